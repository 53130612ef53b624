"""Sparse symbols: the per-block decisions that drive every flashomni kernel.

Shape legend (one attention site, one step, joint sequence)::

    B    batch              H    heads
    Nq   query tokens       Nkv  key/value tokens
    BQ   q-block size       BKV  kv-block size
    NQB  = ceil(Nq / BQ)    NKB  = ceil(Nkv / BKV)

Logical form (the source of truth; what policies and hooks read and write):

* ``q_keep``  bool ``[B, H, NQB]`` -- 1: compute this (q-block, head); 0: its attention output comes
  from the site's feature cache.
* ``kv_keep`` bool ``[B, H, NQB, NKB]`` -- 1: this q-block attends to this kv-block; 0: skip it,
  exactly as if those keys were masked to -inf.

Dense meaning, for token ``i`` in q-block ``qb`` and head ``h``::

    q_keep[b, h, qb] == 0  ->  O[b, h, i] = cache[b, h, i]
    otherwise              ->  J = {j : kv_keep[b, h, qb, j // BKV]}
                               O[b, h, i] = softmax_J(scale * q_i . k_j) @ v_J     (0 if J is empty)

Kernel form (built on the device, once per update, never with a host sync):

* ``kv_count`` int32 ``[B, H, NQB]``       -- number of kept kv-blocks of each row of blocks.
* ``kv_index`` int32 ``[B, H, NQB, NKB]``  -- the kept kv-block indices first, ascending; the tail
  past ``kv_count`` is padding (the skipped indices) and is never read.

This is FlexAttention's ``kv_num_blocks`` / ``kv_indices`` pair, so a kernel walks only the kept blocks.

* ``kv_need`` bool ``[B, H, NKB]`` -- whether some *computed* q-block of head ``h`` attends to kv-block
  ``j``: ``any_i(q_keep[b, h, i] & kv_keep[b, h, i, j])``. Keys/values of the other (kv-block, head)
  tiles are never read at a dispatch step, so their K/V projection tiles need not be computed (GEMM-KV).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._capture import device_cache

__all__ = ["SparseSymbols", "kv_block_lists", "kv_need", "num_blocks"]


def num_blocks(n: int, block: int) -> int:
    """Number of blocks of size ``block`` covering ``n`` tokens (the last may be partial)."""
    return (n + block - 1) // block


def kv_block_lists(kv_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Derive the kernel form ``(kv_count, kv_index)`` from a bool ``kv_keep [..., NKB]``.

    Runs on ``kv_keep``'s device with no host synchronisation: a stable sort moves the kept block
    indices to the front in ascending order.
    """
    if kv_keep.dtype != torch.bool:
        raise ValueError(f"kv_keep must be a bool tensor, got dtype {kv_keep.dtype}")
    kv_count = kv_keep.sum(dim=-1, dtype=torch.int32)
    # Sorting the *negated* mask stably puts the kept blocks first, each group in index order.
    kv_index = torch.sort((~kv_keep).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return kv_count, kv_index.contiguous()


def kv_need(q_keep: torch.Tensor, kv_keep: torch.Tensor, kv_sparse: bool = True,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kv-blocks a dispatch step's attention reads, per head: bool ``[B, H, NKB]``.

    ``kv_need[b, h, j] = any_i(q_keep[b, h, i] & kv_keep[b, h, i, j])``: some computed q-block of head
    ``h`` attends to kv-block ``j``. ``kv_sparse=False`` (the kernel runs without kv-block lists, every
    kept q-block reading every kv-block): ``any_i(q_keep[b, h, i])`` for every ``j``. Runs on the device
    with no host synchronisation; ``out`` (``[B, H, NKB]`` bool) receives the result in place.
    """
    B, H, _, nkb = kv_keep.shape
    if out is None:
        out = torch.empty(B, H, nkb, dtype=torch.bool, device=kv_keep.device)
    if kv_sparse:
        torch.any(q_keep.unsqueeze(-1) & kv_keep, dim=2, out=out)
    else:
        out.copy_(q_keep.any(dim=-1, keepdim=True).expand(B, H, nkb))
    return out


@dataclass
class SparseSymbols:
    """The sparse symbols of one attention site for one step.

    Args:
        q_keep: bool ``[B, H, NQB]``; ``True`` computes the (q-block, head), ``False`` takes it from cache.
        kv_keep: bool ``[B, H, NQB, NKB]``; ``True`` keeps the (q-block, kv-block) pair.
        seq_q: number of query tokens ``Nq`` (the last q-block may be partial).
        seq_kv: number of key tokens ``Nkv``.
        block_q: q-block size ``BQ``.
        block_kv: kv-block size ``BKV``.

    The tensors are validated on construction (shapes, dtypes, same device) and may be edited in place
    afterwards (policies do).

    Example::

        >>> s = SparseSymbols.dense(batch=1, heads=2, seq_q=200, seq_kv=200)
        >>> s.q_keep.shape, s.kv_keep.shape
        (torch.Size([1, 2, 2]), torch.Size([1, 2, 2, 2]))
        >>> float(s.kv_density())
        1.0
    """

    q_keep: torch.Tensor
    kv_keep: torch.Tensor
    seq_q: int
    seq_kv: int
    block_q: int = 128
    block_kv: int = 128

    def __post_init__(self) -> None:
        validate_symbols(self.q_keep, self.kv_keep, self.seq_q, self.seq_kv, self.block_q, self.block_kv)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def dense(cls, batch: int, heads: int, seq_q: int, seq_kv: Optional[int] = None, *,
              block_q: int = 128, block_kv: int = 128, device=None) -> "SparseSymbols":
        """All blocks kept: the sparse kernels then compute exactly dense attention."""
        seq_kv = seq_q if seq_kv is None else seq_kv
        nqb, nkb = num_blocks(seq_q, block_q), num_blocks(seq_kv, block_kv)
        return cls(torch.ones(batch, heads, nqb, dtype=torch.bool, device=device),
                   torch.ones(batch, heads, nqb, nkb, dtype=torch.bool, device=device),
                   seq_q, seq_kv, block_q, block_kv)

    # -- derived forms --------------------------------------------------------------------------
    def kv_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv_count, kv_index)``, the kernel form of ``kv_keep`` (built anew from it on each call)."""
        return kv_block_lists(self.kv_keep)

    def kv_need(self) -> torch.Tensor:
        """``[B, H, NKB]``: the kv-blocks some computed q-block of each head attends to (``kv_need``)."""
        return kv_need(self.q_keep, self.kv_keep)

    def token_mask(self) -> torch.Tensor:
        """The dense bool mask ``[B, H, Nq, Nkv]`` that ``kv_keep`` means (for tests and references)."""
        return expand_kv_keep(self.kv_keep, self.seq_q, self.seq_kv, self.block_q, self.block_kv)

    # -- statistics (device tensors: reading them with float() syncs, so do it off the hot path) --
    def q_density(self) -> torch.Tensor:
        """Fraction of (q-block, head) pairs computed, weighted by the tokens each block holds."""
        w = _block_weights(self.seq_q, self.block_q, self.q_keep.device)
        B, H = self.q_keep.shape[:2]
        return torch.matmul(self.q_keep.to(w.dtype), w).sum() / (self.seq_q * B * H)

    def kv_density(self) -> torch.Tensor:
        """Fraction of the (query, key) pairs attended to, counting only computed q-blocks' pairs as
        work and partial blocks by the tokens they hold."""
        wq = _block_weights(self.seq_q, self.block_q, self.kv_keep.device)
        wk = _block_weights(self.seq_kv, self.block_kv, self.kv_keep.device)
        keys = torch.matmul(self.kv_keep.to(wk.dtype), wk)              # [B, H, NQB]: keys seen per query
        pairs = torch.matmul(keys.mul_(self.q_keep), wq).sum()           # computed q-blocks only
        B, H = self.kv_keep.shape[:2]
        return pairs / (self.seq_q * self.seq_kv * B * H)


@device_cache(256)
def _block_weights(n: int, block: int, device) -> torch.Tensor:
    """Tokens held by each block (the last may be partial), float32 ``[NB]``; built once per
    (n, block, device) and shared: callers must not modify it."""
    # no host-to-device write (``w[-1] = ...`` would be one), so it can also be built inside a CUDA-graph capture
    return (n - block * torch.arange(num_blocks(n, block), device=device)).clamp(max=block).to(torch.float32)


def expand_kv_keep(kv_keep: torch.Tensor, seq_q: int, seq_kv: int, block_q: int, block_kv: int) -> torch.Tensor:
    """Block mask ``[..., NQB, NKB]`` -> token mask ``[..., Nq, Nkv]``."""
    m = kv_keep.repeat_interleave(block_q, dim=-2)[..., :seq_q, :]
    return m.repeat_interleave(block_kv, dim=-1)[..., :seq_kv]


def validate_symbols(q_keep: Optional[torch.Tensor], kv_keep: Optional[torch.Tensor], seq_q: int, seq_kv: int,
                     block_q: int, block_kv: int, *, batch: Optional[int] = None, heads: Optional[int] = None,
                     device=None) -> None:
    """Raise ``ValueError`` naming the argument when the symbols do not fit the attention problem."""
    for name, b in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b!r}")
    nqb, nkb = num_blocks(seq_q, block_q), num_blocks(seq_kv, block_kv)
    for name, t, tail in (("q_keep", q_keep, (nqb,)), ("kv_keep", kv_keep, (nqb, nkb))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.bool:
            raise ValueError(f"{name} must have dtype torch.bool, got {t.dtype}")
        want = (batch if batch is not None else t.shape[0] if t.dim() else None,
                heads if heads is not None else t.shape[1] if t.dim() > 1 else None) + tail
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {want} = [B, H, "
                + ("NQB]" if name == "q_keep" else "NQB, NKB]")
                + f" for Nq={seq_q}, Nkv={seq_kv}, block_q={block_q}, block_kv={block_kv}")
        if device is not None and t.device != torch.device(device):
            raise ValueError(f"{name} is on {t.device}, but the attention inputs are on {device}")
    if q_keep is not None and kv_keep is not None:
        if q_keep.shape[:2] != kv_keep.shape[:2]:
            raise ValueError(f"q_keep {tuple(q_keep.shape)} and kv_keep {tuple(kv_keep.shape)} disagree on [B, H]")
        if q_keep.device != kv_keep.device:
            raise ValueError(f"q_keep is on {q_keep.device} but kv_keep is on {kv_keep.device}")


def dense_equivalent_flops(batch: int, heads: int, seq_q: int, seq_kv: int, head_dim: int) -> float:
    """FLOPs of dense attention forward: two matmuls of 2*Nq*Nkv*D each per (b, h)."""
    return 4.0 * batch * heads * seq_q * seq_kv * head_dim

