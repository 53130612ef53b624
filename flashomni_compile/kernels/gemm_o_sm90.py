"""GEMM-O for Hopper (sm_90) in Gluon: persistent, warp-specialised, two consumer warpgroups in ping-pong.

Same contract as ``gemm_o.py`` (formulas in its docstring), for the common case only: 2-byte dtypes,
head dims that are multiples of 64, an extra range whose width is a multiple of 64, joint rows aligned to
128 (``row_offset % 128 == 0`` and ``block_q % 128 == 0``), every tensor addressable by TMA. ``supports``
says whether a call qualifies; ``gemm_o._launch`` falls back to the Triton kernel otherwise.

Why a second kernel. At low head density a GEMM-O tile is short (d = 0.125: ~3 heads, 6 reduction steps)
and its fixed costs dominate: the q_keep row, the pipeline fill, the C read and the Y write. The Triton
per-tile kernel pays them back to back, one tile after another on each SM (H200, M = 33792: 0.36 ms
against a byte floor near 0.1 ms); its persistent variant could not overlap them either (NOTES.md).
Here one CTA per SM walks the tiles ``pid, pid + P, ...`` with three partitions (``gl.warp_specialize``):

* ``_loader`` (1 warp): for tile ``j`` of the program, for each selected head (the tile's q_keep row,
  walked in registers) and each 64-wide step of it, the A and W slices into a ring of ``STAGES``
  buffers, then the extra range's slices; the C tile (``_load_c``) by TMA after the tile's first
  ``STAGES`` fills, so that waiting for its buffer (freed by the store of an earlier tile) never holds
  back the ring. Every ring stage and C buffer is handed over with a *ready* (TMA byte count) and an
  *empty* (consumer arrive) mbarrier.
* ``_consumer`` x 2 (4 warps each), in one of two schedules (``TILES``; the accumulator is 128 registers
  a thread in each): wgmma over the tile's ring stages (one product in flight), then the epilogue: wait C,
  ``y = acc + c``, written over C in its shared buffer, TMA store, release the buffer.

  *Ping-pong* (128 x 128 or 64 x 256 tiles): consumer ``X`` takes the tiles ``j % 2 == X`` whole. The
  ring is filled in tile order, so while one consumer runs its epilogue the other's reduction runs on
  the tensor cores (CUTLASS's ping-pong schedule, reached here by the order of the ring rather than by an
  explicit barrier). Each consumer walks the other's tiles too: it counts their stages (the same q_keep
  row sum), waits for each to land and releases it unread, because a barrier tells a stage's uses apart
  only by parity (see ``_consumer``): a stage is refilled once both consumers have released it.

  *Cooperative* (128 x 256 tiles): both consumers work on every tile, consumer ``X`` on rows
  ``64 X .. 64 X + 63``, reading the same W slice of each stage; C buffer ``X`` holds its half. A stage
  brings 48 KB for 4.2 MFLOP against 40 KB for 2.1 MFLOP at 64 x 256 (32 KB for 2.1 at 128 x 128): 0.6x
  (0.75x) the L2-to-shared traffic per FLOP, for an epilogue that no reduction overlaps.

Notation: BLOCK_M x BLOCK_N output tile, BLOCK_K reduction step, KSTEPS = D / BLOCK_K steps per head,
``j`` the program's tile counter, ``cnt`` the ring fills (loader) or ring stages passed (consumers).
mbarrier phases: a buffer's n-th use waits phase ``n & 1`` (ready) and ``(n & 1) ^ 1`` (empty: a fresh
barrier counts as having completed phase 1, so the first fill does not wait). Tensors are addressed as
3-D ``[B, M, *]`` descriptors, so a partial last row tile reads zeros past M and its store is clipped at M
(never into the next batch).

Measured (H200, M = 33792, K = N = 3072, bf16; benchmarks/results/gemm_h200_coop.json, the launch table's
cooperative 128 x 256 tile with a 3-stage ring): dense 0.856-0.862 ms (0.94x cuBLAS; 64 x 256 ping-pong
0.929, the Triton kernel 1.06), head density 0.125 0.206-0.210 ms (3.9x cuBLAS; ping-pong 0.222). Loading
a tile's C after its first ring fills, not before them, took the cooperative d = 0.125 case from 0.226 ms.

Gluon has no interpreter: CPU tests compile it for sm_90 and check its resources
(``tests/sm90_compile_check.py``); on a Hopper GPU ``tests/test_gemm_sm90.py`` compares it with the
reference twins.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .gluon_hopper import (AVAILABLE, GluonDescriptor, fence_async_shared, gl, gluon, mbarrier, ring_mma, tma,
                           tma_ok)
from .gluon_hopper import tma_load as _tma_load
from .gluon_hopper import tma_store as _tma_store
from .launch import capability, cdiv, num_sms

__all__ = ["supports", "gemm_o_sm90", "AVAILABLE"]

BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 64
STAGES = 4      # ring of A/W slices, 4 x 32 KB (64 x 256 tiles: 40 KB), + 2 C/Y buffers of 32 KB: 192 (224) KB;
                # cooperative 128 x 256 tiles: 48 KB a stage, 3 stages + 2 x 32 KB = 208 KB
# (BLOCK_M, BLOCK_N) -> schedule. Ping-pong: each consumer takes alternate tiles whole. Cooperative: both
# consumers work on every tile, 64 rows each, and share its W slices (a 128 x 256 tile per consumer would
# need a 256-register accumulator). The accumulator is 128 registers a thread in all three.
TILES = {(128, 128): "ping-pong", (64, 256): "ping-pong", (128, 256): "cooperative"}
GROUP_M = 8     # row tiles that sweep the column tiles together (L2 reuse of W)
WORD = 32       # heads per q_keep load of the head walk


def supports(a: Tensor, weight: Tensor, c: Optional[Tensor], extra: Optional[Tensor], extra_weight: Optional[Tensor],
             y: Tensor, head_dim: int, row_offset: int, block_q: int) -> bool:
    """Whether ``gemm_o_sm90`` takes this call (arguments already checked by ``gemm_o.check_inputs``)."""
    if not AVAILABLE or not a.is_cuda or capability(a.device)[0] != 9:
        return False
    if a.dtype not in (torch.float16, torch.bfloat16) or y.dtype != a.dtype:
        return False
    if head_dim % BLOCK_K or row_offset % BLOCK_M or block_q % BLOCK_M:
        return False
    if extra is not None and extra.shape[-1] % BLOCK_K:
        return False
    return all(t.numel() > 0 and tma_ok(t) for t in (a, weight, c, extra, extra_weight, y) if t is not None)


if AVAILABLE:
    @gluon.jit
    def _tile_coords(t, tiles_mn, tiles_m, tiles_n, FIRST_TILE, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     BLOCK_Q: gl.constexpr, GROUP_M: gl.constexpr):
        """Tile index -> (batch, q-block, first local row, first column); GROUP_M-swizzled (tutorial 03)."""
        b = t // tiles_mn
        r = t - b * tiles_mn
        in_group = GROUP_M * tiles_n
        first_m = (r // in_group) * GROUP_M
        size_m = gl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (r % in_group) % size_m
        tile_n = (r % in_group) // size_m
        return b, ((FIRST_TILE + tile_m) * BLOCK_M) // BLOCK_Q, tile_m * BLOCK_M, tile_n * BLOCK_N

    @gluon.jit
    def _head_word(KEEP_ROW, h0, H, stride_kh, SELECT_KEPT: gl.constexpr, WORD: gl.constexpr,
                   layout: gl.constexpr):
        """(selected flags, count) of the heads ``h0 .. h0 + WORD - 1`` of one q_keep row: q_keep = 1
        (SELECT_KEPT, sparse_linear_o) or = 0 (out_proj_cache); heads past H are never selected."""
        offs = gl.arange(0, WORD, layout=layout)
        inside = h0 + offs < H
        kv = gl.load(KEEP_ROW + (h0 + offs) * stride_kh, mask=inside, other=0)
        if SELECT_KEPT:
            sel = (kv != 0) & inside
        else:
            sel = (kv == 0) & inside
        return sel, gl.sum(sel.to(gl.int32), axis=0)

    @gluon.jit
    def _tile_steps(KEEP, b, qb, H, KE, stride_kb, stride_kh, stride_kq, SELECT_KEPT: gl.constexpr,
                    KSTEPS: gl.constexpr, BLOCK_K: gl.constexpr, WORD: gl.constexpr, layout: gl.constexpr):
        """Ring stages of one tile: KSTEPS per selected head, plus the extra range's steps."""
        n = KE // BLOCK_K
        for h0 in range(0, H, WORD):
            _, count = _head_word(KEEP + b * stride_kb + qb * stride_kq, h0, H, stride_kh, SELECT_KEPT, WORD,
                                  layout)
            n += count * KSTEPS
        return n

    @gluon.jit
    def _fill_stage(desc_x, desc_wt, bi, m0, n0, k0, a_smem, w_smem, ready, empty, cnt, STAGES: gl.constexpr,
                    nbytes: gl.constexpr):
        """The ring's ``cnt``-th fill: once its stage is free, the ``[m0, k0]`` slice of x and the
        ``[n0, k0]`` slice of its weight by TMA onto the stage's ready barrier. Returns ``cnt + 1``."""
        s = cnt % STAGES
        mbarrier.wait(empty.index(s), ((cnt // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), nbytes)
        _tma_load(desc_x, [bi, m0, k0], ready.index(s), a_smem.index(s))
        _tma_load(desc_wt, [n0, k0], ready.index(s), w_smem.index(s))
        return cnt + 1

    @gluon.jit
    def _load_c(desc_c, bi, m0, n0, c_smem, c_ready, c_empty, j, COOP: gl.constexpr, SUB_M: gl.constexpr,
                c_bytes: gl.constexpr):
        """The C tile of the program's ``j``-th tile, once its buffer is free: ping-pong into buffer
        ``j % 2`` (each buffer every other tile), cooperative its two row halves into buffers 0 and 1."""
        if COOP:
            for x in gl.static_range(2):
                mbarrier.wait(c_empty.index(x), (j & 1) ^ 1)
                mbarrier.expect(c_ready.index(x), c_bytes)
                _tma_load(desc_c, [bi, m0 + x * SUB_M, n0], c_ready.index(x), c_smem.index(x))
        else:
            x = j % 2
            mbarrier.wait(c_empty.index(x), ((j // 2) & 1) ^ 1)
            mbarrier.expect(c_ready.index(x), c_bytes)
            _tma_load(desc_c, [bi, m0, n0], c_ready.index(x), c_smem.index(x))

    @gluon.jit
    def _loader(args, SELECT_KEPT: gl.constexpr, HAS_C: gl.constexpr, HAS_BIAS: gl.constexpr,
                HAS_EXTRA: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr,
                GROUP_M: gl.constexpr, WORD: gl.constexpr, X: gl.constexpr):
        (desc_a, desc_w, desc_c, desc_y, desc_e, desc_ew, BIAS, KEEP, N, H, KE, FIRST_TILE, tiles_m, tiles_n,
         num_tiles, stride_kb, stride_kh, stride_kq, smem, bars) = args
        a_smem, w_smem, c_smem = smem
        ready, empty, c_ready, c_empty = bars
        BLOCK_M: gl.constexpr = desc_a.block_type.shape[1]
        BLOCK_K: gl.constexpr = desc_a.block_type.shape[2]
        BLOCK_N: gl.constexpr = desc_w.block_type.shape[0]
        KSTEPS: gl.constexpr = HEAD_DIM // BLOCK_K
        SUB_M: gl.constexpr = desc_y.block_type.shape[1]     # one consumer's rows: BLOCK_M, or half of it
        COOP: gl.constexpr = SUB_M != BLOCK_M
        ab_bytes: gl.constexpr = (BLOCK_M + BLOCK_N) * BLOCK_K * desc_a.dtype.primitive_bitwidth // 8
        c_bytes: gl.constexpr = SUB_M * BLOCK_N * desc_a.dtype.primitive_bitwidth // 8
        word: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        offs = gl.arange(0, WORD, layout=word)
        cnt = 0
        j = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            b, qb, m0, n0 = _tile_coords(t, tiles_m * tiles_n, tiles_m, tiles_n, FIRST_TILE, BLOCK_M, BLOCK_N,
                                         BLOCK_Q, GROUP_M)
            bi = b.to(gl.int32)
            # The C tile is loaded after the tile's first STAGES ring fills (or after all of them, if
            # fewer): its buffer frees only when the previous tile that used it has been stored, and
            # waiting for that first would leave the ring empty at the start of this tile.
            start = cnt
            for h0 in range(0, H, WORD):
                sel, count = _head_word(KEEP + b * stride_kb + qb * stride_kq, h0, H, stride_kh, SELECT_KEPT,
                                        WORD, word)
                h = h0 - 1
                for _ in range(count):
                    # the next selected head after h: lowest selected index above it
                    h = h0 + gl.min(gl.where(sel & (h0 + offs > h), offs, WORD), axis=0)
                    for ks in gl.static_range(KSTEPS):
                        cnt = _fill_stage(desc_a, desc_w, bi, m0, n0, h * HEAD_DIM + ks * BLOCK_K, a_smem, w_smem,
                                          ready, empty, cnt, STAGES, ab_bytes)
                        if HAS_C:
                            if cnt - start == STAGES:
                                _load_c(desc_c, bi, m0, n0, c_smem, c_ready, c_empty, j, COOP, SUB_M, c_bytes)
            if HAS_EXTRA:
                for k0 in range(0, KE, BLOCK_K):
                    cnt = _fill_stage(desc_e, desc_ew, bi, m0, n0, k0, a_smem, w_smem, ready, empty, cnt, STAGES,
                                      ab_bytes)
                    if HAS_C:
                        if cnt - start == STAGES:
                            _load_c(desc_c, bi, m0, n0, c_smem, c_ready, c_empty, j, COOP, SUB_M, c_bytes)
            if HAS_C:
                if cnt - start < STAGES:
                    _load_c(desc_c, bi, m0, n0, c_smem, c_ready, c_empty, j, COOP, SUB_M, c_bytes)
            j += 1

    @gluon.jit
    def _consumer(args, SELECT_KEPT: gl.constexpr, HAS_C: gl.constexpr, HAS_BIAS: gl.constexpr,
                  HAS_EXTRA: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr,
                  GROUP_M: gl.constexpr, WORD: gl.constexpr, X: gl.constexpr):
        (desc_a, desc_w, desc_c, desc_y, desc_e, desc_ew, BIAS, KEEP, N, H, KE, FIRST_TILE, tiles_m, tiles_n,
         num_tiles, stride_kb, stride_kh, stride_kq, smem, bars) = args
        a_smem, w_smem, c_smem = smem
        ready, empty, c_ready, c_empty = bars
        BLOCK_M: gl.constexpr = desc_a.block_type.shape[1]
        BLOCK_K: gl.constexpr = desc_a.block_type.shape[2]
        BLOCK_N: gl.constexpr = desc_w.block_type.shape[0]
        KSTEPS: gl.constexpr = HEAD_DIM // BLOCK_K
        SUB_M: gl.constexpr = desc_y.block_type.shape[1]
        COOP: gl.constexpr = SUB_M != BLOCK_M
        dtype: gl.constexpr = desc_a.dtype
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        word: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        cnt = 0
        j = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            b, qb, m0, n0 = _tile_coords(t, tiles_m * tiles_n, tiles_m, tiles_n, FIRST_TILE, BLOCK_M, BLOCK_N,
                                         BLOCK_Q, GROUP_M)
            n = _tile_steps(KEEP, b, qb, H, KE, stride_kb, stride_kh, stride_kq, SELECT_KEPT, KSTEPS, BLOCK_K, WORD,
                            word)   # KE is 0 without an extra range
            if not COOP and j % 2 != X:
                # The other consumer's tile: see each of its stages land and release it at once, without
                # reading it. A barrier tells a stage's uses apart only by parity, so each consumer must
                # stay within one use of every stage: if it skipped the other's uses it could wait for use
                # u while u - 1 is pending (and pass on stale data), or, fallen behind, for use u after
                # u + 1 completed (and never wake). Both consumers' arrivals free a stage (count 2).
                for k in range(n):
                    mbarrier.wait(ready.index((cnt + k) % STAGES), ((cnt + k) // STAGES) & 1)
                    mbarrier.arrive(empty.index((cnt + k) % STAGES), count=1)
            else:
                # cooperative: this consumer's rows of each stage (ping-pong: all of them); the W slice is shared
                acc = ring_mma(a_smem, w_smem, ready, empty, cnt, n,
                               gl.zeros([SUB_M, BLOCK_N], gl.float32, layout=acc_layout),
                               X * SUB_M, SUB_M, BLOCK_N, STAGES)
                # Epilogue: y = acc (+ c) (+ bias), through the consumer's shared buffer and a TMA store.
                buf = c_smem.index(X)
                buf2 = buf.reshape([SUB_M, BLOCK_N])
                if HAS_C:
                    mbarrier.wait(c_ready.index(X), (j if COOP else j // 2) & 1)
                    acc = acc + buf2.load(acc_layout).to(gl.float32)
                if HAS_BIAS:
                    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
                    bias = gl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
                    acc = acc + gl.expand_dims(bias, 0)
                # Each thread overwrites exactly the elements it read (same layout), so no barrier is
                # needed between the C load and this store.
                buf2.store(acc.to(dtype))
                fence_async_shared()
                row0 = m0
                if COOP:
                    row0 = m0 + X * SUB_M
                _tma_store(desc_y, [b.to(gl.int32), row0, n0], buf)
                tma.store_wait(0)
                if HAS_C:
                    mbarrier.arrive(c_empty.index(X), count=1)
            cnt += n
            j += 1

    @gluon.jit
    def _gemm_o_sm90_kernel(desc_a, desc_w, desc_c, desc_y, desc_e, desc_ew, BIAS, KEEP,
                            N, H, KE, FIRST_TILE, tiles_m, tiles_n, num_tiles,
                            stride_kb, stride_kh, stride_kq,
                            SELECT_KEPT: gl.constexpr, HAS_C: gl.constexpr, HAS_BIAS: gl.constexpr,
                            HAS_EXTRA: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr,
                            STAGES: gl.constexpr, GROUP_M: gl.constexpr, WORD: gl.constexpr,
                            num_warps: gl.constexpr):
        dtype: gl.constexpr = desc_a.dtype
        a_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_a.block_type.shape, desc_a.layout)
        w_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_w.block_type.shape, desc_w.layout)
        c_smem = gl.allocate_shared_memory(dtype, [2] + desc_y.block_type.shape, desc_y.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        c_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        c_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)      # the consumer that reads it and the other one
        for i in gl.static_range(2):
            mbarrier.init(c_ready.index(i), count=1)
            mbarrier.init(c_empty.index(i), count=1)
        fence_async_shared()
        args = (desc_a, desc_w, desc_c, desc_y, desc_e, desc_ew, BIAS, KEEP, N, H, KE, FIRST_TILE, tiles_m,
                tiles_n, num_tiles, stride_kb, stride_kh, stride_kq, (a_smem, w_smem, c_smem),
                (ready, empty, c_ready, c_empty))
        gl.warp_specialize([
            (_consumer, (args, SELECT_KEPT, HAS_C, HAS_BIAS, HAS_EXTRA, HEAD_DIM, BLOCK_Q, STAGES, GROUP_M, WORD, 0)),
            (_consumer, (args, SELECT_KEPT, HAS_C, HAS_BIAS, HAS_EXTRA, HEAD_DIM, BLOCK_Q, STAGES, GROUP_M, WORD, 1)),
            (_loader, (args, SELECT_KEPT, HAS_C, HAS_BIAS, HAS_EXTRA, HEAD_DIM, BLOCK_Q, STAGES, GROUP_M, WORD, 0)),
        ], [4, 1], [232, 40])


def _descriptor(t: Tensor, block: list[int]):
    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return GluonDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gdt))


def gemm_o_sm90(a: Tensor, weight: Tensor, c: Optional[Tensor], bias: Optional[Tensor], keep: Tensor,
                extra: Optional[Tensor], extra_weight: Optional[Tensor], y: Tensor, head_dim: int, row_offset: int,
                block_q: int, select_kept: bool, launch, *, programs: Optional[int] = None,
                stages: int = STAGES, block_m: int = BLOCK_M, block_n: int = BLOCK_N) -> Tensor:
    """Launch the Gluon kernel into ``y`` (allocated by the caller); ``keep`` is q_keep viewed as uint8.
    ``c`` given: ``sparse_linear_o`` (``select_kept``); ``bias``: ``out_proj_cache``. ``programs`` caps the
    grid (default: one program per SM); ``block_m x block_n`` is the tile, one of ``TILES``: 128 x 128 and
    64 x 256 in ping-pong (one consumer's tile), 128 x 256 cooperative (64 rows for each consumer)."""
    B, M, K = a.shape
    N = weight.shape[0]
    if (block_m, block_n) not in TILES:
        raise ValueError(f"gemm_o_sm90: tile {block_m} x {block_n} is not one of {sorted(TILES)}")
    sub_m = block_m // 2 if block_n == 256 and block_m == 128 else block_m     # cooperative: half a tile each
    blk_a, blk_w, blk_c = [1, block_m, BLOCK_K], [block_n, BLOCK_K], [1, sub_m, block_n]
    desc_a, desc_w, desc_y = _descriptor(a, blk_a), _descriptor(weight, blk_w), _descriptor(y, blk_c)
    desc_c = _descriptor(c, blk_c) if c is not None else desc_y                 # placeholder, never read
    has_extra = extra is not None
    desc_e = _descriptor(extra, blk_a) if has_extra else desc_a                 # placeholders, never read
    desc_ew = _descriptor(extra_weight, blk_w) if has_extra else desc_w
    tiles_m, tiles_n = cdiv(M, block_m), cdiv(N, block_n)
    num_tiles = B * tiles_m * tiles_n
    grid = (min(num_tiles, programs or (num_sms(a.device) if a.is_cuda else 1)),)
    launch(
        _gemm_o_sm90_kernel, grid,
        desc_a, desc_w, desc_c, desc_y, desc_e, desc_ew, bias if bias is not None else y, keep,
        N, K // head_dim, extra.shape[-1] if has_extra else 0, row_offset // block_m, tiles_m, tiles_n, num_tiles,
        keep.stride(0), keep.stride(1), keep.stride(2),
        SELECT_KEPT=select_kept, HAS_C=c is not None, HAS_BIAS=bias is not None, HAS_EXTRA=has_extra,
        HEAD_DIM=head_dim, BLOCK_Q=block_q, STAGES=stages, GROUP_M=GROUP_M, WORD=WORD,
        # 4 warps here (consumer 0) + 4 (consumer 1) + 1 loader warp: the partitions redistribute the
        # registers to 232 / 232 / 40 a thread (setmaxnreg; 3 warpgroups x 128 threads x 168 = 64512 =
        # 2 x 128 x 232 + 128 x 40: more for the loader spills the consumers).
        num_warps=4, maxnreg=168,
    )
    return y
