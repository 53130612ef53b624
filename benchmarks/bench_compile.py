"""Compile time and forward time of ``backend="flashomni"`` (policy="dense") against Inductor, in one run.

    python benchmarks/bench_compile.py            # GPU: Flux + HunyuanVideo, bf16 -> benchmarks/results/compile_h100.json
    python benchmarks/bench_compile.py --tiny     # CPU smoke run at toy sizes (float32) -> results/compile_tiny_cpu.json

Models are real diffusers classes with the full-size *width* (heads, head dim, hidden sizes) and random
bf16 weights; the layer count is reduced (``--double``/``--single``, recorded in the JSON) so that two
full-model compiles per model fit the time limit: per-layer cost is identical, so the ratios hold.

Per model and backend: ``compile_s`` is the wall time of the first call (Dynamo + passes + Inductor,
minus nothing), ``fwd_ms`` the median forward time after warm-up (``_common.bench_ms``), ``rel_err`` the
output against the uncompiled model (checked before timing: a case above 2e-2 is a FAIL row, not timed),
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
from _common import bench_ms, format_table, header, rel_err, write_results  # noqa: E402

from flashomni_compile.backend import capture  # noqa: E402

TOL = 2e-2


def flux(tiny: bool, double: int, single: int, dtype, device):
    from diffusers import FluxTransformer2DModel

    if tiny:
        cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(8, 12, 12))
        n_txt, hw = 8, 8
    else:  # FLUX.1-dev widths; 1024x1024 image -> 64x64 packed latent tokens, 512 text tokens
        cfg = dict(num_layers=double, num_single_layers=single, guidance_embeds=True)
        n_txt, hw = 512, 64
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg).to(dtype).eval()
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(hw * 1.0), torch.arange(hw * 1.0),
                                             indexing="ij"), -1).reshape(-1, 3)
        kw = dict(hidden_states=torch.randn(1, hw * hw, model.config.in_channels, dtype=dtype),
                  encoder_hidden_states=torch.randn(1, n_txt, model.config.joint_attention_dim, dtype=dtype),
                  pooled_projections=torch.randn(1, model.config.pooled_projection_dim, dtype=dtype),
                  timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=img_ids,
                  txt_ids=torch.zeros(n_txt, 3), return_dict=False)
    return model, kw, cfg


def hunyuan_video(tiny: bool, double: int, single: int, dtype, device):
    from diffusers import HunyuanVideoTransformer3DModel

    if tiny:
        cfg = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
                   num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
                   pooled_projection_dim=8, rope_axes_dim=(8, 12, 12))
        t, h, w, n_txt = 2, 4, 4, 8
    else:  # HunyuanVideo widths; 33 frames of 480x832 -> 9 x 60 x 104 latents -> 14040 video tokens
        cfg = dict(num_layers=double, num_single_layers=single)
        t, h, w, n_txt = 9, 60, 104, 256
    with torch.device(device):
        model = HunyuanVideoTransformer3DModel(**cfg).to(dtype).eval()
        c = model.config
        mask = torch.ones(1, n_txt, dtype=torch.int64)
        mask[:, n_txt * 3 // 4:] = 0      # a quarter of the text is padding
        kw = dict(hidden_states=torch.randn(1, c.in_channels, t, h, w, dtype=dtype), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, n_txt, c.text_embed_dim, dtype=dtype),
                  encoder_attention_mask=mask, pooled_projections=torch.randn(1, c.pooled_projection_dim, dtype=dtype),
                  guidance=torch.tensor([6000.0], dtype=dtype), return_dict=False)
    return model, kw, cfg


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


def run_case(name, model, kw, backend, options):
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
        err = rel_err(out.float(), ref.float())
        rec = {"model": name, "backend": backend, "compile_s": compile_s, "rel_err": err,
               "sites": sum(len(r.sites) for r in records) if backend == "flashomni" else None,
               "fused": sorted({"+".join(s.pieces) for r in records for s in r.sites}) if backend == "flashomni" else None}
        if not err <= TOL:
            rec["status"] = "FAIL"
            return rec
        rec["fwd_ms"] = _time_ms(lambda: compiled(**kw))
        rec["status"] = "ok"
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes, float32, CPU allowed")
    p.add_argument("--models", default="flux,hunyuan_video")
    p.add_argument("--double", type=int, default=4, help="double-stream layers (full: Flux 19, HunyuanVideo 20)")
    p.add_argument("--single", type=int, default=8, help="single-stream layers (full: Flux 38, HunyuanVideo 40)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        p.error("full sizes need a GPU; use --tiny on CPU")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    out = args.out or ("benchmarks/results/compile_tiny_cpu.json" if args.tiny else "benchmarks/results/compile_h100.json")
    builders = {"flux": flux, "hunyuan_video": hunyuan_video}
    records = []
    for name in args.models.split(","):
        model, kw, cfg = builders[name](args.tiny, args.double, args.single, dtype, device)
        meta = {"config": {k: v for k, v in cfg.items() if not isinstance(v, tuple)} | {"dtype": str(dtype)},
                "layers_note": None if args.tiny else
                f"layer count reduced to {args.double} double + {args.single} single (widths full size)"}
        ind = run_case(name, model, kw, "inductor", None) | meta
        fo = run_case(name, model, kw, "flashomni", {"policy": "dense"}) | meta
        if ind.get("fwd_ms") and fo.get("fwd_ms"):
            fo["ratio"] = fo["fwd_ms"] / ind["fwd_ms"]
            fo["compile_ratio"] = fo["compile_s"] / ind["compile_s"]
        records += [ind, fo]
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    paths = write_results(out, header(), records)
    print(format_table(records, ["model", "backend", "status", "sites", "compile_s", "fwd_ms", "ratio", "rel_err"]))
    print("wrote", ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
