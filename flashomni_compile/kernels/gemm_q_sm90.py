"""GEMM-Q for Hopper (sm_90) in Gluon: persistent, warp-specialised, the kept heads paired and dealt out evenly.

Same contract as ``gemm_q.py`` (formula in its docstring), for the common case only: 2-byte dtypes, head
dims that are multiples of 64, joint rows aligned to 128 (``row_offset % 128 == 0``, ``block_q % 128 ==
0``), at most ``MAX_HALVES`` column halves, every tensor addressable by TMA. ``supports`` says whether a
call qualifies; ``gemm_q`` falls back to the Triton kernel otherwise.

Why a second kernel. The Triton kernel runs one program per output tile. At head density d only a
fraction d of the tiles compute (a full-K reduction), the rest store zeros, and the hardware hands tiles
to SMs in index order: some SMs get several kept tiles, others none, each kept tile starts with an empty
pipeline, and a lone 128 x 128 tile moves 1.4x the operand bytes per FLOP of a 128 x 256 one (H200,
M = 33792: 0.24 ms at d = 0.125 against ~0.10 ms of kept work at the dense rate). Here:

* **Halves and items.** The output is cut into blocks of 128 rows x 128 columns ("halves"). A half is
  kept when any of its two 64-column segments is: the segment's head's symbol in the row block's q-block
  (columns of a fused QKV weight past ``sparse_cols`` always). Within each row block the kept halves are
  paired in column order into *full items* (two halves, any two columns: one 128 x 256 reduction over
  the shared x rows), an odd one left is a *single item* (128 x 128), and every other half is a *zero
  item*. In a dense call the full items are the 128 x 256 tiles of a plain GEMM.
* **The plan** (``_plan_kernel``, a small Triton kernel on the device, no host sync): the three item
  lists and their lengths, 16 row blocks a program, each program's run of items in row-block order.
* **The deal.** The computed items, full ones first, are dealt to the P programs like cards in snake
  order: computed position ``r * P + lane`` goes to program ``lane`` on even rounds ``r`` and to
  ``P - 1 - lane`` on odd ones, so a program that got a full item in one round gets one of the last
  singles of the next, and every program ends within about one half of the mean. Consecutive positions
  run at the same time on different SMs, so the full items of one row block read its x rows from L2
  together (its single, in the other list, runs rounds later on another SM and reads them again;
  padding it into a full item to avoid that gained nothing: benchmarks/NOTES.md session 11). The zero
  items are dealt plainly.
* ``_loader`` (1 warp): for each computed item of the program, the x slice and the item's one or two W
  slices (two halves anywhere in W: one TMA copy each) of every 64-wide reduction step into a ring of
  ``STAGES`` buffers.
* ``_zero_writer`` (1 warp): the program's zero items, by TMA stores from a 64 x 128 shared buffer of
  zeros, as fast as the store queue takes them. (Spread over the loader's rounds instead, or written by
  streaming ``st.global.cs`` stores, they cost more: H200, d = 0.125, 0.206 and 0.219 ms against 0.194.)
* ``_consumer`` x 2 (4 warps each), cooperative: consumer ``X`` computes rows ``64 X .. 64 X + 63`` of
  every computed item (a 64 x 256 or 64 x 128 accumulator), adds the bias, zeroes the columns of unkept
  64-wide segments inside a kept half (64-wide heads), and stores each half through its shared buffer.

Notation as in ``gemm_o_sm90.py``: ``cnt`` ring fills (loader) or stages passed (consumers); a buffer's
n-th use waits phase ``n & 1`` (ready) and ``(n & 1) ^ 1`` (empty). Tensors are 3-D ``[B, M, *]``
descriptors: a partial last row block reads zeros past M and its stores are clipped at M.

Gluon has no interpreter: CPU tests compile it for sm_90 (``tests/sm90_compile_check.py gemm_q``) and run
the plan kernel in the interpreter; on a Hopper GPU ``tests/test_gemm_q_sm90.py`` compares the kernel
with the reference twin.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gluon_hopper import (AVAILABLE, GluonDescriptor, fence_async_shared, gl, gluon, mbarrier, ring_mma,
                           thread_barrier, tma, tma_ok)
from .gluon_hopper import tma_load as _tma_load
from .gluon_hopper import tma_store as _tma_store
from .launch import capability, cdiv, num_sms

__all__ = ["supports", "gemm_q_sm90", "plan", "AVAILABLE"]

BLOCK_M = 128   # rows of a row block (64 a consumer)
BLOCK_N = 256   # columns of a full item: two halves
HALF = 128
SEG = 64        # keep granularity inside a half: head dims are multiples of it
BLOCK_K = 64
STAGES = 3      # ring of x + W slices, 3 x 48 KB, + 2 x 32 KB output buffers + 16 KB of zeros = 224 KB
NONE = 255      # the second half of a single item
MAX_HALVES = NONE   # halves a row can have (the item code keeps a half index in 8 bits): N <= 32640


def supports(x: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, head_dim: int, row_offset: int,
             block_q: int) -> bool:
    """Whether ``gemm_q_sm90`` takes this call (arguments already checked by ``gemm_q.check_inputs``)."""
    if not AVAILABLE or not x.is_cuda or capability(x.device)[0] != 9:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or y.dtype != x.dtype:
        return False
    if head_dim % SEG or row_offset % BLOCK_M or block_q % BLOCK_M or cdiv(weight.shape[0], HALF) > MAX_HALVES:
        return False
    if x.shape[0] * cdiv(x.shape[1], BLOCK_M) >= 1 << 15:     # row block index in 15 bits of the item code
        return False
    return all(t.numel() > 0 and tma_ok(t) for t in (x, weight, y))


# ---------------------------------------------------------------------------------------------------
# The plan: a Triton kernel (it runs in the interpreter too)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _two_least(a1, a2, b1, b2):
    """Combine of (least, second least) pairs."""
    return tl.minimum(a1, b1), tl.minimum(tl.maximum(a1, b1), tl.minimum(a2, b2))


@triton.jit
def _seg_keep(KEEP, b, qb, c0, inside, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM: tl.constexpr):
    """Keep flags of the 64-column segments starting at ``c0`` (any shape; False outside ``inside``)."""
    sparse = (c0 < SPARSE_COLS) & inside
    kv = tl.load(KEEP + b * stride_kb + (c0 // HEAD_DIM) * stride_kh + qb * stride_kq, mask=sparse, other=0)
    return ((kv != 0) & sparse) | ((c0 >= SPARSE_COLS) & (c0 < N) & inside)


@triton.jit
def _plan_kernel(KEEP, ITEMS, COUNTS, R, tiles_m, FIRST_TILE, NH, N, SPARSE_COLS, CAP_FULL, CAP_SINGLE,
                 stride_kb, stride_kh, stride_kq, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr,
                 ROWS: tl.constexpr, NH_P2: tl.constexpr):
    """ROWS row blocks a program: their items appended to ``ITEMS[0:]`` (full items),
    ``ITEMS[CAP_FULL:]`` (single items) and ``ITEMS[CAP_FULL + CAP_SINGLE:]`` (zero items), each run of
    a program's items in row-block order at a place reserved by an atomic add on the list's length in
    ``COUNTS`` (zeroed by the caller). The order of the programs' runs is the order of their atomics;
    it changes which SM computes an item, never a value. Item code: ``row_block << 16 | first_half << 8
    | second_half`` (``NONE`` for a single or zero item)."""
    h = tl.arange(0, NH_P2)[None, :]
    rows1 = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rows = rows1[:, None]
    b = rows // tiles_m
    qb = ((FIRST_TILE + rows - b * tiles_m) * 128) // BLOCK_Q
    inside = (rows < R) & (h < NH)
    kept = (_seg_keep(KEEP, b, qb, h * 128, inside, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
            | _seg_keep(KEEP, b, qb, h * 128 + 64, inside, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq,
                        HEAD_DIM))
    rank = tl.cumsum(kept.to(tl.int32), axis=1) - 1          # of a kept half among its row's kept halves
    cnt1 = tl.sum(kept.to(tl.int32), axis=1)                # per row
    pairs1, odd1 = cnt1 // 2, cnt1 % 2
    zeros1 = tl.where(rows1 < R, NH - cnt1, 0)
    cnt = cnt1[:, None]
    # each row's first item in each list: the program's reserved place plus the rows before it
    at_full = (tl.atomic_add(COUNTS, tl.sum(pairs1, axis=0)) + tl.cumsum(pairs1, axis=0) - pairs1)[:, None]
    at_single = (tl.atomic_add(COUNTS + 1, tl.sum(odd1, axis=0)) + tl.cumsum(odd1, axis=0) - odd1)[:, None]
    at_zero = (tl.atomic_add(COUNTS + 2, tl.sum(zeros1, axis=0)) + tl.cumsum(zeros1, axis=0) - zeros1)[:, None]
    # the next kept half after each kept one: the second least of the kept indices from it on
    _, nxt = tl.associative_scan((tl.where(kept, h, NH_P2), tl.full(kept.shape, NH_P2, tl.int32)), 1,
                                 _two_least, reverse=True)
    code = (rows << 16) | (h << 8)
    starts = kept & (rank % 2 == 0)
    full = starts & (rank + 1 < cnt)
    tl.store(ITEMS + at_full + rank // 2, code | nxt, mask=full)
    tl.store(ITEMS + CAP_FULL + at_single + 0 * h, code | 255, mask=starts & ~full)   # one a row at most
    # an unkept half's place among its row's unkept halves: h minus the kept ones before it
    tl.store(ITEMS + CAP_FULL + CAP_SINGLE + at_zero + (h - rank - 1), code | 255, mask=inside & ~kept)


def plan(q_keep: Tensor, batch: int, tiles_m: int, first: int, block_q: int, head_dim: int, sparse_cols: int,
         n: int, launch) -> tuple[Tensor, Tensor, int, int]:
    """``(items, counts, cap_full, cap_single)`` of a call (``_plan_kernel``); ``q_keep`` as uint8."""
    R, nh = batch * tiles_m, cdiv(n, HALF)
    cap_full, cap_single = R * (nh // 2), R
    items = torch.empty(cap_full + cap_single + R * nh, dtype=torch.int32, device=q_keep.device)
    counts = torch.zeros(3, dtype=torch.int32, device=q_keep.device)
    nh_p2 = triton.next_power_of_2(nh)
    rows = max(1, min(16, 2048 // nh_p2))
    launch(_plan_kernel, (cdiv(R, rows),), q_keep, items, counts, R, tiles_m, first, nh, n, sparse_cols, cap_full,
           cap_single, q_keep.stride(0), q_keep.stride(1), q_keep.stride(2), HEAD_DIM=head_dim, BLOCK_Q=block_q,
           ROWS=rows, NH_P2=nh_p2, num_warps=4)
    return items, counts, cap_full, cap_single


if AVAILABLE:
    @gluon.jit
    def _decode(code, tiles_m, FIRST_TILE, BLOCK_Q: gl.constexpr):
        """Item code -> (batch, q-block, first local row, first half, second half or NONE)."""
        rb = code >> 16
        b = rb // tiles_m
        tm = rb - b * tiles_m
        return b, ((FIRST_TILE + tm) * 128) // BLOCK_Q, tm * 128, (code >> 8) & 255, code & 255

    @gluon.jit
    def _dealt(r, pid, P):
        """Deal position of the program's computed item of round ``r`` (snake order)."""
        return r * P + pid + (r % 2) * (P - 1 - 2 * pid)

    @gluon.jit
    def _computed(ITEMS, pos, n_full, n_comp, CAP_FULL):
        """Code of the computed item at deal position ``pos`` (full items, then singles); 0 past the end."""
        at = gl.where(pos < n_full, pos, CAP_FULL + pos - n_full)
        return gl.load(ITEMS + at, mask=pos < n_comp, other=0)

    @gluon.jit
    def _seg(KEEP, b, qb, c0, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM: gl.constexpr):
        """Keep flag of the 64 columns from ``c0`` (a scalar twin of ``_seg_keep``)."""
        sparse = c0 < SPARSE_COLS
        kv = gl.load(KEEP + b * stride_kb + (c0 // HEAD_DIM) * stride_kh + qb * stride_kq, mask=sparse, other=0)
        return ((kv != 0) & sparse) | ((c0 >= SPARSE_COLS) & (c0 < N))

    @gluon.jit
    def _item(ITEMS, KEEP, pos, n_full, n_comp, CAP_FULL, tiles_m, FIRST_TILE, N, SPARSE_COLS, stride_kb, stride_kh,
              stride_kq, HALF: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr):
        """The computed item at deal position ``pos``: (batch, first local row, first half, second half, and
        the keep flags of the four 64-column segments of its two halves)."""
        b, qb, m0, ha, hb = _decode(_computed(ITEMS, pos, n_full, n_comp, CAP_FULL), tiles_m, FIRST_TILE, BLOCK_Q)
        f0 = _seg(KEEP, b, qb, ha * HALF, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
        f1 = _seg(KEEP, b, qb, ha * HALF + 64, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
        f2 = _seg(KEEP, b, qb, hb * HALF, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
        f3 = _seg(KEEP, b, qb, hb * HALF + 64, N, SPARSE_COLS, stride_kb, stride_kh, stride_kq, HEAD_DIM)
        return b, m0, ha, hb, f0, f1, f2, f3

    @gluon.jit
    def _loader(args, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr):
        (desc_x, desc_w, desc_y, BIAS, KEEP, ITEMS, COUNTS, N, K, SPARSE_COLS, FIRST_TILE, tiles_m, CAP_FULL,
         CAP_SINGLE, stride_kb, stride_kh, stride_kq, smem, bars) = args
        a_smem, w_smem, y_smem, zero_smem = smem
        ready, empty = bars
        BLOCK_M: gl.constexpr = desc_x.block_type.shape[1]
        BLOCK_K: gl.constexpr = desc_x.block_type.shape[2]
        HALF: gl.constexpr = desc_w.block_type.shape[0]
        x_bytes: gl.constexpr = BLOCK_M * BLOCK_K * desc_x.dtype.primitive_bitwidth // 8
        w_bytes: gl.constexpr = HALF * BLOCK_K * desc_x.dtype.primitive_bitwidth // 8
        pid = gl.program_id(0)
        P = gl.num_programs(0)
        n_full = gl.load(COUNTS)
        n_comp = n_full + gl.load(COUNTS + 1)
        cnt = 0
        for r in range(gl.cdiv(n_comp, P)):
            pos = _dealt(r, pid, P)
            if pos < n_comp:
                b, _, m0, ha, hb = _decode(_computed(ITEMS, pos, n_full, n_comp, CAP_FULL), tiles_m, FIRST_TILE,
                                           BLOCK_Q)
                bi = b.to(gl.int32)
                full = hb != 255
                for k0 in range(0, K, BLOCK_K):
                    s = cnt % STAGES
                    mbarrier.wait(empty.index(s), ((cnt // STAGES) & 1) ^ 1)
                    if full:     # the byte count is a constant of the instruction
                        mbarrier.expect(ready.index(s), x_bytes + 2 * w_bytes)
                    else:
                        mbarrier.expect(ready.index(s), x_bytes + w_bytes)
                    _tma_load(desc_x, [bi, m0, k0], ready.index(s), a_smem.index(s))
                    _tma_load(desc_w, [ha * HALF, k0], ready.index(s), w_smem.index(s).slice(0, HALF))
                    if full:
                        _tma_load(desc_w, [hb * HALF, k0], ready.index(s), w_smem.index(s).slice(HALF, HALF))
                    cnt += 1

    @gluon.jit
    def _zero_writer(args, BLOCK_Q: gl.constexpr):
        (desc_x, desc_w, desc_y, BIAS, KEEP, ITEMS, COUNTS, N, K, SPARSE_COLS, FIRST_TILE, tiles_m, CAP_FULL,
         CAP_SINGLE, stride_kb, stride_kh, stride_kq, smem, bars) = args
        a_smem, w_smem, y_smem, zero_smem = smem
        BLOCK_M: gl.constexpr = desc_x.block_type.shape[1]
        HALF: gl.constexpr = desc_w.block_type.shape[0]
        ROWS: gl.constexpr = desc_y.block_type.shape[1]
        lanes: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        offs = gl.arange(0, 32, layout=lanes)
        pid = gl.program_id(0)
        P = gl.num_programs(0)
        n_zero = gl.load(COUNTS + 2)
        mine = gl.maximum(gl.cdiv(n_zero - pid, P), 0)    # zero items pid, pid + P, ...
        base = ITEMS + CAP_FULL + CAP_SINGLE
        for i0 in range(0, mine, 32):
            # 32 codes at a time (one load, one per lane), then their stores one by one
            codes = gl.load(base + pid + (i0 + offs) * P, mask=i0 + offs < mine, other=0)
            for i in range(0, gl.minimum(mine - i0, 32)):
                code = gl.sum(gl.where(offs == i, codes, 0), axis=0)
                b, _, m0, ha, _ = _decode(code, tiles_m, FIRST_TILE, BLOCK_Q)
                for x in gl.static_range(BLOCK_M // ROWS):
                    _tma_store(desc_y, [b.to(gl.int32), m0 + x * ROWS, ha * HALF], zero_smem)
        tma.store_wait(0)

    @gluon.jit
    def _epilogue(acc, buf, desc, BIAS, b, row0, ha, hb, N, f0, f1, f2, f3, HAS_BIAS: gl.constexpr):
        """``acc (+ bias)``, the columns of unkept segments zeroed, written into ``buf`` and stored by TMA:
        its first 128 columns at half ``ha``, the next 128 (a full item) at half ``hb``."""
        layout: gl.constexpr = acc.type.layout
        WIDTH: gl.constexpr = acc.shape[1]
        HALF: gl.constexpr = desc.block_type.shape[2]
        j = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
        second = j >= HALF
        if HAS_BIAS:
            # two loads with addresses affine in j (vectorised), one for each half
            bias = gl.load(BIAS + ha * HALF + j, mask=(~second) & (ha * HALF + j < N), other=0.0).to(gl.float32)
            if WIDTH > HALF:
                bias += gl.load(BIAS + (hb * HALF - HALF) + j, mask=second & (hb * HALF - HALF + j < N),
                                other=0.0).to(gl.float32)
            acc = acc + gl.expand_dims(bias, 0)
        if (f0 & f1 & f2 & f3).to(gl.int32) == 0:
            # a kept half may hold an unkept 64-wide head (D = 64)
            seg = j // 64
            keep = ((seg == 0) & f0) | ((seg == 1) & f1) | ((seg == 2) & f2) | ((seg == 3) & f3)
            acc = gl.where(gl.expand_dims(keep, 0), acc, 0.0)
        tma.store_wait(0)     # the buffer's previous stores have read it out
        thread_barrier()
        buf2 = buf.reshape([acc.shape[0], buf.shape[2]])
        if WIDTH == buf.shape[2]:
            buf2.store(acc.to(buf.dtype))
        else:
            buf2.slice(0, WIDTH, 1).store(acc.to(buf.dtype))
        fence_async_shared()
        # in the NVMMA layout a buffer's 64-column chunks follow one another (one TMA copy each), so each
        # 128-column slice is a box of ``desc``
        _tma_store(desc, [b, row0, ha * HALF], buf.slice(0, HALF, 2))
        if WIDTH > HALF:
            _tma_store(desc, [b, row0, hb * HALF], buf.slice(HALF, HALF, 2))

    @gluon.jit
    def _consumer(args, HAS_BIAS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr,
                  STAGES: gl.constexpr, X: gl.constexpr):
        (desc_x, desc_w, desc_y, BIAS, KEEP, ITEMS, COUNTS, N, K, SPARSE_COLS, FIRST_TILE, tiles_m, CAP_FULL,
         CAP_SINGLE, stride_kb, stride_kh, stride_kq, smem, bars) = args
        a_smem, w_smem, y_smem, zero_smem = smem
        ready, empty = bars
        BLOCK_K: gl.constexpr = desc_x.block_type.shape[2]
        HALF: gl.constexpr = desc_w.block_type.shape[0]
        acc_full: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 2 * HALF, 16])
        acc_half: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HALF, 16])
        pid = gl.program_id(0)
        P = gl.num_programs(0)
        n_full = gl.load(COUNTS)
        n_comp = n_full + gl.load(COUNTS + 1)
        nsteps = gl.cdiv(K, BLOCK_K)
        buf = y_smem.index(X)
        # the next item and its segment flags are loaded one round ahead, under the current reduction
        pos = _dealt(0, pid, P)
        b, m0, ha, hb, f0, f1, f2, f3 = _item(ITEMS, KEEP, pos, n_full, n_comp, CAP_FULL, tiles_m, FIRST_TILE, N,
                                              SPARSE_COLS, stride_kb, stride_kh, stride_kq, HALF, HEAD_DIM, BLOCK_Q)
        cnt = 0
        for r in range(gl.cdiv(n_comp, P)):
            here = pos < n_comp
            cb, cm0, cha, chb, c0_, c1_, c2_, c3_ = b, m0, ha, hb, f0, f1, f2, f3
            pos = _dealt(r + 1, pid, P)
            b, m0, ha, hb, f0, f1, f2, f3 = _item(ITEMS, KEEP, pos, n_full, n_comp, CAP_FULL, tiles_m, FIRST_TILE, N,
                                                  SPARSE_COLS, stride_kb, stride_kh, stride_kq, HALF, HEAD_DIM,
                                                  BLOCK_Q)
            if here:
                bi = cb.to(gl.int32)
                if chb != 255:
                    acc = ring_mma(a_smem, w_smem, ready, empty, cnt, nsteps,
                                   gl.zeros([64, 2 * HALF], gl.float32, layout=acc_full), X * 64, 64, 2 * HALF,
                                   STAGES)
                    _epilogue(acc, buf, desc_y, BIAS, bi, cm0 + X * 64, cha, chb, N, c0_, c1_, c2_, c3_, HAS_BIAS)
                else:
                    acc_h = ring_mma(a_smem, w_smem, ready, empty, cnt, nsteps,
                                     gl.zeros([64, HALF], gl.float32, layout=acc_half), X * 64, 64, HALF, STAGES)
                    _epilogue(acc_h, buf, desc_y, BIAS, bi, cm0 + X * 64, cha, cha, N, c0_, c1_, True, True,
                              HAS_BIAS)
                cnt += nsteps
        tma.store_wait(0)

    @gluon.jit
    def _gemm_q_sm90_kernel(desc_x, desc_w, desc_y, BIAS, KEEP, ITEMS, COUNTS,
                            N, K, SPARSE_COLS, FIRST_TILE, tiles_m, CAP_FULL, CAP_SINGLE,
                            stride_kb, stride_kh, stride_kq,
                            HAS_BIAS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr,
                            STAGES: gl.constexpr, num_warps: gl.constexpr):
        dtype: gl.constexpr = desc_x.dtype
        HALF: gl.constexpr = desc_w.block_type.shape[0]
        a_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_x.block_type.shape, desc_x.layout)
        w_smem = gl.allocate_shared_memory(dtype, [STAGES, 2 * HALF, desc_w.block_type.shape[1]], desc_w.layout)
        y_smem = gl.allocate_shared_memory(dtype, [2, 1, 64, 2 * HALF], desc_y.layout)
        zero_smem = gl.allocate_shared_memory(dtype, desc_y.block_type.shape, desc_y.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)      # both consumers read every stage
        zl: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 4, 8], [1, num_warps, 1], [2, 1, 0])
        zero_smem.store(gl.zeros([1, 64, 128], dtype, layout=zl))     # desc_y.block_type.shape
        fence_async_shared()
        args = (desc_x, desc_w, desc_y, BIAS, KEEP, ITEMS, COUNTS, N, K, SPARSE_COLS, FIRST_TILE, tiles_m,
                CAP_FULL, CAP_SINGLE, stride_kb, stride_kh, stride_kq, (a_smem, w_smem, y_smem, zero_smem),
                (ready, empty))
        gl.warp_specialize([
            (_consumer, (args, HAS_BIAS, HEAD_DIM, BLOCK_Q, STAGES, 0)),
            (_consumer, (args, HAS_BIAS, HEAD_DIM, BLOCK_Q, STAGES, 1)),
            (_loader, (args, BLOCK_Q, STAGES)),
            (_zero_writer, (args, BLOCK_Q)),
        ], [4, 1, 1], [232, 40, 40])


def _descriptor(t: Tensor, block: list[int]):
    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return GluonDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gdt))


