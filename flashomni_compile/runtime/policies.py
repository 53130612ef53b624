"""Sparsity policies: small frozen objects with one method, ``__call__(ctx) -> SparseSymbols``.

A policy runs at update steps only, on the device, and never syncs: it sees a ``PolicyContext`` (the
site's ``SiteSpec``, the step, the pooled Q/K block means and pooled block scores, the dense attention
output of this update and of the previous one) and returns the symbols the dispatch steps will use
until the next update. Decisions are per (batch, head, q-block): no order is shared by all heads.

Shape legend: ``B`` batch, ``H`` heads, ``D`` head dim, ``Nq``/``Nkv`` tokens, ``NQB``/``NKB`` q/kv blocks.

Built-ins (``get_policy(name, **kwargs)``; ``policy_names()`` lists them):

=============  ==========================================================================================
``dense``      every symbol kept.
``window``     static local windows over the token grid (``spec.grid`` or ``grid=``); text kept dense.
``pooled_qk``  drop the kv-blocks holding the lowest ``tau_kv`` of the pooled attention mass of each row
               (FlashOmni / SpargeAttn); text rows and columns and the diagonal kept.
``qcache``     cache the (q-block, head) pairs whose attention output changed least between the last two
               updates; text q-blocks kept; optional FlashOmni text-guidance score.
``layer``      layer granularity: an inner policy (qcache) whose site is cached whole when its kept
               q-density falls below ``threshold``.
``flashomni``  the combination (default): pooled_qk + qcache + layer, thresholds ramped over the steps.
=============  ==========================================================================================

Two optional host-side attributes tell the engine which kernels it needs: ``caches_q`` (the policy may
set ``q_keep`` to False: feature cache, sparse GEMM-Q/GEMM-O) and ``skips_kv`` (it may set ``kv_keep``
to False). A policy without them is assumed to do both.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._capture import device_cache
from ..kernels.plan import kv_select, layer_granularity, q_select, text_block_range
from ..kernels.refresh import block_norm
from ..symbols import SparseSymbols, num_blocks
from .spec import SiteSpec

__all__ = ["PolicyContext", "DensePolicy", "WindowPolicy", "PooledQKPolicy", "QCachePolicy", "LayerCachePolicy",
           "FlashOmniPolicy", "get_policy", "register_policy", "policy_names", "block_reduce", "pooled_scores"]

Ramp = Union[float, tuple[float, float]]


# ---------------------------------------------------------------------------------------------------
# What a policy sees
# ---------------------------------------------------------------------------------------------------
def block_reduce(x: Tensor, block: int, dim: int = 2) -> Tensor:
    """Sum of ``x`` over consecutive blocks of ``block`` entries along ``dim`` (last block may be partial)."""
    n = x.shape[dim]
    nb = num_blocks(n, block)
    x = x.movedim(dim, -1)
    x = F.pad(x, (0, nb * block - n))
    return x.reshape(*x.shape[:-1], nb, block).sum(-1).movedim(-1, dim)


def _block_reduce_to(x: Tensor, block: int, dim: int, op: Callable[..., Tensor], dtype: torch.dtype) -> Tensor:
    """``op`` (``torch.sum`` or ``torch.mean``) over consecutive blocks of ``block`` entries along ``dim``,
    accumulated in ``dtype``. The full blocks are a view of ``x`` and the partial last block a slice, so
    no converted or padded copy of ``x`` is made: a bf16 ``x`` on CUDA is read once, reduced in float32."""
    dim = dim % x.dim()
    n = x.shape[dim]
    nfull, rem = divmod(n, block)
    parts = []
    if nfull:
        parts.append(op(x.narrow(dim, 0, nfull * block).unflatten(dim, (nfull, block)), dim + 1, dtype=dtype))
    if rem:
        parts.append(op(x.narrow(dim, nfull * block, rem), dim, keepdim=True, dtype=dtype))
    if not parts:
        return x.new_zeros(*x.shape[:dim], 0, *x.shape[dim + 1:], dtype=dtype)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def pooled_scores(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], scale: float, block_q: int,
                  block_kv: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean-pool Q and K per block and return ``(pooled_q [B,H,NQB,D], pooled_k [B,H,NKB,D], scores)``.

    ``scores [B, H, NQB, NKB]`` is the row softmax of ``scale * pooled_q . pooled_k`` (float32); kv-blocks
    with no visible key get 0. Padded keys are left out of the K means.
    """
    # Block means accumulated in float32 straight from q and k: the former ``q.float()`` copies and
    # padded reshapes cost ~22 bytes of traffic per element of q and k on every update step; this reads
    # each element once (2 bytes in bf16).
    f32 = torch.float32
    pq = _block_reduce_to(q, block_q, 2, torch.mean, f32)
    if key_padding_mask is None:
        pk = _block_reduce_to(k, block_kv, 2, torch.mean, f32)
        empty = None
    else:
        # k * mask is exact (x * 1, x * 0) in any dtype, and propagates NaN like the float32 product did
        km = k * key_padding_mask[:, None, :, None].to(k.dtype)
        cnt_k = _block_reduce_to(key_padding_mask, block_kv, 1, torch.sum, f32)                 # [B, NKB]
        pk = _block_reduce_to(km, block_kv, 2, torch.sum, f32) / cnt_k.clamp_min(1.0)[:, None, :, None]
        empty = (cnt_k == 0)[:, None, None, :]
    logits = torch.matmul(pq, pk.transpose(-1, -2)).mul_(scale)
    if empty is not None:
        logits = logits.masked_fill_(empty, float("-inf"))
    return pq, pk, torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def text_blocks(n: int, text_len: int, text_first: bool, block: int, device=None) -> Tensor:
    """Bool ``[NB]``: the blocks of a joint sequence of ``n`` tokens that hold at least one text token
    (``kernels.plan.text_block_range`` as a mask)."""
    lo, hi = text_block_range(n, text_len, text_first, block)
    b = torch.arange(num_blocks(n, block), device=device)
    return (b >= lo) & (b < hi)


