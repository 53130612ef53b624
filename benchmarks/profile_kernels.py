"""One call each of the kernels whose targets are still open, for a hardware-counter profile under Nsight
Compute (no timing here: ``ncu`` replays each launch).

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \\
        -k 'regex:_gemm_q_kernel|_sparse_attn_fwd_sm90|_gemm_o_sm90_kernel' python benchmarks/profile_kernels.py

Cases (bf16, H200 sizes of issue 2 and 3): GEMM-Q M = 33792, K = N = 3072 at head density 0.125; GEMM-O
(dispatch) the same at 0.125; attention N = 4608, H = 24, D = 128 at kv density 0.1 (4 tiles a row). Each
runs twice (the first launch compiles); symbols as in bench_gemm.py / bench_attention.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_attention as BA  # noqa: E402
import bench_gemm as BG  # noqa: E402


def main() -> None:
    dev = "cuda"
    fn_q, _, _ = BG.q_case(33792, 3072, 0.125, None, dev)
    fn_o, _, _, _ = BG.o_case(33792, 0, 0.125, None, dev)
    q, k, v = BA.make_qkv(1, 24, 4608, 128, dev, seed=1)
    _, kv_keep = BA.make_symbols(1, 24, 4608, 0.1, 1.0, dev, seed=2)
    fn_a = BA.ours(q, k, v, None, kv_keep, None, 128 ** -0.5)
    for fn in (fn_q, fn_o, fn_a):
        fn()
        fn()
    torch.cuda.synchronize()
    print("done")


if __name__ == "__main__":
    main()
