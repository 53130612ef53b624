"""GEMM-O: the reduction-sparse output projection and its update-step cache (DESIGN.md section 2).

    out_proj_cache:   c[b, m] = bias + sum_{h : not q_keep[b, h, (row_offset + m) // block_q]} a[b, m, h] . W_h^T
    sparse_linear_o:  y[b, m] = c[b, m] + sum_{h : q_keep[b, h, (row_offset + m) // block_q]} a[b, m, h] . W_h^T
                                 (+ extra[b, m] . extra_weight^T, dense)
with a[b, m, h] = a[b, m, h*head_dim:(h+1)*head_dim] and W_h = weight[:, h*head_dim:(h+1)*head_dim].

Chained at an update step the two equal the dense projection ``a @ weight.T + bias`` for any symbols.
The reduction runs over the selected heads only: a head that is not selected costs nothing, neither its
slice of ``a`` nor its columns of ``weight`` are read (FlashOmni's reduction-sparse GEMM-O). The extra
K-range is the MLP half of a Flux single-stream block, whose output projection takes ``cat(attn, mlp)``
with one weight: ``extra`` and ``extra_weight`` are its activations and weight columns, dense, added in
the same launch.

``c`` is kept in the activations' dtype (bf16 in practice), not float32: a float32 cache of 33K tokens x
3072 columns is 415 MB per site. The price is one extra rounding of the cached part (relative 2^-9 in
bf16) added to the rounding of ``y`` itself; the identity test bounds it with the dtype tolerance.

Notation as in ``gemm_q.py``; here K is the attention width ``H * D``, KE the extra width, and

    SELECT_KEPT  constexpr: reduce over heads with q_keep = 1 (sparse_linear_o) or = 0 (out_proj_cache)
    KSTEPS       constexpr: ceil(D / BLOCK_K) reduction steps per head; EVEN_D: D % BLOCK_K == 0
    HAS_C, HAS_BIAS, HAS_EXTRA   constexpr: what the epilogue adds / the second (dense) loop exists
    EVEN_KE      constexpr: KE % BLOCK_K == 0

Row tiles are joint-aligned and lie in one q-block (see ``gemm_q.py``), so the selected heads are the
same for every row of a tile: the kernel loads the tile's q_keep row, packs the selected heads of 32 at
a time into a bit mask, and walks the set bits (lowest first) in one flat loop of ``count * KSTEPS``
steps, so the software pipeline stays unbroken. No host sync, no derived tensor, no data-dependent grid.

Two kernels. On sm_90 the launcher hands the calls ``gemm_o_sm90.supports`` takes to the persistent
warp-specialised Gluon kernel of ``gemm_o_sm90.py`` (``Config.gluon``: its consumer tile and ring depth;
the launch table sets it for sm_90, ``FLASHOMNI_GLUON=0`` turns it off). Every other call runs
``_gemm_o_kernel`` here: one program per output tile (grid = tiles x B); c is loaded before the
reduction and added in the epilogue. (A persistent Triton variant, one flat loop of work items per
program, was measured no faster and removed: benchmarks/NOTES.md, "Persistent GEMM-O".)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gemm_q import (Config, as_rows, check_head_dim, check_symbols, check_tensor, dense_k_loop, descriptor, dot_f32,
                     grouped_tile, mma, row_keep, setup, tma_ok)
from . import gemm_o_sm90
from .launch import GLUON_ON, cdiv, launch

_WORD = 32  # heads per bit mask of the per-tile kernel (it walks the heads a word at a time)


# ---------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _lowest_bit(bits):
    """(lowest set bit as a power of two, its index) of a non-zero int64 ``bits < 2^63``.
    The index is read off the float32 exponent (a power of two converts exactly): branch-free, and runs
    in the interpreter."""
    low = bits & (-bits)
    index = (low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
    return low, index


@triton.jit
def _gemm_o_kernel(A, W, C, BIAS, E, EW, Y, KEEP,
                   M, N, H, KE, ROW_OFFSET, FIRST_TILE, NUM_TILES_M,
                   stride_ab, stride_am, stride_ak, stride_wn, stride_wk,
                   stride_cb, stride_cm, stride_cn, stride_eb, stride_em, stride_ek, stride_ewn, stride_ewk,
                   stride_yb, stride_ym, stride_yn, stride_kb, stride_kh, stride_kq,
                   HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, SELECT_KEPT: tl.constexpr,
                   HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EXTRA: tl.constexpr, EVEN_KE: tl.constexpr,
                   USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, WORD: tl.constexpr, DOT_F32: tl.constexpr):
    KSTEPS: tl.constexpr = (HEAD_DIM + BLOCK_K - 1) // BLOCK_K
    EVEN_D: tl.constexpr = HEAD_DIM % BLOCK_K == 0
    tile_m, tile_n = grouped_tile(tl.program_id(0), NUM_TILES_M, tl.cdiv(N, BLOCK_N), GROUP_M)
    b = tl.program_id(1).to(tl.int64)
    joint_m0 = (FIRST_TILE + tile_m) * BLOCK_M
    qb = joint_m0 // BLOCK_Q                        # the tile's one q-block
    m0 = joint_m0 - ROW_OFFSET                      # first local row; < 0 in a partial first tile
    n0 = tile_n * BLOCK_N
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = (offs_m >= 0) & (offs_m < M)
    col_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_C:
        # Issued before the reduction so that its latency hides behind it: at low density the tile is
        # mostly this read and the store (one 8-warp program per SM fits: 150+ registers a thread).
        C_tile = C + b * stride_cb + m0.to(tl.int64) * stride_cm
        c = tl.load(C_tile + tl.arange(0, BLOCK_M)[:, None] * stride_cm + offs_n[None, :] * stride_cn, mask=mask, other=0.0)

    if USE_TMA:
        row = (b * M + m0).to(tl.int32)             # the tile's row in the [B*M, K] views
    else:
        A_tile = A + b * stride_ab + m0.to(tl.int64) * stride_am
        W_tile = W + n0.to(tl.int64) * stride_wn
        a_ptrs = A_tile + tl.arange(0, BLOCK_M)[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = W_tile + tl.arange(0, BLOCK_N)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    offs_w = tl.arange(0, WORD)
    for h0 in range(0, H, WORD):
        # Bit i of `bits` <=> head h0 + i is in this launch's reduction for the tile's q-block.
        kv = tl.load(KEEP + b * stride_kb + (h0 + offs_w) * stride_kh + qb * stride_kq, mask=h0 + offs_w < H, other=0)
        if SELECT_KEPT:
            sel = (kv != 0) & (h0 + offs_w < H)
        else:
            sel = (kv == 0) & (h0 + offs_w < H)
        bits = tl.sum(tl.where(sel, tl.full([WORD], 1, tl.int64) << offs_w.to(tl.int64), 0), axis=0)
        count = tl.sum(sel.to(tl.int32), axis=0)
        for t in range(0, count * KSTEPS):
            low, i = _lowest_bit(bits)
            step = t % KSTEPS
            k0 = (h0 + i) * HEAD_DIM + step * BLOCK_K
            if USE_TMA:  # EVEN_D here: a box never crosses into the next head
                a = A.load([row, k0])
                w = W.load([n0, k0])
                acc = mma(a, w.T, acc, DOT_F32)
            else:
                if EVEN_D:
                    a = tl.load(a_ptrs + k0 * stride_ak, mask=row_ok[:, None], other=0.0)
                    w = tl.load(w_ptrs + k0 * stride_wk, mask=col_ok[None, :], other=0.0)
                else:
                    # The last step of a head is partial: its tail columns belong to the next head (or lie
                    # past the last one) and may hold anything, NaN included, so both operands are masked.
                    k_ok = offs_k < HEAD_DIM - step * BLOCK_K
                    a = tl.load(a_ptrs + k0 * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    w = tl.load(w_ptrs + k0 * stride_wk, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
                acc = mma(a, w, acc, DOT_F32)
            bits = tl.where(step == KSTEPS - 1, bits ^ low, bits)

    if HAS_EXTRA:
        # The dense K-range (Flux single-stream MLP): a plain GEMM loop into the same accumulator.
        acc = dense_k_loop(acc, E, EW, b, m0, n0, M, KE, row_ok, col_ok, stride_eb, stride_em, stride_ek,
                           stride_ewn, stride_ewk, EVEN_KE, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32)

    if HAS_C:
        acc += c.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    Y_tile = Y + b * stride_yb + m0.to(tl.int64) * stride_ym
    tl.store(Y_tile + tl.arange(0, BLOCK_M)[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------
def head_block_k(head_dim: int, block_k: int) -> int:
    """Reduction step for heads of ``head_dim``: the table's ``block_k`` if it divides the head, else the
    largest power of two >= 16 that does, else 32 (the last step of each head is then masked)."""
    for bk in (block_k, 64, 32, 16):
        if bk <= block_k and head_dim % bk == 0:
            return bk
    return min(32, block_k)


def _launch(a: Tensor, weight: Tensor, c: Optional[Tensor], bias: Optional[Tensor], q_keep: Tensor,
            extra: Optional[Tensor], extra_weight: Optional[Tensor], head_dim: int, row_offset: int,
            block_q: int, select_kept: bool, config: Optional[Config], out: Optional[Tensor],
            programs: Optional[int] = None) -> Tensor:
    B, M, K = a.shape
    N = weight.shape[0]
    y, cfg, block_m, block_k, first, tiles_m = setup(a, N, out, config, "o" if select_kept else "c", row_offset,
                                                     block_q)
    if y.numel() == 0:
        return y
    block_k = head_block_k(head_dim, block_k)
    keep = q_keep.view(torch.uint8)
    if cfg.gluon and GLUON_ON and gemm_o_sm90.supports(a, weight, c, extra, extra_weight, y, head_dim, row_offset,
                                                      block_q):
        gm, gn, gs = cfg.gluon
        return gemm_o_sm90.gemm_o_sm90(a, weight, c, bias, keep, extra, extra_weight, y, head_dim, row_offset,
                                       block_q, select_kept, launch, programs=programs, stages=gs, block_m=gm,
                                       block_n=gn)
    has_extra = extra is not None
    e, ew = (extra, extra_weight) if has_extra else (a, weight)   # placeholders, never read
    aa, wa, ea, ewa = a, weight, e, ew
    use_tma = cfg.tma and head_dim % block_k == 0
    if use_tma:
        rows, erows = as_rows(a), as_rows(e)
        use_tma = rows is not None and erows is not None and tma_ok(weight) and tma_ok(ew)
        if use_tma:
            aa, wa = descriptor(rows, [block_m, block_k]), descriptor(weight, [cfg.block_n, block_k])
            ea, ewa = descriptor(erows, [block_m, block_k]), descriptor(ew, [cfg.block_n, block_k])
    cc = c if c is not None else y
    grid = (tiles_m * cdiv(N, cfg.block_n), B)
    launch(
        _gemm_o_kernel, grid,
        aa, wa, cc, bias if bias is not None else y, ea, ewa, y, keep,
        M, N, K // head_dim, e.shape[-1], row_offset, first, tiles_m,
        a.stride(0), a.stride(1), a.stride(2), weight.stride(0), weight.stride(1),
        cc.stride(0), cc.stride(1), cc.stride(2), e.stride(0), e.stride(1), e.stride(2), ew.stride(0), ew.stride(1),
        y.stride(0), y.stride(1), y.stride(2), keep.stride(0), keep.stride(1), keep.stride(2),
        HEAD_DIM=head_dim, BLOCK_Q=block_q, SELECT_KEPT=select_kept, HAS_C=c is not None,
        HAS_BIAS=bias is not None, HAS_EXTRA=has_extra, EVEN_KE=e.shape[-1] % block_k == 0, USE_TMA=use_tma, BLOCK_M=block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m, WORD=_WORD, DOT_F32=dot_f32(a),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def out_proj_cache_triton(a: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, head_dim: int,
                          row_offset: int, block_q: int, config: Optional[Config] = None,
                          out: Optional[Tensor] = None, programs: Optional[int] = None) -> Tensor:
    """Triton launcher (same contract as ``out_proj_cache_ref``); ``config`` overrides the table,
    ``out`` receives the result, ``programs`` caps the Gluon kernel's grid (tests)."""
    return _launch(a, weight, None, bias, q_keep, None, None, head_dim, row_offset, block_q, False, config, out,
                   programs)