# Update steps ask for these per layer, several times per policy call (each ~7 small launches when
# rebuilt): they depend on host values only, so one tensor per (shape, device) is built and shared.
# Callers must not edit the returned tensors in place (no built-in policy does).
# (device_cache: like lru_cache, but not filled during a CUDA-graph capture, see _capture.py)
_text_blocks_shared = device_cache(256)(text_blocks)


@device_cache(256)
def _diagonal_shared(nqb: int, nkb: int, block_q: int, block_kv: int, joint: bool, device: torch.device) -> Tensor:
    if not joint:
        return torch.zeros(nqb, nkb, dtype=torch.bool, device=device)
    qs = torch.arange(nqb, device=device) * block_q
    ks = torch.arange(nkb, device=device) * block_kv
    return (qs[:, None] < ks[None, :] + block_kv) & (ks[None, :] < qs[:, None] + block_q)


@dataclass
class PolicyContext:
    """Everything a policy sees at one update step of one layer of one site.

    Attributes:
        spec: the site's static facts (heads, head_dim, seq lengths, text_len, text_first, grid, ...).
        step: the denoising step (host int); total: number of steps when known, else None.
        block_q, block_kv: symbol block sizes.
        pooled_q ``[B,H,NQB,D]``, pooled_k ``[B,H,NKB,D]``: block means (float32).
        scores ``[B,H,NQB,NKB]``: row softmax of the pooled logits (float32).
        out ``[B,H,Nq,D]``: this update's dense attention output; seq_kv: ``Nkv``.
        prev_out ``[B,H,Nq,D]`` or None: the previous update's output (None at a layer's first update
            or when the layer keeps no feature cache).
        steps_since_update: steps since the previous update (None at the first).
        prev_symbols: the symbols in force until now (None at the first update).
    """

    spec: SiteSpec
    step: int
    total: Optional[int]
    block_q: int
    block_kv: int
    pooled_q: Tensor
    pooled_k: Tensor
    scores: Tensor
    out: Tensor
    seq_kv: int
    prev_out: Optional[Tensor] = None
    steps_since_update: Optional[int] = None
    prev_symbols: Optional[SparseSymbols] = None
    # memos of one update (computed on first use; the engine hands ``_diff`` on to the feature cache)
    _diff: Optional[Tensor] = field(default=None, init=False, repr=False, compare=False)
    _change: Optional[Tensor] = field(default=None, init=False, repr=False, compare=False)
    # set by the engine when the layer has a feature cache: ``() -> (num, den)``, the block norms of
    # ``out - prev_out`` and ``prev_out`` from the cache's fused refresh pass (``FeatureCache.refresh``),
    # which also forms the cache's new Taylor terms, so ``change`` needs no float32 difference tensor
    _refresh: Optional[Callable[[], tuple[Tensor, Tensor]]] = field(default=None, init=False, repr=False,
                                                                    compare=False)

    @property
    def batch(self) -> int:
        return self.out.shape[0]

    @property
    def heads(self) -> int:
        return self.out.shape[1]

    @property
    def seq_q(self) -> int:
        return self.out.shape[2]

    @property
    def device(self) -> torch.device:
        return self.out.device

    @property
    def joint(self) -> bool:
        """Queries and keys are the same joint sequence (self / joint attention)."""
        return self.seq_q == self.seq_kv

    @property
    def text_q(self) -> Tensor:
        """Bool ``[NQB]``: q-blocks holding text tokens (all False without text or for cross attention)."""
        t = self.spec.text_len if self.joint else 0
        return _text_blocks_shared(self.seq_q, t, self.spec.text_first, self.block_q, self.device)

    @property
    def n_text_q(self) -> int:
        """Number of q-blocks holding text (a host int: no device read)."""
        lo, hi = self.text_q_range
        return hi - lo

    @property
    def text_q_range(self) -> tuple[int, int]:
        """The q-blocks ``[lo, hi)`` holding text, as host ints (``text_q`` as a range)."""
        t = self.spec.text_len if self.joint else 0
        return text_block_range(self.seq_q, t, self.spec.text_first, self.block_q)

    @property
    def text_kv_range(self) -> tuple[int, int]:
        """The kv-blocks ``[lo, hi)`` holding text, as host ints (``text_kv`` as a range)."""
        t = self.spec.text_len if self.joint else 0
        return text_block_range(self.seq_kv, t, self.spec.text_first, self.block_kv)

    @property
    def text_kv(self) -> Tensor:
        """Bool ``[NKB]``: kv-blocks holding text tokens."""
        t = self.spec.text_len if self.joint else 0
        return _text_blocks_shared(self.seq_kv, t, self.spec.text_first, self.block_kv, self.device)

    def diagonal(self) -> Tensor:
        """Bool ``[NQB, NKB]``: kv-blocks sharing tokens with the q-block (all False for cross attention)."""
        nqb, nkb = self.scores.shape[-2:]
        return _diagonal_shared(nqb, nkb, self.block_q, self.block_kv, self.joint, self.device)

    def progress(self, ramp_steps: int) -> float:
        """Denoising progress in [0, 1]: ``step / (total - 1)``, or ``step / ramp_steps`` without a total."""
        if self.total is not None and self.total > 1:
            return min(1.0, self.step / (self.total - 1))
        return min(1.0, self.step / max(1, ramp_steps))

    def output_diff(self) -> Optional[Tensor]:
        """``out - prev_out`` in float32 (float64 for float64 outputs), ``[B,H,Nq,D]``; None without a
        previous output. Computed once per update: the feature cache's first divided difference reuses it."""
        if self.prev_out is None:
            return None
        if self._diff is None:
            acc = torch.float64 if self.out.dtype == torch.float64 else torch.float32
            self._diff = self.out.to(acc).sub_(self.prev_out) if self.out.dtype != acc \
                else self.out - self.prev_out
        return self._diff

    def change(self) -> Optional[Tensor]:
        """Relative L2 change of each (q-block, head) output since the previous update, ``[B,H,NQB]``
        (float32; computed once per update, do not edit it in place)."""
        if self.prev_out is None:
            return None
        if self._change is None:
            # ||diff||_block / ||prev||_block; the floor 1e-6 on the norm is the former 1e-12 floor on the
            # squared norm
            if self._refresh is not None and self._diff is None:
                num, den = self._refresh()            # one fused pass, no difference tensor
            else:
                d = self.output_diff()
                num = block_norm(d, self.block_q)
                den = block_norm(self.prev_out, self.block_q, dtype=d.dtype)
            self._change = (num / den.clamp_min(1e-6)).float()
        return self._change

    def dense(self) -> SparseSymbols:
        """All-kept symbols for this site."""
        return SparseSymbols.dense(self.batch, self.heads, self.seq_q, self.seq_kv, block_q=self.block_q,
                                   block_kv=self.block_kv, device=self.device)

    def symbols(self, q_keep: Tensor, kv_keep: Tensor) -> SparseSymbols:
        return SparseSymbols(q_keep, kv_keep, self.seq_q, self.seq_kv, self.block_q, self.block_kv)


