"""GEMM-Q for Hopper (sm_90) in Gluon: persistent, warp-specialised, the kept tiles dealt out evenly.

Same contract as ``gemm_q.py`` (formula in its docstring), for the common case only: 2-byte dtypes, head
dims that are multiples of 64, joint rows aligned to 128 (``row_offset % 128 == 0``, ``block_q % 128 ==
0``), every tensor addressable by TMA. ``supports`` says whether a call qualifies; ``gemm_q`` falls back to
the Triton kernel otherwise.

Why a second kernel. The Triton kernel runs one program per output tile. At head density d only a
fraction d of the tiles compute (a full-K reduction, ~20 us for 128 x 128 x 3072), the rest store zeros
(~1 us), and the hardware hands tiles to SMs in index order: some SMs get several kept tiles, others none,
and each kept tile starts with an empty pipeline (H200, M = 33792: 0.236 ms at d = 0.125 against 0.101 ms
of kept work at the dense rate). Here one CTA per SM takes a fixed share of the work:

* **Units and kinds.** The output is cut into units of 128 rows x 256 columns (two halves of 128). A half
  computes when any of its 64-column segments is kept (its head's symbol in the unit's q-block; columns
  of a fused QKV weight past ``sparse_cols`` always); a unit is of kind 2 (both halves compute: one
  128 x 256 reduction), 1 (one half: a 128 x 128 reduction, the other half zeros) or 0 (zeros only).
* **The deal** (``plan``, torch ops on the device: no host sync). The units sorted by kind, largest
  first (stable, so that units adjacent in the GROUP_M-swizzled order stay adjacent), are dealt to the P
  programs like cards, in snake order: computed position ``r * P + lane`` goes to program ``lane`` on even
  rounds ``r`` and ``P - 1 - lane`` on odd ones. Dealing decreasing sizes in snake order leaves every
  program within about one half-unit of the mean (the programs that got a kind-2 unit in a round get the
  last kind-1 units of the next). The zero units are dealt plainly after the computed ones.
* ``_loader`` (1 warp): for each of the program's computed units, the x slice and the computing
  half's (or both halves') W slice of every 64-wide reduction step into a ring of ``STAGES`` buffers.
  It also writes all zeros: those of the program's zero units spread over its rounds, and the other half
  of each kind-1 unit, by TMA stores from a 64 x 128 shared buffer of zeros, so that they overlap the
  consumers' reductions and cost the consumers nothing.
* ``_consumer`` x 2 (4 warps each), cooperative: consumer ``X`` computes rows ``64 X .. 64 X + 63`` of
  every computed unit (a 64 x 256 or 64 x 128 accumulator, reading the stage's shared x slice), then
  ``+ bias``, zeroes the columns of unkept segments inside a computed half (64-wide heads), and stores
  through its shared buffer by TMA.

Notation as in ``gemm_o_sm90.py``: ``cnt`` ring fills (loader) or stages passed (consumers); a buffer's
n-th use waits phase ``n & 1`` (ready) and ``(n & 1) ^ 1`` (empty). Tensors are 3-D ``[B, M, *]``
descriptors: a partial last row tile reads zeros past M and its stores are clipped at M.

Gluon has no interpreter: CPU tests compile it for sm_90 (``tests/sm90_compile_check.py gemm_q``); on a
Hopper GPU ``tests/test_gemm_sm90.py`` compares it with the reference twin.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .gluon_hopper import (AVAILABLE, GluonDescriptor, fence_async_shared, gl, gluon, mbarrier, thread_barrier, tma,
                           tma_ok, warpgroup_mma, warpgroup_mma_wait)
from .gluon_hopper import tma_load as _tma_load
from .gluon_hopper import tma_store as _tma_store
from .launch import capability, cdiv, num_sms

__all__ = ["supports", "gemm_q_sm90", "plan", "AVAILABLE"]

BLOCK_M = 128   # unit rows (64 a consumer)
BLOCK_N = 256   # unit columns: two halves of HALF
HALF = 128
SEG = 64        # keep granularity inside a unit: head dims are multiples of it
BLOCK_K = 64
STAGES = 3      # ring of x + W slices, 3 x 48 KB, + 2 x 32 KB output buffers + 16 KB of zeros = 224 KB
GROUP_M = 8     # row units that sweep the column units together (L2 reuse of W)


def supports(x: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, head_dim: int, row_offset: int,
             block_q: int) -> bool:
    """Whether ``gemm_q_sm90`` takes this call (arguments already checked by ``gemm_q.check_inputs``)."""
    if not AVAILABLE or not x.is_cuda or capability(x.device)[0] != 9:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or y.dtype != x.dtype:
        return False
    if head_dim % SEG or row_offset % BLOCK_M or block_q % BLOCK_M:
        return False
    return all(t.numel() > 0 and tma_ok(t) for t in (x, weight, y))


if AVAILABLE:
    @gluon.jit
    def _unit(ORDER, pos, valid, tiles_mn, tiles_m, tiles_n, FIRST_TILE, BLOCK_Q: gl.constexpr,
              GROUP_M: gl.constexpr):
        """Unit at ``pos`` of the deal -> (batch, q-block, first local row, first column); GROUP_M-swizzled
        unit ids (tutorial 03). ``valid`` False: a placeholder (unit 0), nothing read past the order."""
        t = gl.load(ORDER + pos, mask=valid, other=0)
        b = t // tiles_mn
        r = t - b * tiles_mn
        in_group = GROUP_M * tiles_n
        first_m = (r // in_group) * GROUP_M
        size_m = gl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (r % in_group) % size_m
        tile_n = (r % in_group) // size_m
        return b, ((FIRST_TILE + tile_m) * 128) // BLOCK_Q, tile_m * 128, tile_n * 256

    @gluon.jit
    def _seg(KEEP, b, qb, c0, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM: gl.constexpr):
        """Keep flag of the 64 columns from ``c0``: their head's symbol (sparse columns), True for the
        dense columns of a fused weight, False past N."""
        sparse = c0 < SPARSE_COLS
        kv = gl.load(KEEP + b * stride_kb + (c0 // HEAD_DIM) * stride_kh + qb * stride_kq, mask=sparse, other=0)
        return ((kv != 0) & sparse) | ((c0 >= SPARSE_COLS) & (c0 < N))

    @gluon.jit
    def _flags(KEEP, b, qb, n0, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM: gl.constexpr):
        """The four segment flags of the unit at column ``n0``."""
        f0 = _seg(KEEP, b, qb, n0, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
        f1 = _seg(KEEP, b, qb, n0 + 64, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
        f2 = _seg(KEEP, b, qb, n0 + 128, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
        f3 = _seg(KEEP, b, qb, n0 + 192, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
        return f0, f1, f2, f3

    @gluon.jit
    def _dealt(r, pid, P):
        """Deal position of the program's computed unit of round ``r`` (snake order)."""
        return r * P + pid + (r % 2) * (P - 1 - 2 * pid)

    @gluon.jit
    def _zero_half(desc_z, zero_smem, b, m0, c0, N):
        """Zeros into the 128 x 128 block at (``m0``, ``c0``): two 64-row TMA stores (none past N)."""
        if c0 < N:
            _tma_store(desc_z, [b, m0, c0], zero_smem)
            _tma_store(desc_z, [b, m0 + 64, c0], zero_smem)

    @gluon.jit
    def _loader(args, HAS_BIAS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr,
                STAGES: gl.constexpr, GROUP_M: gl.constexpr, X: gl.constexpr):
        (desc_x, desc_w, desc_wh, desc_y, desc_z, BIAS, KEEP, ORDER, NCOMP, N, K, SPARSE_COLS, FIRST_TILE, tiles_m,
         tiles_n, num_units, stride_kb, stride_kh, stride_kq, smem, bars) = args
        a_smem, w_smem, y_smem, zero_smem = smem
        ready, empty = bars
        BLOCK_M: gl.constexpr = desc_x.block_type.shape[1]
        BLOCK_K: gl.constexpr = desc_x.block_type.shape[2]
        BLOCK_N: gl.constexpr = desc_w.block_type.shape[0]
        HALF: gl.constexpr = desc_wh.block_type.shape[0]
        full_bytes: gl.constexpr = (BLOCK_M + BLOCK_N) * BLOCK_K * desc_x.dtype.primitive_bitwidth // 8
        half_bytes: gl.constexpr = (BLOCK_M + HALF) * BLOCK_K * desc_x.dtype.primitive_bitwidth // 8
        pid = gl.program_id(0)
        P = gl.num_programs(0)
        n_comp = gl.load(NCOMP)
        rounds = gl.cdiv(n_comp, P)
        # the program's zero units: deal positions n_comp + pid + i P
        my_zero = gl.maximum(gl.cdiv(num_units - n_comp - pid, P), 0)
        tiles_mn = tiles_m * tiles_n
        cnt = 0
        z = 0
        for r in range(rounds):
            # this round's share of the zero units, issued before its fills (stores run beside the ring)
            z_to = ((r + 1) * my_zero) // rounds
            for i in range(z, z_to):
                zb, _, zm, zn = _unit(ORDER, n_comp + pid + i * P, i < my_zero, tiles_mn, tiles_m, tiles_n, FIRST_TILE,
                                      BLOCK_Q, GROUP_M)
                _zero_half(desc_z, zero_smem, zb.to(gl.int32), zm, zn, N)
                _zero_half(desc_z, zero_smem, zb.to(gl.int32), zm, zn + HALF, N)
            z = z_to
            pos = _dealt(r, pid, P)
            if pos < n_comp:
                b, qb, m0, n0 = _unit(ORDER, pos, pos < n_comp, tiles_mn, tiles_m, tiles_n, FIRST_TILE, BLOCK_Q, GROUP_M)
                f0, f1, f2, f3 = _flags(KEEP, b, qb, n0, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
                lo = f0 | f1
                hi = f2 | f3
                bi = b.to(gl.int32)
                if lo & hi:
                    for k0 in range(0, K, BLOCK_K):
                        s = cnt % STAGES
                        mbarrier.wait(empty.index(s), ((cnt // STAGES) & 1) ^ 1)
                        mbarrier.expect(ready.index(s), full_bytes)
                        _tma_load(desc_x, [bi, m0, k0], ready.index(s), a_smem.index(s))
                        _tma_load(desc_w, [n0, k0], ready.index(s), w_smem.index(s))
                        cnt += 1
                else:
                    nc = n0 + hi.to(gl.int32) * HALF     # the computing half
                    for k0 in range(0, K, BLOCK_K):
                        s = cnt % STAGES
                        mbarrier.wait(empty.index(s), ((cnt // STAGES) & 1) ^ 1)
                        mbarrier.expect(ready.index(s), half_bytes)
                        _tma_load(desc_x, [bi, m0, k0], ready.index(s), a_smem.index(s))
                        _tma_load(desc_wh, [nc, k0], ready.index(s), w_smem.index(s).slice(0, HALF))
                        cnt += 1
                    _zero_half(desc_z, zero_smem, bi, m0, n0 + lo.to(gl.int32) * HALF, N)
        for i in range(z, my_zero):
            zb, _, zm, zn = _unit(ORDER, n_comp + pid + i * P, i < my_zero, tiles_mn, tiles_m, tiles_n, FIRST_TILE,
                                  BLOCK_Q, GROUP_M)
            _zero_half(desc_z, zero_smem, zb.to(gl.int32), zm, zn, N)
            _zero_half(desc_z, zero_smem, zb.to(gl.int32), zm, zn + HALF, N)
        tma.store_wait(0)

    @gluon.jit
    def _reduce(a_smem, w_smem, ready, empty, cnt, nsteps, acc, X: gl.constexpr, WIDTH: gl.constexpr,
                STAGES: gl.constexpr):
        """``acc +`` this consumer's 64 rows of x times the first WIDTH rows of W over ``nsteps`` stages,
        one product in flight; each stage is released once its product is done."""
        BM: gl.constexpr = a_smem.shape[2]
        BK: gl.constexpr = a_smem.shape[3]
        for k in range(nsteps):
            s = (cnt + k) % STAGES
            mbarrier.wait(ready.index(s), ((cnt + k) // STAGES) & 1)
            a2 = a_smem.index(s).reshape([BM, BK]).slice(X * 64, 64, 0)
            w2 = w_smem.index(s).slice(0, WIDTH)
            acc = warpgroup_mma(a2, w2.permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if k > 0:
                mbarrier.arrive(empty.index((cnt + k - 1) % STAGES), count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if nsteps > 0:
            mbarrier.arrive(empty.index((cnt + nsteps - 1) % STAGES), count=1)
        return acc

    @gluon.jit
    def _epilogue(acc, buf2, buf3, desc, BIAS, b, row0, c0, n0, N, f0, f1, f2, f3, HAS_BIAS: gl.constexpr):
        """``acc (+ bias)`` with the columns of unkept segments zeroed, stored at (``row0``, ``c0``): written
        into ``buf2`` (2-D) and copied out of ``buf3`` (the same memory as a 3-D box of ``desc``); ``n0``
        is the unit's first column, for the segment of each column."""
        layout: gl.constexpr = acc.type.layout
        WIDTH: gl.constexpr = acc.shape[1]
        offs_n = c0 + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
        if HAS_BIAS:
            bias = gl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
            acc = acc + gl.expand_dims(bias, 0)
        if (f0 & f1 & f2 & f3).to(gl.int32) == 0:
            # a computed half may hold an unkept 64-wide head (D = 64) or the unit's other, unkept half
            seg = (offs_n - n0) // 64
            keep = ((seg == 0) & f0) | ((seg == 1) & f1) | ((seg == 2) & f2) | ((seg == 3) & f3)
            acc = gl.where(gl.expand_dims(keep, 0), acc, 0.0)
        tma.store_wait(0)     # the buffer's previous store has been read out
        thread_barrier()
        buf2.store(acc.to(buf2.dtype))
        fence_async_shared()
        _tma_store(desc, [b, row0, c0], buf3)

    @gluon.jit
    def _consumer(args, HAS_BIAS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr,
                  STAGES: gl.constexpr, GROUP_M: gl.constexpr, X: gl.constexpr):
        (desc_x, desc_w, desc_wh, desc_y, desc_z, BIAS, KEEP, ORDER, NCOMP, N, K, SPARSE_COLS, FIRST_TILE, tiles_m,
         tiles_n, num_units, stride_kb, stride_kh, stride_kq, smem, bars) = args
        a_smem, w_smem, y_smem, zero_smem = smem
        ready, empty = bars
        BLOCK_K: gl.constexpr = desc_x.block_type.shape[2]
        BLOCK_N: gl.constexpr = desc_w.block_type.shape[0]
        HALF: gl.constexpr = desc_wh.block_type.shape[0]
        acc_full: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        acc_half: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HALF, 16])
        pid = gl.program_id(0)
        P = gl.num_programs(0)
        n_comp = gl.load(NCOMP)
        rounds = gl.cdiv(n_comp, P)
        nsteps = gl.cdiv(K, BLOCK_K)
        tiles_mn = tiles_m * tiles_n
        buf = y_smem.index(X)
        # the next unit and its flags are loaded one round ahead, under the current reduction
        pos = _dealt(0, pid, P)
        b, qb, m0, n0 = _unit(ORDER, pos, pos < n_comp, tiles_mn, tiles_m, tiles_n, FIRST_TILE, BLOCK_Q, GROUP_M)
        f0, f1, f2, f3 = _flags(KEEP, b, qb, n0, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
        cnt = 0
        for r in range(rounds):
            cb, cm0, cn0, c0_, c1_, c2_, c3_ = b, m0, n0, f0, f1, f2, f3
            here = pos < n_comp
            pos = _dealt(r + 1, pid, P)
            b, qb, m0, n0 = _unit(ORDER, pos, pos < n_comp, tiles_mn, tiles_m, tiles_n, FIRST_TILE, BLOCK_Q,
                                  GROUP_M)
            f0, f1, f2, f3 = _flags(KEEP, b, qb, n0, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
            if here:
                lo = c0_ | c1_
                hi = c2_ | c3_
                bi = cb.to(gl.int32)
                if lo & hi:
                    acc = _reduce(a_smem, w_smem, ready, empty, cnt, nsteps,
                                  gl.zeros([64, BLOCK_N], gl.float32, layout=acc_full), X, BLOCK_N, STAGES)
                    _epilogue(acc, buf.reshape([64, BLOCK_N]), buf, desc_y, BIAS, bi, cm0 + X * 64, cn0, cn0, N,
                              c0_, c1_, c2_, c3_, HAS_BIAS)
                else:
                    acc_h = _reduce(a_smem, w_smem, ready, empty, cnt, nsteps,
                                    gl.zeros([64, HALF], gl.float32, layout=acc_half), X, HALF, STAGES)
                    # the first half of the buffer: in the NVMMA layout a box's 64-column chunks follow
                    # one another (one TMA copy each), so its first two chunks are a 64 x 128 box
                    _epilogue(acc_h, buf.reshape([64, BLOCK_N]).slice(0, HALF, 1), buf.slice(0, HALF, 2), desc_z,
                              BIAS, bi, cm0 + X * 64, cn0 + hi.to(gl.int32) * HALF, cn0, N, c0_, c1_, c2_, c3_,
                              HAS_BIAS)
                cnt += nsteps
        tma.store_wait(0)

    @gluon.jit
    def _gemm_q_sm90_kernel(desc_x, desc_w, desc_wh, desc_y, desc_z, BIAS, KEEP, ORDER, NCOMP,
                            N, K, SPARSE_COLS, FIRST_TILE, tiles_m, tiles_n, num_units,
                            stride_kb, stride_kh, stride_kq,
                            HAS_BIAS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr,
                            STAGES: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
        dtype: gl.constexpr = desc_x.dtype
        a_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_x.block_type.shape, desc_x.layout)
        w_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_w.block_type.shape, desc_w.layout)
        y_smem = gl.allocate_shared_memory(dtype, [2] + desc_y.block_type.shape, desc_y.layout)
        zero_smem = gl.allocate_shared_memory(dtype, desc_z.block_type.shape, desc_z.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)      # both consumers read every stage
        zl: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 4, 8], [1, num_warps, 1], [2, 1, 0])
        zero_smem.store(gl.zeros([1, 64, 128], dtype, layout=zl))     # desc_z.block_type.shape
        fence_async_shared()
        args = (desc_x, desc_w, desc_wh, desc_y, desc_z, BIAS, KEEP, ORDER, NCOMP, N, K, SPARSE_COLS, FIRST_TILE,
                tiles_m, tiles_n, num_units, stride_kb, stride_kh, stride_kq, (a_smem, w_smem, y_smem, zero_smem),
                (ready, empty))
        gl.warp_specialize([
            (_consumer, (args, HAS_BIAS, HEAD_DIM, BLOCK_Q, STAGES, GROUP_M, 0)),
            (_consumer, (args, HAS_BIAS, HEAD_DIM, BLOCK_Q, STAGES, GROUP_M, 1)),
            (_loader, (args, HAS_BIAS, HEAD_DIM, BLOCK_Q, STAGES, GROUP_M, 0)),
        ], [4, 1], [232, 40])


def _descriptor(t: Tensor, block: list[int]):
    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return GluonDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gdt))


_PLAN_CONSTANTS: dict = {}


def _plan_constants(batch: int, heads: int, tiles_m: int, tiles_n: int, first: int, block_q: int, head_dim: int,
                    sparse_cols: int, n: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(q-block of each row unit, augmented head of each 64-column segment, swizzled unit -> natural index),
    cached per shape. Segment heads: ``heads`` for the always-kept dense columns, ``heads + 1`` past N."""
    key = (batch, heads, tiles_m, tiles_n, first, block_q, head_dim, sparse_cols, n, str(device))
    hit = _PLAN_CONSTANTS.get(key)
    if hit is None:
        qb = ((first + np.arange(tiles_m)) * BLOCK_M) // block_q
        c0 = np.arange(tiles_n * (BLOCK_N // SEG)) * SEG
        seg = np.where(c0 < sparse_cols, c0 // head_dim, np.where(c0 < n, heads, heads + 1))
        t = np.arange(batch * tiles_m * tiles_n)           # _unit's swizzle, on the host
        b, r = t // (tiles_m * tiles_n), t % (tiles_m * tiles_n)
        in_group = GROUP_M * tiles_n
        first_m = (r // in_group) * GROUP_M
        size_m = np.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (r % in_group) % size_m
        tile_n = (r % in_group) // size_m
        natural = (b * tiles_m + tile_m) * tiles_n + tile_n
        hit = tuple(torch.as_tensor(v, dtype=torch.long, device=device) for v in (qb, seg, natural))
        _PLAN_CONSTANTS[key] = hit
    return hit


def plan(q_keep: Tensor, tiles_m: int, tiles_n: int, first: int, block_q: int, head_dim: int, sparse_cols: int,
         n: int) -> tuple[Tensor, Tensor]:
    """The deal's order (int32 swizzled unit ids, kind 2 units first, then kind 1, then kind 0, each in
    swizzled order) and the number of computed units (int32 ``[1]``), from ``q_keep [B, H, NQB]`` (bool),
    by torch ops on its device: no host synchronisation."""
    B, H, _ = q_keep.shape
    qb, seg, natural = _plan_constants(B, H, tiles_m, tiles_n, first, block_q, head_dim, sparse_cols, n,
                                       q_keep.device)
    hk = q_keep[:, :, qb]                                                   # [B, H, tiles_m]
    aug = torch.cat([hk, hk.new_ones(B, 1, tiles_m), hk.new_zeros(B, 1, tiles_m)], dim=1)
    halves = aug[:, seg, :].view(B, tiles_n, 2, BLOCK_N // SEG // 2, tiles_m).any(dim=3)
    kind = halves.sum(dim=2, dtype=torch.int32).transpose(1, 2).reshape(-1)[natural]   # per swizzled unit
    order = torch.sort(kind, descending=True, stable=True).indices.to(torch.int32)
    return order, (kind > 0).sum(dtype=torch.int32).reshape(1)


def gemm_q_sm90(x: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, y: Tensor, head_dim: int,
                row_offset: int, block_q: int, sparse_cols: int, launch, *, programs: Optional[int] = None,
                stages: int = STAGES) -> Tensor:
    """Launch the Gluon kernel into ``y`` (allocated by the caller); ``q_keep`` is the bool symbol tensor.
    ``programs`` caps the grid (default: one program per SM)."""
    B, M, K = x.shape
    N = weight.shape[0]
    tiles_m, tiles_n = cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)
    first = row_offset // BLOCK_M
    order, n_comp = plan(q_keep, tiles_m, tiles_n, first, block_q, head_dim, sparse_cols, N)
    num_units = B * tiles_m * tiles_n
    desc_x = _descriptor(x, [1, BLOCK_M, BLOCK_K])
    desc_w, desc_wh = _descriptor(weight, [BLOCK_N, BLOCK_K]), _descriptor(weight, [HALF, BLOCK_K])
    desc_y, desc_z = _descriptor(y, [1, 64, BLOCK_N]), _descriptor(y, [1, 64, HALF])
    keep = q_keep.view(torch.uint8)
    grid = (min(num_units, programs or (num_sms(x.device) if x.is_cuda else 1)),)
    launch(
        _gemm_q_sm90_kernel, grid,
        desc_x, desc_w, desc_wh, desc_y, desc_z, bias if bias is not None else y, keep, order, n_comp,
        N, K, sparse_cols, first, tiles_m, tiles_n, num_units, keep.stride(0), keep.stride(1), keep.stride(2),
        HAS_BIAS=bias is not None, HEAD_DIM=head_dim, BLOCK_Q=block_q, STAGES=stages, GROUP_M=GROUP_M,
        # 4 warps here (consumer 0) + 4 (consumer 1) + 1 loader warp: registers redistributed to 232 / 232 / 40
        num_warps=4, maxnreg=168,
    )
    return y
