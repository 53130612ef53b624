"""Full-width diffusers DiTs with random weights for the GPU benchmarks (bench_compile, bench_e2e).

Each builder returns ``(model, forward kwargs, config dict)``; ``tiny`` gives toy sizes for CPU smoke runs.
Layer counts are parameters: full size is Flux 19 double + 38 single, HunyuanVideo 20 + 40, SD3.5 Large 38.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _default_dtype(dtype):
    """Build parameters directly in ``dtype``: a full-size model built in fp32 and cast would need
    both copies at once (HunyuanVideo: 52 GB + 26 GB, more than an H100 holds)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def flux(tiny: bool, double: int, single: int, dtype, device, hw: int = 64, n_txt: int = 512):
    from diffusers import FluxTransformer2DModel

    if tiny:
        cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(8, 12, 12))
        n_txt, hw = 8, 8
    else:  # FLUX.1-dev widths; default 1024x1024 image -> 64x64 packed latent tokens, 512 text tokens
        cfg = dict(num_layers=double, num_single_layers=single, guidance_embeds=True)
    with torch.device(device), _default_dtype(dtype):
        model = FluxTransformer2DModel(**cfg).to(dtype).eval()
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(hw * 1.0), torch.arange(hw * 1.0),
                                             indexing="ij"), -1).reshape(-1, 3)
        kw = dict(hidden_states=torch.randn(1, hw * hw, model.config.in_channels, dtype=dtype),
                  encoder_hidden_states=torch.randn(1, n_txt, model.config.joint_attention_dim, dtype=dtype),
                  pooled_projections=torch.randn(1, model.config.pooled_projection_dim, dtype=dtype),
                  timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=img_ids,
                  txt_ids=torch.zeros(n_txt, 3), return_dict=False)
    return model, kw, cfg


def hunyuan_video(tiny: bool, double: int, single: int, dtype, device, thw=(9, 60, 104), n_txt: int = 256):
    from diffusers import HunyuanVideoTransformer3DModel

    if tiny:
        cfg = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
                   num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
                   pooled_projection_dim=8, rope_axes_dim=(8, 12, 12))
        t, h, w, n_txt = 2, 4, 4, 8
    else:  # HunyuanVideo widths; default 33 frames of 480x832 -> 9 x 60 x 104 latents -> 14040 video tokens
        # (patch 1x2x2 halves h and w: thw=(9, 60, 104) gives 9 * 30 * 52 = 14040 tokens)
        cfg = dict(num_layers=double, num_single_layers=single)
        t, h, w = thw
    with torch.device(device), _default_dtype(dtype):
        model = HunyuanVideoTransformer3DModel(**cfg).to(dtype).eval()
        c = model.config
        mask = torch.ones(1, n_txt, dtype=torch.int64)
        mask[:, n_txt * 3 // 4:] = 0      # a quarter of the text is padding
        kw = dict(hidden_states=torch.randn(1, c.in_channels, t, h, w, dtype=dtype), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, n_txt, c.text_embed_dim, dtype=dtype),
                  encoder_attention_mask=mask, pooled_projections=torch.randn(1, c.pooled_projection_dim, dtype=dtype),
                  guidance=torch.tensor([6000.0], dtype=dtype), return_dict=False)
    return model, kw, cfg


def sd3(tiny: bool, layers: int, dtype, device, hw: int = 128, n_txt: int = 333):
    """Stable Diffusion 3.5 Large widths (38 joint blocks, 38 heads of 64, RMS QK-norm); default 1024x1024:
    128 x 128 latents, patch 2 -> 4096 image tokens, beside 333 text tokens (77 CLIP + 256 T5)."""
    from diffusers import SD3Transformer2DModel

    if tiny:
        cfg = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                   pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm")
        hw, n_txt = 8, 6
    else:
        cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
                   num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
    with torch.device(device), _default_dtype(dtype):
        model = SD3Transformer2DModel(**cfg).to(dtype).eval()
        # diffusers 0.42 names no repeated blocks for SD3; the benchmark's regional compilation
        # (compile_repeated_blocks, as for Flux and HunyuanVideo) needs them
        model._repeated_blocks = ["JointTransformerBlock"]
        c = model.config
        kw = dict(hidden_states=torch.randn(1, c.in_channels, hw, hw, dtype=dtype),
                  encoder_hidden_states=torch.randn(1, n_txt, c.joint_attention_dim, dtype=dtype),
                  pooled_projections=torch.randn(1, c.pooled_projection_dim, dtype=dtype),
                  timestep=torch.tensor([500.0]), return_dict=False)
    return model, kw, cfg
