"""flashomni-compile in one script: compile the shipped tiny DiT, sample dense and sparse, compare.

    python examples/main.py                       # CPU: image model (~1K tokens), 20 steps, a few minutes at most
    python examples/main.py --model video         # GPU: video model (16K tokens), prints the speedup

What it does:
1. loads the project's trained MM-DiT (``examples/tinydit/weights``, trained on procedural captioned shapes);
2. ``flashomni_compile.explain`` lists the attention sites the backend found (and any it left alone);
3. samples the same captions from the same noise twice through ``torch.compile(backend="flashomni")``:
   ``policy="dense"`` (every symbol kept: exact) and the default ``policy="flashomni"`` (block skipping +
   q-block feature caching on dispatch steps), with a progress line per step;
4. prints per-site densities (``flashomni_compile.stats_report()``), PSNR / SSIM / relative L2 of the
   sparse result against the dense one and, on a GPU, the wall-clock speedup over Inductor;
5. writes ``<out>/dense_vs_flashomni.png``: dense samples on the top row, flashomni below.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flashomni_compile as fo  # noqa: E402
from tinydit import data, metrics, model as tdm, sampler, viz  # noqa: E402

# Word order as in training captions (tinydit/data.py): colour, texture, shape, position[, motion].
CAPTIONS = ["red solid circle top-left", "blue striped square center", "green solid triangle bottom-right",
            "yellow checkered circle center"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def generate(net, ids, noise, steps, dtype, label) -> tuple[torch.Tensor, float]:
    """Sample with a progress line; the callback also tells the runtime the step (``set_step``)."""
    def progress(i, total):
        fo.set_step(i, total)
        print(f"\r  {label}: step {i + 1}/{total}", end="", flush=True)

    _sync(noise.device)
    t0 = time.perf_counter()
    x = sampler.sample(net, ids, noise, num_steps=steps, callback=progress, dtype=dtype)
    _sync(noise.device)
    seconds = time.perf_counter() - t0
    fo.clear_step()
    print(f"\r  {label}: {steps} steps in {seconds:.2f} s" + " " * 10)
    return x, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("image", "video"), default="image")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--policy", default="flashomni", help="any name of flashomni_compile.policy_names()")
    p.add_argument("--out", default="fo_example", help="directory for the PNG")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = tdm.IMAGE_WEIGHTS if args.model == "image" else tdm.VIDEO_WEIGHTS
    if not weights.exists():
        sys.exit(f"{weights} is missing: train it with benchmarks/quality/train.py (see docs/quality.md)")
    net = tdm.load_model(weights, device=device, dtype=dtype)
    cfg = net.config
    ids = data.tokenize([c + (" moving-right" if args.model == "video" else "") for c in CAPTIONS], device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    shape = (len(CAPTIONS), cfg.in_channels) + (() if cfg.frames == 1 else (cfg.frames,)) + (cfg.sample_size,) * 2
    noise = torch.randn(shape, generator=g, device=device)
    tokens = cfg.frames * (cfg.sample_size // cfg.patch_size) ** 2 + cfg.text_len
    print(f"{args.model} model: {sum(t.numel() for t in net.parameters()) / 1e6:.1f}M parameters, "
          f"{tokens} tokens per sample, {device.type}, {dtype}")

    t_ = sampler.flow_timesteps(args.steps, device=device)[:1].expand(len(CAPTIONS))
    report = fo.explain(net, noise.to(dtype), t_, ids)
    print(report)

    runs = {}
    baselines = [("inductor", "inductor", None)] if device.type == "cuda" else []
    for label, backend, options in baselines + [
            ("dense", "flashomni", {"policy": "dense"}),
            (args.policy, "flashomni", {"policy": args.policy, "total_steps": args.steps})]:
        torch._dynamo.reset()
        fo.reset_runtime()
        compiled = torch.compile(net, backend=backend, options=options) if options else \
            torch.compile(net, backend=backend)
        generate(compiled, ids, noise, min(args.steps, 4), dtype, f"{label} (warm-up, compiles)")
        runs[label] = generate(compiled, ids, noise, args.steps, dtype, label)
        if label == args.policy:
            print(fo.stats_report())

    dense, sparse = runs["dense"][0], runs[args.policy][0]
    print(f"{args.policy} vs dense: PSNR {metrics.psnr(sparse, dense):.2f} dB, "
          f"SSIM {metrics.ssim(sparse, dense):.4f}, rel L2 {metrics.rel_l2(sparse, dense):.2e}")
    if "inductor" in runs:
        print(f"speedup over Inductor: {runs['inductor'][1] / runs[args.policy][1]:.2f}x "
              f"({runs['inductor'][1]:.2f} s -> {runs[args.policy][1]:.2f} s for {args.steps} steps)")
    pics = torch.cat([dense, sparse]).clamp(-1, 1).cpu()
    grid = viz.image_grid(pics, ["dense: " + c for c in CAPTIONS] + [args.policy + ": " + c for c in CAPTIONS]) \
        if cfg.frames == 1 else viz.video_grid(pics, ["dense"] * len(CAPTIONS) + [args.policy] * len(CAPTIONS))
    path = viz.save_png(grid, Path(args.out) / "dense_vs_flashomni.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