def sparse_linear_o_triton(a: Tensor, weight: Tensor, c: Tensor, q_keep: Tensor, extra: Optional[Tensor],
                           extra_weight: Optional[Tensor], head_dim: int, row_offset: int, block_q: int,
                           config: Optional[Config] = None, out: Optional[Tensor] = None,
                           programs: Optional[int] = None) -> Tensor:
    """Triton launcher (same contract as ``sparse_linear_o_ref``); ``config`` overrides the table,
    ``out`` receives the result, ``programs`` caps the Gluon kernel's grid (tests)."""
    return _launch(a, weight, c, None, q_keep, extra, extra_weight, head_dim, row_offset, block_q, True, config, out,
                   programs)


# ---------------------------------------------------------------------------------------------------
# Torch reference twins
# ---------------------------------------------------------------------------------------------------
def _masked_heads(a: Tensor, q_keep: Tensor, head_dim: int, row_offset: int, block_q: int, kept: bool) -> Tensor:
    """``a`` (in float32/64) with the heads outside the reduction zeroed."""
    cdt = torch.float64 if a.dtype == torch.float64 else torch.float32
    sel = row_keep(q_keep, a.shape[1], row_offset, block_q)
    sel = sel if kept else ~sel
    # where, not a product: the heads outside the reduction may hold anything (NaN too) and are not read
    return torch.where(sel.repeat_interleave(head_dim, dim=-1), a.to(cdt), 0.0)


