"""Where a denoising step's time goes: per-step GPU and host times by step kind, and kernel tables.

    python benchmarks/profile_steps.py --model video --policy flashomni
    python benchmarks/profile_steps.py --model image --runtime '{"taylor_order": 0}'

Runs the shipped tinydit model (``examples/tinydit``) with the Euler sampler (CFG as one batch) under
Inductor and under ``backend="flashomni"``. Every model call is bracketed by CUDA events (GPU time)
and a host clock that does not synchronise (host time to enqueue the call): a step whose host time is
close to its GPU time is host-bound. Then one update and one dispatch step are profiled with
``torch.profiler`` and their kernels are summed by category. Also times the host cost of one launch of
each flashomni op at a small size (median over calls, no synchronisation between calls).

Writes ``benchmarks/results/profile_<model>_h100.json`` (and ``$OUT``); prints the tables last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import header, write_results  # noqa: E402
from examples.tinydit import data  # noqa: E402
from examples.tinydit.model import WEIGHTS_DIR, load_model  # noqa: E402
from examples.tinydit.sampler import sample  # noqa: E402

# kernel-name substrings -> category (first match wins)
CATEGORIES = (
    ("attn_flashomni", ("_sparse_attn_fwd",)),
    ("attn_sdpa", ("flash_fprop", "fmha", "flash_fwd", "cudnn", "attention")),
    ("gemm_q", ("_gemm_q_kernel",)),
    ("gemm_o", ("_gemm_o_kernel",)),
    ("gemm_cublas", ("nvjet", "gemm", "sm90_xmma", "cutlass", "cublas")),
    ("inductor_fused", ("triton_",)),
    ("reduce", ("reduce_kernel",)),
    ("sort_scan", ("sort", "Sort", "scan", "Scan", "radix")),
    ("copy", ("copy", "Memcpy", "cat")),
    ("elementwise", ("elementwise", "Elementwise")),
)


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def kernel_table(prof) -> tuple[dict, list]:
    """(category -> (ms, count), top kernels [(name, ms, count)]) from a profiler's device events."""
    per_cat: dict = defaultdict(lambda: [0.0, 0])
    per_name: dict = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.time_range.elapsed_us()
        c = per_cat[category(ev.name)]
        c[0] += us / 1e3
        c[1] += 1
        n = per_name[ev.name[:90]]
        n[0] += us / 1e3
        n[1] += 1
    top = sorted(((k, v[0], v[1]) for k, v in per_name.items()), key=lambda r: -r[1])[:15]
    return {k: (round(v[0], 3), v[1]) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1][0])}, top


def stack_table(prof, n: int = 25) -> list:
    """The aten ops with the most device time, grouped by the flashomni / model source line that called
    them: [(device ms, calls, op, 'file:line function' of the innermost project frame)]."""
    rows = []
    for ev in prof.key_averages(group_by_stack_n=12):
        if not ev.key.startswith("aten::") or ev.self_device_time_total <= 0:
            continue
        frames = [f for f in ev.stack if "flashomni_compile" in f or "tinydit" in f]
        rows.append((round(ev.self_device_time_total / 1e3, 3), ev.count, ev.key, frames[0] if frames else "?"))
    return sorted(rows, key=lambda r: -r[0])[:n]


class Timed:
    """Wrap a model: CUDA events and a host clock around each call, tagged with the current step."""

    def __init__(self, fn):
        self.fn, self.records, self.step = fn, [], None

    def __call__(self, *a):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        e0.record()
        out = self.fn(*a)
        e1.record()
        self.records.append((self.step, e0, e1, (time.perf_counter() - t0) * 1e3))
        return out

    def summary(self, kinds: dict) -> dict:
        torch.cuda.synchronize()
        by = defaultdict(lambda: ([], []))
        for step, e0, e1, host in self.records:
            k = kinds.get(step, "dense")
            by[k][0].append(e0.elapsed_time(e1))
            by[k][1].append(host)
        return {k: {"n": len(g), "gpu_ms": statistics.median(g), "host_ms": statistics.median(h)}
                for k, (g, h) in by.items()}


