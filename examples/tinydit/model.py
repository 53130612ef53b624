"""A small MM-DiT (SD3 / Flux style) for the procedural shapes data, written like the diffusers models.

Every block is a *joint* text+image transformer block: each stream (caption tokens, image or video
patch tokens) has its own adaLN modulation, its own Q/K/V projections, QK RMSNorm per head, its own
output projection and MLP; attention runs once over the joint sequence, text tokens first::

    q = to_q(x).unflatten(-1, (H, D))          # [B, N, H, D], likewise k, v; add_*_proj for text
    q, k = norm_q(q), norm_k(k)                 # RMSNorm over D
    q, k = rope(q), rope(k)                     # image/video tokens only (3 axes: frame, row, column)
    q = cat([q_text, q_img], dim=1).permute(0, 2, 1, 3)   # [B, H, T + N, D], as Flux does
    o = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).flatten(2)
    o_text, o_img = o.split([T, N], dim=1); x += gate * to_out(o_img); c += gate * to_add_out(o_text)

Conditioning follows PixArt's adaLN-single (diffusers ``AdaLayerNormSingle``): one shared linear maps
the timestep + pooled-caption embedding to 6 modulation vectors, and every block adds its own learned
table (zero-initialised, so each block starts as the identity: adaLN-zero). That keeps the weights of
a 4-layer, 256-wide, two-stream model under 8 MB in bf16.

Images use the same 3-axis RoPE as videos with frame index 0 (as Flux does with its zero first axis),
so a video model can start from the image model's weights.

Shape legend: ``B`` batch, ``C`` pixel channels, ``F`` frames, ``S`` image side, ``P`` patch size,
``N = F * (S/P)^2`` image/video tokens, ``T`` caption tokens, ``H`` heads, ``D`` head dim, ``W`` width.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import TEXT_LEN, VOCAB_SIZE

__all__ = ["TinyDiTConfig", "TinyMMDiT", "rope_cos_sin", "apply_rope", "save_model", "load_model",
           "WEIGHTS_DIR", "IMAGE_WEIGHTS", "VIDEO_WEIGHTS"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
IMAGE_WEIGHTS = WEIGHTS_DIR / "image.safetensors"
VIDEO_WEIGHTS = WEIGHTS_DIR / "video.safetensors"


@dataclass(frozen=True)
class TinyDiTConfig:
    """Architecture of :class:`TinyMMDiT`. ``frames`` and ``sample_size`` are the training resolution
    (the model itself accepts any frame count and any side divisible by ``patch_size``)."""

    in_channels: int = 3
    patch_size: int = 2
    sample_size: int = 64
    frames: int = 1  # 1: image model
    width: int = 256
    heads: int = 4
    layers: int = 4
    mlp_ratio: float = 2.0  # image/video stream MLP
    text_mlp_ratio: float = 0.5  # caption stream MLP (16 tokens need less)
    vocab_size: int = VOCAB_SIZE
    text_len: int = TEXT_LEN
    freq_dim: int = 64  # sinusoidal timestep features
    rope_axes: tuple[int, int, int] = (16, 24, 24)  # head-dim split over (frame, row, column)
    rope_theta: float = 100.0  # grids are at most 32 wide: 100 keeps the slowest frequency useful

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if sum(self.rope_axes) != self.head_dim or any(a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be even and sum to head_dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size ** 2


def rope_cos_sin(grid: tuple[int, int, int], axes: tuple[int, ...], theta: float,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin ``[N, D/2]`` of the rotary angles for a ``(frames, rows, cols)`` token grid, frame-major."""
    ids = torch.stack(torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid],
                                     indexing="ij"), -1).reshape(-1, 3)  # [N, 3]
    angles = []
    for a, dim in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        angles.append(ids[:, a, None] * freqs[None, :])
    angles = torch.cat(angles, -1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of ``x [B, N, H, D]`` by the angles of ``cos, sin [N, D/2]`` (in float32)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
    return out.type_as(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class JointAttention(nn.Module):
    """Joint text+image attention, separate projections per stream (diffusers ``JointAttnProcessor2_0``)."""

    def __init__(self, dim: int, heads: int, context_pre_only: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.context_pre_only = context_pre_only
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim), nn.Linear(dim, dim),
                                                             nn.Linear(dim, dim))
        self.norm_q, self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6), nn.RMSNorm(self.head_dim, eps=1e-6)
        self.norm_added_q = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.norm_added_k = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.to_out = nn.Linear(dim, dim)
        self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor,
                rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """``hidden_states [B, N, W]`` (image), ``encoder_hidden_states [B, T, W]`` (text) -> same shapes
        (the text output is None with ``context_pre_only``, as in SD3's last block)."""
        H = self.heads
        query = self.to_q(hidden_states).unflatten(-1, (H, -1))  # [B, N, H, D]
        key = self.to_k(hidden_states).unflatten(-1, (H, -1))
        value = self.to_v(hidden_states).unflatten(-1, (H, -1))
        query, key = self.norm_q(query), self.norm_k(key)
        query, key = apply_rope(query, *rope), apply_rope(key, *rope)

        enc_query = self.add_q_proj(encoder_hidden_states).unflatten(-1, (H, -1))  # [B, T, H, D]
        enc_key = self.add_k_proj(encoder_hidden_states).unflatten(-1, (H, -1))
        enc_value = self.add_v_proj(encoder_hidden_states).unflatten(-1, (H, -1))
        enc_query, enc_key = self.norm_added_q(enc_query), self.norm_added_k(enc_key)

        # text first, then image, along the sequence; attention on [B, H, T + N, D]
        query = torch.cat([enc_query, query], dim=1).permute(0, 2, 1, 3)
        key = torch.cat([enc_key, key], dim=1).permute(0, 2, 1, 3)
        value = torch.cat([enc_value, value], dim=1).permute(0, 2, 1, 3)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.permute(0, 2, 1, 3).flatten(2)  # [B, T + N, W]

        text_len = encoder_hidden_states.shape[1]
        enc_out, out = out.split([text_len, out.shape[1] - text_len], dim=1)
        if self.to_add_out is None:
            return self.to_out(out), None
        return self.to_out(out), self.to_add_out(enc_out)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class JointTransformerBlock(nn.Module):
    """One MM-DiT block: two streams, joint attention, adaLN-single modulation per stream.

    ``context_pre_only`` (the last block, as in SD3): the text stream only feeds keys and values; its
    output projection and MLP would be dead weights, so they do not exist.
    """

    def __init__(self, cfg: TinyDiTConfig, context_pre_only: bool = False):
        super().__init__()
        W = cfg.width
        self.context_pre_only = context_pre_only
        self.norm1 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.norm1_context = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.attn = JointAttention(W, cfg.heads, context_pre_only)
        self.norm2 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(W, int(W * cfg.mlp_ratio))
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(W, int(W * cfg.text_mlp_ratio))
        # per-block offsets added to the shared modulation (PixArt's scale_shift_table); zero: identity
        self.scale_shift_table = nn.Parameter(torch.zeros(6, W))
        self.scale_shift_table_context = nn.Parameter(torch.zeros(6, W))

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """``temb [B, 6, W]``: shared modulation (shift, scale, gate for attention, then for the MLP)."""
        shift, scale, gate, shift2, scale2, gate2 = (self.scale_shift_table[None] + temb).unbind(1)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = (
            self.scale_shift_table_context[None] + temb).unbind(1)

        attn_out, enc_attn_out = self.attn(_modulate(self.norm1(hidden_states), shift, scale),
                                           _modulate(self.norm1_context(encoder_hidden_states), c_shift, c_scale),
                                           rope)
        hidden_states = hidden_states + gate[:, None] * attn_out
        hidden_states = hidden_states + gate2[:, None] * self.ff(
            _modulate(self.norm2(hidden_states), shift2, scale2))
        if self.context_pre_only:
            return hidden_states, None

        encoder_hidden_states = encoder_hidden_states + c_gate[:, None] * enc_attn_out
        encoder_hidden_states = encoder_hidden_states + c_gate2[:, None] * self.ff_context(
            _modulate(self.norm2_context(encoder_hidden_states), c_shift2, c_scale2))
        return hidden_states, encoder_hidden_states


