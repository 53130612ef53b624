"""Feature cache of one layer: Taylor terms of the attention output and their GEMM-O projections.

At update step ``s_n`` (dense output ``F_n``, distance ``d = s_n - s_{n-1}`` to the previous update)
the terms are refreshed as TaylorSeer's divided differences::

    D0 = F_n        D1 = (F_n - F_{n-1}) / d        D2 = (D1_n - D1_{n-1}) / d

and at a dispatch step ``t`` (``delta = t - s_n``) the cache is the truncated Taylor series

    cache(t) = D0 + delta * D1 + delta^2 / 2 * D2          (order 0: D0; order 1: the first two terms)

The attention kernel evaluates it for the cached q-blocks only, reading the terms (``dispatch_terms``);
``at(t)`` materialises it for every row (tests, and callers without the kernel).

The order in use is ``min(order, updates seen - 1)``. GEMM-O stays reduction-sparse with order > 0
because projection is linear: each term's cached heads are projected once at the update step,

    C_k = sum over cached heads h of D_k[h] . W_h^T   (+ bias in C_0 only)   (``out_proj_cache``)

and a dispatch step combines ``C(t) = C0 + delta * C1 + delta^2 / 2 * C2`` elementwise, which is exactly
the projection of ``cache(t)``'s cached heads. Every buffer is allocated at the first update (or when a
shape changes) and overwritten in place afterwards; dispatch steps only write into preallocated buffers.

Shape legend: ``B`` batch, ``H`` heads, ``N`` joint tokens, ``D`` head dim, ``M`` rows of one GEMM-O
call (``row_offset`` where they start), ``NO`` output features. Feature terms are ``[B, H, N, D]`` with
memory order ``[B, N, H, D]`` (the attention output's), so ``term.transpose(1, 2).reshape(B, N, H*D)`` is
a free view of the GEMM-O input layout.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import gemm_o
from ..kernels.ops import out_proj_cache_op, use_triton
from ..kernels.refresh import refresh_terms

__all__ = ["FeatureCache", "order_within_cap"]


def _bnhd_empty(like: Tensor) -> Tensor:
    B, H, N, D = like.shape
    return torch.empty(B, N, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def _out_proj_cache_into(dst: Tensor, a: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor,
                         head_dim: int, row_offset: int, block_q: int) -> None:
    """``out_proj_cache`` written straight into the persistent buffer ``dst`` (the Triton launcher takes
    ``out=``; the torch twin's result is copied), instead of a fresh tensor plus a DtoD copy per term."""
    if use_triton(a):
        gemm_o.out_proj_cache_triton(a, weight, bias, q_keep, head_dim, row_offset, block_q, out=dst)
    else:
        dst.copy_(out_proj_cache_op(a, weight, bias, q_keep, head_dim, row_offset, block_q))


def order_within_cap(order: int, cap_bytes: Optional[float], term_bytes: int, out_term_bytes: int) -> int:
    """The highest Taylor order ``<= order`` whose buffers fit ``cap_bytes``; -1 when not even order 0 fits.

    Order ``k`` keeps ``k + 1`` feature terms and ``k + 1`` GEMM-O terms, plus, when ``k > 0``, one buffer
    for ``C(t)`` (the attention kernel extrapolates the feature terms itself: no buffer for ``cache(t)``).
    """
    if cap_bytes is None:
        return order
    for k in range(order, -1, -1):
        if (k + 1) * term_bytes + (k + 1 + (1 if k > 0 else 0)) * out_term_bytes <= cap_bytes:
            return k
    return -1


class FeatureCache:
    """Taylor terms ``D0..Dk`` of one layer's attention output and their per-call GEMM-O projections."""

    def __init__(self, order: int) -> None:
        self.order = order                       # the most terms this cache keeps (after the cap)
        self.terms: list[Tensor] = []            # D0..D_order, allocated at the first update
        self.updates = 0                         # updates seen since the last reset (host int)
        self.last_step: Optional[int] = None
        self.extrap: Optional[Tensor] = None     # cache(t) for order > 0, allocated by the first ``at``
        self.out_terms: dict[int, list[Tensor]] = {}   # row_offset -> C0..C_order   [B, M, NO]
        self.out_buf: dict[int, Tensor] = {}           # row_offset -> C(t)        [B, M, NO]
        self.out_step: dict[int, int] = {}             # row_offset -> the update step C0.. were projected at
        self.planned = False                     # the engine's memory plan has set the final order
        self.refreshed_step: Optional[int] = None   # step whose D1/D2 ``refresh`` formed (until its ``update``)

    # -- update step ------------------------------------------------------------------------------
    @property
    def active_order(self) -> int:
        """The order the dispatch steps use: limited by the updates seen so far."""
        return max(0, min(self.order, self.updates - 1))

    def reset(self) -> None:
        """Forget the history (a new generation started); buffers are kept for reuse."""
        self.updates = 0
        self.last_step = None
        self.refreshed_step = None

    def raise_order(self, order: int) -> None:
        """Keep up to ``order`` terms from now on (a cache begun at a lower order: the engine plans memory
        in two phases). The new feature terms are allocated here, the GEMM-O terms at the next
        ``project``; the history (``D0``, the update count) stays, so the next update forms ``D1``."""
        if order <= self.order:
            return
        if self.terms:
            self.terms += [_bnhd_empty(self.terms[0]) for _ in range(order - self.order)]
        self.order = order

    def _fits(self, out: Tensor) -> bool:
        t = self.terms
        return bool(t) and t[0].shape == out.shape and t[0].dtype == out.dtype and t[0].device == out.device

    def refresh(self, out: Tensor, step: int, block: int) -> tuple[Tensor, Tensor]:
        """The fused first half of ``update`` (``kernels/refresh.py``), called through the policy's change
        metric before the symbols are chosen: forms ``D1`` (and ``D2``) from ``out`` and ``D0`` in one
        pass and returns the block norms ``(||out - D0||, ||D0||)`` ``[B, H, NB]`` over blocks of ``block``
        rows. ``D0`` is left as it is (the policy may still read it as ``prev_out``); the ``update`` of the
        same step then only copies ``out`` into it. Needs a history (``updates > 0``) of ``out``'s shape."""
        if not self._fits(out) or self.updates == 0:
            raise RuntimeError("FeatureCache.refresh needs the terms of an earlier update of this shape")
        d1 = self.terms[1] if self.order > 0 else None
        d2 = self.terms[2] if self.order > 1 and self.updates > 1 else None
        num, den = refresh_terms(out, self.terms[0], d1, d2, float(step - self.last_step), block)
        self.refreshed_step = step
        return num, den

    def update(self, out: Tensor, step: int, diff: Optional[Tensor] = None) -> None:
        """Refresh the terms from this update's dense output ``out [B, H, N, D]`` at ``step``.

        ``diff``, when given, is ``out - D0`` already formed in the accumulation dtype (the policy's change
        metric needs the same difference: ``PolicyContext.output_diff``); it is read, not modified. After
        ``refresh`` at this step the differences are formed already: only ``D0`` is written."""
        refreshed, self.refreshed_step = self.refreshed_step == step, None
        if not self._fits(out):
            self.terms = [_bnhd_empty(out) for _ in range(self.order + 1)]
            self.extrap = None
            self.out_terms, self.out_buf, self.out_step = {}, {}, {}
            self.updates = 0
            refreshed = False
        if self.updates > 0 and self.order > 0 and not refreshed:
            d = float(step - self.last_step)
            # Differences in float32: the terms are stored in the activations' dtype, but a bf16
            # subtraction of two nearby outputs would lose most of the difference's bits.
            acc = torch.float64 if out.dtype == torch.float64 else torch.float32
            if diff is None or diff.dtype != acc or diff.shape != out.shape:
                diff = out.to(acc).sub_(self.terms[0]) if out.dtype != acc else out - self.terms[0]
            if self.order > 1 and self.updates > 1:
                # D2 = (D1_n - D1_{n-1}) / d = (diff - d * D1_{n-1}) / d^2, formed in acc, stored once
                torch.div(torch.sub(diff, self.terms[1], alpha=d), d * d, out=self.terms[2])
            torch.div(diff, d, out=self.terms[1])      # computed in acc, rounded once into the term
        self.terms[0].copy_(out)
        self.updates += 1
        self.last_step = step

    def project(self, row_offset: int, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, a: Tensor,
                head_dim: int, block_q: int) -> Tensor:
        """Build and keep ``C0..Ck`` for the GEMM-O call at ``row_offset`` (update step); returns ``C0``.

        ``a [B, M, H*D]`` is this update's attention output rows (equal to ``D0``'s rows).
        """
        k = self.active_order
        B, M = a.shape[:2]
        old = self.reserve_out(row_offset, weight, a)
        _out_proj_cache_into(old[0], a, weight, bias, q_keep, head_dim, row_offset, block_q)
        for i in range(1, k + 1):
            t = self.terms[i]
            rows = t.transpose(1, 2).reshape(B, t.shape[2], -1)[:, row_offset:row_offset + M]
            _out_proj_cache_into(old[i], rows, weight, None, q_keep, head_dim, row_offset, block_q)
        self.out_step[row_offset] = self.last_step
        return old[0]

    def reserve_out(self, row_offset: int, weight: Tensor, a: Tensor) -> list[Tensor]:
        """The GEMM-O term buffers ``C0..C_order`` (and ``C(t)``'s) of the call at ``row_offset``, allocated
        if missing or of another shape. An update that projects nothing (no dispatch step follows it)
        still reserves them, so the memory plan sees every layer's buffers from its first update on."""
        B, M = a.shape[:2]
        shape = (B, M, weight.shape[0])
        old = self.out_terms.get(row_offset)
        if old is None or len(old) < self.order + 1 or old[0].shape != shape or old[0].dtype != a.dtype \
                or old[0].device != a.device:
            old = [a.new_empty(shape) for _ in range(self.order + 1)]
            self.out_terms[row_offset] = old
            if self.order > 0:
                self.out_buf[row_offset] = a.new_empty(shape)
        return old

    # -- dispatch step (no allocation, no sync) --------------------------------------------------------
    def dispatch_terms(self, step: int) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], float]:
        """``(D0, D1 or None, D2 or None, delta)``: what the attention kernel combines into ``cache(step)``
        for the cached rows (the terms beyond the order in use are None)."""
        k = self.active_order
        delta = 0.0 if self.last_step is None else float(step - self.last_step)
        return (self.terms[0], self.terms[1] if k >= 1 else None, self.terms[2] if k >= 2 else None, delta)

    def at(self, step: int) -> Tensor:
        """``cache(step)`` for every row (order 0: ``D0`` itself; else in a buffer allocated on first use)."""
        if self.active_order > 0 and self.extrap is None:
            self.extrap = _bnhd_empty(self.terms[0])
        return self._combine(self.terms, self.extrap, step)

    def has_out(self, row_offset: int) -> bool:
        """Whether the GEMM-O terms of this call are those of the update in force (an update that no
        dispatch step follows skips the projection and leaves older terms behind)."""
        return row_offset in self.out_terms and self.out_step.get(row_offset) == self.last_step

    def out_at(self, row_offset: int, step: int) -> Tensor:
        """``C(step)`` of the GEMM-O call at ``row_offset``, in its preallocated buffer."""
        return self._combine(self.out_terms[row_offset], self.out_buf.get(row_offset), step)

    def _combine(self, terms: list[Tensor], buf: Optional[Tensor], step: int) -> Tensor:
        k = self.active_order
        if k == 0:
            return terms[0]
        delta = float(step - self.last_step)
        torch.add(terms[0], terms[1], alpha=delta, out=buf)
        if k > 1:
            buf.add_(terms[2], alpha=delta * delta / 2.0)
        return buf

    # -- accounting ---------------------------------------------------------------------------------
    def nbytes(self) -> int:
        ts = list(self.terms) + [self.extrap] + [t for ts in self.out_terms.values() for t in ts] \
            + list(self.out_buf.values())
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def tensors(self) -> list[Tensor]:
        """Every buffer (for tests: dispatch steps must not replace any)."""
        return [t for t in list(self.terms) + [self.extrap] + [t for ts in self.out_terms.values() for t in ts]
                + list(self.out_buf.values()) if t is not None]
