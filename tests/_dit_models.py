"""Tiny random configurations of the diffusers DiTs the backend must match, plus hand-written blocks.

Each factory returns ``(model, kwargs)``: ``model(**kwargs)`` runs one forward on CPU in float32.
Sizes are the smallest that keep every code path (text + image streams, masks, RoPE, QK-norms).
"""

from __future__ import annotations

import torch
from torch import nn

B = 1


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed))


def flux(num_layers=1, num_single_layers=1):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=num_layers,
                               num_single_layers=num_single_layers, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 6, 6))
    n_img, n_txt = 16, 6
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                         indexing="ij"), -1).reshape(-1, 3)
    kw = dict(hidden_states=_randn(B, n_img, 4, seed=1), encoder_hidden_states=_randn(B, n_txt, 32, seed=2),
              pooled_projections=_randn(B, 32, seed=3), timestep=torch.tensor([0.5] * B),
              img_ids=img_ids, txt_ids=torch.zeros(n_txt, 3), return_dict=False)
    return m.eval(), kw


def sd3(dual=True, qk_norm="rms_norm", num_layers=2):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers,
                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                              caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
                              pos_embed_max_size=16, dual_attention_layers=(0,) if dual else (),
                              qk_norm=qk_norm)
    kw = dict(hidden_states=_randn(B, 4, 8, 8, seed=1), encoder_hidden_states=_randn(B, 6, 32, seed=2),
              pooled_projections=_randn(B, 32, seed=3), timestep=torch.tensor([10] * B), return_dict=False)
    return m.eval(), kw


def hunyuan_video(num_layers=1, num_single_layers=1):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                       attention_head_dim=16, num_layers=num_layers,
                                       num_single_layers=num_single_layers, num_refiner_layers=1,
                                       patch_size=1, patch_size_t=1, text_embed_dim=16,
                                       pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))
    mask = torch.ones(B, 6, dtype=torch.int64)
    mask[:, 4:] = 0  # two padded text tokens
    kw = dict(hidden_states=_randn(B, 4, 2, 4, 4, seed=1), timestep=torch.tensor([10] * B),
              encoder_hidden_states=_randn(B, 6, 16, seed=2), encoder_attention_mask=mask,
              pooled_projections=_randn(B, 8, seed=3), guidance=torch.tensor([3000.0] * B),
              return_dict=False)
    return m.eval(), kw


def wan(num_layers=1):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                              in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                              num_layers=num_layers, rope_max_seq_len=32)
    kw = dict(hidden_states=_randn(B, 4, 2, 8, 8, seed=1), timestep=torch.tensor([10] * B),
              encoder_hidden_states=_randn(B, 6, 16, seed=2), return_dict=False)
    return m.eval(), kw


def cogvideox(num_layers=1):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                    out_channels=4, time_embed_dim=8, text_embed_dim=16,
                                    num_layers=num_layers, sample_width=8, sample_height=8, sample_frames=5,
                                    patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6)
    kw = dict(hidden_states=_randn(B, 2, 4, 8, 8, seed=1), encoder_hidden_states=_randn(B, 6, 16, seed=2),
              timestep=torch.tensor([10] * B), return_dict=False)
    return m.eval(), kw


def pixart(num_layers=1):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=72, in_channels=4, out_channels=8,
                                 num_layers=num_layers, cross_attention_dim=144, sample_size=8, patch_size=2,
                                 caption_channels=16)
    kw = dict(hidden_states=_randn(B, 4, 8, 8, seed=1), encoder_hidden_states=_randn(B, 6, 16, seed=2),
              timestep=torch.tensor([10] * B), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
              return_dict=False)
    return m.eval(), kw


def dit(num_layers=1):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=num_layers,
                              sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    kw = dict(hidden_states=_randn(B, 4, 8, 8, seed=1), timestep=torch.tensor([10] * B),
              class_labels=torch.tensor([1] * B), return_dict=False)
    return m.eval(), kw


class ViTBlock(nn.Module):
    """A plain pre-norm ViT block: fused ``qkv`` linear, ``[B, N, 3, H, D]`` permute, SDPA, ``proj``."""

    def __init__(self, dim=64, heads=4, mlp=2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp * dim), nn.GELU(), nn.Linear(mlp * dim, dim))

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, depth=2, dim=64, heads=4):
        super().__init__()
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(depth))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


class _Renamed(nn.Module):
    """The ViT block with every module renamed: matching must not depend on names."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.h = heads
        self.n_a = nn.LayerNorm(dim)
        self.w_in = nn.Linear(dim, 3 * dim)
        self.w_out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        t = self.w_in(self.n_a(x)).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(t[0], t[1], t[2])
        return x + self.w_out(a.transpose(1, 2).reshape(b, n, c))


class RenamedViT(nn.Module):
    def __init__(self, depth=2, dim=64, heads=4):
        super().__init__()
        self.zz = nn.ModuleList(_Renamed(dim, heads) for _ in range(depth))

    def forward(self, x):
        for m in self.zz:
            x = m(x)
        return x


def vit(renamed=False):
    torch.manual_seed(0)
    m = RenamedViT() if renamed else ViT()
    return m.eval(), dict(x=_randn(B, 20, 64, seed=1))


MODELS = {"flux": flux, "sd3": sd3, "hunyuan_video": hunyuan_video, "wan": wan, "cogvideox": cogvideox,
          "pixart": pixart, "dit": dit, "vit": vit}
