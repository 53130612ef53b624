"""Train the tinydit image and video models (rectified flow on procedural shapes), deterministic per seed.

    python benchmarks/quality/train.py --model both            # H100: image (~3 min), then video (~5 min)
    python benchmarks/quality/train.py --model both --smoke    # CPU, seconds: tiny model, a few steps

Flow matching: ``x_t = (1 - t) x0 + t noise`` with logit-normal ``t``, the model predicts ``noise - x0``;
AdamW, linear warm-up then cosine decay, gradient clipping, EMA of the weights (the EMA is what is
saved), 10% of captions dropped for classifier-free guidance, bf16 autocast on the GPU.

The video model starts from the image model's weights (same architecture; images are frame-0 videos
for the 3-axis RoPE) and trains in phases of growing clip length, e.g. ``4:32:800,16:8:1450`` = 800
steps of 4-frame clips at batch 32, then 1450 steps of 16-frame clips at batch 8 (the cosine schedule
spans all phases).

Everything random (initial weights, data, noise, timesteps, caption dropout) comes from ``--seed``.
On a GPU the result is reproducible up to the non-determinism of the attention backward kernels.

Writes: weights (bf16 safetensors, config in the metadata) to ``--weights-dir``; a JSON log per model
(``tinydit_train_<model>.json``: header, config, arguments, loss every ``--log-every`` steps, held-out
loss on a fixed batch) to ``--results-dir``; sample grids and the loss curve (PNG) to ``--docs-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import header  # noqa: E402
from examples.tinydit import data, viz  # noqa: E402
from examples.tinydit.model import TinyDiTConfig, TinyMMDiT, save_model  # noqa: E402
from examples.tinydit.sampler import sample  # noqa: E402

SMOKE_CFG = TinyDiTConfig(width=64, heads=2, layers=2, rope_axes=(8, 12, 12), sample_size=32)


def parse_phases(spec: str) -> list[tuple[int, int, int]]:
    """``"4:32:700,16:8:1100"`` -> ``[(frames, batch, steps), ...]``."""
    phases = []
    for part in spec.split(","):
        try:
            f, b, s = (int(v) for v in part.split(":"))
        except ValueError:
            raise SystemExit(f"--video-phases: {part!r} is not frames:batch:steps (e.g. 16:8:1000)")
        phases.append((f, b, s))
    return phases


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * p)))


def flow_loss(model, x0, ids, g, p_uncond: float) -> torch.Tensor:
    """Rectified-flow velocity loss on a batch; ``g`` supplies timesteps, noise and caption dropout."""
    B = x0.shape[0]
    t = torch.sigmoid(torch.randn(B, generator=g, device=x0.device))  # logit-normal (SD3)
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    drop = torch.rand(B, generator=g, device=x0.device) < p_uncond
    ids = torch.where(drop[:, None], torch.full_like(ids, data.PAD), ids)
    tb = t.view(B, *([1] * (x0.dim() - 1)))
    xt = (1 - tb) * x0 + tb * noise
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x0.is_cuda):
        v = model(xt, t, ids)
    return F.mse_loss(v.float(), noise - x0)


@torch.no_grad()
def eval_loss(model, batch, device) -> float:
    """Loss on a fixed held-out batch at 8 fixed timesteps (a far less noisy curve than the train loss)."""
    x0, ids = batch
    total = 0.0
    g = data.make_generator(4321, device)
    for t_val in torch.linspace(0.05, 0.95, 8).tolist():
        t = torch.full((x0.shape[0],), t_val, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x0.is_cuda):
            v = model((1 - tb) * x0 + tb * noise, t, ids)
        total += float(F.mse_loss(v.float(), noise - x0))
    return total / 8


def train(name: str, cfg: TinyDiTConfig, phases: list[tuple[int, int, int]], args, device,
          init_state: dict | None = None) -> tuple[TinyMMDiT, dict]:
    """Train one model over ``phases`` [(frames or 0 for images, batch, steps)]; returns (EMA model, log)."""
    torch.manual_seed(args.seed)
    model = TinyMMDiT(cfg).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    ema = TinyMMDiT(cfg).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    params = [p for p in model.parameters()]
    decay_params = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99), fused=device.type == "cuda")
    fwd = torch.compile(model) if args.compile in (name, "both") else model
    g = data.make_generator(args.seed + (1 if name == "image" else 2), device)
    total = sum(s for _, _, s in phases)
    lr = args.lr if name == "image" else args.video_lr
    S = cfg.sample_size
    ema_params, model_params = list(ema.parameters()), list(model.parameters())

    log: list[dict] = []
    evals: list[dict] = []
    step, t0, stopped = 0, time.perf_counter(), None
    n_params = sum(p.numel() for p in params)
    print(f"[{name}] {n_params / 1e6:.2f}M parameters, phases {phases}, device {device}", flush=True)
    for frames, batch, steps in phases:
        fr = frames or None
        eval_batch = data.sample_batch(args.eval_batch if fr is None else max(2, args.eval_batch // fr),
                                       data.make_generator(999, device), S, fr)
        running = torch.zeros((), device=device)
        n_running, t_phase = 0, time.perf_counter()
        for _ in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, args.warmup)
            x0, ids = data.sample_batch(batch, g, S, fr)
            loss = flow_loss(fwd, x0, ids, g, args.p_uncond)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
            running += loss.detach()
            n_running += 1
            step += 1
            last = step == total
            if step % args.log_every == 0 or last:
                elapsed = time.perf_counter() - t0
                rec = {"step": step, "frames": frames, "loss": float(running) / n_running,
                       "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 2),
                       "samples_per_s": round(batch * n_running / (time.perf_counter() - t_phase), 1)}
                log.append(rec)
                running.zero_()
                n_running, t_phase = 0, time.perf_counter()
                if step % args.eval_every == 0 or last:
                    rec_e = {"step": step, "frames": frames, "eval_loss": eval_loss(ema, eval_batch, device)}
                    evals.append(rec_e)
                    print(f"[{name}] step {step}/{total} loss {rec['loss']:.4f} eval(ema) "
                          f"{rec_e['eval_loss']:.4f} {rec['samples_per_s']:.0f} samples/s {elapsed:.0f}s",
                          flush=True)
                limit = getattr(args, f"max_minutes_{name}", None) or args.max_minutes
                if elapsed > limit * 60 and not last:
                    stopped = f"stopped at step {step}/{total}: over the time limit of {limit} min"
                    print(f"[{name}] {stopped}", flush=True)
                    break
        if stopped:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    result = {"model": name, "config": asdict(cfg), "phases": phases, "parameters": n_params,
              "steps": step, "train_s": round(train_s, 1), "stopped_early": stopped,
              "final_loss": log[-1]["loss"], "final_eval_loss": evals[-1]["eval_loss"],
              "log": log, "eval": evals}
    return ema.eval(), result


@torch.no_grad()
def sample_grid(model: TinyMMDiT, name: str, args, device) -> "object":
    """Samples for the fixed prompts (2 seeds each for images), guidance ``--guidance``."""
    cfg = model.config
    S = cfg.sample_size
    if name == "image":
        prompts = [p for p in data.IMAGE_PROMPTS for _ in range(2)]
        shape = (len(prompts), 3, S, S)
    else:
        prompts = list(data.VIDEO_PROMPTS)
        shape = (len(prompts), 3, cfg.frames, S, S)
    ids = data.tokenize(prompts, device)
    noise = torch.randn(shape, generator=data.make_generator(0, device), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = sample(model, ids, noise, num_steps=args.sample_steps, guidance=args.guidance)
    if name == "image":
        return viz.image_grid(out, prompts, cols=4)
    F_ = cfg.frames
    return viz.video_grid(out, prompts, frames=sorted({0, F_ // 3, (2 * F_) // 3, F_ - 1}))


def calibrate(base: TinyDiTConfig, args, device) -> None:
    """Print training throughput (samples/s) per configuration, eager and compiled, to size the runs."""
    cases = [("image", 0, args.image_batch)] + [("video", f, b) for f, b, _ in parse_phases(args.video_phases)]
    for compiled in (False, True):
        for name, frames, batch in cases:
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = TinyMMDiT(replace(base, frames=max(1, frames))).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            fwd = torch.compile(model) if compiled else model
            g = data.make_generator(0, device)
            t0 = time.perf_counter()

            def step():
                x0, ids = data.sample_batch(batch, g, base.sample_size, frames or None)
                loss = flow_loss(fwd, x0, ids, g, 0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for _ in range(3):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            n = args.calibrate
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / n
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            print(f"calibrate {name:5s} frames={frames:2d} batch={batch:3d} compiled={compiled!s:5s}: "
                  f"{dt * 1e3:7.1f} ms/step {batch / dt:8.1f} samples/s (first 3 steps {warm_s:.1f} s, "
                  f"peak {mem:.1f} GiB)", flush=True)


def loss_plot(results: list[dict], path: Path) -> None:
    plt = viz.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        ax.plot([e["step"] for e in r["log"]], [e["loss"] for e in r["log"]], lw=0.8, alpha=0.6,
                label="train (mean over log interval)")
        ax.plot([e["step"] for e in r["eval"]], [e["eval_loss"] for e in r["eval"]], "o-", ms=3,
                label="held-out, EMA weights")
        for i, e in enumerate(r["log"][1:], 1):  # mark phase changes (clip length)
            if e["frames"] != r["log"][i - 1]["frames"]:
                ax.axvline(r["log"][i - 1]["step"], color="gray", ls=":", lw=1)
        ax.set_title(f"{r['model']} model: {r['steps']} steps, {r['train_s']:.0f} s")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching MSE")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    viz.save_figure(fig, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["image", "video", "both"], default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-steps", type=int, default=3800)
    p.add_argument("--image-batch", type=int, default=128)
    p.add_argument("--video-phases", default="4:32:800,16:8:1450", help="frames:batch:steps,...")
    p.add_argument("--video-init", default=None,
                   help="weights to start the video model from (default: the image model just trained, "
                        "or the shipped image weights with --model video; 'none' for random)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--video-lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1, help="caption dropout for guidance")
    p.add_argument("--compile", choices=["none", "image", "video", "both"], default="image",
                   help="torch.compile the training forward of these models (H100: 2.5x for the image "
                        "model after ~50 s of compiling; 1.5x for 16-frame video, which is attention-bound)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--max-minutes", type=float, default=8.0, help="per model; a safety stop, logged")
    p.add_argument("--max-minutes-image", type=float, default=None, help="overrides --max-minutes")
    p.add_argument("--max-minutes-video", type=float, default=None, help="overrides --max-minutes")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--weights-dir", type=Path, default=REPO / "examples/tinydit/weights")
    p.add_argument("--results-dir", type=Path, default=REPO / "benchmarks/results")
    p.add_argument("--docs-dir", type=Path, default=REPO / "docs")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="only time N training steps of each configuration (eager and compiled), then exit")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, 32x32, a few steps; outputs under /tmp/tinydit_smoke unless given")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    base = TinyDiTConfig()
    if args.smoke:
        base = SMOKE_CFG
        args.image_steps, args.image_batch, args.video_phases = 6, 4, "2:2:3,4:2:3"
        args.log_every, args.eval_every, args.eval_batch, args.sample_steps, args.warmup = 2, 4, 8, 3, 2
        tmp = Path("/tmp/tinydit_smoke")
        defaults = {"weights_dir": REPO / "examples/tinydit/weights", "results_dir": REPO / "benchmarks/results",
                    "docs_dir": REPO / "docs"}
        for key, default in defaults.items():
            if getattr(args, key) == default:
                setattr(args, key, tmp)
    if args.calibrate:
        calibrate(base, args, device)
        return
    head = header()
    results, image_state = [], None
    t_all = time.perf_counter()

    if args.model in ("image", "both"):
        cfg = replace(base, frames=1)
        model, res = train("image", cfg, [(0, args.image_batch, args.image_steps)], args, device)
        image_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        results.append(res)
        save_model(model, args.weights_dir / "image.safetensors",
                   extra={"trained": {k: res[k] for k in ("steps", "train_s", "final_loss", "final_eval_loss")}})
        viz.save_png(sample_grid(model, "image", args, device), args.docs_dir / "tinydit_image_samples.png")

    if args.model in ("video", "both"):
        phases = parse_phases(args.video_phases)
        cfg = replace(base, frames=phases[-1][0])
        init = image_state
        if args.video_init == "none":
            init = None
        elif args.video_init is not None or init is None:
            from examples.tinydit.model import load_model
            path = args.video_init or (args.weights_dir / "image.safetensors")
            init = load_model(path, device).state_dict()
        model, res = train("video", cfg, phases, args, device, init_state=init)
        res["init"] = "image model" if init is not None else "random"
        results.append(res)
        save_model(model, args.weights_dir / "video.safetensors",
                   extra={"trained": {k: res[k] for k in ("steps", "train_s", "final_loss", "final_eval_loss")}})
        viz.save_png(sample_grid(model, "video", args, device), args.docs_dir / "tinydit_video_samples.png")

    for res in results:
        path = args.results_dir / f"tinydit_train_{res['model']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"header": head, "args": {k: str(v) for k, v in vars(args).items()}, **res},
                                   indent=1) + "\n")
    if args.model == "both" or len(results) == 2:
        loss_plot(results, args.docs_dir / "tinydit_loss.png")
    print(f"\nsummary ({head['device']}, torch {head['torch']}, total {time.perf_counter() - t_all:.0f} s)")
    for r in results:
        print(f"  {r['model']:5s}: {r['parameters'] / 1e6:.2f}M params, {r['steps']} steps in {r['train_s']:.0f} s, "
              f"final loss {r['final_loss']:.4f}, held-out (EMA) {r['final_eval_loss']:.4f}"
              + (f"  [{r['stopped_early']}]" if r["stopped_early"] else ""))


if __name__ == "__main__":
    main()