def gemm_q_sm90(x: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, y: Tensor, head_dim: int,
                row_offset: int, block_q: int, sparse_cols: int, launch, *, programs: Optional[int] = None,
                stages: int = STAGES) -> Tensor:
    """Plan and launch the Gluon kernel into ``y`` (allocated by the caller); ``q_keep`` is the bool symbol
    tensor. ``programs`` caps the grid (default: one program per SM)."""
    B, M, K = x.shape
    N = weight.shape[0]
    tiles_m = cdiv(M, BLOCK_M)
    first = row_offset // BLOCK_M
    keep = q_keep.view(torch.uint8)
    items, counts, cap_full, cap_single = plan(keep, B, tiles_m, first, block_q, head_dim, sparse_cols, N, launch)
    desc_x = _descriptor(x, [1, BLOCK_M, BLOCK_K])
    desc_w, desc_y = _descriptor(weight, [HALF, BLOCK_K]), _descriptor(y, [1, 64, HALF])
    grid = (max(1, min(B * tiles_m * cdiv(N, HALF), programs or (num_sms(x.device) if x.is_cuda else 1))),)
    launch(
        _gemm_q_sm90_kernel, grid,
        desc_x, desc_w, desc_y, bias if bias is not None else y, keep, items, counts,
        N, K, sparse_cols, first, tiles_m, cap_full, cap_single, keep.stride(0), keep.stride(1), keep.stride(2),
        HAS_BIAS=bias is not None, HEAD_DIM=head_dim, BLOCK_Q=block_q, STAGES=stages,
        # 4 warps here (consumer 0) + 4 (consumer 1) + the loader's and the zero writer's warps (with 2 idle
        # ones, a warpgroup): registers redistributed to 232 / 232 / 40 / 40 a thread
        num_warps=4, maxnreg=168,
    )
    return y