def _check_fraction(owner: str, name: str, v: Any, lo_open: bool = False) -> None:
    vals = v if isinstance(v, tuple) else (v,)
    if (len(vals) not in (1, 2) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in vals)
            or any(not (0.0 <= x <= 1.0) for x in vals)):
        raise ValueError(f"{owner}: {name}={v!r} is not valid; need a number in [0, 1] "
                         f"or a (start, end) pair of such numbers")


def _ramp(v: Ramp, progress: float) -> float:
    """A threshold that is a number, or a ``(start, end)`` pair interpolated linearly over the steps."""
    if isinstance(v, tuple):
        return v[0] + (v[1] - v[0]) * progress
    return float(v)


# ---------------------------------------------------------------------------------------------------
# Built-in policies
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DensePolicy:
    """Every (q-block, head) computed and every kv-block kept: the sparse path then equals dense."""

    caches_q = False
    skips_kv = False

    def __call__(self, ctx: PolicyContext) -> SparseSymbols:
        return ctx.dense()


@dataclass(frozen=True)
class PooledQKPolicy:
    """kv-block skipping from pooled scores (FlashOmni, SpargeAttn).

    Per (b, h, q-block) row of ``ctx.scores``, sort the kv-blocks by pooled mass and drop the smallest
    ones while their cumulative mass stays below ``tau_kv``. Text rows and text columns are kept
    (``keep_text``), and so are the kv-blocks on the diagonal (``keep_diagonal``). ``tau_kv = 0`` is dense.
    """

    tau_kv: float = 0.1
    keep_text: bool = True
    keep_diagonal: bool = True

    caches_q = False

    @property
    def skips_kv(self) -> bool:
        return self.tau_kv > 0

    def __post_init__(self):
        _check_fraction("pooled_qk", "tau_kv", self.tau_kv)

    def kv_keep(self, ctx: PolicyContext, tau: float) -> Tensor:
        # one launch on CUDA (kernels/plan.py: a bisection instead of the sort; its torch twin is the
        # sort + cumsum + scatter this method ran before)
        none = (0, 0)
        text_q, text_kv = (ctx.text_q_range, ctx.text_kv_range) if self.keep_text else (none, none)
        return kv_select(ctx.scores, tau, text_q, text_kv, self.keep_diagonal and ctx.joint, ctx.block_q,
                         ctx.block_kv)

    def __call__(self, ctx: PolicyContext) -> SparseSymbols:
        q_keep = torch.ones(ctx.scores.shape[:3], dtype=torch.bool, device=ctx.device)
        return ctx.symbols(q_keep, self.kv_keep(ctx, self.tau_kv))


