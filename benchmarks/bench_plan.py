"""The update step's planning (``kernels/plan.py``) against its torch twins, per layer, on the GPU.

    python benchmarks/bench_plan.py [--out F]

For each site shape (Flux 1024^2, SD3.5 Large 1024^2, HunyuanVideo 33K; bf16, blocks 128, batch 1 and 2),
times from CUDA-graph replays (L2 flushed; ``_common.graph_ms``) each piece the runtime runs between an
update's attention and its cache refresh, once through the torch twin (what the runtime ran before) and
once through the kernel:

    kv_select       the pooled-QK kv-block selection (tau 0.05, text and diagonal kept)
    q_select        the q-block caching decision (fraction 0.9 of the image pairs, text guidance,
                    layer granularity 0.2)
    store_plan      the symbols into the persistent tensors, the kv-block lists, kv_need, densities
    all             the three in sequence after ``policies.pooled_scores`` (torch in both: the
                    runtime's pooling; a Triton version of it lost to torch, benchmarks/NOTES.md)

Graph replays leave out the host, so the ratios are the device's; in an eager step each twin launch also
costs its host launch (the ~45 launches a layer the kernels remove). Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import format_table, graph_ms, header, write_results  # noqa: E402

from flashomni_compile.kernels import plan  # noqa: E402
from flashomni_compile.runtime.policies import pooled_scores  # noqa: E402
from flashomni_compile.symbols import num_blocks  # noqa: E402

# name -> (heads, tokens, head dim, text tokens)
SHAPES = {"flux": (24, 4608, 128, 512), "sd3": (38, 4429, 64, 333), "hunyuan_video": (24, 33792, 128, 256)}
BLOCK = 128


def pieces(impl: str, B: int, H: int, N: int, D: int, text: int):
    """The four pieces' calls on fixed inputs (the twin's or the kernel's), and the whole sequence."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, N, H, D, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(B, N, H, D, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    nb = num_blocks(N, BLOCK)
    change = torch.rand(B, H, nb, generator=g, device="cuda")
    tq = tk = plan.text_block_range(N, text, True, BLOCK)
    n_img = nb - (tq[1] - tq[0])
    k_cache = int(0.9 * n_img * H)
    bufs = (torch.empty(B, H, nb, dtype=torch.bool, device="cuda"),
            torch.empty(B, H, nb, nb, dtype=torch.bool, device="cuda"),
            torch.empty(B, H, nb, dtype=torch.int32, device="cuda"),
            torch.empty(B, H, nb, nb, dtype=torch.int32, device="cuda"),
            torch.empty(B, H, nb, dtype=torch.bool, device="cuda"))
    twin = impl == "twin"
    pool = pooled_scores                     # torch in both (the runtime's; a Triton version lost, NOTES)
    kv_sel = plan.kv_select_ref if twin else plan.kv_select_triton
    q_sel = plan.q_select_ref if twin else plan.q_select_triton
    store = plan.store_plan_ref if twin else plan.store_plan_triton
    _, _, scores = pool(q, k, None, D ** -0.5, BLOCK, BLOCK)
    kv_keep = kv_sel(scores, 0.05, tq, tk, True, BLOCK, BLOCK)
    q_keep = q_sel(change, scores, k_cache, None, 1.0, tq, tk, True, 0.2)

    def whole():
        _, _, s = pool(q, k, None, D ** -0.5, BLOCK, BLOCK)
        kv = kv_sel(s, 0.05, tq, tk, True, BLOCK, BLOCK)
        qk = q_sel(change, s, k_cache, None, 1.0, tq, tk, True, 0.2)
        store(qk, kv, *bufs, N, N, BLOCK, BLOCK, True)

    return {"kv_select": lambda: kv_sel(scores, 0.05, tq, tk, True, BLOCK, BLOCK),
            "q_select": lambda: q_sel(change, scores, k_cache, None, 1.0, tq, tk, True, 0.2),
            "store_plan": lambda: store(q_keep, kv_keep, *bufs, N, N, BLOCK, BLOCK, True),
            "all": whole}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/plan_h200.json")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    records = []
    for name in args.shapes.split(","):
        H, N, D, text = SHAPES[name]
        for B in (1, 2):
            ms = {impl: {p: graph_ms(fn) for p, fn in pieces(impl, B, H, N, D, text).items()}
                  for impl in ("twin", "kernel")}
            for p in ms["twin"]:
                records.append({"model": name, "B": B, "H": H, "N": N, "D": D, "piece": p,
                                "twin_ms": ms["twin"][p], "kernel_ms": ms["kernel"][p],
                                "speedup": ms["twin"][p] / ms["kernel"][p]})
            write_results(args.out, header(), records)
    print(format_table(records, ["model", "B", "N", "piece", "twin_ms", "kernel_ms", "speedup"]))


if __name__ == "__main__":
    main()
