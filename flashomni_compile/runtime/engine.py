"""What the ``flashomni::site_*`` ops do at run time (dense placeholder until the runtime issue lands).

Contract (kept by every version of this file):

* ``attention(site, anchor, q, k, v, key_padding_mask, scale) -> out``: ``q [B, H, Nq, D]``,
  ``k, v [B, H, Nkv, D]``; returns ``[B, H, Nq, D]`` in memory order ``[B, Nq, H, D]`` (the fake of
  ``site_attention`` promises that layout).
* ``linear_q(site, anchor, x, weight, bias, row_offset, sparse_cols) -> y``: the Q (or fused QKV)
  projection ``[B, M, N]``; rows ``row_offset ...`` of the joint sequence.
* ``linear_o(site, anchor, a, weight, bias, row_offset, extra, extra_weight) -> y``: the output
  projection of the attention output ``a [B, M, H*D]`` (plus a dense ``extra`` K-range for
  single-stream blocks).

``site`` is the index of a registered ``SiteSpec``; ``anchor`` is a weight tensor of the site that
differs per layer at run time (its ``data_ptr`` keys the per-layer state).
No host syncs and no data-dependent allocation on dispatch steps.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _bnhd(out: Tensor) -> Tensor:
    """Return ``out [B, H, N, D]`` with memory order ``[B, N, H, D]`` (copy only if it is not)."""
    if out.transpose(1, 2).is_contiguous():
        return out
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def attention(site: int, anchor: Tensor, q: Tensor, k: Tensor, v: Tensor,
              key_padding_mask: Optional[Tensor], scale: float) -> Tensor:
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return _bnhd(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))


def linear_q(site: int, anchor: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
             row_offset: int, sparse_cols: int) -> Tensor:
    return F.linear(x, weight, bias)


def linear_o(site: int, anchor: Tensor, a: Tensor, weight: Tensor, bias: Optional[Tensor], row_offset: int,
             extra: Optional[Tensor], extra_weight: Optional[Tensor]) -> Tensor:
    y = F.linear(a, weight, bias)
    if extra is not None:
        y = y + F.linear(extra, extra_weight)
    return y
