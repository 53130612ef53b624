"""End to end: a denoising loop of a full-size DiT, Inductor dense vs flashomni (default policy), one run.

    python benchmarks/bench_e2e.py                       # GPU: HunyuanVideo ~33K tokens + Flux 1024^2
    python benchmarks/bench_e2e.py --models sd3          # GPU: SD3.5 Large widths at 1024^2 (4,429 tokens)
    python benchmarks/bench_e2e.py --tiny --steps 6      # CPU smoke run at toy sizes

Both implementations run the same Euler flow-matching loop (``x <- x + (t_next - t) * v``) from the same
noise, with regional compilation (diffusers' ``compile_repeated_blocks``: one compile per block class,
per-layer state in flashomni's runtime). The baseline is ``backend="inductor"`` with SDPA's default
backend. flashomni runs its default policy and schedule (``RuntimeOptions`` defaults) with
``total_steps`` set, so the last step is an update step; ``--config NAME=JSON`` adds configurations
(run-time options) that reuse the same compiled graphs through ``set_runtime_options``. Random weights
give near-uniform attention, on which the default policy keeps almost every block; a configuration
with fixed thresholds (e.g. ``tau_kv``) measures the speed at a chosen density, reported beside it.

Per step the loop synchronises and reads a host clock (the benchmark's own syncs, outside the model);
``update_step_ms`` / ``dispatch_step_ms`` are medians over the steps of each kind (Inductor: every
step is dense, reported as ``update_step_ms``); ``total_s`` sums every step after a warm-up loop (the
first loop compiles and is not counted). ``rel_l2`` is ``||x_final - x_final_dense|| / ||x_final_dense||``
against the Inductor run. Random weights: speed only, quality is measured on the trained tiny DiT
(``bench_quality.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from collections import Counter
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import (device_and_dtype, format_table, header, rel_err, results_path, runtime_density,  # noqa: E402
                     write_results)
from _models import flux, hunyuan_video, sd3  # noqa: E402

from flashomni_compile.runtime import engine  # noqa: E402
from flashomni_compile.runtime.controller import clear_step, set_step, step_kind  # noqa: E402
from flashomni_compile.runtime.graphs import graph_failures, graph_stats  # noqa: E402
from flashomni_compile.runtime.options import RuntimeOptions  # noqa: E402
from flashomni_compile.runtime.stats import reset_stats  # noqa: E402
from flashomni_compile.runtime.state import all_layer_states  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _latents_key(name: str) -> str:
    return "hidden_states"


def _timestep(name: str, t: float, device) -> torch.Tensor:
    # Flux takes t in [0, 1] (it scales by 1000 inside); HunyuanVideo and SD3 take t in [0, 1000].
    return torch.tensor([t if name == "flux" else t * 1000.0], device=device)


def kernel_summary(prof, top: int = 25) -> str:
    """The GPU kernels of a profile by size: how many ran, their summed time, how much of it went to
    small kernels (under 10 us each, the launches an eager step pays for its glue), and the kernels
    that ran most often."""
    ker = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    tot = sum(e.device_time_total for e in ker)
    small = [e for e in ker if e.device_time_total < 10.0]
    by: dict = {}
    for e in ker:
        n, t = by.get(e.name, (0, 0.0))
        by[e.name] = (n + 1, t + e.device_time_total)
    lines = [f"kernels: {len(ker)}, {tot / 1e3:.2f} ms; under 10 us: {len(small)}, "
             f"{sum(e.device_time_total for e in small) / 1e3:.2f} ms", f"{'count':>6} {'ms':>8}  name"]
    for name, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{n:6d} {t / 1e3:8.3f}  {name[:100]}")
    return "\n".join(lines)


def denoise(model, kw: dict, name: str, steps: int, x0: torch.Tensor,
            run_steps: int | None = None, profile: dict | None = None,
            split: list | None = None) -> tuple[torch.Tensor, list[float]]:
    """Euler flow matching from t=1 to t=0 over ``steps`` steps (only the first ``run_steps`` when
    given); returns the latent and each step's milliseconds. ``split``, when given, receives per step
    ``(host_ms, gpu_ms)``: the host time to enqueue the model call (no sync inside it) and the GPU time
    between CUDA events around it; host close to GPU means the step is host-bound."""
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = x0.clone()
    times = []
    cuda = torch.cuda.is_available() and x.is_cuda
    for i in range(steps if run_steps is None else run_steps):
        set_step(i, steps)
        args = dict(kw, **{_latents_key(name): x, "timestep": _timestep(name, ts[i], x.device)})
        _sync()
        t0 = time.perf_counter()
        if profile is not None and i in profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                v = model(**args)[0]
                _sync()
            profile[i] = (prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18,
                                                    max_name_column_width=70) + "\n" + kernel_summary(prof))
        else:
            if cuda:
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev0.record()
            v = model(**args)[0]
            host_ms = (time.perf_counter() - t0) * 1e3
            if cuda:
                ev1.record()
        x = x + (ts[i + 1] - ts[i]) * v.to(x.dtype)
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
        if split is not None and cuda and not (profile is not None and i in profile):
            split.append((host_ms, ev0.elapsed_time(ev1)))
    clear_step()
    return x, times


def run_model(name: str, args, device, dtype) -> list[dict]:
    if name == "flux":
        model, kw, cfg = flux(args.tiny, args.flux_double, args.flux_single, dtype, device, hw=64)
    elif name == "sd3":
        model, kw, cfg = sd3(args.tiny, args.sd3_layers, dtype, device)
    elif name == "hunyuan_video":
        model, kw, cfg = hunyuan_video(args.tiny, args.hv_double, args.hv_single, dtype, device,
                                       thw=tuple(int(v) for v in args.hv_thw.split(",")))
    else:
        raise SystemExit(f"--models: unknown model {name!r} (flux, hunyuan_video, sd3)")
    x0 = kw[_latents_key(name)].clone()
    tokens = None
    records = []
    runtime = {"total_steps": args.steps, **json.loads(args.runtime)}
    configs = parse_configs(args.config)
    graphs = args.cuda_graphs
    # (no Inductor mode="reduce-overhead" baseline: under regional compilation its CUDA-graph trees overwrite a
    # block's outputs that the next block still reads, and the dense Inductor step is not host-bound anyway)
    runs = [("inductor", None, None)] + [("flashomni", cname, {**runtime, **c}) for cname, c in configs]
    compiled_fo = False
    for impl, cname, options in runs:
        opts = RuntimeOptions(**options) if options is not None else RuntimeOptions(**runtime)
        if impl == "inductor":
            torch._dynamo.reset()
            engine.set_runtime_options(None)
            engine.reset()
            model.compile_repeated_blocks(backend="inductor", fullgraph=True)
        elif not compiled_fo:
            torch._dynamo.reset()
            engine.reset()
            model.compile_repeated_blocks(backend="flashomni", fullgraph=True,
                                          options={"policy": "flashomni", "cuda_graphs": graphs, **options})
            compiled_fo = True
        if impl == "flashomni":
            engine.set_runtime_options(options)   # later configurations: same compiled graphs, no recompile
        with torch.no_grad():
            # Warm-up: compiles, and runs the first update and dispatch steps (Triton JIT) once. With CUDA
            # graphs: three whole generations (the first runs eagerly, the second captures all but step 0,
            # whose starting state differs from the first generation's, the third captures step 0).
            t0 = time.perf_counter()
            if graphs:
                for _ in range(3):
                    denoise(model, kw, name, args.steps, x0)
            else:
                denoise(model, kw, name, args.steps, x0, run_steps=min(args.steps, opts.warmup + 2))
            warm_s = time.perf_counter() - t0
            if graphs:
                reset_stats()                       # statistics of the timed loop only; the graphs stay
            else:
                engine.reset()                      # the same, with the run-time state (a reset drops graphs)
            split: list = []
            gstats = graph_stats()
            x, times = denoise(model, kw, name, args.steps, x0, split=split)
            gstats = {k: v - gstats[k] for k, v in graph_stats().items()}
            density = runtime_density() if impl == "flashomni" else None
            if impl == "flashomni":   # Taylor order per layer after the loop (-1: the layer does not cache)
                orders = Counter(st.stats.cache_order for st in all_layer_states())
                density = {**(density or {}), "cache_orders": {str(k): v for k, v in sorted(orders.items())}}
            if args.profile:   # after the timed loop: flashomni's first update and dispatch steps, one Inductor step
                steps = {k: None for k in ((opts.warmup, opts.warmup + 1) if impl == "flashomni" else (opts.warmup,))}
                denoise(model, kw, name, args.steps, x0, run_steps=max(steps) + 1, profile=steps)
                for i, table in steps.items():
                    kind = step_kind(i, args.steps, opts) if impl == "flashomni" else "dense"
                    print(f"--- {name} {impl} [{cname}] step {i} ({kind}) ---\n{table}")
        kinds = ["update"] * args.steps if impl == "inductor" else \
            [step_kind(i, args.steps, opts) for i in range(args.steps)]
        upd = [t for t, k in zip(times, kinds) if k == "update"]
        dis = [t for t, k in zip(times, kinds) if k == "dispatch"]
        med = lambda kind, j: (statistics.median([s[j] for s, k in zip(split, kinds) if k == kind])  # noqa: E731
                               if split and kind in kinds else None)
        tokens = tokens or _tokens(name, kw, model)
        rec = {"model": name, "tokens": tokens,
               "steps": args.steps, "impl": impl, "config": cname, "total_s": sum(times) / 1e3, "warmup_s": warm_s,
               "update_step_ms": statistics.median(upd) if upd else None,
               "dispatch_step_ms": statistics.median(dis) if dis else None,
               # CUDA events around the model call / host time to enqueue it (medians; GPU runs only)
               "update_gpu_ms": med("update", 1), "update_host_ms": med("update", 0),
               "dispatch_gpu_ms": med("dispatch", 1), "dispatch_host_ms": med("dispatch", 0),
               "n_update": len(upd), "n_dispatch": len(dis),
               "layers": {k: v for k, v in cfg.items() if k in ("num_layers", "num_single_layers")},
               "runtime_options": options, "cuda_graphs": graphs, **(density or {}),
               # every step of the timed loop (update medians mix dense warm-up/last steps and sparse updates)
               "step_ms": [round(t, 3) for t in times], "step_kinds": kinds}
        if impl == "flashomni" and graphs:
            rec["graph_calls"] = gstats        # of the timed loop: replays, captures, eager calls
            rec["graph_failures"] = graph_failures()
        if impl == "inductor":
            base, ref = rec, x.float()
            rec["rel_l2"] = 0.0
        else:
            rec["rel_l2"] = rel_err(x.float(), ref)
            rec["speedup"] = base["total_s"] / rec["total_s"]
            if rec["dispatch_step_ms"]:
                rec["dispatch_speedup"] = base["update_step_ms"] / rec["dispatch_step_ms"]
        records.append(rec)
    engine.set_runtime_options(None)
    del model, kw
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return records


def parse_configs(specs: list[str] | None) -> list[tuple[str, dict]]:
    """``--config NAME=JSON`` (repeatable) -> [(name, run-time options)]; none given: the defaults."""
    if not specs:
        return [("default", {})]
    out = []
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--config {spec!r}: expected NAME=JSON, e.g. default={{}}")
        out.append((name, json.loads(text)))
    return out


def _tokens(name: str, kw: dict, model) -> int:
    x = kw["hidden_states"]
    if name == "flux":
        return x.shape[1] + kw["encoder_hidden_states"].shape[1]
    if name == "sd3":
        p = model.config.patch_size
        return (x.shape[2] // p) * (x.shape[3] // p) + kw["encoder_hidden_states"].shape[1]
    p, pt = model.config.patch_size, model.config.patch_size_t
    t, h, w = x.shape[2:]
    return (t // pt) * (h // p) * (w // p) + kw["encoder_hidden_states"].shape[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes, float32, CPU allowed")
    p.add_argument("--models", default="flux,hunyuan_video")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--flux-double", type=int, default=19)
    p.add_argument("--flux-single", type=int, default=38)
    p.add_argument("--hv-double", type=int, default=20)
    p.add_argument("--hv-single", type=int, default=40)
    p.add_argument("--sd3-layers", type=int, default=38)
    p.add_argument("--hv-thw", default="13,80,128", help="latent frames,height,width (patch 1x2x2): "
                   "13,80,128 -> 33,280 video tokens")
    p.add_argument("--runtime", default="{}", help='extra run-time options as JSON, e.g. \'{"taylor_order": 0}\'')
    p.add_argument("--config", action="append", default=None, metavar="NAME=JSON",
                   help="a flashomni configuration (run-time options on top of --runtime), repeatable; all "
                        "share one compile (set_runtime_options). Default: default={}")
    p.add_argument("--cuda-graphs", action="store_true", help="flashomni with cuda_graphs=True (step graphs); "
                   "three warm-up generations")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table (and the kernels "
                   "counted) of one update and one dispatch step of flashomni and one Inductor step (not timed)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device, dtype = device_and_dtype(p, args.tiny)
    out = results_path(args.out, "e2e", args.tiny)
    records = []
    for name in args.models.split(","):
        records += run_model(name, args, device, dtype)
        write_results(out, header(), records)          # after each model: a later time-out keeps these
    print(format_table(records, ["model", "tokens", "impl", "config", "total_s", "update_step_ms", "update_gpu_ms",
                                 "dispatch_step_ms", "dispatch_gpu_ms", "n_dispatch", "kv_density", "speedup", "dispatch_speedup", "rel_l2"]))


if __name__ == "__main__":
    main()