def launch_overhead(device) -> list[dict]:
    """Host microseconds per call of each op (small sizes: the GPU is never the bottleneck).

    Each flashomni case runs with the launch cache on (``host_us``, the default) and off
    (``host_us_normal``: every launch through ``kernel[grid]``, as before the cache), through the op
    (``torch.library`` dispatch included) and through the bare Triton launcher. Before timing, each case
    runs both ways and must give the same bits (``same_bits``); a case that does not is reported as FAIL
    (``status``, times NaN) and not timed. ``cache``: the launch cache's counters for the case's kernel.
    Alone: ``python -c "import sys; sys.path.insert(0, 'benchmarks'); import profile_steps as p;
    [print(r) for r in p.launch_overhead('cuda')]"``.
    """
    import torch.nn.functional as F

    from flashomni_compile.kernels import attention, gemm_o, gemm_q, launch, ops
    from flashomni_compile.symbols import SparseSymbols, kv_block_lists

    B, H, N, D = 1, 4, 512, 64
    q, k, v = (torch.randn(B, N, H, D, device=device, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    sym = SparseSymbols.dense(B, H, N, N, device=device)
    cnt, idx = kv_block_lists(sym.kv_keep)
    cache = torch.randn_like(q)
    x = torch.randn(B, N, H * D, device=device, dtype=torch.bfloat16)
    w = torch.randn(3 * H * D, H * D, device=device, dtype=torch.bfloat16)
    wo = torch.randn(H * D, H * D, device=device, dtype=torch.bfloat16)
    c = torch.randn(B, N, H * D, device=device, dtype=torch.bfloat16)
    baselines = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "F.linear": lambda: F.linear(x, w),
    }
    # name -> (kernel whose cache counters are reported, call)
    cases = {
        "sparse_attention (dense)": ("_sparse_attn_fwd", lambda: ops.sparse_attention_op(
            q, k, v, None, None, None, None, None, 0.125, 128, 128)),
        "sparse_attention (lists+cache)": ("_sparse_attn_fwd", lambda: ops.sparse_attention_op(
            q, k, v, sym.q_keep, cnt, idx, cache, None, 0.125, 128, 128)),
        "sparse_linear_q": ("_gemm_q_kernel", lambda: ops.sparse_linear_q_op(
            x, w, None, sym.q_keep, D, 0, 128, H * D)),
        "sparse_linear_o": ("_gemm_o_kernel", lambda: ops.sparse_linear_o_op(
            x, wo, c, sym.q_keep, None, None, D, 0, 128)),
        "out_proj_cache": ("_gemm_o_kernel", lambda: ops.out_proj_cache_op(x, wo, None, sym.q_keep, D, 0, 128)),
        "launcher: sparse_attention_triton": ("_sparse_attn_fwd", lambda: attention.sparse_attention_triton(
            q, k, v, sym.q_keep, cnt, idx, cache, None, 0.125, 128, 128)),
        "launcher: sparse_linear_q_triton": ("_gemm_q_kernel", lambda: gemm_q.sparse_linear_q_triton(
            x, w, None, sym.q_keep, D, 0, 128, H * D)),
        "launcher: sparse_linear_o_triton": ("_gemm_o_kernel", lambda: gemm_o.sparse_linear_o_triton(
            x, wo, c, sym.q_keep, None, None, D, 0, 128)),
        "launcher: out_proj_cache_triton": ("_gemm_o_kernel", lambda: gemm_o.out_proj_cache_triton(
            x, wo, None, sym.q_keep, D, 0, 128)),
    }

    def host_us(fn) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(200):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        return round(statistics.median(ts), 1)

    def as_tuple(out):
        return out if isinstance(out, tuple) else (out,)

    rows = [{"op": name, "host_us": host_us(fn)} for name, fn in baselines.items()]
    mode = launch.set_launch_cache("on")
    try:
        for name, (kernel, fn) in cases.items():
            launch.set_launch_cache("off")
            want = as_tuple(fn())
            launch.set_launch_cache("on")
            got = [as_tuple(fn()) for _ in range(3)]   # the first may fill the cache, the others hit it
            same = all(torch.equal(a, b) for g in got for a, b in zip(g, want))
            if not same:
                rows.append({"op": name, "host_us": float("nan"), "host_us_normal": float("nan"), "same_bits": False,
                             "status": "FAIL: the cached launch changed the output"})
                continue
            launch.set_launch_cache("off")
            normal = host_us(fn)
            launch.set_launch_cache("on")
            rows.append({"op": name, "host_us": host_us(fn), "host_us_normal": normal, "same_bits": True,
                         "cache": launch.launch_stats().get(kernel)})
    finally:
        launch.set_launch_cache(mode)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="video", choices=["image", "video"])
    p.add_argument("--policy", default="flashomni")
    p.add_argument("--runtime", default="{}", help="extra run-time options, JSON")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_steps.py needs a GPU")
    import flashomni_compile
    from flashomni_compile.runtime.controller import step_kind
    from flashomni_compile.runtime.options import RuntimeOptions

    device, dtype = "cuda", torch.bfloat16
    model = load_model(WEIGHTS_DIR / f"{args.model}.safetensors", device, dtype)
    cfg = model.config
    prompts = list(data.IMAGE_PROMPTS if args.model == "image" else data.VIDEO_PROMPTS)
    prompts = (prompts * args.samples)[: args.samples]
    ids = data.tokenize(prompts, device)
    shape = (3, cfg.sample_size, cfg.sample_size) if args.model == "image" else \
        (3, cfg.frames, cfg.sample_size, cfg.sample_size)
    noise = torch.randn((len(prompts),) + shape, generator=data.make_generator(0, device), device=device)
    options = {"policy": args.policy, "total_steps": args.steps, **json.loads(args.runtime)}
    ropts = RuntimeOptions.from_dict(options)
    kinds = {i: step_kind(i, args.steps, ropts) for i in range(args.steps)}

    results = {"model": args.model, "options": {k: v for k, v in options.items()}, "steps": {}, "profile": {}}
    for impl in ("inductor", "flashomni"):
        torch._dynamo.reset()
        flashomni_compile.reset_runtime()
        compiled = torch.compile(model, backend="inductor") if impl == "inductor" else \
            torch.compile(model, backend="flashomni", options=options)
        timed = Timed(compiled)

        def cb(i, n, timed=timed, impl=impl):
            timed.step = i
            if impl == "flashomni":
                flashomni_compile.set_step(i, n)

        run = lambda: sample(timed, ids, noise, num_steps=args.steps, guidance=args.guidance,  # noqa: E731
                             callback=cb, dtype=dtype)
        run()   # compile + warm
        torch.cuda.synchronize()
        timed.records.clear()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) * 1e3
        summ = timed.summary(kinds if impl == "flashomni" else {})
        results["steps"][impl] = {"total_ms": total, **summ}
        if impl == "flashomni":
            results["stats"] = flashomni_compile.stats_report()
            # profile one update step and one dispatch step (the first of each after warm-up)
            want = {}
            for i, kd in kinds.items():
                if i >= ropts.warmup and kd not in want.values():
                    want[i] = kd
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            active, done = {}, {}

            def stop_active():
                for j, pr in list(active.items()):
                    torch.cuda.synchronize()
                    pr.__exit__(None, None, None)
                    done[j] = pr
                active.clear()

            def pcb(i, n):
                flashomni_compile.set_step(i, n)
                stop_active()
                if i in want:
                    torch.cuda.synchronize()
                    active[i] = torch.profiler.profile(activities=activities, with_stack=True)
                    active[i].__enter__()

            sample(compiled, ids, noise, num_steps=args.steps, guidance=args.guidance, callback=pcb, dtype=dtype)
            stop_active()
            for i, pr in done.items():
                cats, top = kernel_table(pr)
                results["profile"][f"step {i} ({want[i]})"] = {"categories": cats, "top": top,
                                                              "by_stack": stack_table(pr)}
    results["launch_host_us"] = launch_overhead(device)

    out = args.out or f"benchmarks/results/profile_{args.model}_h100.json"
    write_results(out, header(), [results])
    print(results.get("stats", ""))
    for name, pr in results["profile"].items():
        print(f"--- {name}: kernels by category (ms, count) ---")
        for k, v in pr["categories"].items():
            print(f"  {k:16s} {v[0]:9.3f} {v[1]:6d}")
        for n, ms, cnt in pr["top"][:8]:
            print(f"    {ms:8.3f} {cnt:5d}  {n}")
        print("  by caller (device ms, calls, op, source):")
        for ms, cnt, op, src in pr["by_stack"][:18]:
            print(f"    {ms:8.3f} {cnt:5d}  {op:28s} {src}")
    print("--- launcher host cost (us per call) ---")
    for r in results["launch_host_us"]:
        print(f"  {r['op']:32s} {r['host_us']:8.1f}")
    print("--- per model call: median GPU ms / host ms ---")
    for impl, s in results["steps"].items():
        print(f"  {impl:10s} total {s['total_ms']:.1f} ms  " + "  ".join(
            f"{k}: n={v['n']} gpu {v['gpu_ms']:.2f} host {v['host_ms']:.2f}" for k, v in s.items() if isinstance(v, dict)))


if __name__ == "__main__":
    main()
