"""The shipped tinydit models (examples/tinydit): data, model, sampler, metrics, compiled == eager."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from examples.tinydit import data  # noqa: E402
from examples.tinydit.metrics import psnr, rel_l2, ssim  # noqa: E402
from examples.tinydit.model import (IMAGE_WEIGHTS, VIDEO_WEIGHTS, TinyDiTConfig, TinyMMDiT,  # noqa: E402
                                    apply_rope, load_model, rope_cos_sin, save_model)
from examples.tinydit.sampler import flow_timesteps, sample  # noqa: E402

TINY = TinyDiTConfig(width=64, heads=2, layers=2, rope_axes=(8, 12, 12), sample_size=16)


def _tiny_model(seed: int = 0) -> TinyMMDiT:
    """A tiny model with random (non-zero) weights everywhere, so every path carries signal."""
    torch.manual_seed(seed)
    m = TinyMMDiT(TINY).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    return m


# ------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("frames", [None, 4])
def test_dataset_deterministic_given_seed(frames):
    x1, c1 = data.sample_batch(3, data.make_generator(7), size=32, frames=frames)
    x2, c2 = data.sample_batch(3, data.make_generator(7), size=32, frames=frames)
    x3, _ = data.sample_batch(3, data.make_generator(8), size=32, frames=frames)
    assert torch.equal(x1, x2) and torch.equal(c1, c2)
    assert not torch.equal(x1, x3)
    expect = (3, 3, 32, 32) if frames is None else (3, 3, frames, 32, 32)
    assert x1.shape == expect and x1.dtype == torch.float32
    assert c1.shape == (3, data.TEXT_LEN) and c1.dtype == torch.long
    assert x1.min() >= -1.0 and x1.max() <= 1.0
    # 4 words per shape in images, 5 (with a motion) in videos
    words = (c1 != data.PAD).sum(1)
    assert bool(((words % (4 if frames is None else 5)) == 0).all()) and bool((words > 0).all())


def test_captions_round_trip_and_errors():
    ids = data.tokenize(data.IMAGE_PROMPTS + data.VIDEO_PROMPTS)
    assert data.detokenize(ids) == list(data.IMAGE_PROMPTS + data.VIDEO_PROMPTS)
    with pytest.raises(ValueError, match="unknown words"):
        data.tokenize(["purple circle"])


def _one_shape(**kw) -> data.Scenes:
    fields = dict(count=[1], shape=[[0, 0, 0]], colour=[[0, 0, 0]], texture=[[0, 0, 0]], cell=[[4, 0, 1]],
                  motion=[[0, 0, 0]])
    fields.update({k: v for k, v in kw.items() if k in fields})
    t = {k: torch.tensor(v) for k, v in fields.items()}
    return data.Scenes(**t, radius=torch.full((1, 3), 8.0), offset=torch.zeros(1, 3, 2),
                       speed=torch.full((1, 3), 1.5))


def test_render_matches_caption():
    scenes = _one_shape()  # a red solid circle in the center cell
    img = data.render(scenes, size=64)
    assert data.detokenize(data.captions(scenes)) == ["red solid circle center"]
    centre, corner = img[0, :, 32, 32], img[0, :, 2, 2]
    assert centre[0] > 0.5 and centre[1] < -0.5 and centre[2] < -0.5  # red
    assert torch.allclose(corner, torch.full((3,), data.BACKGROUND * 2 - 1))


def test_video_motion_follows_caption():
    scenes = _one_shape(motion=[[4, 0, 0]])  # moving-right
    vid = data.render(scenes, size=64, frames=8)
    assert data.detokenize(data.captions(scenes, video=True)) == ["red solid circle center moving-right"]
    red = (vid[0, 0] > 0.5).float()  # [F, S, S]
    xs = torch.arange(64.0)
    cx = (red.sum(1) * xs).sum(-1) / red.sum((1, 2))  # centroid column per frame
    assert bool((cx.diff() > 1.0).all())
    assert abs(float(cx[3] + cx[4]) / 2 - 32.0) < 1.0  # the position word holds in the middle frame


# ------------------------------------------------------------------------------------------ model
def test_default_config_fits_8mb_in_bf16():
    n = sum(p.numel() for p in TinyMMDiT(TinyDiTConfig()).parameters())
    assert 2 * n <= 8_000_000, f"{n} parameters = {2 * n / 1e6:.2f} MB in bf16"


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 3, 3, 16, 16)])
def test_model_output_shape(shape):
    m = _tiny_model()
    x = torch.randn(shape)
    out = m(x, torch.rand(shape[0]), data.tokenize(["red solid circle center"] * shape[0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_rope_is_relative():
    cos, sin = rope_cos_sin((1, 1, 12), (8, 12, 12), 100.0, torch.device("cpu"))
    q, k = torch.randn(2, 1, 1, 32, dtype=torch.float64).unbind(0)
    qs = apply_rope(q.expand(1, 12, 1, 32), cos, sin)  # the same vector at every column position
    ks = apply_rope(k.expand(1, 12, 1, 32), cos, sin)
    dots = (qs[0, :, None, 0] * ks[0, None, :, 0]).sum(-1)  # [12, 12]
    assert torch.allclose(qs.norm(dim=-1), q.norm(dim=-1).expand(1, 12, 1))
    assert torch.allclose(dots.diagonal(2), dots.diagonal(2)[:1].expand(10), atol=1e-6)


def test_save_load_round_trip(tmp_path):
    m = _tiny_model()
    save_model(m, tmp_path / "m.safetensors", dtype=torch.float32)
    m2 = load_model(tmp_path / "m.safetensors")
    assert m2.config == m.config
    x, t, ids = torch.randn(1, 3, 16, 16), torch.rand(1), data.tokenize(["blue striped square top"])
    assert torch.equal(m(x, t, ids), m2(x, t, ids))


def test_sampler_callback_and_guidance():
    m = _tiny_model()
    ids = data.tokenize(["red solid circle center", "blue solid square left"])
    noise = torch.randn(2, 3, 16, 16, generator=data.make_generator(0))
    seen = []
    out = sample(m, ids, noise, num_steps=3, guidance=2.0, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(0, 3), (1, 3), (2, 3)] and out.shape == noise.shape
    ts = flow_timesteps(4, shift=3.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and bool((ts.diff() < 0).all())


# ------------------------------------------------------------------------------------------ metrics
def test_metrics():
    x = torch.rand(2, 3, 4, 24, 24) * 2 - 1
    assert psnr(x, x) == pytest.approx(100.0) and ssim(x, x) == pytest.approx(1.0) and rel_l2(x, x) == 0.0
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    assert 15.0 < psnr(noisy, x) < 30.0 and 0.0 < ssim(noisy, x) < 0.99
    assert ssim(noisy, x) > ssim((x + 0.5 * torch.randn_like(x)).clamp(-1, 1), x)


# ------------------------------------------------------------------------------------------ shipped weights
def test_shipped_weights_size():
    for path in (IMAGE_WEIGHTS, VIDEO_WEIGHTS):
        assert path.exists(), f"{path} is missing (benchmarks/quality/train.py writes it)"
        assert path.stat().st_size <= 8_000_000 + 64_000  # bf16 weights + the safetensors header


@pytest.fixture(scope="module")
def image_model():
    return load_model(IMAGE_WEIGHTS)


def test_shipped_image_model_samples(image_model):
    prompts = ["red solid circle center", "blue solid square top-left"]
    ids = data.tokenize(prompts)
    noise = torch.randn(2, 3, 64, 64, generator=data.make_generator(0))
    out = sample(image_model, ids, noise, num_steps=8, guidance=3.0)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    assert float(out.std()) > 0.1, "the sample is (nearly) constant"
    # the trained model draws what the caption says: red in the centre, blue at the top left
    red_centre = out[0, :, 26:38, 26:38].mean((1, 2))
    blue_corner = out[1, :, 6:16, 6:16].mean((1, 2))
    assert red_centre[0] > red_centre[1] + 0.5 and red_centre[0] > red_centre[2] + 0.5, red_centre
    assert blue_corner[2] > blue_corner[0] + 0.5, blue_corner


def _inputs_32(seed=0):
    g = data.make_generator(seed)
    return torch.randn(2, 3, 32, 32, generator=g), data.tokenize(["red solid circle center", "green striped "
                                                                   "triangle bottom-left"])


def test_compiled_dense_equals_eager(image_model):
    """aot_eager over the whole sampler: equal to eager, traced once (the timestep is a tensor)."""
    torch._dynamo.reset()
    noise, ids = _inputs_32()
    ref = sample(image_model, ids, noise, num_steps=3, guidance=2.0)
    compiled = torch.compile(image_model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = sample(compiled, ids, noise, num_steps=3, guidance=2.0)
    assert rel_l2(out, ref) < 1e-5


def test_flashomni_dense_equals_eager(image_model):
    """backend="flashomni" at policy "dense": every joint attention is a site, output equals eager."""
    if importlib.util.find_spec("flashomni_compile.backend") is None:
        pytest.skip("flashomni_compile.backend does not exist yet")
    import flashomni_compile

    torch._dynamo.reset()
    noise, ids = _inputs_32()
    t = torch.full((2,), 0.7)
    report = flashomni_compile.explain(image_model, noise, t, ids, options={"policy": "dense"})
    assert [s.kind for s in report.sites] == ["joint"] * image_model.config.layers, str(report)
    assert all(s.pieces == ("gemm_q", "gemm_kv", "attention", "gemm_o") for s in report.sites), str(report)
    assert not report.unmatched, str(report)

    torch._dynamo.reset()
    ref = sample(image_model, ids, noise, num_steps=3, guidance=2.0)
    compiled = torch.compile(image_model, backend="flashomni",
                             options={"policy": "dense", "inner_backend": "aot_eager"})
    out = sample(compiled, ids, noise, num_steps=3, guidance=2.0)
    assert rel_l2(out, ref) < 1e-5


def test_tiny_video_model_compiled_equals_eager():
    m = _tiny_model(1)
    x = torch.randn(1, 3, 4, 16, 16)
    t, ids = torch.rand(1), data.tokenize(["red solid circle center moving-up"])
    torch._dynamo.reset()
    with torch.no_grad():
        ref = m(x, t, ids)
        out = torch.compile(m, backend="aot_eager", fullgraph=True)(x, t, ids)
    assert rel_l2(out, ref) < 1e-5


def test_bench_policy_grammar():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "benchmarks" / "bench_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_policy("dense") == [("dense", {})]
    assert bench.parse_policy("pooled_qk:tau_kv=0.1,0.2:interval=3") == [
        ("pooled_qk", {"tau_kv": 0.1, "interval": 3}), ("pooled_qk", {"tau_kv": 0.2, "interval": 3})]
    assert bench.parse_policy("flashomni:cache_fraction=0.2/0.9,0.5:sparse_updates=true") == [
        ("flashomni", {"cache_fraction": (0.2, 0.9), "sparse_updates": True}),
        ("flashomni", {"cache_fraction": 0.5, "sparse_updates": True})]
    with pytest.raises(ValueError, match="key=v1,v2"):
        bench.parse_policy("pooled_qk:tau_kv")
    opts = bench.backend_options("pooled_qk", {"tau_kv": 0.1, "interval": 3}, 20)
    assert opts == {"policy": "pooled_qk", "total_steps": 20, "interval": 3, "policy_args": {"tau_kv": 0.1}}
    assert bench.backend_options("dense", {}, 20) == {"policy": "dense"}
    # every run-time option goes to the options, not to policy_args (sparse_updates was missed once)
    opts = bench.backend_options("flashomni", {"cache_fraction": (0.2, 0.9), "sparse_updates": True}, 20)
    assert opts == {"policy": "flashomni", "total_steps": 20, "sparse_updates": True,
                    "policy_args": {"cache_fraction": (0.2, 0.9)}}
    # the plot's colour follows the sparse-update setting that ran, not only the swept parameters
    eff = bench.effective_sparse_updates
    assert eff("flashomni", {}, 20) is True                       # the default since session 5
    assert eff("flashomni", {"sparse_updates": False}, 20) is False
    assert eff("flashomni", {"tau_kv": 0.0}, 20) is False         # nothing to skip: updates stay dense
    assert eff("qcache", {}, 20) is False and eff("dense", {}, 20) is False
    assert bench._sparse_updates_of({"params": {}}) is False      # records from before the field existed
    assert bench._sparse_updates_of({"params": {}, "sparse_updates": True}) is True
