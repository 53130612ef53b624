"""Sparse-symbol attention: one kernel for block skipping and q-block feature caching.

Formula (DESIGN.md section 2), for token ``i`` of q-block ``qb`` and head ``h``::

    q_keep[b, h, qb] == 0 -> O[i] = cache[i]                                   (copied in the kernel)
    otherwise             -> O[i] = softmax_J(scale * q_i . k_j) v_J,  J = kept kv-blocks, unmasked keys
                             O[i] = 0 when J is empty (never NaN)
    lse[i] = log(sum_J exp(scale * q_i . k_j))  (natural log; -inf for empty rows and cached rows)

The kv-blocks of a row of blocks arrive as ``(kv_count, kv_index)`` lists (see ``symbols.py``), so a
skipped block costs nothing. Online softmax after FlashAttention-2 (Dao, 2023).

This file holds the reference twin ``sparse_attention_ref`` and the Triton launcher
``sparse_attention_triton`` with the same signature. Output layout for both: ``out`` has shape
``[B, H, Nq, D]`` and memory order ``[B, Nq, H, D]`` (like SDPA's flash path, so the usual
``transpose(1, 2).reshape(B, Nq, H * D)`` that follows is free); ``lse`` is float32 ``[B, H, Nq]``.
"""

from __future__ import annotations

from typing import Optional

import torch


def empty_output(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate ``(out, lse)`` in the layout both implementations (and the fake) return."""
    B, H, Nq, _ = q.shape
    Dv = v.shape[-1]
    out = torch.empty(B, Nq, H, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    return out, lse


def kv_keep_from_lists(kv_count: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
    """Inverse of ``symbols.kv_block_lists``: bool ``[B, H, NQB, NKB]``."""
    nkb = kv_index.shape[-1]
    valid = torch.arange(nkb, device=kv_index.device) < kv_count.unsqueeze(-1)
    keep = torch.zeros(kv_index.shape, dtype=torch.bool, device=kv_index.device)
    return keep.scatter(-1, kv_index.long(), valid)


def sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         q_keep: Optional[torch.Tensor], kv_count: Optional[torch.Tensor],
                         kv_index: Optional[torch.Tensor], cache: Optional[torch.Tensor],
                         key_padding_mask: Optional[torch.Tensor], scale: float,
                         block_q: int, block_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of the kernel. Computes in float32 (float64 if the inputs are float64).

    Inputs are assumed validated (``ops.sparse_attention`` validates). Materialises the
    ``[B, H, Nq, Nkv]`` score matrix: for tests, CPU runs and small problems only.
    """
    B, H, Nq, _ = q.shape
    Nkv = k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(cdt), k.to(cdt)) * scale
    visible = torch.ones(B, H, Nq, Nkv, dtype=torch.bool, device=q.device)
    if kv_count is not None:
        keep = kv_keep_from_lists(kv_count, kv_index)
        keep = keep.repeat_interleave(block_q, dim=-2)[..., :Nq, :]
        visible &= keep.repeat_interleave(block_kv, dim=-1)[..., :Nkv]
    if key_padding_mask is not None:
        visible &= key_padding_mask[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                       # -inf on empty rows
    p = torch.exp(s - lse.nan_to_num(neginf=0.0).unsqueeze(-1))  # empty rows: exp(-inf) = 0
    o = torch.einsum("bhqk,bhkd->bhqd", p, v.to(cdt))
    if q_keep is not None:
        row_keep = q_keep.repeat_interleave(block_q, dim=-1)[..., :Nq]     # [B, H, Nq]
        if cache is not None:
            o = torch.where(row_keep.unsqueeze(-1), o, cache.to(cdt))
        lse = lse.masked_fill(~row_keep, float("-inf"))
    out, lse_out = empty_output(q, v)
    out.copy_(o)
    lse_out.copy_(lse)
    return out, lse_out


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            q_keep: Optional[torch.Tensor], kv_count: Optional[torch.Tensor],
                            kv_index: Optional[torch.Tensor], cache: Optional[torch.Tensor],
                            key_padding_mask: Optional[torch.Tensor], scale: float,
                            block_q: int, block_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher (same contract as ``sparse_attention_ref``)."""
    raise NotImplementedError("the Triton attention kernel is not written yet")