def timestep_features(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features ``[B, dim]`` of ``t [B]`` in [0, 1] (scaled to 0..1000, cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([args.cos(), args.sin()], -1)


class TinyMMDiT(nn.Module):
    """Flow-matching MM-DiT on pixels: predicts the velocity ``noise - x0`` of ``x_t = (1-t) x0 + t noise``.

    ``forward(hidden_states, timestep, caption_ids)``: ``hidden_states`` ``[B, C, S, S]`` (image) or
    ``[B, C, F, S, S]`` (video), ``timestep [B]`` in [0, 1] (1 = pure noise), ``caption_ids [B, T]``
    (int64, see ``data.tokenize``). Returns the velocity, shaped like ``hidden_states``.
    """

    def __init__(self, cfg: TinyDiTConfig = TinyDiTConfig()):
        super().__init__()
        self.config = cfg
        W = cfg.width
        self.x_embedder = nn.Linear(cfg.patch_dim, W)
        self.caption_embedder = nn.Embedding(cfg.vocab_size, W)
        self.caption_pos = nn.Parameter(torch.zeros(cfg.text_len, W))
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, W), nn.SiLU(), nn.Linear(W, W))
        self.pooled_embed = nn.Linear(W, W)
        self.adaln_single = nn.Sequential(nn.SiLU(), nn.Linear(W, 6 * W))
        self.transformer_blocks = nn.ModuleList(
            [JointTransformerBlock(cfg, context_pre_only=i == cfg.layers - 1) for i in range(cfg.layers)])
        self.norm_out = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, W))
        self.proj_out = nn.Linear(W, cfg.patch_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.caption_embedder.weight, std=0.02)
        nn.init.normal_(self.caption_pos, std=0.02)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        # adaLN-zero: no modulation and zero output at init, so every block starts as the identity
        nn.init.zeros_(self.adaln_single[1].weight)
        nn.init.zeros_(self.proj_out.weight)

    def patchify(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """``[B, C, F, S, S]`` -> tokens ``[B, N, C*P*P]`` (frame-major, then rows, then columns), grid."""
        P = self.config.patch_size
        B, C, Fr, Hh, Ww = x.shape
        if Hh % P or Ww % P:
            raise ValueError(f"image side {Hh}x{Ww} is not divisible by the patch size {P}")
        x = x.reshape(B, C, Fr, Hh // P, P, Ww // P, P).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(B, Fr * (Hh // P) * (Ww // P), C * P * P), (Fr, Hh // P, Ww // P)

    def unpatchify(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        P, C = self.config.patch_size, self.config.in_channels
        Fr, Hp, Wp = grid
        B = tokens.shape[0]
        x = tokens.reshape(B, Fr, Hp, Wp, C, P, P).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(B, C, Fr, Hp * P, Wp * P)

    def forward(self, hidden_states: Tensor, timestep: Tensor, caption_ids: Tensor) -> Tensor:
        is_image = hidden_states.dim() == 4
        x = hidden_states.unsqueeze(2) if is_image else hidden_states
        tokens, grid = self.patchify(x)
        dtype = self.x_embedder.weight.dtype
        hidden = self.x_embedder(tokens.to(dtype))

        text = self.caption_embedder(caption_ids) + self.caption_pos[None]  # [B, T, W]
        t_emb = self.time_embed(timestep_features(timestep, self.config.freq_dim).to(dtype))
        cond = t_emb + self.pooled_embed(text.mean(dim=1))  # [B, W]
        temb = self.adaln_single(cond).unflatten(1, (6, -1))  # [B, 6, W]

        rope = rope_cos_sin(grid, self.config.rope_axes, self.config.rope_theta, hidden.device)
        for block in self.transformer_blocks:
            hidden, text = block(hidden, text, temb, rope)

        shift, scale = (self.scale_shift_table[None] + cond[:, None]).unbind(1)
        out = self.proj_out(_modulate(self.norm_out(hidden), shift, scale))
        out = self.unpatchify(out, grid)
        return out[:, :, 0] if is_image else out


def save_model(model: TinyMMDiT, path: str | Path, dtype: torch.dtype = torch.bfloat16,
               extra: Optional[dict] = None) -> None:
    """Write ``model``'s weights (cast to ``dtype``) and its config as safetensors metadata."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps(asdict(model.config))}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def load_model(path: str | Path = IMAGE_WEIGHTS, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> TinyMMDiT:
    """Build a :class:`TinyMMDiT` from a safetensors file written by :func:`save_model`, in eval mode."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "config" not in meta:
        raise ValueError(f"{path}: no 'config' in the safetensors metadata; was it written by save_model?")
    raw = json.loads(meta["config"])
    raw["rope_axes"] = tuple(raw["rope_axes"])
    model = TinyMMDiT(TinyDiTConfig(**raw))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval()