@dataclass(frozen=True)
class QCachePolicy:
    """q-block feature caching: cached (q-block, head) pairs take the feature cache at dispatch steps.

    Ranks the non-text (q-block, head) pairs of each batch element by how much their output changed
    between the last two updates (``ctx.change()``, relative L2) and caches the lowest ``fraction`` of
    them; with ``threshold``, only pairs whose change is at most ``threshold`` are cached. With
    ``text_guidance > 0`` (joint text+image sites) the rank score adds ``text_guidance`` times
    FlashOmni's text-guidance score (pooled mass from text q-blocks to the block plus the block's pooled
    mass on text kv-blocks; the first term only when ``block_q == block_kv``), each term normalised by its mean, so blocks tied to the text are computed.
    At a layer's first update (no previous output) nothing is cached.
    """

    fraction: float = 0.3
    threshold: Optional[float] = None
    text_guidance: float = 0.0

    skips_kv = False

    @property
    def caches_q(self) -> bool:
        return self.fraction > 0

    def __post_init__(self):
        _check_fraction("qcache", "fraction", self.fraction)
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                                           or self.threshold < 0):
            raise ValueError(f"qcache: threshold={self.threshold!r} is not valid; need a number >= 0 or None")
        if isinstance(self.text_guidance, bool) or not isinstance(self.text_guidance, (int, float)) or self.text_guidance < 0:
            raise ValueError(f"qcache: text_guidance={self.text_guidance!r} is not valid; need a number >= 0")

    def q_keep(self, ctx: PolicyContext, fraction: float, layer_threshold: float = 0.0) -> Tensor:
        """The decision for ``fraction``; with ``layer_threshold > 0`` also layer granularity (a batch
        element whose kept fraction is under it is cached whole; only with a change measure). One launch
        on CUDA (``kernels.plan.q_select``, a bisection for the k-th score instead of the argsort)."""
        B, H, nqb = ctx.scores.shape[:3]
        change = ctx.change()
        n_img = nqb - ctx.n_text_q
        k = int(math.floor(fraction * n_img * H))
        if change is None or k <= 0:
            return torch.ones(B, H, nqb, dtype=torch.bool, device=ctx.device)
        guided = self.text_guidance > 0 and bool(ctx.spec.text_len) and ctx.joint
        return q_select(change, ctx.scores if guided else None, k, self.threshold, self.text_guidance,
                        ctx.text_q_range, ctx.text_kv_range, ctx.block_q == ctx.block_kv, layer_threshold)

    def __call__(self, ctx: PolicyContext) -> SparseSymbols:
        kv_keep = torch.ones(ctx.scores.shape, dtype=torch.bool, device=ctx.device)
        return ctx.symbols(self.q_keep(ctx, self.fraction), kv_keep)


