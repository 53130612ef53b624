"""Where the Gluon GEMM-O's low-density time goes (issue 3's 0.9-of-roofline target): M = 33792, K = N = 3072,
bf16, head densities 1 / 0.5 / 0.25 / 0.125 / 0 (``python benchmarks/ab_gemm_o.py [--out F]``, H200; prints
one dict a density, device ms from CUDA-graph replays, L2 flushed):

    dispatch     sparse_linear_o through the launch table: y = C + the kept heads' a W^T
    same_heads   out_proj_cache over the same heads (q_keep inverted): the same reductions, no C read
    copy         torch's y.copy_(C): the bytes of the dispatch call without its reductions
    floor        the dispatch call's bytes (C + y + kept A + W, MB) at the copy rate of this run

``dispatch - same_heads`` is what reading C costs beside the reductions, and ``dispatch`` at d = 0 against
``copy`` is how well the kernel streams C into y when there is nothing to reduce. Session 10 measured the
dispatch call at 0.206 ms at d = 0.125 (2.1 TB/s against the 4.2 TB/s copy rate) with no breakdown."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_gemm as BG  # noqa: E402
from _common import graph_ms, header, write_results  # noqa: E402

from flashomni_compile.kernels import gemm_o  # noqa: E402

M, K, N, D, BQ = 33792, 3072, 3072, 128, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args()
    a = BG.randn(1, M, K, seed=0)
    w = BG.randn(N, K, scale=K ** -0.5, seed=1)
    b = BG.randn(N, seed=2)
    y = torch.empty(1, M, N, dtype=torch.bfloat16, device="cuda")
    c = BG.randn(1, M, N, seed=3)
    copy_ms = graph_ms(lambda: y.copy_(c))
    rate = 2 * c.numel() * c.element_size() / (copy_ms * 1e-3)
    rows = []
    for d in (1.0, 0.5, 0.25, 0.125, 0.0):
        keep = BG.symbols(M, d, 0, "cuda")
        kept_a = d * a.numel() * a.element_size()
        nbytes = 2 * c.numel() * c.element_size() + kept_a + (w.numel() * w.element_size() if d else 0)
        r = dict(d=d,
                 dispatch=graph_ms(lambda: gemm_o.sparse_linear_o_triton(a, w, c, keep, None, None, D, 0, BQ, out=y)),
                 same_heads=graph_ms(lambda: gemm_o.out_proj_cache_triton(a, w, b, ~keep, D, 0, BQ, out=y)),
                 copy=copy_ms, floor=nbytes / rate * 1e3, mbytes=nbytes / 1e6)
        rows.append(r)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    print(f"copy rate {rate / 1e12:.2f} TB/s")
    if args.out:
        write_results(args.out, {**header(), "copy_tb_s": rate / 1e12}, rows)


if __name__ == "__main__":
    main()
