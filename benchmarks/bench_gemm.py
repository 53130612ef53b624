"""GEMM-Q and GEMM-O on the GPU against cuBLAS (``F.linear``), in one run.

    python benchmarks/bench_gemm.py               # the issue's grid -> benchmarks/results/gemm_h100.json
    python benchmarks/bench_gemm.py --sweep       # also times the launch candidates, then the grid with the best
    python benchmarks/bench_gemm.py --selfcheck   # only the small-case correctness checks (odd shapes, dtypes)
    python benchmarks/bench_gemm.py --sweep --kernels o   # only the GEMM-O dispatch candidates (Triton and Gluon)
    python benchmarks/bench_gemm.py --compile-check   # no GPU needed: sm_90 registers/spills/shared of the candidates

Problem (issue 3): bf16, B=1, H=24 heads of D=128, symbol blocks of 128 rows.
``gemm_q``: ``x [M, 3072] @ W^T + b`` with N = 3072 (Q alone) or 9216 (fused QKV, only the first 3072
columns sparse). ``gemm_o`` (dispatch step): ``y = c + sum over kept heads a_h W_h^T`` with K = 3072, and
the Flux single-stream projection, K = 3072 head-sparse attention + 12288 dense MLP (``extra``), N = 3072.
``gemm_o_cache`` (update step): ``c = b + sum over cached heads a_h W_h^T``. Baselines: ``F.linear`` on the
same operands (single-stream: on the already concatenated ``[attn, mlp]``), timed in the same run.

Symbols at density d: exactly round(d * H * NQB) (head, q-block) pairs are kept, chosen at random.
FLOPs: dense ``2 M N K``; computed: GEMM-Q ``2 M K (d Nq + Nkv)``, GEMM-O ``2 M N (d K + KE)``, the cache
``2 M N (1 - d) K``. TFLOP/s are reported both ways.

Roofline (per impl): ``t_roof = max(bytes / BW, computed FLOPs / P)`` with BW the device-to-device copy
bandwidth (bytes read + written), measured at the start of the run, and P the best bf16 rate seen in
the run: the cuBLAS 8192^3 product or any cuBLAS baseline, whichever is faster (on the H100 the
33792 x 3072 x 3072 product ran at 767 TFLOP/s, the 8192^3 one at 689). Bytes for GEMM-O: C read + Y write (2 M N x 2 B) + the kept heads' A and W slices (d M K + d N K,
x 2 B) + the extra range (M KE + N KE, x 2 B). GEMM-Q: x + W reads, and all of y written (skipped tiles
are zeros). ``roof_frac = t_roof / t`` (1.0 = at the roofline); the GEMM-O target is
``speedup >= 0.9 x roofline speedup``, i.e. ``roof_frac >= 0.9``.

Times are device times from CUDA-graph replays with L2 flushed before every call (``graph_ms``); the
host cost of one call (Python launcher + launch) is reported apart as ``host_us`` at M = 4608.

Every case is verified before it is timed (full output against an fp32 reference, rel. error < 2e-2,
and the GEMM-O identity ``sparse_linear_o(out_proj_cache(.)) = a W^T + b``); a failing case is FAIL.
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
if not torch.cuda.is_available() and "--compile-check" not in sys.argv:   # CPU smoke run: the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
from _common import bench_ms, format_table, graph_ms, header, host_us, rel_err, tflops, write_results  # noqa: E402

from flashomni_compile.kernels import gemm_o, gemm_q  # noqa: E402
from flashomni_compile.kernels.gemm_q import Config  # noqa: E402

H, D, BQ = (24 if torch.cuda.is_available() else 2), 128, 128   # CPU smoke run: 2 heads
K = H * D   # model width: 3072 on the GPU
TOL = 2e-2  # bf16 operands (conftest.REL_TOL[bfloat16])

# Launch candidates for --sweep (name -> Config); None = the launch table's choice. Chosen from the
# sm_90 compile report (NOTES.md): configs that spill registers are left out.
Q_VARIANTS = {
    "tma_128x128x64_w4_s4": Config(128, 128, 64, 8, 4, 4, True),
    "tma_128x128x64_w8_s4": Config(128, 128, 64, 8, 8, 4, True),
    "tma_128x256x64_w8_s3_split": Config(128, 256, 64, 8, 8, 3, True, split_n=True),
    "tma_128x256x64_w8_s4_split": Config(128, 256, 64, 8, 8, 4, True, split_n=True),
    # the persistent Gluon kernel (gemm_q_sm90.py: 128 x 256 units dealt by kind, 3-stage ring); the
    # Triton fields are for the calls it declines
    "gluon_128x256_s3": Config(128, 256, 64, 8, 8, 4, True, split_n=True, gluon=(128, 256, 3)),
}
O_VARIANTS = {   # also the candidates for "c" (out_proj_cache)
    "tma_128x128x64_w8_s4": Config(128, 128, 64, 8, 8, 4, True),
    "tma_64x128x64_w4_s3": Config(64, 128, 64, 8, 4, 3, True),
    "tma_64x128x64_w4_s4": Config(64, 128, 64, 8, 4, 4, True),
    "tma_64x256x64_w8_s3": Config(64, 256, 64, 8, 8, 3, True),
    "tma_64x128x128_w4_s3": Config(64, 128, 128, 8, 4, 3, True),
    # the warp-specialised Gluon kernel (gemm_o_sm90.py, ping-pong consumers): `gluon` = its consumer
    # tile and A/W ring depth; the other fields are the Triton kernel's, for the calls it declines
    "gluon_s4": Config(128, 128, 64, 8, 8, 4, True, gluon=(128, 128, 4)),
    "gluon_s5": Config(128, 128, 64, 8, 8, 4, True, gluon=(128, 128, 5)),
    "gluon_64x256_s4": Config(128, 128, 64, 8, 8, 4, True, gluon=(64, 256, 4)),   # the table's until session 10
    "gluon_coop_128x256_s3": Config(128, 128, 64, 8, 8, 4, True, gluon=(128, 256, 3)),   # cooperative: the table's
}
PTR = Config(128, 128, 64, 8, 8, 3, False)   # the portable path, self-checked


def symbols(m: int, density: float, seed: int, device) -> torch.Tensor:
    """``q_keep [1, H, NQB]`` with exactly round(density * H * NQB) kept pairs, at random."""
    nqb = -(-m // BQ)
    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(H * nqb, dtype=torch.bool)
    flat[torch.randperm(H * nqb, generator=g)[: round(density * H * nqb)]] = True
    return flat.view(1, H, nqb).to(device)


def randn(*shape, scale=1.0, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=device) * scale).to(torch.bfloat16)


class Ceilings:
    """Copy bandwidth (bytes/s) and cuBLAS bf16 rate (FLOP/s), measured once per run."""

    def __init__(self, device):
        if device == "cpu":
            self.bw, self.peak = 1e11, 1e12
            return
        src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        self.bw = 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)
        a = randn(8192, 8192, device=device, seed=1)
        b = randn(8192, 8192, device=device, seed=2)
        self.peak = 2 * 8192 ** 3 / (bench_ms(lambda: a @ b) * 1e-3)
        del src, dst, a, b



# ---------------------------------------------------------------------------------------------------
# Cases: each returns (fn, check) where check() -> rel. error of fn's output (verified before timing)
# ---------------------------------------------------------------------------------------------------
def q_case(M, N, d, cfg, device, seed=0):
    x = randn(1, M, K, device=device, seed=seed)
    w = randn(N, K, scale=K ** -0.5, device=device, seed=seed + 1)
    b = randn(N, device=device, seed=seed + 2)
    keep = symbols(M, d, seed, device)
    fn = lambda: gemm_q.sparse_linear_q_triton(x, w, b, keep, D, 0, BQ, H * D, config=cfg)  # noqa: E731

    def check():
        out = torch.full((1, M, N), float("nan"), dtype=x.dtype, device=device)
        gemm_q.sparse_linear_q_triton(x, w, b, keep, D, 0, BQ, H * D, config=cfg, out=out)
        ref = gemm_q.sparse_linear_q_ref(x.float(), w.float(), b.float(), keep, D, 0, BQ, H * D)
        skipped = ~gemm_q.row_keep(keep, M, 0, BQ).repeat_interleave(D, dim=-1)
        if not (out[..., : H * D][skipped] == 0).all():
            return float("inf")
        return rel_err(out, ref)
    return fn, check, (x, w, b)


def o_case(M, ke, d, cfg, device, seed=0):
    """GEMM-O dispatch and cache launches over one set of operands (ke > 0: single-stream extra range)."""
    N = K
    a = randn(1, M, K, device=device, seed=seed)
    w_full = randn(N, K + ke, scale=(K + ke) ** -0.5, device=device, seed=seed + 1)
    w, ew = w_full[:, :K], (w_full[:, K:] if ke else None)          # column slices of one weight
    e = randn(1, M, ke, device=device, seed=seed + 3) if ke else None
    b = randn(N, device=device, seed=seed + 2)
    keep = symbols(M, d, seed, device)
    c = gemm_o.out_proj_cache_ref(a, w, b, keep, D, 0, BQ)          # the dispatch step's input, bf16
    fn_o = lambda: gemm_o.sparse_linear_o_triton(a, w, c, keep, e, ew, D, 0, BQ, config=cfg)  # noqa: E731
    fn_c = lambda: gemm_o.out_proj_cache_triton(a, w, b, keep, D, 0, BQ, config=cfg)  # noqa: E731

    def check():
        out_c = torch.full((1, M, N), float("nan"), dtype=a.dtype, device=device)
        gemm_o.out_proj_cache_triton(a, w, b, keep, D, 0, BQ, config=cfg, out=out_c)
        err_c = rel_err(out_c, gemm_o.out_proj_cache_ref(a.float(), w.float(), b.float(), keep, D, 0, BQ))
        out = torch.full((1, M, N), float("nan"), dtype=a.dtype, device=device)
        gemm_o.sparse_linear_o_triton(a, w, out_c, keep, e, ew, D, 0, BQ, config=cfg, out=out)
        dense = a.float() @ w.float().T + b.float() + (e.float() @ ew.float().T if ke else 0)
        return max(err_c, rel_err(out, dense))
    x_cat = torch.cat([a, e], dim=-1) if ke else a
    return fn_o, fn_c, check, (x_cat, w_full, b)


# ---------------------------------------------------------------------------------------------------
# Self-check: small odd cases on the device (head dims 64/72, fp16/fp32, offsets, batch, fused, extra)
# ---------------------------------------------------------------------------------------------------
def selfcheck(device) -> list[str]:
    fails = []
    tol = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 2e-3}
    g = torch.Generator(device=device).manual_seed(7)
    ptr = PTR
    cases = [(dt, hd, *((200, 77) if i % 2 else (333, 0)), None)
             for i, (dt, hd) in enumerate((dt, hd) for dt in (torch.bfloat16, torch.float16, torch.float32) for hd in (64, 72, 128))]
    cases += [(torch.bfloat16, 128, 200, 77, ptr), (torch.float32, 64, 333, 0, ptr)]
    for dt, hd, m, off, cfg in cases:
        nh, bsz, k, n, ke = 3, 2, 96, 160, 80
        nqb = -(-(off + m) // 64) + 1
        keep = torch.rand(bsz, nh, nqb, generator=g, device=device) < 0.5
        r = lambda *s: torch.randn(*s, generator=g, device=device).to(dt)  # noqa: E731
        x, wq, bq = r(bsz, m, k), r(3 * nh * hd, k), r(3 * nh * hd)
        a, wo, bo, e, ew = r(bsz, m, nh * hd), r(n, nh * hd), r(n), r(bsz, m, ke), r(n, ke)
        y = gemm_q.sparse_linear_q_triton(x, wq, bq, keep, hd, off, 64, nh * hd, config=cfg)
        err_q = rel_err(y, gemm_q.sparse_linear_q_ref(x.double(), wq.double(), bq.double(), keep, hd, off, 64, nh * hd))
        c = gemm_o.out_proj_cache_triton(a, wo, bo, keep, hd, off, 64, config=cfg)
        yo = gemm_o.sparse_linear_o_triton(a, wo, c, keep, e, ew, hd, off, 64, config=cfg)
        want = a.double() @ wo.double().T + bo.double() + e.double() @ ew.double().T
        err_o = rel_err(yo, want)
        if not (err_q < tol[dt] and err_o < tol[dt]):
            name = "table" if cfg is None else "ptr"
            fails.append(f"{dt} D={hd} M={m} off={off} cfg={name}: q {err_q:.2e} o {err_o:.2e}")
    print(f"selfcheck: {len(cases) - len(fails)}/{len(cases)} ok" + "".join("\n  FAIL " + f for f in fails), flush=True)
    return fails


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------
def timed(fn, check, name, **meta):
    """Verify, then time; returns a record (ms None + status FAIL when the check fails or raises)."""
    try:
        err = check()
    except Exception as ex:  # noqa: BLE001 -- a crashing variant is a FAIL row, the run goes on
        return dict(meta, impl=name, ms=None, status=f"FAIL {type(ex).__name__}: {str(ex)[:120]}")
    if not err < TOL:
        return dict(meta, impl=name, ms=None, err=err, status="FAIL")
    r = dict(meta, impl=name, ms=TIME(fn), err=err, status="ok")
    if torch.cuda.is_available() and meta.get("M") == 4608:
        r["host_us"] = host_us(fn)
    return r


def _cpu_ms(fn) -> float:
    """CPU smoke run: one call's wall time (the numbers mean nothing; the script's logic is what runs)."""
    import time
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


TIME = graph_ms if torch.cuda.is_available() else _cpu_ms


def sweep(device, ms, densities, kernels=("q", "o", "c"), only=()):
    """Time every candidate; return the Config of least total time over the cases, per kernel.

    Total time, not a geometric mean: the geometric mean let the empty reduction of ``out_proj_cache``
    at d = 1 (0.015 vs 0.031 ms) pick 64-row tiles that are 27-37% slower on every case with work."""
    rows, best = [], {}
    candidates = {"q": Q_VARIANTS, "o": O_VARIANTS, "c": O_VARIANTS}
    for kernel in kernels:
        variants = candidates[kernel]
        score = {}
        for vname, cfg in variants.items():
            if cfg is None or (only and vname not in only):   # None: the table's entry is a named candidate
                continue
            times = []
            for M in ms:
                for d in densities:
                    shapes = {"q": ((K, 0), (3 * K, 0)), "o": ((K, 0), (K, 4 * K)), "c": ((K, 0),)}[kernel]
                    for N, ke in shapes:
                        if kernel == "q":
                            fn, check, _ = q_case(M, N, d, cfg, device)
                        else:
                            fn_o, fn_c, check, _ = o_case(M, ke, d, cfg, device)
                            fn = fn_o if kernel == "o" else fn_c
                        r = timed(fn, check, f"sweep_{kernel}", M=M, N=N, K=K + ke, density=d, variant=vname)
                        rows.append(r)
                        times.append(r["ms"] if r["ms"] else math.inf)
            score[vname] = sum(times)
            print(f"sweep {kernel} {vname:28s} total ms {score[vname]:.4f}", flush=True)
        name = min(score, key=score.get)
        best[kernel] = variants[name]
        print(f"sweep {kernel}: best {name}", flush=True)
        print(sweep_table([r for r in rows if r["impl"] == f"sweep_{kernel}"]), flush=True)
    return best, rows


def sweep_table(rows: list[dict]) -> str:
    """One line per candidate, one column per case (M/K/density): milliseconds, the candidates side by side."""
    cases = list(dict.fromkeys((r["M"], r["N"], r["K"], r["density"]) for r in rows))
    ms = {(r["variant"], (r["M"], r["N"], r["K"], r["density"])): r["ms"] for r in rows}
    head = f"{'variant':28s}" + "".join(f" {f'{m}/{k}/d{d:g}':>16s}" for m, n, k, d in cases)
    lines = [head]
    for v in dict.fromkeys(r["variant"] for r in rows):
        cells = [ms.get((v, c)) for c in cases]
        lines.append(f"{v:28s}" + "".join(f" {x:16.4f}" if x else f" {'FAIL':>16s}" for x in cells))
    return "\n".join(lines)


def compile_check() -> None:
    """Compile every Triton GEMM-O candidate for sm_90 on this machine, GPU or not, and print
    registers, spilled bytes (cuobjdump's STACK) and shared memory per (candidate, kernel, dtype, D).

    The launchers run as usual on CPU tensors of the benchmark's widths; each launch becomes
    ``kernel.warmup`` (compile only) under a stub driver that reports an sm_90 target."""
    import triton

    from flashomni_compile.kernels.sm90_compile import resource_usage, sm90_target

    compiled = []
    gemm_o.launch = lambda kernel, grid, *a, **kw: compiled.append(kernel.warmup(*a, grid=grid, **kw))

    def usage(kernel) -> tuple[int, int, int]:
        return (*resource_usage(kernel), kernel.metadata.shared)

    print(f"triton {triton.__version__}, sm_90; M=1024, N=3072, K=3072 (+512 extra), block_q=128")
    print(f"{'variant':28s} {'kernel':9s} {'dtype':8s} {'D':>4s} {'regs':>5s} {'spill B':>8s} {'shared B':>9s}")
    for name, cfg in ((n, c) for n, c in O_VARIANTS.items() if not c.gluon):   # Gluon: sm90_compile_check.py
        for dt in (torch.bfloat16, torch.float16):
            for hd in ((64, 72, 128) if dt == torch.bfloat16 else (128,)):
                a, w = torch.empty(1, 1024, 3072 // hd * hd, dtype=dt), torch.empty(3072, 3072 // hd * hd, dtype=dt)
                c, y = torch.empty(1, 1024, 3072, dtype=dt), torch.empty(1, 1024, 3072, dtype=dt)
                e, ew = torch.empty(1, 1024, 512, dtype=dt), torch.empty(3072, 512, dtype=dt)
                keep = torch.ones(1, a.shape[-1] // hd, 9, dtype=torch.bool)
                runs = {"o": lambda: gemm_o.sparse_linear_o_triton(a, w, c, keep, None, None, hd, 0, BQ, cfg, y),
                        "o+extra": lambda: gemm_o.sparse_linear_o_triton(a, w, c, keep, e, ew, hd, 0, BQ, cfg, y),
                        "c": lambda: gemm_o.out_proj_cache_triton(a, w, w[0], keep, hd, 0, BQ, cfg, y)}
                for kname, run in runs.items():
                    compiled.clear()
                    with sm90_target():
                        run()
                    regs, stack, shared = usage(compiled[-1])
                    print(f"{name:28s} {kname:9s} {str(dt)[6:]:8s} {hd:4d} {regs:5d} {stack:8d} {shared:9d}", flush=True)


def work(r: dict) -> tuple[float, float]:
    """(computed FLOPs, fewest bytes) of a record, by the module docstring's model."""
    M, N, k_all, d = r["M"], r["N"], r["K"], r["density"]
    if r["impl"] == "cublas":
        return 2 * M * N * k_all, 2 * (M * k_all + N * k_all + M * N)
    if r["impl"] == "gemm_q":
        d_eff = (d * K + (N - K)) / N
        return 2 * M * N * k_all * d_eff, 2 * (M * k_all + N * k_all + M * N)
    if r["impl"] == "gemm_o":
        ke = k_all - K
        return 2 * M * N * (d * K + ke), 2 * (2 * M * N + d * (M * K + N * K) + M * ke + N * ke)
    return 2 * M * N * (1 - d) * K, 2 * (M * N + (1 - d) * (M * K + N * K))   # gemm_o_cache


def finish(records: list[dict], bw: float, peak: float) -> float:
    """Add roofline, speedup and target fields; returns the FLOP rate P used (see the docstring)."""
    peak = max([peak] + [work(r)[0] / (r["ms"] * 1e-3) for r in records if r["impl"] == "cublas" and r.get("ms")])
    for r in records:
        if not r.get("ms"):
            continue
        flops, nbytes = work(r)
        r["roof_ms"] = max(flops / peak, nbytes / bw) * 1e3
        r["roof_frac"] = r["roof_ms"] / r["ms"]
        r["tflops_computed"] = tflops(flops, r["ms"])
        if r["impl"] != "cublas":
            r["speedup"] = r["cublas_ms"] / r["ms"]
            r["met"] = None if r.get("target_ms") is None else bool(r["ms"] <= r["target_ms"])
            if r["impl"] == "gemm_o":
                r["roof_speedup"] = r["cublas_ms"] / r["roof_ms"]
    return peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="time the launch candidates first; use the best")
    ap.add_argument("--selfcheck", action="store_true", help="only the small-case correctness checks")
    ap.add_argument("--kernels", default="q,o,c", help="with --sweep: which kernels' candidates to time (q,o,c)")
    ap.add_argument("--only", default="", help="with --sweep: only these candidates (comma-separated names)")
    ap.add_argument("--compile-check", action="store_true",
                    help="no GPU needed: compile the GEMM-O candidates for sm_90, print registers/spills/shared")
    ap.add_argument("--m", default="4608,33792", help="comma-separated row counts M (GPU runs)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="with --sweep: stop after the candidates' table (and cuBLAS on the GEMM-Q shapes)")
    ap.add_argument("--sweep-densities", default="1,0.5,0.125", help="with --sweep: the candidates' densities")
    ap.add_argument("--out", default="benchmarks/results/gemm_h100.json")
    args = ap.parse_args()
    if args.compile_check:
        compile_check()
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = device == "cpu"
    fails = selfcheck(device) if not cpu else []
    if args.selfcheck:
        sys.exit(1 if fails else 0)
    ms = (256,) if cpu else tuple(int(m) for m in args.m.split(","))   # CPU: a smoke run of the logic only
    densities = (1.0, 0.125) if cpu else (1.0, 0.5, 0.25, 0.125)
    ceil = Ceilings(device)
    print(f"ceilings: copy {ceil.bw / 1e12:.2f} TB/s, cuBLAS bf16 {ceil.peak / 1e12:.0f} TFLOP/s", flush=True)

    cfg = {"q": None, "o": None, "c": None}
    sweep_rows = []
    if args.sweep and not cpu:
        sweep_d = tuple(float(d) for d in args.sweep_densities.split(","))
        cfg, sweep_rows = sweep(device, ms, sweep_d, tuple(args.kernels.split(",")),
                                tuple(n for n in args.only.split(",") if n))
        cfg = {k: cfg.get(k) for k in ("q", "o", "c")}
        if args.sweep_only:
            base = []
            for M in ms:
                for N in (K, 3 * K):
                    _, _, (x, w, b) = q_case(M, N, 1.0, None, device)
                    base.append(timed(lambda: F.linear(x, w, b), lambda: 0.0, "cublas", M=M, K=K, N=N, density=1.0))
            head = header()
            head.update(sweep=sweep_rows)
            write_results(args.out, head, base)
            print(format_table(base, ["impl", "M", "K", "N", "ms"]))
            return

    records = []
    for M in ms:
        for N in (K, 3 * K):
            _, _, (x, w, b) = q_case(M, N, 1.0, cfg["q"], device)
            rb = timed(lambda: F.linear(x, w, b), lambda: 0.0, "cublas", M=M, K=K, N=N, density=1.0)
            base = rb["ms"]
            dense_flops = 2 * M * N * K
            records.append(dict(rb, tflops=tflops(dense_flops, base)))
            for d in densities:
                fn, check, _ = q_case(M, N, d, cfg["q"], device)
                d_eff = (d * H * D + (N - H * D)) / N
                r = timed(fn, check, "gemm_q", M=M, K=K, N=N, density=d)
                r.update(cublas_ms=base, d_eff=d_eff, target_ms=base / 0.9 if d == 1.0 else base * d_eff / 0.85)
                records.append(r)
        for ke in (0, 4 * K):   # 4 K = 12288: the Flux single-stream MLP width
            for d in densities:
                fn_o, _, check, (x_cat, w_full, b) = o_case(M, ke, d, cfg["o"], device)
                _, fn_c, check_c, _ = o_case(M, ke, d, cfg["c"], device)
                if d == densities[0]:
                    rb = timed(lambda: F.linear(x_cat, w_full, b), lambda: 0.0, "cublas", M=M, K=K + ke, N=K, density=1.0)
                    base = rb["ms"]
                    base_k = TIME(lambda: F.linear(x_cat[..., :K], w_full[:, :K], b))
                    records.append(dict(rb, tflops=tflops(2 * M * K * (K + ke), base)))
                N = K
                r = timed(fn_o, check, "gemm_o", M=M, K=K + ke, N=N, density=d)
                r.update(cublas_ms=base, target_ms=base / 0.9 if d == 1.0 else base / 3.8 if (d == 0.125 and ke == 0) else None)
                records.append(r)
                if ke == 0:   # the update path: the cache of the (1 - d) cached heads, K = 3072 only
                    rc = timed(fn_c, check_c, "gemm_o_cache", M=M, K=K, N=N, density=d)
                    rc.update(cublas_ms=base_k, target_ms=None)
                    records.append(rc)

    peak = finish(records, ceil.bw, ceil.peak)
    head = header()
    head.update(copy_TBps=ceil.bw / 1e12, cublas_8192_TFLOPs=ceil.peak / 1e12, roof_TFLOPs=peak / 1e12,
                selfcheck_fails=fails,
                configs={k: (v._asdict() if v else "table") for k, v in cfg.items()},
                table={f"{a}/{k}": v._asdict() for (a, k), v in gemm_q.CONFIGS.items()})
    head["sweep"] = sweep_rows
    paths = write_results(args.out, head, records)
    cols = ["impl", "M", "K", "N", "density", "ms", "cublas_ms", "speedup", "target_ms", "met", "roof_ms", "roof_frac",
            "host_us", "err", "status"]
    print(f"wrote {', '.join(str(p) for p in paths)}")
    print(format_table(records, cols))


if __name__ == "__main__":
    main()
