"""Compile time and forward time of ``backend="flashomni"`` (policy="dense") against Inductor, in one run.

    python benchmarks/bench_compile.py            # GPU: Flux + HunyuanVideo, bf16 -> benchmarks/results/compile_h100.json
    python benchmarks/bench_compile.py --tiny     # CPU smoke run at toy sizes (float32) -> results/compile_tiny_cpu.json

Models are real diffusers classes with the full-size *width* (heads, head dim, hidden sizes) and random
bf16 weights; the layer count is reduced (``--double``/``--single``, recorded in the JSON) so that two
full-model compiles per model fit the time limit: per-layer cost is identical, so the ratios hold.

Per model and backend: ``compile_s`` is the wall time of the first call (Dynamo + passes + Inductor,
minus nothing), ``fwd_ms`` the median forward time after warm-up (``_common.bench_ms``), ``rel_err`` the
output against the uncompiled model, ``rel_err_vs_inductor`` flashomni's output against Inductor's (checked
before timing: above 2e-2 is a FAIL row, not timed; Inductor's own bf16 deviation from eager on
random-weight Flux reaches ~5e-2, which is why the check is against Inductor),
``sites`` how many attention sites the flashomni backend rewrote. ``ratio`` = flashomni / inductor
forward time; the target is <= 1.03.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import bench_ms, device_and_dtype, format_table, header, rel_err, results_path, write_results  # noqa: E402

from _models import flux, hunyuan_video  # noqa: E402

from flashomni_compile.backend import capture  # noqa: E402

TOL = 2e-2


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_ms(fn) -> float:
    if torch.cuda.is_available():
        return bench_ms(fn)
    ts = []     # CPU smoke run: do_bench needs CUDA; a median of a few calls is enough to exercise the path
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def run_case(name, model, kw, backend, options, baseline=None):
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(**kw)[0]
        compiled = torch.compile(model, backend=backend, fullgraph=True, **({"options": options} if options else {}))
        with capture() as records:
            _sync()
            t0 = time.perf_counter()
            out = compiled(**kw)[0]
            _sync()
            compile_s = time.perf_counter() - t0
        rec = {"model": name, "backend": backend, "compile_s": compile_s, "rel_err": rel_err(out.float(), ref.float()),
               "sites": sum(len(r.sites) for r in records) if backend == "flashomni" else None,
               "fused": sorted({"+".join(s.pieces) for r in records for s in r.sites}) if backend == "flashomni" else None}
        if baseline is not None:
            rec["rel_err_vs_inductor"] = rel_err(out.float(), baseline.float())
            if not rec["rel_err_vs_inductor"] <= TOL:
                rec["status"] = "FAIL"
                return rec, out
        rec["fwd_ms"] = _time_ms(lambda: compiled(**kw))
        rec["status"] = "ok"
    return rec, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes, float32, CPU allowed")
    p.add_argument("--models", default="flux,hunyuan_video")
    p.add_argument("--double", type=int, default=4, help="double-stream layers (full: Flux 19, HunyuanVideo 20)")
    p.add_argument("--single", type=int, default=8, help="single-stream layers (full: Flux 38, HunyuanVideo 40)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device, dtype = device_and_dtype(p, args.tiny)
    out = results_path(args.out, "compile", args.tiny)
    builders = {"flux": flux, "hunyuan_video": hunyuan_video}
    records = []
    for name in args.models.split(","):
        model, kw, cfg = builders[name](args.tiny, args.double, args.single, dtype, device)
        meta = {"config": {k: v for k, v in cfg.items() if not isinstance(v, tuple)} | {"dtype": str(dtype)},
                "layers_note": None if args.tiny else
                f"layer count reduced to {args.double} double + {args.single} single (widths full size)"}
        ind, ind_out = run_case(name, model, kw, "inductor", None)
        fo, _ = run_case(name, model, kw, "flashomni", {"policy": "dense"}, baseline=ind_out)
        ind, fo = ind | meta, fo | meta
        if ind.get("fwd_ms") and fo.get("fwd_ms"):
            fo["ratio"] = fo["fwd_ms"] / ind["fwd_ms"]
            fo["compile_ratio"] = fo["compile_s"] / ind["compile_s"]
        records += [ind, fo]
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    paths = write_results(out, header(), records)
    print(format_table(records, ["model", "backend", "status", "sites", "compile_s", "fwd_ms", "ratio", "rel_err", "rel_err_vs_inductor"]))
    print("wrote", ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
