"""GEMM-Q: the head-sparse Q projection (contract in the GEMM issue and DESIGN.md section 2).

    y[b, m, n] = x[b, m, :] . weight[n, :] + bias[n]
        computed for n >= sparse_cols (dense columns: the K/V part of a fused QKV weight), and for
        n < sparse_cols only where q_keep[b, n // head_dim, (row_offset + m) // block_q] is True;
        every other element is 0.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def check_inputs(x, weight, bias, q_keep, head_dim, row_offset, block_q, sparse_cols) -> None:
    raise NotImplementedError


def sparse_linear_q_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, head_dim: int,
                        row_offset: int, block_q: int, sparse_cols: int) -> Tensor:
    raise NotImplementedError


def sparse_linear_q_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, head_dim: int,
                           row_offset: int, block_q: int, sparse_cols: int) -> Tensor:
    raise NotImplementedError
