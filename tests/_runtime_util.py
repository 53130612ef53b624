"""Shared helpers of the runtime tests: a hand-made joint text+image layer driven through ``engine``.

The layer mimics an MM-DiT block: text rows ``[0, T)`` and image rows ``[T, N)`` have their own Q and
output projections (two ``linear_q`` / ``linear_o`` calls with ``row_offset`` 0 and T); K and V are dense
``F.linear`` unless ``forward(kv=True)`` sends them through ``linear_kv`` (per stream with ``streams``).
Inputs drift smoothly with the step so that feature caching and Taylor extrapolation see realistic
histories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from flashomni_compile.runtime import engine
from flashomni_compile.runtime.controller import clear_step
from flashomni_compile.runtime.hooks import clear_symbol_hooks
from flashomni_compile.runtime.options import RuntimeOptions
from flashomni_compile.runtime.spec import SiteSpec, register_site


@pytest.fixture(autouse=True)
def fresh_runtime():
    """Every runtime test starts and ends with no state, no explicit step and no hooks
    (import it into a test module to make it apply there)."""
    engine.reset()
    clear_step()
    clear_symbol_hooks()
    yield
    engine.reset()
    clear_step()
    clear_symbol_hooks()


def make_site(options, *, heads=2, head_dim=64, seq=200, text_len=40, text_first=True, grid=None,
              name="blocks.0.attn", pieces=("gemm_q", "gemm_kv", "attention", "gemm_o")) -> int:
    if isinstance(options, dict):
        # these layers are tiny: send every projection through the sparse GEMMs unless a test says otherwise
        options = RuntimeOptions.from_dict({"sparse_gemm_min_macs": 0, "sparse_gemm_o_min_macs": 0, **options})
    spec = SiteSpec(name=name, kind="joint" if text_len else "self", heads=heads, head_dim=head_dim, seq_q=seq,
                    seq_kv=seq, text_len=text_len, text_first=text_first, grid=grid, pieces=pieces,
                    options=options)
    return register_site(spec)


@dataclass
class Layer:
    """Weights of one layer (``anchor`` is ``wq_img``, a per-layer weight as in the backend)."""

    heads: int
    head_dim: int
    text_len: int
    wq_txt: torch.Tensor
    bq_txt: torch.Tensor
    wq_img: torch.Tensor
    bq_img: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo_txt: torch.Tensor
    bo_txt: torch.Tensor
    wo_img: torch.Tensor
    bo_img: torch.Tensor

    @property
    def anchor(self) -> torch.Tensor:
        return self.wq_img

    @classmethod
    def random(cls, heads=2, head_dim=64, text_len=40, dtype=torch.float64, seed=0) -> "Layer":
        g = torch.Generator().manual_seed(seed)
        c = heads * head_dim
        w = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dtype)  # noqa: E731
        return cls(heads, head_dim, text_len, w(c, c), w(c), w(c, c), w(c), w(c, c), w(c, c), w(c, c), w(c), w(c, c), w(c))


@dataclass
class Trace:
    """Everything one forward of the layer produced (for reference computations)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor       # attention() output [B, H, N, D]
    a: torch.Tensor         # [B, N, H*D]
    y: torch.Tensor         # output projection [B, N, C]


def inputs(step: int, batch=1, seq=200, width=128, dtype=torch.float64, seed=1, drift=0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, seq, width, generator=g)
    x1 = torch.randn(batch, seq, width, generator=g)
    x2 = torch.randn(batch, seq, width, generator=g)
    return (x0 + drift * step * x1 + 0.5 * drift * drift * step * step * x2).to(dtype)


def _kv(site: int, L: Layer, x: torch.Tensor, streams: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V through ``engine.linear_kv`` (text and image rows as two calls each with ``streams``)."""
    T = L.text_len
    if not streams:
        return (engine.linear_kv(site, L.anchor, x, L.wk, None, 0), engine.linear_kv(site, L.anchor, x, L.wv, None, 0))
    return tuple(torch.cat([engine.linear_kv(site, L.anchor, x[:, :T], w, None, 0),
                            engine.linear_kv(site, L.anchor, x[:, T:], w, None, T)], dim=1) for w in (L.wk, L.wv))


def forward(site: int, L: Layer, x: torch.Tensor, kpm: Optional[torch.Tensor] = None, streams: bool = True,
            fused: bool = True, kv: bool = False, kv_first: bool = False) -> Trace:
    """One layer forward through ``engine`` (``fused=False``: attention only, dense projections;
    ``kv=True``: K and V through ``linear_kv``, before the Q projections with ``kv_first``)."""
    B, N, _ = x.shape
    H, D, T = L.heads, L.head_dim, L.text_len
    lq = engine.linear_q if fused else (lambda s, an, x, w, b, off, cols: F.linear(x, w, b))
    lo = engine.linear_o if fused else (lambda s, an, a, w, b, off, e, ew: F.linear(a, w, b))
    if kv and kv_first:
        k, v = _kv(site, L, x, streams)
    if streams:
        q = torch.cat([lq(site, L.anchor, x[:, :T], L.wq_txt, L.bq_txt, 0, H * D),
                       lq(site, L.anchor, x[:, T:], L.wq_img, L.bq_img, T, H * D)], dim=1)
    else:
        q = lq(site, L.anchor, x, L.wq_img, L.bq_img, 0, H * D)
    if not kv:
        k, v = F.linear(x, L.wk), F.linear(x, L.wv)
    elif not kv_first:
        k, v = _kv(site, L, x, streams)
    q4, k4, v4 = (t.view(B, N, H, D).transpose(1, 2) for t in (q, k, v))
    out = engine.attention(site, L.anchor, q4, k4, v4, kpm, D ** -0.5)
    a = out.transpose(1, 2).reshape(B, N, H * D)
    if streams:
        y = torch.cat([lo(site, L.anchor, a[:, :T], L.wo_txt, L.bo_txt, 0, None, None),
                       lo(site, L.anchor, a[:, T:], L.wo_img, L.bo_img, T, None, None)], dim=1)
    else:
        y = lo(site, L.anchor, a, L.wo_img, L.bo_img, 0, None, None)
    return Trace(q4, k4, v4, out, a, y)


def dense_forward(L: Layer, x: torch.Tensor, kpm: Optional[torch.Tensor] = None, streams: bool = True) -> Trace:
    """The same layer with plain torch (the dense reference)."""
    B, N, _ = x.shape
    H, D, T = L.heads, L.head_dim, L.text_len
    if streams:
        q = torch.cat([F.linear(x[:, :T], L.wq_txt, L.bq_txt), F.linear(x[:, T:], L.wq_img, L.bq_img)], dim=1)
    else:
        q = F.linear(x, L.wq_img, L.bq_img)
    k, v = F.linear(x, L.wk), F.linear(x, L.wv)
    q4, k4, v4 = (t.view(B, N, H, D).transpose(1, 2) for t in (q, k, v))
    mask = None if kpm is None else kpm[:, None, None, :]
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=D ** -0.5)
    a = out.transpose(1, 2).reshape(B, N, H * D)
    if streams:
        y = torch.cat([F.linear(a[:, :T], L.wo_txt, L.bo_txt), F.linear(a[:, T:], L.wo_img, L.bo_img)], dim=1)
    else:
        y = F.linear(a, L.wo_img, L.bo_img)
    return Trace(q4, k4, v4, out, a, y)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
