"""Sparse-symbol attention on the GPU against SDPA (cuDNN, flash) and FlexAttention, in one run.

    python benchmarks/bench_attention.py                  # the issue's grid -> benchmarks/results/attention_h100.json
    python benchmarks/bench_attention.py --quick          # N=16384 only, fewer densities
    python benchmarks/bench_attention.py --variants       # kernel launch variants (tuning), no baselines
    python benchmarks/bench_attention.py --graphs         # also graph_ms: device time from CUDA-graph replays

Problem: bf16, B=1, H=24, D=128, q/k/v as ``[B, H, N, D]`` views of ``[B, N, H, D]`` memory (how
diffusers hands them over). Symbols: every row of q-blocks keeps exactly ``round(d * NKB)`` kv-blocks,
its diagonal block among them (random otherwise); with q density 0.5 each head computes half of its
q-blocks (random) and copies the rest from a cache. Blocks are 128 x 128.

Impls: ``flashomni`` (our launcher with precomputed kv lists: the dispatch step; dense cases take its
no-list path), ``flex`` (compiled FlexAttention on ``BlockMask.from_kv_blocks`` of the same lists, all
blocks "full" so no mask_mod runs; cached q-blocks get no kv-block, so flex outputs 0 there, and its
check uses a zero cache), ``sdpa_cudnn`` and ``sdpa_flash`` (dense only).

Every case is checked before it is timed: the full output must be finite (ours: written into a NaN-poisoned
buffer) and sampled rows (2 heads x 4 q-blocks) must match an fp32 reference within 2e-2 relative
error; a failing case is a FAIL row and is not timed. TFLOP/s: ``tflops`` is dense-equivalent
(4 B H N^2 D / time); ``tflops_computed`` counts only the kept blocks' work.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():  # CPU smoke run of this script: our kernel under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
from _common import bench_ms, format_table, graph_ms, header, rel_err, tflops, write_results  # noqa: E402

from flashomni_compile.kernels import attention  # noqa: E402
from flashomni_compile.kernels.attention import KernelConfig, sparse_attention_triton  # noqa: E402
from flashomni_compile.symbols import dense_equivalent_flops, kv_block_lists, num_blocks  # noqa: E402

BLOCK = 128
TOL = 2e-2  # bf16 operands (conftest.REL_TOL[bfloat16])
GRAPHS = False  # --graphs: also time every impl from CUDA-graph replays (graph_ms: device time, no host)

# Launch variants compared by --variants (name -> config; None = the launch table's choice).
VARIANTS = {
    "table": None,
    "128x128_w8_s3_l3": KernelConfig(128, 128, 8, 3, list_stages=3),  # list loop at 3 stages (run 1)
    "128x64_w8_s3": KernelConfig(128, 64, 8, 3),
    "64x64_w4_s2": KernelConfig(64, 64, 4, 2),
    "64x64_w4_s3": KernelConfig(64, 64, 4, 3),
    "64x64_w4_s4": KernelConfig(64, 64, 4, 4),
    "64x32_w4_s3": KernelConfig(64, 32, 4, 3),
    "128x32_w4_s3": KernelConfig(128, 32, 4, 3),
    "64x128_w4_s2": KernelConfig(64, 128, 4, 2),
    "tma_128x128_w8_s3": KernelConfig(128, 128, 8, 3, tma=True),
    "tma_64x64_w4_s3": KernelConfig(64, 64, 4, 3, tma=True),
    # Hopper Gluon kernel (attention_sm90.py; the table takes it for N >= 2048 at D=64 and 128), K ring of 2 / 3 / 4;
    # triton_128x128_w8_s3 is the Triton kernel the table takes otherwise at D=128
    "triton_128x128_w8_s3": KernelConfig(128, 128, 8, 3),
    "gluon": KernelConfig(128, 128, 8, 3, gluon=True),
    "gluon_k3": KernelConfig(128, 128, 8, 3, gluon=True, k_stages=3),
    "gluon_k4": KernelConfig(128, 128, 8, 3, gluon=True, k_stages=4),
    # one consumer warpgroup a CTA, 64 rows, two CTAs an SM (the table's for short calls: attention.gluon_launch);
    # two K buffers fit beside two V buffers at D=64 only
    "gluon_c1": KernelConfig(128, 128, 8, 3, gluon=True, k_stages=1, consumers=1),
    "gluon_c1_k2": KernelConfig(128, 128, 8, 3, gluon=True, k_stages=2, consumers=1),
}


# ---------------------------------------------------------------------------------------------------
# problem set-up
# ---------------------------------------------------------------------------------------------------
def make_qkv(B, H, N, D, device, seed):
    g = torch.Generator(device).manual_seed(seed)
    return tuple(torch.randn(B, N, H, D, generator=g, device=device, dtype=torch.bfloat16).transpose(1, 2)
                 for _ in range(3))


def make_symbols(B, H, N, kv_density, q_density, device, seed):
    """Exact per-row densities: ``round(d * NKB)`` kept kv-blocks (diagonal included) per q-block row,
    ``round(q_density * NQB)`` computed q-blocks per head."""
    g = torch.Generator(device).manual_seed(seed)
    nb = num_blocks(N, BLOCK)
    n_keep = max(1, round(kv_density * nb))
    score = torch.rand(B, H, nb, nb, generator=g, device=device)
    score.diagonal(dim1=-2, dim2=-1).fill_(2.0)  # the diagonal always ranks first
    kv_keep = torch.zeros(B, H, nb, nb, dtype=torch.bool, device=device)
    kv_keep.scatter_(-1, score.topk(n_keep, dim=-1).indices, True)
    n_q = max(1, round(q_density * nb))
    q_keep = torch.zeros(B, H, nb, dtype=torch.bool, device=device)
    q_keep.scatter_(-1, torch.rand(B, H, nb, generator=g, device=device).topk(n_q, dim=-1).indices, True)
    return q_keep, kv_keep


def computed_fraction(q_keep, kv_keep, N):
    """Fraction of the dense (query, key) pairs the kept blocks hold (partial blocks by their tokens)."""
    nb = num_blocks(N, BLOCK)
    w = torch.full((nb,), float(BLOCK), device=kv_keep.device)
    w[-1] = N - BLOCK * (nb - 1)
    live = kv_keep.float() * q_keep.float().unsqueeze(-1)
    return float((live * w[:, None] * w[None, :]).sum() / (N * N * kv_keep.shape[0] * kv_keep.shape[1]))


def sampled_reference(q, k, v, q_keep, kv_keep, cache, scale, heads, qblocks):
    """fp32 reference for the rows of ``qblocks`` of ``heads``: ``{(h, qb): [rows, D]}``."""
    N = q.shape[2]
    ref = {}
    for h in heads:
        kh, vh = k[0, h].float(), v[0, h].float()
        for qb in qblocks:
            rows = slice(qb * BLOCK, min(N, (qb + 1) * BLOCK))
            if q_keep is not None and not bool(q_keep[0, h, qb]):
                ref[(h, qb)] = cache[0, h, rows].float()
                continue
            s = (q[0, h, rows].float() @ kh.T) * scale
            if kv_keep is not None:
                keys = kv_keep[0, h, qb].repeat_interleave(BLOCK)[:N]
                s = s.masked_fill(~keys, float("-inf"))
            ref[(h, qb)] = torch.softmax(s, dim=-1) @ vh
    return ref


def check(out, ref):
    """Max relative error over the sampled (head, q-block) rows; inf if any output is not finite."""
    if not torch.isfinite(out).all():
        return float("inf")
    return max(rel_err(out[0, h, qb * BLOCK:qb * BLOCK + r.shape[0]], r) for (h, qb), r in ref.items())


# ---------------------------------------------------------------------------------------------------
# implementations: each returns a zero-argument callable producing the output
# ---------------------------------------------------------------------------------------------------
def ours(q, k, v, q_keep, kv_keep, cache, scale, config=None, dense_lists=False):
    if kv_keep is None and dense_lists:
        nb = num_blocks(q.shape[2], BLOCK)
        kv_keep = torch.ones(q.shape[0], q.shape[1], nb, nb, dtype=torch.bool, device=q.device)
    cnt, idx = kv_block_lists(kv_keep) if kv_keep is not None else (None, None)  # plan step: not timed
    return lambda: sparse_attention_triton(q, k, v, q_keep, cnt, idx, cache, None, scale, BLOCK, BLOCK,
                                           config=config)[0]


def sdpa(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v)
    return run


_FLEX = {}


def flex(q, k, v, q_keep, kv_keep, scale):
    """Compiled FlexAttention on the same kv lists; cached q-blocks get no kv-block (output 0).

    Every kept block is a "full" block, so the compiled kernel never calls ``mask_mod`` (flex's fastest
    path for a pure block mask); ``mask_mod`` restates the block mask for flex's eager (CPU) path.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    B, H, N, _ = q.shape
    nb = num_blocks(N, BLOCK)
    keep = kv_keep if kv_keep is not None else torch.ones(B, H, nb, nb, dtype=torch.bool, device=q.device)
    if q_keep is not None:
        keep = keep & q_keep.unsqueeze(-1)
    cnt, idx = kv_block_lists(keep)

    def block_mask_mod(b, h, q_idx, kv_idx):
        return keep[b, h, q_idx // BLOCK, kv_idx // BLOCK]

    bm = BlockMask.from_kv_blocks(torch.zeros_like(cnt), idx, cnt, idx, BLOCK_SIZE=BLOCK,
                                  mask_mod=block_mask_mod, seq_lengths=(N, N))
    return lambda: _FLEX["fn"](q, k, v, block_mask=bm, scale=scale)


def poisoned_first_call(fn):
    """Run ``fn`` once with ``attention.empty_output`` NaN-filling its buffers (ours only)."""
    real = attention.empty_output

    def poisoned(q, v):
        out, lse = real(q, v)
        return out.fill_(float("nan")), lse.fill_(float("nan"))

    attention.empty_output = poisoned
    try:
        return fn()
    finally:
        attention.empty_output = real


# ---------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------
def run_case(impl, make_fn, N, kv_density, q_density, frac, ref, flops_dense, poison=False):
    rec = dict(impl=impl, N=N, kv_density=kv_density, q_density=q_density, computed_fraction=round(frac, 4),
               flops_dense=flops_dense)
    try:
        fn = make_fn()
        out = poisoned_first_call(fn) if poison else fn()
        err = check(out, ref)
    except Exception as e:  # a variant that does not compile/launch is reported, not fatal
        rec.update(status=f"ERROR {type(e).__name__}: {str(e)[:120]}", ms=None, tflops=None)
        return rec
    rec["rel_err"] = err
    if not err < TOL:
        rec.update(status="FAIL", ms=None, tflops=None, tflops_computed=None)
        return rec
    if not torch.cuda.is_available():  # smoke run: checked, not timed
        rec.update(status="ok (untimed)", ms=None, tflops=None)
        return rec
    ms = bench_ms(fn)
    rec.update(status="ok", ms=ms, tflops=tflops(flops_dense, ms), tflops_computed=tflops(flops_dense * frac, ms))
    if GRAPHS:
        try:
            rec["graph_ms"] = graph_ms(fn)
        except Exception as e:  # an impl that cannot be captured keeps its eager time
            rec["graph_ms"], rec["graph_status"] = None, f"ERROR {type(e).__name__}: {str(e)[:120]}"
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=16384, kv density {1, 0.25}, q density {1, 0.5}")
    ap.add_argument("--variants", action="store_true", help="compare kernel launch variants (ours only)")
    ap.add_argument("--n", type=str, default=None, help="comma-separated sequence lengths")
    ap.add_argument("--only", type=str, default=None, help="with --variants: comma-separated variant names")
    ap.add_argument("--kv", type=str, default=None, help="comma-separated kv densities (default: the grid's)")
    ap.add_argument("--graphs", action="store_true", help="also record graph_ms: device time from CUDA-graph "
                    "replays, L2 flushed (what step graphs run; eager ms includes the launchers' host time)")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", type=str, default=None, help="JSON path (default: results/attention_h100.json, "
                    "or attention_variants.json with --variants)")
    args = ap.parse_args(argv)
    global GRAPHS
    GRAPHS = args.graphs and torch.cuda.is_available()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, H, D = 1, args.heads, args.head_dim
    Ns = [int(n) for n in args.n.split(",")] if args.n else ([16384] if args.quick else [4608, 16384, 33792])
    kv_ds = [1.0, 0.25] if args.quick or args.variants else [1.0, 0.5, 0.25, 0.1]
    if args.kv:
        kv_ds = [float(d) for d in args.kv.split(",")]
    q_ds = [1.0, 0.5]
    scale = 1.0 / math.sqrt(D)
    records = []
    for N in Ns:
        q, k, v = make_qkv(B, H, N, D, device, seed=N)
        cache = torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16)
        flops_dense = dense_equivalent_flops(B, H, N, N, D)
        nb = num_blocks(N, BLOCK)
        qblocks = sorted({0, nb - 1, nb // 3, (2 * nb) // 3})
        heads = [0, H - 1]
        for kv_d in kv_ds:
            for q_d in q_ds:
                if args.variants and kv_d != 1.0 and q_d != 1.0:
                    continue  # tuning needs the dense, sparse-kv and sparse-q cases only
                dense = kv_d == 1.0 and q_d == 1.0
                q_keep, kv_keep = make_symbols(B, H, N, kv_d, q_d, device, seed=N + int(kv_d * 100) + int(q_d * 10))
                if kv_d == 1.0:
                    kv_keep_arg = None  # dense: the kernel's no-list path
                else:
                    kv_keep_arg = kv_keep
                q_keep_arg = None if q_d == 1.0 else q_keep
                frac = computed_fraction(q_keep, kv_keep, N)
                ref = sampled_reference(q, k, v, q_keep_arg, kv_keep_arg, cache, scale, heads, qblocks)
                case = (N, kv_d, q_d, frac, ref, flops_dense)
                if args.variants:
                    for name, cfg in VARIANTS.items():
                        if args.only and name not in args.only.split(","):
                            continue
                        records.append(run_case(f"flashomni[{name}]", lambda: ours(
                            q, k, v, q_keep_arg, kv_keep_arg, cache, scale, config=cfg), *case, poison=True))
                    if dense and device == "cuda":
                        records.append(run_case("sdpa_cudnn", lambda: sdpa(q, k, v, "cudnn"), *case))
                    if kv_d == 1.0:
                        records.append(run_case("flashomni[table,dense_lists]", lambda: ours(
                            q, k, v, q_keep_arg, None, cache, scale, dense_lists=True), *case, poison=True))
                    continue
                records.append(run_case("flashomni", lambda: ours(q, k, v, q_keep_arg, kv_keep_arg, cache, scale),
                                        *case, poison=True))
                records[-1]["config"] = str(attention.launch_config(q.device, D))
                ref0 = ref if q_keep_arg is None else sampled_reference(
                    q, k, v, q_keep_arg, kv_keep_arg, torch.zeros_like(cache), scale, heads, qblocks)
                records.append(run_case("flex", lambda: flex(q, k, v, q_keep_arg, kv_keep_arg, scale),
                                        N, kv_d, q_d, frac, ref0, flops_dense))
                if dense and device == "cuda":
                    for be in ("cudnn", "flash"):
                        records.append(run_case(f"sdpa_{be}", lambda: sdpa(q, k, v, be), *case))
                print(f"done N={N} kv_density={kv_d} q_density={q_d}", flush=True)
        del q, k, v, cache

    head = header()
    head["problem"] = dict(B=B, H=H, D=D, dtype="bfloat16", block=BLOCK, layout="[B,N,H,D] memory, [B,H,N,D] view")
    out = args.out or ("benchmarks/results/attention_variants.json" if args.variants
                       else "benchmarks/results/attention_h100.json")
    paths = write_results(out, head, records)
    print(f"wrote {', '.join(map(str, paths))}")
    print(summary(records, variants=args.variants))
    if GRAPHS:
        print("\nthe same from CUDA-graph replays (graph_ms):")
        print(summary(records, variants=args.variants, key="graph_ms"))


def summary(records, variants=False, key="ms"):
    """The short table: per case, ``key`` (eager ``ms`` or ``graph_ms``) per impl, our ratios and the targets."""
    if variants:
        cols = ["impl", "N", "kv_density", "q_density", key, "tflops", "tflops_computed", "status"]
        return format_table(records, cols)
    by = {(r["impl"], r["N"], r["kv_density"], r["q_density"]): r for r in records}
    rows = []
    for (impl, N, kv_d, q_d), r in by.items():
        if impl != "flashomni":
            continue
        def ms(name, kd=kv_d, qd=q_d):
            x = by.get((name, N, kd, qd))
            return x[key] if x and x.get(key) else None
        ours_ms, dense_ms, q_dense_ms = ms("flashomni"), ms("flashomni", 1.0, 1.0), ms("flashomni", kv_d, 1.0)
        row = dict(N=N, kv_d=kv_d, q_d=q_d, frac=r["computed_fraction"], ours_ms=ours_ms,
                   tflops=tflops(r["flops_dense"], ours_ms) if ours_ms else None, flex_ms=ms("flex"),
                   status=r["status"])
        if ours_ms:
            if ms("flex"):
                row["vs_flex"] = ms("flex") / ours_ms
            if kv_d == 1.0 and q_d == 1.0:
                for be in ("cudnn", "flash"):
                    if ms(f"sdpa_{be}"):
                        row[f"vs_{be}"] = ms(f"sdpa_{be}") / ours_ms
            elif dense_ms:
                # sparse target: time <= dense * fraction / 0.85 (fraction = work actually kept)
                row["vs_target"] = ours_ms / (dense_ms * r["computed_fraction"] / 0.85)
            if q_d != 1.0 and q_dense_ms:
                row["q_ratio"] = ours_ms / q_dense_ms  # target <= 0.55 at q density 0.5
        rows.append(row)
    cols = ["N", "kv_d", "q_d", "frac", "ours_ms", "tflops", "flex_ms", "vs_flex", "vs_cudnn", "vs_flash",
            "vs_target", "q_ratio", "status"]
    return ("vs_X = X_ms / ours_ms (>1: ours faster); vs_target = ours / (our dense * frac / 0.85) (<= 1 meets "
            "the sparse target); q_ratio = ours / ours at q density 1 (target <= 0.55)\n" + format_table(rows, cols))


if __name__ == "__main__":
    main()