@dataclass(frozen=True)
class LayerCachePolicy:
    """Layer granularity: run ``inner``; where its kept q-density (fraction of computed (q-block, head)
    pairs, per batch element) is below ``threshold``, the whole site is cached until the next update."""

    inner: Any = None
    threshold: float = 0.5

    def __post_init__(self):
        if self.inner is None:
            object.__setattr__(self, "inner", QCachePolicy())
        if not callable(self.inner):
            raise ValueError(f"layer: inner must be a policy, got {type(self.inner).__name__}")
        _check_fraction("layer", "threshold", self.threshold)

    caches_q = True

    @property
    def skips_kv(self) -> bool:
        return getattr(self.inner, "skips_kv", True)

    def __call__(self, ctx: PolicyContext) -> SparseSymbols:
        s = self.inner(ctx)
        return ctx.symbols(layer_granularity(s.q_keep, self.threshold), s.kv_keep)


@dataclass(frozen=True)
class FlashOmniPolicy:
    """The combination (default policy): pooled-QK kv-block skipping + q-block feature caching with the
    text-guidance score + layer granularity, with step-dependent thresholds.

    ``tau_kv`` and ``cache_fraction`` are numbers or ``(start, end)`` pairs ramped linearly with the
    denoising progress (``ctx.progress(ramp_steps)``): early steps, where the image is still forming,
    are kept denser than late ones.

    The defaults are the point measured best on the project's trained video model (docs/quality.md:
    with ``sparse_updates`` on, the default run-time option): caching is cheap in quality there and
    kv-block skipping is not, so ``cache_fraction`` is high enough that layer granularity caches most
    sites whole at dispatch steps, and ``tau_kv`` is low; the update steps then skip only the kv-blocks
    that hold the least attention mass. The previous, more conservative default (``tau_kv=(0.02, 0.1),
    cache_fraction=(0.2, 0.5)`` with ``sparse_updates=False``) is in docs/policies.md.
    """

    tau_kv: Ramp = (0.02, 0.05)
    cache_fraction: Ramp = 0.9
    cache_threshold: Optional[float] = None
    text_guidance: float = 1.0
    layer_threshold: float = 0.2
    keep_diagonal: bool = True
    ramp_steps: int = 50

    def __post_init__(self):
        for name in ("tau_kv", "cache_fraction"):
            v = getattr(self, name)
            if isinstance(v, list):
                v = tuple(v)
                object.__setattr__(self, name, v)
            _check_fraction("flashomni", name, v)
        _check_fraction("flashomni", "layer_threshold", self.layer_threshold)
        if isinstance(self.ramp_steps, bool) or not isinstance(self.ramp_steps, int) or self.ramp_steps < 1:
            raise ValueError(f"flashomni: ramp_steps={self.ramp_steps!r} is not valid; need an int >= 1")
        QCachePolicy(0.0, self.cache_threshold, self.text_guidance)  # validates those two

    @property
    def caches_q(self) -> bool:
        return max(_pair(self.cache_fraction)) > 0 or self.layer_threshold > 0

    @property
    def skips_kv(self) -> bool:
        return max(_pair(self.tau_kv)) > 0

    def __call__(self, ctx: PolicyContext) -> SparseSymbols:
        prog = ctx.progress(self.ramp_steps)
        kv_keep = PooledQKPolicy(keep_diagonal=self.keep_diagonal).kv_keep(ctx, _ramp(self.tau_kv, prog))
        qc = QCachePolicy(0.0, self.cache_threshold, self.text_guidance)
        # layer granularity needs a change measure, like qcache: q_keep applies it only with one
        q_keep = qc.q_keep(ctx, _ramp(self.cache_fraction, prog), self.layer_threshold)
        return ctx.symbols(q_keep, kv_keep)


