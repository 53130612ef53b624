"""GEMM-O: the reduction-sparse output projection and its update-step cache (DESIGN.md section 2).

    out_proj_cache:   c[b, m] = bias + sum_{h : not q_keep[b, h, (row_offset + m) // block_q]} a[b, m, h] . W_h^T
    sparse_linear_o:  y[b, m] = c[b, m] + sum_{h : q_keep[b, h, (row_offset + m) // block_q]} a[b, m, h] . W_h^T
                                 (+ extra[b, m] . extra_weight^T, dense)
with a[b, m, h] = a[b, m, h*head_dim:(h+1)*head_dim] and W_h = weight[:, h*head_dim:(h+1)*head_dim].
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def check_inputs(a, weight, c, q_keep, extra, extra_weight, head_dim, row_offset, block_q, bias=None) -> None:
    raise NotImplementedError


def out_proj_cache_ref(a: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, head_dim: int,
                       row_offset: int, block_q: int) -> Tensor:
    raise NotImplementedError


def out_proj_cache_triton(a: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, head_dim: int,
                          row_offset: int, block_q: int) -> Tensor:
    raise NotImplementedError


def sparse_linear_o_ref(a: Tensor, weight: Tensor, c: Tensor, q_keep: Tensor, extra: Optional[Tensor],
                        extra_weight: Optional[Tensor], head_dim: int, row_offset: int, block_q: int) -> Tensor:
    raise NotImplementedError


def sparse_linear_o_triton(a: Tensor, weight: Tensor, c: Tensor, q_keep: Tensor, extra: Optional[Tensor],
                           extra_weight: Optional[Tensor], head_dim: int, row_offset: int, block_q: int) -> Tensor:
    raise NotImplementedError
