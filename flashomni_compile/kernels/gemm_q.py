"""GEMM-Q: the head-sparse Q projection (contract in the GEMM issue and DESIGN.md section 2).

    y[b, m, n] = x[b, m, :] . weight[n, :] + bias[n]
        computed for n >= sparse_cols (dense columns: the K/V part of a fused QKV weight), and for
        n < sparse_cols only where q_keep[b, n // head_dim, (row_offset + m) // block_q] is True;
        every other element is 0.

The zeros are the defined value of a non-computed tile (the attention kernel never reads those rows of
Q, but a functional op must not return uninitialised memory). Writing them costs one pass of stores
over the skipped part of ``y`` and nothing else: a skipped tile reads neither ``x`` nor ``weight``.

Notation (shared with ``gemm_o.py``)::

    B batch          M rows of this call (e.g. only the image tokens of an MM-DiT)
    K reduction      N output columns          D head_dim        BQ block_q (q-block of the symbols)
    BLOCK_M x BLOCK_N  output tile             BLOCK_K  reduction step
    GROUP_M          row tiles that sweep the column tiles together (L2 reuse, Triton tutorial 03)
    EVEN_K           constexpr: K % BLOCK_K == 0, no mask on the reduction axis
    USE_TMA          constexpr: operands arrive as Hopper tensor descriptors (bulk copies, zero-filled
                     out of bounds) instead of masked pointer loads; the output is always stored
                     through masked pointers
    SPLIT_N          constexpr (GEMM-Q): a BLOCK_N tile whose two halves are not both kept runs as two
                     BLOCK_N/2 tiles, so wide tiles (fast on dense K/V columns) waste no work on Q heads

Row tiles are aligned to the *joint* sequence, not to this call's rows: tile ``t`` covers the joint
rows ``[t * BLOCK_M, (t + 1) * BLOCK_M)`` and ``BLOCK_M`` divides ``BQ`` (both powers of two, the
launcher takes ``BLOCK_M <= BQ``), so a tile lies in exactly one q-block even when ``row_offset`` is not
a multiple of ``BQ``; the first and last tiles of a call may be partial (masked rows). Column tiles may
hold several heads (D=64) or parts of heads (D=72): the keep flag is gathered per column, and a tile is
computed when any of its columns is kept, with the others zeroed.

This file holds the Triton kernel, its launcher ``sparse_linear_q_triton``, the torch twin
``sparse_linear_q_ref`` and the argument checks ``check_inputs`` (used by ``ops.sparse_linear_q``). On
sm_90 the launcher hands the calls ``gemm_q_sm90.supports`` takes to the persistent warp-specialised Gluon
kernel of ``gemm_q_sm90.py`` (``Config.gluon``, set by the launch table; ``FLASHOMNI_GLUON=0`` turns it off):
it pairs the kept heads of each row block into 128 x 256 reductions and deals them evenly over the SMs.
The helpers marked "shared" are imported by ``gemm_o.py``.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import gemm_q_sm90
from .launch import GLUON_ON, capability, cdiv, launch

try:  # host-side TMA descriptors (triton >= 3.4); the pointer path never needs them
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------
@triton.jit
def grouped_tile(pid, num_tiles_m, num_tiles_n, GROUP_M: tl.constexpr):
    """(shared) Program id (a scalar or, in gemm_o's persistent kernel, a vector of tile indices) ->
    (row tile, column tile), GROUP_M row tiles at a time (tutorial 03)."""
    in_group = GROUP_M * num_tiles_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % in_group) % size_m
    tile_n = (pid % in_group) // size_m
    return tile_m, tile_n


@triton.jit
def mma(a, b, acc, DOT_F32: tl.constexpr):
    """(shared) ``acc + a @ b``. DOT_F32 (interpreter + bfloat16 only) upcasts the operands first: the
    triton 3.9 interpreter's dot multiplies the raw bf16 bit patterns (seen: results ~1e10)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def dense_k_loop(acc, X, W, b, m0, n0, M, K, row_ok, col_ok, stride_xb, stride_xm, stride_xk, stride_wn, stride_wk,
                 EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """(shared) ``acc + X[b, m0:m0+BLOCK_M, :K] @ W[n0:n0+BLOCK_N, :K]^T``. Rows outside ``row_ok`` and
    columns outside ``col_ok`` may hold anything on return: the caller never stores them."""
    offs_k = tl.arange(0, BLOCK_K)
    if USE_TMA:
        # X is a descriptor over x viewed as [B*M, K]: rows of a partial tile outside [0, M) read
        # zeros or a neighbouring batch's rows, and are never stored. Columns past K read zeros.
        row = (b * M + m0).to(tl.int32)
        for k0 in range(0, K, BLOCK_K):
            x = X.load([row, k0])
            w = W.load([n0, k0])
            acc = mma(x, w.T, acc, DOT_F32)
    else:
        # The tile's base row as one int64 scalar; the per-element offsets stay small int32.
        X_tile = X + b * stride_xb + m0.to(tl.int64) * stride_xm
        W_tile = W + n0.to(tl.int64) * stride_wn
        x_ptrs = X_tile + tl.arange(0, BLOCK_M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = W_tile + tl.arange(0, BLOCK_N)[None, :] * stride_wn + offs_k[:, None] * stride_wk
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < K - k0
                x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = mma(x, w, acc, DOT_F32)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _col_keep(KEEP, b, qb, n0, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq,
              HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr):
    """Keep flag of columns ``n0 .. n0+WIDTH-1``: sparse columns follow their head's symbol in the tile's
    q-block, dense columns (n >= SPARSE_COLS) are always kept, columns past N never."""
    offs_n = n0 + tl.arange(0, WIDTH)
    sparse = offs_n < SPARSE_COLS
    kv = tl.load(KEEP + b * stride_kb + (offs_n // HEAD_DIM) * stride_kh + qb * stride_kq, mask=sparse, other=0)
    return tl.where(sparse, kv != 0, offs_n < N)


@triton.jit
def _q_tile(X, W, BIAS, Y, KEEP, b, qb, m0, n0, M, N, K, SPARSE_COLS,
            stride_xb, stride_xm, stride_xk, stride_wn, stride_wk, stride_yb, stride_ym, stride_yn,
            stride_kb, stride_kh, stride_kq, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
            USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr,
            DOT_F32: tl.constexpr):
    """Compute and store the output tile ``[m0, m0+BLOCK_M) x [n0, n0+WIDTH)``, or store zeros when none
    of its columns is kept (then neither x nor W is read)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, WIDTH)
    row_ok = (offs_m >= 0) & (offs_m < M)
    col_ok = offs_n < N
    col_keep = _col_keep(KEEP, b, qb, n0, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM, WIDTH)
    if tl.max(col_keep.to(tl.int32), axis=0) > 0:
        acc = dense_k_loop(tl.zeros([BLOCK_M, WIDTH], dtype=tl.float32), X, W, b, m0, n0, M, K, row_ok, col_ok,
                           stride_xb, stride_xm, stride_xk, stride_wn, stride_wk,
                           EVEN_K, USE_TMA, BLOCK_M, WIDTH, BLOCK_K, DOT_F32)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # Columns of skipped heads inside a computed tile (several heads per tile) are zeroed too.
        acc = tl.where(col_keep[None, :], acc, 0.0)
    else:
        acc = tl.zeros([BLOCK_M, WIDTH], dtype=tl.float32)
    Y_tile = Y + b * stride_yb + m0.to(tl.int64) * stride_ym
    y_ptrs = Y_tile + tl.arange(0, BLOCK_M)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gemm_q_kernel(X, W, W_HALF, BIAS, Y, KEEP,
                   M, N, K, SPARSE_COLS, ROW_OFFSET, FIRST_TILE, NUM_TILES_M,
                   stride_xb, stride_xm, stride_xk, stride_wn, stride_wk,
                   stride_yb, stride_ym, stride_yn, stride_kb, stride_kh, stride_kq,
                   HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, SPLIT_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   DOT_F32: tl.constexpr):
    tile_m, tile_n = grouped_tile(tl.program_id(0), NUM_TILES_M, tl.cdiv(N, BLOCK_N), GROUP_M)
    b = tl.program_id(1).to(tl.int64)
    joint_m0 = (FIRST_TILE + tile_m) * BLOCK_M      # first joint-sequence row of the tile
    qb = joint_m0 // BLOCK_Q                        # its one q-block (BLOCK_M divides BLOCK_Q)
    m0 = joint_m0 - ROW_OFFSET                      # first local row; < 0 in a partial first tile
    n0 = tile_n * BLOCK_N
    if SPLIT_N:
        # Wide tiles run the dense (K/V) columns near cuBLAS speed, but would compute a whole tile for one
        # kept head of two: a tile whose halves are not both kept runs as two half-width tiles, each
        # computed or zero-filled on its own (W_HALF: the weight's descriptor for half-width boxes).
        HALF: tl.constexpr = BLOCK_N // 2
        lo = _col_keep(KEEP, b, qb, n0, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM, HALF)
        hi = _col_keep(KEEP, b, qb, n0 + HALF, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM, HALF)
        both = (tl.max(lo.to(tl.int32), axis=0) > 0) & (tl.max(hi.to(tl.int32), axis=0) > 0)
        if both:
            _q_tile(X, W, BIAS, Y, KEEP, b, qb, m0, n0, M, N, K, SPARSE_COLS, stride_xb, stride_xm, stride_xk,
                    stride_wn, stride_wk, stride_yb, stride_ym, stride_yn, stride_kb, stride_kh, stride_kq,
                    HEAD_DIM, HAS_BIAS, EVEN_K, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32)
        else:
            for half in tl.static_range(2):
                _q_tile(X, W_HALF, BIAS, Y, KEEP, b, qb, m0, n0 + half * HALF, M, N, K, SPARSE_COLS, stride_xb,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_yb, stride_ym, stride_yn, stride_kb,
                        stride_kh, stride_kq, HEAD_DIM, HAS_BIAS, EVEN_K, USE_TMA, BLOCK_M, HALF, BLOCK_K, DOT_F32)
    else:
        _q_tile(X, W, BIAS, Y, KEEP, b, qb, m0, n0, M, N, K, SPARSE_COLS, stride_xb, stride_xm, stride_xk,
                stride_wn, stride_wk, stride_yb, stride_ym, stride_yn, stride_kb, stride_kh, stride_kq,
                HEAD_DIM, HAS_BIAS, EVEN_K, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32)


# ---------------------------------------------------------------------------------------------------
# Launch settings (shared)
# ---------------------------------------------------------------------------------------------------
class Config(NamedTuple):
    """(shared) One launch setting. ``block_k`` is for 2-byte dtypes; 4-byte dtypes take half."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: bool
    split_n: bool = False   # GEMM-Q: a tile whose two halves are not both kept runs as two half tiles
    # On sm_90: (block_m, block_n, stages) of the warp-specialised Gluon kernel (gemm_o_sm90.py for "o" and
    # "c", gemm_q_sm90.py for "q": 128 x 256 units only), run where it applies (its ``supports``); the
    # fields above are the Triton kernel's for the other calls
    gluon: tuple = ()
    # GEMM-Q: fused-QKV calls (dense K/V columns beside the sparse Q ones) of at most this many rows
    # (B * M) run the Triton kernel even where the Gluon one applies (0: never)
    fused_triton_rows: int = 0


# Per (arch, kernel); kernels: "q" GEMM-Q, "o" sparse_linear_o (dispatch step), "c" out_proj_cache
# (update step). sm90 entries: the least total time over the sweep of benchmarks/bench_gemm.py --sweep
# (H100, bf16, M in {4608, 33792}, densities {1, 0.5, 0.125}; benchmarks/NOTES.md, GEMM section):
#   q: 128x256 split tiles, 4 stages: 10.8 ms summed vs 11.9 for 128x128 (dense QKV 2.88 vs 3.24 ms at
#      M=33792; at d=0.125 the split keeps Q as cheap as 128x128 tiles: 0.274 vs 0.273 ms). On sm_90 the
#      calls gemm_q_sm90.supports takes run the Gluon kernel (kept halves paired per row block, dealt
#      evenly over persistent programs; benchmarks/NOTES.md, session 11), except fused-QKV calls of at
#      most 6144 rows: there the Triton kernel was 1-10% faster at every density on the H200 (2048, 4096,
#      4608 rows; a tie at 8192, Gluon ahead from 16384; results/gemm_h200_q_route.json, session 14).
#   o, c: 128x128, 8 warps, 4 stages. 64x128 4-warp tiles (2 CTAs per SM) were 19% faster at d=0.125
#      (0.279 vs 0.343 ms) but 50% slower dense (1.67 vs 1.11 ms); density is per-step data, so no switch.
#      On sm_90 the calls gemm_o_sm90.supports takes run the Gluon kernel instead: cooperative 128x256
#      tiles with a 3-stage ring, least total time of the H200 sweep (17.99 ms vs 19.08 for 64x256 s4 and
#      19.76 for 128x128 s4, all with the C tile loaded after the first ring fills; dense 0.856 vs 0.929
#      ms, d = 0.125 0.210 vs 0.222; results/gemm_h200_coop.json). Before: 64x256 s4 (results/gemm_h200_gluon2.json).
# The Triton kernels of every sm90 entry compile without spills on triton 3.6 and 3.9 for fp16/bf16/fp32
# and D in {64, 72, 128} (at most 192 KB of shared memory); the Gluon GEMM-O (208 KB at 128x256) has no
# local-memory access in any innermost loop, 8-32 B saved at its entry (tests/test_gemm_sm90.py). "cpu" is the interpreter (tests): small tiles so that several
# tiles, partial tiles and straddling heads occur at tiny sizes.
CONFIGS = {
    ("sm90", "q"): Config(128, 256, 64, 8, 8, 4, True, split_n=True, gluon=(128, 256, 3), fused_triton_rows=6144),
    ("sm90", "o"): Config(128, 128, 64, 8, 8, 4, True, gluon=(128, 256, 3)),
    ("sm90", "c"): Config(128, 128, 64, 8, 8, 4, True, gluon=(128, 256, 3)),
    ("cuda", "q"): Config(128, 128, 32, 8, 4, 3, False),
    ("cuda", "o"): Config(128, 128, 32, 8, 4, 3, False),
    ("cuda", "c"): Config(128, 128, 32, 8, 4, 3, False),
    ("cpu", "q"): Config(32, 32, 32, 2, 4, 1, False),
    ("cpu", "o"): Config(32, 32, 32, 2, 4, 1, False),
    ("cpu", "c"): Config(32, 32, 32, 2, 4, 1, False),
}


def pick_config(t: Tensor, kernel: str) -> Config:
    """(shared) The table's setting for ``t``'s device (``kernel``: ``"q"``, ``"o"`` or ``"c"``)."""
    if t.is_cuda:
        return CONFIGS[("sm90" if capability(t.device)[0] == 9 else "cuda", kernel)]
    return CONFIGS[("cpu", kernel)]


def as_rows(t: Tensor) -> Optional[Tensor]:
    """(shared) ``t [B, M, K]`` as a TMA-ready ``[B*M, K]`` view, or None when its layout does not allow one."""
    v = t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t
    if v.data_ptr() != t.data_ptr() or not tma_ok(v):
        return None
    return v


def tma_ok(t: Tensor) -> bool:
    """(shared) A 2-D tensor a tensor descriptor can address: unit last stride, 16-byte aligned base and rows."""
    esize = t.element_size()
    return (t.dim() == 2 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * esize) % 16 == 0
            and t.shape[0] > 0 and t.shape[1] > 0)


def descriptor(t: Tensor, block: list[int]):
    """(shared) Host-side tensor descriptor (``triton.tools.tensor_descriptor``, triton >= 3.4)."""
    return TensorDescriptor.from_tensor(t, block)


def dot_f32(t: Tensor) -> bool:
    """(shared) Whether the kernels must upcast ``tl.dot`` operands (see ``mma``)."""
    return t.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def setup(x: Tensor, n: int, out: Optional[Tensor], config: Optional[Config], kernel: str, row_offset: int,
          block_q: int) -> tuple[Tensor, Config, int, int, int, int]:
    """(shared) ``(y, config, BLOCK_M, BLOCK_K, first row tile, row tiles)`` of a launch over ``x [B, M, K]``.

    BLOCK_M is capped at ``block_q`` so that a tile lies in one q-block; row tiles are joint-aligned:
    the first is ``row_offset // BLOCK_M``, and they cover rows ``[row_offset, row_offset + M)``."""
    B, M, _ = x.shape
    y = torch.empty(B, M, n, dtype=x.dtype, device=x.device) if out is None else out
    cfg = config or pick_config(x, kernel)
    block_m = min(cfg.block_m, block_q)
    block_k = cfg.block_k if x.element_size() <= 2 else cfg.block_k // 2
    first = row_offset // block_m
    return y, cfg, block_m, block_k, first, cdiv(row_offset + M, block_m) - first


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------
def gluon_takes(x: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, head_dim: int, row_offset: int,
                block_q: int, sparse_cols: int, cfg: Config) -> bool:
    """Whether a call runs the Gluon kernel: the config asks for it, ``gemm_q_sm90.supports`` takes it, and it
    is not a fused-QKV call (``sparse_cols < N``) of at most ``cfg.fused_triton_rows`` rows. By shape only:
    the density is on the device, and the dispatch path reads nothing back."""
    if not (cfg.gluon and GLUON_ON and gemm_q_sm90.supports(x, weight, bias, y, head_dim, row_offset, block_q)):
        return False
    return not (sparse_cols < weight.shape[0] and x.shape[0] * x.shape[1] <= cfg.fused_triton_rows)


def sparse_linear_q_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, head_dim: int,
                           row_offset: int, block_q: int, sparse_cols: int, config: Optional[Config] = None,
                           out: Optional[Tensor] = None, programs: Optional[int] = None) -> Tensor:
    """Launcher (same contract as ``sparse_linear_q_ref``); ``config`` overrides the table, ``out``
    (``[B, M, N]``, any strides) receives the result instead of a new tensor. On sm_90, with
    ``Config.gluon`` set, the calls ``gemm_q_sm90.supports`` takes run the persistent Gluon kernel
    (``programs`` caps its grid; ``FLASHOMNI_GLUON=0`` turns it off), the others the Triton kernel here:
    also fused-QKV calls of at most ``Config.fused_triton_rows`` rows."""
    B, M, K = x.shape
    N = weight.shape[0]
    y, cfg, block_m, block_k, first, tiles_m = setup(x, N, out, config, "q", row_offset, block_q)
    if y.numel() == 0:
        return y
    if gluon_takes(x, weight, bias, y, head_dim, row_offset, block_q, sparse_cols, cfg):
        if tuple(cfg.gluon[:2]) != (gemm_q_sm90.BLOCK_M, gemm_q_sm90.BLOCK_N):
            raise ValueError(f"GEMM-Q's Gluon kernel has one unit shape, {gemm_q_sm90.BLOCK_M} x "
                             f"{gemm_q_sm90.BLOCK_N}; Config.gluon asks for {cfg.gluon[0]} x {cfg.gluon[1]}")
        return gemm_q_sm90.gemm_q_sm90(x, weight, bias, q_keep, y, head_dim, row_offset, block_q, sparse_cols, launch,
                                       programs=programs, stages=cfg.gluon[2])
    keep = q_keep.view(torch.uint8)
    xa, wa, wh = x, weight, weight
    use_tma = cfg.tma
    if use_tma:
        rows = as_rows(x)
        use_tma = rows is not None and tma_ok(weight)
        if use_tma:
            xa, wa = descriptor(rows, [block_m, block_k]), descriptor(weight, [cfg.block_n, block_k])
            wh = descriptor(weight, [cfg.block_n // 2, block_k]) if cfg.split_n else wa
    grid = (tiles_m * cdiv(N, cfg.block_n), B)
    launch(
        _gemm_q_kernel, grid,
        xa, wa, wh, bias if bias is not None else y, y, keep,
        M, N, K, sparse_cols, row_offset, first, tiles_m,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
        y.stride(0), y.stride(1), y.stride(2), keep.stride(0), keep.stride(1), keep.stride(2),
        HEAD_DIM=head_dim, BLOCK_Q=block_q, HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0,
        USE_TMA=use_tma, SPLIT_N=cfg.split_n, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
        DOT_F32=dot_f32(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


# ---------------------------------------------------------------------------------------------------
# Torch reference twin
# ---------------------------------------------------------------------------------------------------
def row_keep(q_keep: Tensor, m: int, row_offset: int, block_q: int) -> Tensor:
    """(shared) ``q_keep [B, H, NQB]`` -> per-row flags ``[B, M, H]`` for rows ``row_offset .. row_offset+m-1``."""
    qb = (torch.arange(m, device=q_keep.device) + row_offset) // block_q
    return q_keep[:, :, qb].transpose(1, 2)


def sparse_linear_q_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, head_dim: int,
                        row_offset: int, block_q: int, sparse_cols: int) -> Tensor:
    """Torch twin: the dense product (float32, or float64 for float64 inputs) with skipped Q tiles zeroed."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cdt) @ weight.to(cdt).T
    if bias is not None:
        y = y + bias.to(cdt)
    keep = row_keep(q_keep, x.shape[1], row_offset, block_q).repeat_interleave(head_dim, dim=-1)
    y[..., :sparse_cols] *= keep
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Argument checks (shared helpers first)
# ---------------------------------------------------------------------------------------------------
def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_tensor(name: str, t, ndim: int, like: Optional[Tensor] = None) -> None:
    """(shared) ``t`` is a floating tensor of ``ndim`` dims, with ``like``'s dtype and device when given."""
    if not isinstance(t, Tensor) or t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got {_shape(t)}")
    if like is None:
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    elif t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must match the activations' dtype and device ({like.dtype}, {like.device}), "
                         f"got ({t.dtype}, {t.device})")


def check_symbols(q_keep, batch: int, heads: int, m: int, head_dim, row_offset, block_q, device) -> None:
    """(shared) ``head_dim``, ``row_offset``, ``block_q`` and ``q_keep [B, H, NQB]`` fit ``m`` rows of ``heads`` heads."""
    if not isinstance(row_offset, int) or row_offset < 0:
        raise ValueError(f"row_offset must be an int >= 0, got {row_offset!r}")
    if not isinstance(block_q, int) or block_q < 16 or block_q & (block_q - 1):
        raise ValueError(f"block_q must be a power of two >= 16, got {block_q!r}")
    if not isinstance(q_keep, Tensor) or q_keep.dtype != torch.bool or q_keep.dim() != 3:
        raise ValueError(f"q_keep must be a bool tensor [B, H, NQB], got "
                         + (f"{q_keep.dtype} {tuple(q_keep.shape)}" if isinstance(q_keep, Tensor) else type(q_keep).__name__))
    need = cdiv(row_offset + m, block_q)
    if q_keep.shape[0] != batch or q_keep.shape[1] != heads or q_keep.shape[2] < need:
        raise ValueError(f"q_keep has shape {tuple(q_keep.shape)}, expected ({batch}, {heads}, NQB >= {need}): "
                         f"B={batch}, H={heads} heads of head_dim={head_dim}, and NQB q-blocks of {block_q} "
                         f"covering rows up to row_offset + M = {row_offset + m}")
    if q_keep.device != device:
        raise ValueError(f"q_keep is on {q_keep.device}, the activations on {device}")


def check_head_dim(head_dim, cols: int, what: str) -> None:
    """(shared) ``head_dim`` is a positive int dividing ``cols``."""
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if cols % head_dim:
        raise ValueError(f"head_dim={head_dim} does not divide {what}={cols}")


def check_inputs(x, weight, bias, q_keep, head_dim, row_offset, block_q, sparse_cols) -> None:
    """Raise ``ValueError`` naming the argument when the inputs break the contract of ``sparse_linear_q``.

    Shapes: ``x [B, M, K]``, ``weight [N, K]``, ``bias [N]`` or None, ``q_keep`` bool ``[B, H, NQB]``
    with ``H = sparse_cols // head_dim`` and ``NQB >= ceil((row_offset + M) / block_q)``;
    ``sparse_cols`` (None: N) a multiple of ``head_dim`` in ``(0, N]``.
    """
    check_tensor("x", x, 3)
    check_tensor("weight", weight, 2, like=x)
    if weight.shape[1] != x.shape[2]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [N, K] with K = x.shape[-1] = {x.shape[2]}")
    N = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, 1, like=x)
        if bias.shape[0] != N:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},) = [N]")
    if sparse_cols is None:
        sparse_cols = N
    if not isinstance(sparse_cols, int) or not 0 < sparse_cols <= N:
        raise ValueError(f"sparse_cols must be an int in (0, N={N}], got {sparse_cols!r}")
    check_head_dim(head_dim, sparse_cols, "sparse_cols")
    check_symbols(q_keep, x.shape[0], sparse_cols // head_dim, x.shape[1], head_dim, row_offset, block_q, x.device)
