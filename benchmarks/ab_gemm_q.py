"""A/B of the Gluon GEMM-Q (``kernels/gemm_q_sm90.py``) with parts of its work removed, M = 33792, K = N = 3072,
bf16, at head densities 1 / 0.5 / 0.25 / 0.125 (``python benchmarks/ab_gemm_q.py``, H200; prints one dict a
density, device ms from CUDA-graph replays, L2 flushed):

    full_call        the launcher: plan + kernel         plan             the plan kernel alone
    kernel           the GEMM kernel on the plan         no_zeros         without its zero items (y not all written)
    zeros_only       only the zero items                 full_items_only  only the full (two-half) items

The counts edited on the device select the work, so the kernel and its plan are the shipped ones. Session
11 (benchmarks/NOTES.md) read the zero fill's cost and the items' cost from it."""
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_gemm as BG
from _common import graph_ms
from flashomni_compile.kernels import gemm_q_sm90 as G
from flashomni_compile.kernels.launch import launch, cdiv

M, K, N, D = 33792, 3072, 3072, 128
x = BG.randn(1, M, K, seed=0); w = BG.randn(N, K, scale=K ** -0.5, seed=1); b = BG.randn(N, seed=2)
y = torch.empty(1, M, N, dtype=torch.bfloat16, device="cuda")
rows = []
for d in (1.0, 0.5, 0.25, 0.125):
    keep = BG.symbols(M, d, 0, "cuda")
    k8 = keep.view(torch.uint8)
    tm = cdiv(M, 128)
    items, counts, cf, cs = G.plan(k8, 1, tm, 0, 128, D, N, N, launch)
    dx = G._descriptor(x, [1, 128, 64]); dw = G._descriptor(w, [128, 64]); dy = G._descriptor(y, [1, 64, 128])
    def run(c):
        return lambda: launch(G._gemm_q_sm90_kernel, (132,), dx, dw, dy, b, k8, items, c, N, K, N, 0, tm, cf, cs,
                              *k8.stride(), HAS_BIAS=True, HEAD_DIM=D, BLOCK_Q=128, STAGES=3, num_warps=4, maxnreg=168)
    nf, ns, nz = counts.tolist()
    c_nozero = torch.tensor([nf, ns, 0], dtype=torch.int32, device="cuda")
    c_zeroonly = torch.tensor([0, 0, nz], dtype=torch.int32, device="cuda")
    c_fullonly = torch.tensor([nf, 0, 0], dtype=torch.int32, device="cuda")
    r = dict(d=d, n_full=nf, n_single=ns, n_zero=nz,
             full_call=graph_ms(lambda: G.gemm_q_sm90(x, w, b, keep, y, D, 0, 128, N, launch)),
             plan=graph_ms(lambda: G.plan(k8, 1, tm, 0, 128, D, N, N, launch)),
             kernel=graph_ms(run(counts)), no_zeros=graph_ms(run(c_nozero)), zeros_only=graph_ms(run(c_zeroonly)),
             full_items_only=graph_ms(run(c_fullonly)))
    rows.append(r)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