def _pair(v: Ramp) -> tuple[float, ...]:
    return v if isinstance(v, tuple) else (v,)


@dataclass(frozen=True)
class WindowPolicy:
    """Static local windows over the token grid; text blocks kept dense (rows and columns).

    The image/video tokens (everything but the text) are laid out in raster order over
    ``grid = (frames, height, width)`` (``grid=`` here, else ``spec.grid``). A kv-block is kept for a
    q-block when their tokens' bounding boxes are within ``window = (frames, height, width)``
    half-extents of each other on every axis (bounding boxes make the pattern conservative: it keeps a
    superset of the token-level window). Without a grid, the tokens form one line and ``radius_1d``
    tokens is the half-extent.
    """

    window: tuple[int, int, int] = (1, 8, 8)
    grid: Optional[tuple[int, int, int]] = None
    radius_1d: int = 256

    caches_q = False
    skips_kv = True

    def __post_init__(self):
        for name in ("window", "grid"):
            v = getattr(self, name)
            if v is None and name == "grid":
                continue
            v = tuple(v) if isinstance(v, (list, tuple)) else v
            lo = 0 if name == "window" else 1
            if not isinstance(v, tuple) or len(v) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < lo
                                                               for x in v):
                raise ValueError(f"window: {name}={getattr(self, name)!r} is not valid; need 3 ints "
                                 f"(frames, height, width) >= {lo}")
            object.__setattr__(self, name, v)
        if isinstance(self.radius_1d, bool) or not isinstance(self.radius_1d, int) or self.radius_1d < 0:
            raise ValueError(f"window: radius_1d={self.radius_1d!r} is not valid; need an int >= 0")

    def __call__(self, ctx: PolicyContext) -> SparseSymbols:
        if not ctx.joint:
            raise ValueError(f"window policy needs self/joint attention (Nq == Nkv); site {ctx.spec.name!r} has "
                             f"Nq={ctx.seq_q}, Nkv={ctx.seq_kv}")
        text = ctx.spec.text_len
        grid = self.grid or ctx.spec.grid
        n_img = ctx.seq_q - text
        if grid is None:
            grid, window = (1, 1, n_img), (0, 0, self.radius_1d)
        else:
            window = self.window
        if math.prod(grid) != n_img:
            raise ValueError(f"window policy: grid {tuple(grid)} holds {math.prod(grid)} tokens but site "
                             f"{ctx.spec.name!r} has {n_img} image tokens ({ctx.seq_q} tokens, {text} text); "
                             "pass grid=(frames, height, width) matching the model's patch grid")
        pattern = _window_pattern_on(ctx.device, ctx.seq_q, text, ctx.spec.text_first, tuple(grid),
                                     tuple(window), ctx.block_q, ctx.block_kv)
        kv_keep = pattern.expand(ctx.batch, ctx.heads, -1, -1).clone()
        q_keep = torch.ones(ctx.batch, ctx.heads, pattern.shape[0], dtype=torch.bool, device=ctx.device)
        return ctx.symbols(q_keep, kv_keep)