def out_proj_cache_ref(a: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, head_dim: int,
                       row_offset: int, block_q: int) -> Tensor:
    """Torch twin: the dense product over the cached heads' columns only, plus bias."""
    am = _masked_heads(a, q_keep, head_dim, row_offset, block_q, kept=False)
    c = am @ weight.to(am.dtype).T
    if bias is not None:
        c = c + bias.to(am.dtype)
    return c.to(a.dtype)


def sparse_linear_o_ref(a: Tensor, weight: Tensor, c: Tensor, q_keep: Tensor, extra: Optional[Tensor],
                        extra_weight: Optional[Tensor], head_dim: int, row_offset: int, block_q: int) -> Tensor:
    """Torch twin: ``c`` plus the dense product over the computed heads' columns (plus the extra range)."""
    am = _masked_heads(a, q_keep, head_dim, row_offset, block_q, kept=True)
    y = c.to(am.dtype) + am @ weight.to(am.dtype).T
    if extra is not None:
        y = y + extra.to(am.dtype) @ extra_weight.to(am.dtype).T
    return y.to(a.dtype)


# ---------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------
def check_inputs(a, weight, c, q_keep, extra, extra_weight, head_dim, row_offset, block_q, bias=None) -> None:
    """Raise ``ValueError`` naming the argument when the inputs break the contract of GEMM-O.

    Shapes: ``a [B, M, H*D]``, ``weight [N, H*D]``, ``c [B, M, N]`` (``sparse_linear_o``) or ``bias [N]``
    / None (``out_proj_cache``), ``q_keep`` bool ``[B, H, NQB]`` with ``NQB >= ceil((row_offset + M) / block_q)``,
    ``extra [B, M, KE]`` and ``extra_weight [N, KE]`` together or not at all.
    """
    check_tensor("a", a, 3)
    check_tensor("weight", weight, 2, like=a)
    if weight.shape[1] != a.shape[2]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [N, K] with K = a.shape[-1] = {a.shape[2]}")
    B, M, K = a.shape
    N = weight.shape[0]
    if c is not None:
        check_tensor("c", c, 3, like=a)
        if tuple(c.shape) != (B, M, N):
            raise ValueError(f"c has shape {tuple(c.shape)}, expected {(B, M, N)} = [B, M, N]")
    if bias is not None:
        check_tensor("bias", bias, 1, like=a)
        if bias.shape[0] != N:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},) = [N]")
    if (extra is None) != (extra_weight is None):
        raise ValueError("extra and extra_weight go together: got "
                         f"extra={_what(extra)}, extra_weight={_what(extra_weight)}")
    if extra is not None:
        check_tensor("extra", extra, 3, like=a)
        check_tensor("extra_weight", extra_weight, 2, like=a)
        if tuple(extra.shape[:2]) != (B, M):
            raise ValueError(f"extra has shape {tuple(extra.shape)}, expected ({B}, {M}, KE) = [B, M, KE]")
        if tuple(extra_weight.shape) != (N, extra.shape[2]):
            raise ValueError(f"extra_weight has shape {tuple(extra_weight.shape)}, expected "
                             f"{(N, extra.shape[2])} = [N, KE]")
    check_head_dim(head_dim, K, "a.shape[-1]")
    check_symbols(q_keep, B, K // head_dim, M, head_dim, row_offset, block_q, a.device)


def _what(t) -> str:
    return "None" if t is None else f"tensor {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
