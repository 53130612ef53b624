"""Speed and quality of sparsity policies on the shipped tinydit models, against their dense runs.

    python benchmarks/bench_quality.py                                   # dense only (GPU: ~1 min)
    python benchmarks/bench_quality.py --policy dense --policy pooled_qk:tau_kv=0.1,0.2,0.3
    python benchmarks/bench_quality.py --policy flashomni:tau_kv=0.1,0.2:tau_q=0.3,0.5   # cartesian grid

For each model (``image``: 1,040 tokens; ``video``: 16,400 tokens) the same prompts and the same
initial noise (fixed seeds) are sampled with the Euler sampler and classifier-free guidance as one
batch, by:

* ``eager``     — the uncompiled model: the quality reference (bf16 on the GPU, float32 on the CPU);
* ``inductor``  — ``torch.compile`` (Inductor, dense): the speed baseline;
* ``flashomni`` — ``torch.compile(backend="flashomni", options={"policy": name, **params})`` for each
  policy and each point of its parameter grid (skipped, with the reason, while the backend is absent).

Each record holds: PSNR and SSIM of the final frames against the eager run, the relative L2 of the
final latents (pixels here), the attention density the runtime reports (mean over sites and steps;
``density_source: "assumed"`` and 1.0 when the runtime exposes no statistics), and the wall-clock
speedup of the whole sampling loop over ``inductor`` (median of ``--reps`` loops after one warm-up).
A flashomni run with ``policy="dense"`` is checked against the reference first and reported as FAIL
(not timed) if it drifts beyond bf16 noise. The JSON goes to ``benchmarks/results/quality_<dev>.json``
and the speed-quality plot to ``docs/quality_pareto.png``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import format_table, header, runtime_density, write_results  # noqa: E402
from examples.tinydit import data, viz  # noqa: E402
from examples.tinydit.metrics import psnr, rel_l2, ssim  # noqa: E402
from examples.tinydit.model import WEIGHTS_DIR, load_model  # noqa: E402
from examples.tinydit.sampler import sample  # noqa: E402

# A flashomni run at policy "dense" must match eager within bf16 noise (float32 on CPU: far tighter).
DENSE_MAX_REL_L2 = {torch.bfloat16: 5e-2, torch.float32: 1e-3}


# --------------------------------------------------------------------------------------------------
# Policy grammar
# --------------------------------------------------------------------------------------------------
def _value(text: str):
    """int, float, true/false/none, ``a/b`` (a ``(start, end)`` ramp, e.g. ``cache_fraction=0.2/0.9``), else
    the string."""
    if "/" in text:
        return tuple(_value(t) for t in text.split("/"))
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_policy(spec: str) -> list[tuple[str, dict]]:
    """``"name[:key=v1,v2[:key2=w1,w2]]"`` -> ``[(name, {key: v, key2: w}), ...]`` over the cartesian grid;
    a value ``a/b`` is a ramp ``(a, b)`` (FlashOmniPolicy's ``tau_kv``, ``cache_fraction``).

    >>> parse_policy("pooled_qk:tau_kv=0.1,0.2")
    [('pooled_qk', {'tau_kv': 0.1}), ('pooled_qk', {'tau_kv': 0.2})]
    """
    name, *groups = spec.split(":")
    if not name:
        raise ValueError(f"--policy {spec!r}: empty policy name (grammar: name[:key=v1,v2[:key2=...]])")
    keys, values = [], []
    for group in groups:
        if "=" not in group:
            raise ValueError(f"--policy {spec!r}: {group!r} is not key=v1,v2 (grammar: name[:key=v1,v2[:...]])")
        key, vals = group.split("=", 1)
        keys.append(key)
        values.append([_value(v) for v in vals.split(",") if v != ""])
    return [(name, dict(zip(keys, combo))) for combo in itertools.product(*values)]


# --------------------------------------------------------------------------------------------------
# The only places that know the backend's run-time API (issues 4 and 5). Each degrades to "absent".
# --------------------------------------------------------------------------------------------------
def backend_status() -> Optional[str]:
    """None if the flashomni backend is importable, else the reason it is not."""
    try:
        import flashomni_compile.backend  # noqa: F401
    except ImportError as e:
        return f"flashomni_compile.backend is not importable ({e})"
    return None


def _schedule_keys() -> tuple[str, ...]:
    """Swept keys that are run-time options (``RuntimeOptions``: schedule, cache, ``sparse_updates``, ...);
    all others are policy arguments."""
    try:
        from flashomni_compile.runtime.options import RuntimeOptions
    except ImportError:
        return ("warmup", "interval", "last_dense", "taylor_order", "cache_cap_mb", "block_q", "block_kv")
    return tuple(k for k in RuntimeOptions.option_names() if k not in ("policy", "policy_args"))


SCHEDULE_KEYS = _schedule_keys()


def backend_options(policy: str, params: dict, total_steps: int) -> dict:
    """``options=`` for ``torch.compile(backend="flashomni")`` (one flat dict, docs/policies.md): the
    policy, its arguments under ``policy_args``, swept schedule keys as they are, and the step count."""
    if policy == "dense" and not params:
        return {"policy": "dense"}
    opts = {"policy": policy, "total_steps": total_steps}
    opts.update({k: v for k, v in params.items() if k in SCHEDULE_KEYS})
    policy_args = {k: v for k, v in params.items() if k not in SCHEDULE_KEYS}
    if policy_args:
        opts["policy_args"] = policy_args
    return opts


def effective_sparse_updates(policy: str, params: dict, total_steps: int) -> bool:
    """Whether a flashomni point ran with sparse update steps: the option (its own value or the default of
    the code that ran: recorded, since the default changed in session 5) and a policy that skips kv-blocks."""
    from flashomni_compile.runtime.options import RuntimeOptions
    from flashomni_compile.runtime.policies import get_policy

    o = RuntimeOptions.from_dict(backend_options(policy, params, total_steps))
    pol = get_policy(o.policy, **o.policy_args) if isinstance(o.policy, str) else o.policy
    return bool(o.sparse_updates and getattr(pol, "skips_kv", True))


def _sparse_updates_of(r: dict) -> bool:
    """A record's sparse-update setting; records written before the field existed come from runs whose
    default was ``False``."""
    return bool(r.get("sparse_updates", r.get("params", {}).get("sparse_updates", False)))


def _first_lines(e: Exception, n: int = 2) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: " + " ".join(lines[:n])


def flashomni(options: dict):
    """The backend for ``torch.compile``: the name ``"flashomni"`` when the package is installed (entry
    point), else the backend function with the options bound (e.g. a checkout on ``PYTHONPATH``)."""
    if "flashomni" in torch._dynamo.list_backends(exclude_tags=()):
        return "flashomni", options
    from flashomni_compile.backend import flashomni_backend

    return functools.partial(flashomni_backend, options=options), None


def set_step(step: int, total: int) -> None:
    """The sampler's per-step callback: tell the run-time controller the step."""
    import flashomni_compile

    flashomni_compile.set_step(step, total)


def reset_runtime() -> None:
    """Forget compiled graphs and all per-site state and statistics between configurations."""
    import flashomni_compile

    torch._dynamo.reset()
    flashomni_compile.clear_step()
    flashomni_compile.reset_runtime()


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------
def timed_loop(run: Callable[[], torch.Tensor], reps: int) -> tuple[torch.Tensor, float, float]:
    """One warm-up call (compiles; its output is returned), then ``reps`` timed calls: (out, median ms,
    warm-up s). Whole sampling loops of 0.1-10 s: host clock around device syncs is accurate enough."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = run()
    sync()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times), warm


def model_inputs(name: str, model, args, device):
    cfg = model.config
    if name == "image":
        prompts = list(data.IMAGE_PROMPTS)[: args.num_prompts or None]
        shape = (3, cfg.sample_size, cfg.sample_size)
    else:
        prompts = list(data.VIDEO_PROMPTS)[: args.num_prompts or None]
        shape = (3, cfg.frames, cfg.sample_size, cfg.sample_size)
    prompts = [p for p in prompts for _ in range(args.seeds if name == "image" else args.video_seeds)]
    ids = data.tokenize(prompts, device)
    noise = torch.randn((len(prompts),) + shape, generator=data.make_generator(args.seed, device), device=device)
    return ids, noise


def bench_model(name: str, args, device, dtype) -> list[dict]:
    path = args.weights_dir / f"{name}.safetensors"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: train it first (benchmarks/quality/train.py)")
    t_start = time.perf_counter()
    model = load_model(path, device, dtype)
    ids, noise = model_inputs(name, model, args, device)
    tokens = model.config.text_len + noise[0, 0].numel() // model.config.patch_size ** 2
    print(f"[{name}] {noise.shape[0]} samples x {args.steps} steps, guidance {args.guidance}, "
          f"{tokens} tokens, {dtype}", flush=True)

    def runner(fn, callback=None):
        return lambda: sample(fn, ids, noise, num_steps=args.steps, guidance=args.guidance, shift=args.shift,
                              callback=callback, dtype=dtype)

    records = []

    def record(impl, policy, params, out, ms, ref, base_ms, eager_ms, density=None, status="ok"):
        rec = {"model": name, "impl": impl, "policy": policy, "params": params, "tokens": tokens,
               "samples": noise.shape[0], "steps": args.steps, "status": status}
        if out is not None:
            rec.update(psnr=psnr(out, ref), ssim=ssim(out, ref), rel_l2=rel_l2(out, ref), ms=ms,
                       speedup=None if base_ms is None or ms is None else base_ms / ms,
                       speedup_vs_eager=None if ms is None else eager_ms / ms)
            rec.update(density or {"density": 1.0, "density_source": "dense"})
        if impl == "flashomni":
            rec["sparse_updates"] = effective_sparse_updates(policy, params, args.steps)
        records.append(rec)
        print(f"  {impl:9s} {policy:10s} {params}: {status}"
              + (f", {ms:.0f} ms, PSNR {rec['psnr']:.1f} dB" if out is not None and ms is not None else ""),
              flush=True)
        return rec

    torch._dynamo.reset()
    ref, eager_ms, _ = timed_loop(runner(model), args.reps)
    base_ms = None
    if args.baseline_backend != "none":
        compiled = torch.compile(model, backend=args.baseline_backend)
        out, base_ms, warm = timed_loop(runner(compiled), args.reps)
        print(f"  ({args.baseline_backend} warm-up incl. compile: {warm:.1f} s)")
    rec = record("eager", "dense", {}, ref, eager_ms, ref, base_ms, eager_ms)
    if args.baseline_backend != "none":
        record(args.baseline_backend, "dense", {}, out, base_ms, ref, base_ms, eager_ms)

    missing = backend_status()
    compiled = None   # one flashomni compile per model; each configuration is set with set_runtime_options
    for spec in args.policy:
        for policy, params in parse_policy(spec):
            if missing:
                record("flashomni", policy, params, None, None, ref, base_ms, eager_ms,
                       status=f"skipped: {missing}")
                continue
            if args.time_budget and time.perf_counter() - t_start > args.time_budget:
                record("flashomni", policy, params, None, None, ref, base_ms, eager_ms,
                       status=f"skipped: --time-budget {args.time_budget:g} s spent")
                continue
            try:
                options = backend_options(policy, params, args.steps)
                if compiled is None:
                    reset_runtime()
                    backend, backend_opts = flashomni({**options, "cuda_graphs": args.cuda_graphs})
                    compiled = torch.compile(model, backend=backend, options=backend_opts)
                import flashomni_compile
                flashomni_compile.clear_step()
                flashomni_compile.set_runtime_options(options)   # also drops the previous run-time state
                run = runner(compiled, set_step)
                out = run()  # verify before timing (this call also compiles)
                if args.cuda_graphs:
                    run()    # step graphs: this loop captures, the timed loop's warm-up call step 0's graphs
            except Exception as e:  # report, do not hide: the run goes on with the next configuration
                record("flashomni", policy, params, None, None, ref, base_ms, eager_ms,
                       status=f"FAIL: {_first_lines(e)}")
                continue
            err = rel_l2(out, ref)
            if not torch.isfinite(out).all() or (policy == "dense" and err > DENSE_MAX_REL_L2[dtype]):
                record("flashomni", policy, params, out, None, ref, base_ms, eager_ms,
                       status=f"FAIL: rel_l2 {err:.3g} vs eager (limit {DENSE_MAX_REL_L2[dtype]:g} at dense)"
                       if torch.isfinite(out).all() else "FAIL: non-finite output")
                continue
            density = runtime_density()  # of the verified loop
            if density["density_source"] == "runtime":
                import flashomni_compile
                print(flashomni_compile.stats_report(), end="")
            out, ms, _ = timed_loop(run, args.reps)
            record("flashomni", policy, params, out, ms, ref, base_ms, eager_ms, density)
    if not missing:
        import flashomni_compile
        flashomni_compile.set_runtime_options(None)
        reset_runtime()
    return records


def pareto_plot(records: list[dict], path: Path) -> None:
    """Speed (x) against PSNR (y) per model; one colour per implementation/policy in every panel, each
    colour's Pareto front joined and labelled with its parameters."""
    plt = viz.pyplot()
    if plt is None:
        return
    def label(r: dict) -> str:
        if r["impl"] != "flashomni":
            return r["impl"]
        return f"flashomni {r['policy']}" + (" + sparse_updates" if _sparse_updates_of(r) else "")

    models = list(dict.fromkeys(r["model"] for r in records))
    labels = list(dict.fromkeys(label(r) for r in records if r.get("speedup") is not None))
    colours = {lbl: plt.get_cmap("tab10")(i % 10) for i, lbl in enumerate(labels)}
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in records if r["model"] == m and r.get("speedup") is not None]
        for lbl in labels:
            grp = sorted((r for r in rows if label(r) == lbl), key=lambda r: r["speedup"])
            if not grp:
                continue
            psnrs = [min(r["psnr"], 60.0) for r in grp]
            ax.plot([r["speedup"] for r in grp], psnrs, "o", ms=5, color=colours[lbl], label=lbl)
            # the group's Pareto front (no other point both faster and better), joined and annotated
            front = [i for i, r in enumerate(grp)
                     if not any(o["speedup"] > r["speedup"] and min(o["psnr"], 60.0) > psnrs[i] for o in grp)]
            ax.plot([grp[i]["speedup"] for i in front], [psnrs[i] for i in front], "-", color=colours[lbl])
            for r, y in ((grp[i], psnrs[i]) for i in front):
                if r["impl"] == "flashomni":
                    text = ",".join(f"{k}={v}" for k, v in r["params"].items() if k != "sparse_updates") or "defaults"
                    ax.annotate(text, (r["speedup"], y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(30, color="gray", ls=":", lw=1)
        ax.axvline(1, color="gray", ls=":", lw=1)
        ax.set_title(f"{m} model ({rows[0]['tokens'] if rows else '?'} tokens)")
        ax.set_xlabel("speedup over Inductor (dense), whole sampling loop")
        ax.set_ylabel("PSNR vs eager dense, dB (capped at 60)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    viz.save_figure(fig, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="image,video")
    p.add_argument("--policy", action="append", default=None,
                   help="name[:key=v1,v2[:key2=...]] (repeatable; default: dense)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--seeds", type=int, default=2, help="samples per image prompt")
    p.add_argument("--video-seeds", type=int, default=1, help="samples per video prompt")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds per model; configurations left when it is spent are recorded as skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-prompts", type=int, default=0, help="first N fixed prompts (0: all)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cuda-graphs", action="store_true", help="compile flashomni with cuda_graphs=True: every "
                   "sampling loop after the first two replays CUDA graphs (runtime/graphs.py)")
    p.add_argument("--baseline-backend", default="inductor", help="inductor | aot_eager | eager | none")
    p.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "quality_pareto.png")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON",
                   help="only redraw --plot from a results file this script wrote")
    args = p.parse_args(argv)
    if args.replot:
        pareto_plot(json.loads(args.replot.read_text())["records"], args.plot)
        return
    args.policy = args.policy or ["dense"]
    for spec in args.policy:
        parse_policy(spec)  # fail on bad grammar before any work

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.out is None:
        dev = torch.cuda.get_device_name().lower() if cuda else "cpu"
        dev = next((k for k in ("h100", "h200", "a100") if k in dev), "gpu" if cuda else "cpu")
        args.out = Path("benchmarks/results") / f"quality_{dev}.json"
    if not cuda:
        print("no GPU: speedups are CPU wall-clock, not the figures that count")

    records = []
    head = header()
    head.update(steps=args.steps, guidance=args.guidance, shift=args.shift, seeds=args.seeds,
                video_seeds=args.video_seeds,
                model_dtype=str(dtype).replace("torch.", ""), reference="eager dense, same noise",
                speed_baseline=args.baseline_backend)
    for name in args.models.split(","):
        records += bench_model(name, args, device, dtype)
        write_results(args.out, head, records)  # after each model: a later failure keeps what was measured
    pareto_plot(records, args.plot)
    print()
    print(format_table([{**r, "params": ",".join(f"{k}={v}" for k, v in r["params"].items())} for r in records],
                       ["model", "impl", "policy", "params", "status", "ms", "speedup", "psnr", "ssim", "rel_l2",
                        "density"]))


if __name__ == "__main__":
    main()