_FAR = 1 << 40


@device_cache(64)
def _window_pattern_on(device: torch.device, *args) -> Tensor:
    """``_window_pattern`` copied to ``device`` once (no host-to-device copy per update step)."""
    return _window_pattern(*args).to(device)


@functools.lru_cache(maxsize=64)
def _window_pattern(n: int, text_len: int, text_first: bool, grid: tuple[int, int, int],
                    window: tuple[int, int, int], block_q: int, block_kv: int) -> Tensor:
    """Bool ``[NQB, NKB]`` block pattern of the window policy (built once on the CPU per shape)."""
    f, h, w = grid
    img0 = text_len if text_first else 0
    idx = torch.arange(n) - img0
    is_img = (idx >= 0) & (idx < f * h * w)
    coords = torch.stack([idx // (h * w), (idx // w) % h, idx % w], dim=-1)       # [n, 3], garbage on text

    def boxes(block: int) -> tuple[Tensor, Tensor, Tensor]:
        nb = num_blocks(n, block)
        pad = nb * block - n
        c = F.pad(coords, (0, 0, 0, pad)).reshape(nb, block, 3)
        m = F.pad(is_img, (0, pad)).reshape(nb, block, 1)
        lo = torch.where(m, c, _FAR).amin(dim=1)        # a pure-text block gets an empty box (lo > hi)
        hi = torch.where(m, c, -_FAR).amax(dim=1)
        has_text = (~F.pad(is_img, (0, pad), value=True)).reshape(nb, block).any(dim=1)
        return lo, hi, has_text

    qlo, qhi, qtext = boxes(block_q)
    klo, khi, ktext = boxes(block_kv)
    gap = (torch.maximum(qlo[:, None], klo[None]) - torch.minimum(qhi[:, None], khi[None])).clamp_min(0)
    near = (gap <= torch.tensor(window)).all(dim=-1)
    # pure-text blocks have far-away boxes: they are kept through the text rule
    return near | qtext[:, None] | ktext[None, :]


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_policy(name: str, factory: Callable[..., Any]) -> None:
    """Make ``options={"policy": name}`` and ``get_policy(name, **kw)`` build ``factory(**kw)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"policy factory for {name!r} must be callable, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def policy_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_policy(policy: Any = "flashomni", **kwargs: Any) -> Any:
    """A policy instance from a registered name (with keyword arguments) or an instance (returned as is).

    >>> get_policy("pooled_qk", tau_kv=0.2)
    PooledQKPolicy(tau_kv=0.2, keep_text=True, keep_diagonal=True)
    """
    if not isinstance(policy, str):
        if kwargs:
            raise ValueError(f"keyword arguments apply to a policy given by name, not to {type(policy).__name__}")
        if not callable(policy):
            raise ValueError(f"a policy must be a name ({', '.join(policy_names())}) or an object with "
                             f"__call__(ctx), got {type(policy).__name__}")
        return policy
    if policy not in _REGISTRY:
        raise ValueError(f"unknown policy {policy!r}; valid: {', '.join(policy_names())}")
    factory = _REGISTRY[policy]
    if isinstance(factory, type) and hasattr(factory, "__dataclass_fields__"):
        valid = [f.name for f in fields(factory)]
        bad = sorted(set(kwargs) - set(valid))
        if bad:
            raise ValueError(f"policy {policy!r} has no argument(s) {', '.join(map(repr, bad))}; "
                             f"valid: {', '.join(valid) or '(none)'}")
    return factory(**kwargs)


for _name, _cls in (("dense", DensePolicy), ("window", WindowPolicy), ("pooled_qk", PooledQKPolicy),
                    ("qcache", QCachePolicy), ("layer", LayerCachePolicy), ("flashomni", FlashOmniPolicy)):
    register_policy(_name, _cls)
