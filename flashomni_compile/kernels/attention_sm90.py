"""Sparse-symbol attention for Hopper (sm_90) in Gluon, warp-specialised: a loader warp and two
independent consumer warpgroups.

Same contract as ``attention.sparse_attention_triton`` (DESIGN.md section 2; formula in
``attention.py``'s docstring), for the common case only: 2-byte dtypes, head dim 64 or 128, symbol blocks
of 128 x 128, q/k/v addressable by TMA. ``supports`` says whether a call qualifies; the launcher in
``attention.py`` falls back to the Triton kernel otherwise, so callers never see the difference.

Why a second kernel. In the Triton kernel both warpgroups of a CTA wait at a CTA barrier every kv tile
(the cp.async ring needs one before a stage is refilled), so they run in step: while one does its exp2
work the tensor cores idle, since the other is doing the same. 0.78-0.82x cuDNN on an H100, 0.81x on
an H200 (benchmarks/NOTES.md). Here each CTA of 128 query rows has three partitions (``gl.warp_specialize``):

* ``_ws_loader`` (1 warp): Q's two 64-row halves once, then for each kept kv tile ``t`` K_t and V_t by
  TMA into rings of ``K_STAGES`` / ``V_STAGES`` buffers, waiting on each stage's *empty* mbarrier;
* ``_ws_consumer`` x 2 (4 warps each, 64 rows each, ``_consume_tiles``): FlashAttention-3's
  intra-warpgroup overlap (Shah et al., 2024, section 3.2): for tile ``t``, wait K_t *ready*, issue
  S_t = Q K_t^T, wait V_{t-1} *ready*, issue O += P_{t-1} V_{t-1}, wait for S_t only (the PV product stays
  in flight), signal K_t *empty*, online softmax of S_t (beside the PV product on the tensor cores), wait
  for PV, signal V_{t-1} *empty*, O *= alpha_t.

No CTA barrier ties the consumers, so one's softmax also runs beside the other's products, as in
FlashAttention-3's inter-warpgroup overlap (section 3.1; no explicit ping-pong here). H200, D=128, H=24
(benchmarks/NOTES.md, session 8): dense 21.5 ms at N=33792 against cuDNN's 22.4 and 25.7 for the same
kernel in FlashAttention-2 order (S_t, wait for it and PV_{t-1}, softmax, issue PV_t), 5.18 vs 5.34 ms at
16384, 0.438 vs 0.434 at 4608.

One consumer (``consumers=1``, the launch table's choice for sparse calls of short sequences,
``attention.gluon_launch``): a CTA of 64 query rows (two programs a q-block), the loader and one consumer
at 216 registers, and at D = 128 one K buffer beside two V buffers (112 KB), so that two CTAs share an
SM and one's start (Q, first K) and epilogue run beside the other's tiles. A program visiting a few kv
tiles (N = 4608 at kv density 0.1: ~4) spends about as long on those as on its tiles; two CTAs an SM
hide part of that: 0.084 vs 0.099 ms there (H200). Each K/V tile then feeds 64 rows instead of 128
(twice the shared-memory traffic per FLOP), so dense calls and long rows stay on two consumers
(N = 8192 dense 1.61 vs 1.27 ms; NOTES.md session 12).

Tried and dropped (NOTES.md): the same intra-warpgroup pipelining without warp specialisation (one
program per 128 rows, Triton-style): ptxas placed the full wait before the first write to a register the
in-flight products had touched, so the softmax did not overlap; 1% slower than the Triton kernel.

Notation: program (pid_m, pid_bh) owns BLOCK_M = 128 query rows of one (b, h), 64 per consumer (HALF);
BLOCK_N = 128 keys per tile, one tile per kv symbol block; D = HEAD_DIM. ``t`` counts the tiles a program
visits (its list entries). Constexpr flags as in ``attention.py``: HAS_QKEEP, HAS_LISTS, HAS_KPM (key
padding mask: a tile takes the masked softmax iff ``KVMASKED[b, kv-block]`` says its block holds a masked
key or keys past Nkv, whatever its place in the list, so neither the dense path nor the lists need
reordering), EVEN_KV (no partial last kv-block), CACHE_TERMS (Taylor terms of the cached
rows). mbarrier phases: a stage's n-th use waits phase ``n & 1`` (ready) and ``(n & 1) ^ 1`` (empty: a
fresh barrier counts as having completed phase 1, so the first fill does not wait).

Not run by the Triton interpreter (Gluon has none): CPU tests compile it for sm_90 and check its
resources (``tests/sm90_compile_check.py``); on a Hopper GPU ``tests/test_attention_sm90.py`` compares it
with the reference twin.
"""

from __future__ import annotations

import torch

from .gluon_hopper import (AVAILABLE, GluonDescriptor, fence_async_shared, gl, gluon, mbarrier, tma_ok,
                           warpgroup_mma, warpgroup_mma_wait)
from .gluon_hopper import tma_load as _tma_load
from .launch import capability

__all__ = ["supports", "sparse_attention_sm90", "AVAILABLE"]

BLOCK_M = 128
BLOCK_N = 128
K_STAGES = 2     # K ring depth: 2 and 3 measured alike dense, 2 up to 3% faster sparse (NOTES.md)
V_STAGES = 2
TWO_CTA_SMEM = 115 * 1024   # ring + Q bytes a one-consumer CTA may take so that two share an SM (228 KB)
_LOG2E = 1.4426950408889634
_HEAD_DIMS = (64, 128)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_kv: int) -> bool:
    """Whether ``sparse_attention_sm90`` takes this call (else the Triton kernel does)."""
    if not AVAILABLE or not q.is_cuda or capability(q.device)[0] != 9:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.shape[-1] not in _HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return False
    if block_q != BLOCK_M or block_kv != BLOCK_N:
        return False
    return all(tma_ok(t) for t in (q, k, v))


if AVAILABLE:
    _LN2 = gl.constexpr(0.6931471805599453)    # lse = log2-sum * ln(2)

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, start_n, KPM_b, stride_kpm_n, Nkv, qk_scale,
                      s_layout: gl.constexpr, BLOCK_N: gl.constexpr, HAS_KPM: gl.constexpr,
                      MASK: gl.constexpr):
        """Online-softmax step on one score tile: returns ``(p, m_new, alpha, l_new)``; m in log2 units.

        MASK: keys past Nkv (and padded keys) get -inf; a row that has seen no visible key keeps
        m = -inf and gets p = alpha = 0 (never NaN)."""
        if MASK:
            offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            if HAS_KPM:   # keys past Nkv load as padding
                valid = gl.load(KPM_b + offs_n.to(gl.int64) * stride_kpm_n, mask=offs_n < Nkv, other=0) != 0
            else:
                valid = offs_n < Nkv
            s = gl.where(gl.expand_dims(valid, 0), s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(s - gl.expand_dims(m_sub, 1))
            alpha = gl.exp2(m_i - m_sub)
        else:
            # Unmasked tiles come first in every row, so m is finite after the first one.
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
        l_new = l_i * alpha + gl.sum(p, 1)
        return p, m_new, alpha, l_new

    @gluon.jit
    def _tile_offsets(off_b, off_h, row0, Nq, stride_b, stride_h, stride_n, stride_d,
                      layout: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Element offsets and row mask of the program's ``[BLOCK_M, HEAD_DIM]`` tile of a [B, H, N, D] tensor."""
        offs_m = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        off = (off_b * stride_b + off_h * stride_h + gl.expand_dims(offs_m.to(gl.int64) * stride_n, 1)
               + gl.expand_dims(offs_d * stride_d, 0))
        mask = gl.expand_dims(offs_m < Nq, 1) & gl.expand_dims(offs_d < HEAD_DIM, 0)
        return off, mask

    @gluon.jit
    def _store_rows(O, LSE, out, lse, off_b, off_h, row0, Nq, strides, layout: gl.constexpr,
                    BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Store a consumer's ``[BLOCK_M, HEAD_DIM]`` output rows (rounded once) and their lse."""
        (stride_ob, stride_oh, stride_on, stride_od, stride_lb, stride_lh, stride_ln) = (
            strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], strides[6])
        o_off, io_mask = _tile_offsets(off_b, off_h, row0, Nq, stride_ob, stride_oh, stride_on, stride_od,
                                       layout, BLOCK_M, HEAD_DIM)
        gl.store(O + o_off, out.to(O.dtype.element_ty), mask=io_mask)
        offs_m = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        gl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ln, lse, mask=offs_m < Nq)

    @gluon.jit
    def _tile_block(t, IDX, stride_idx, n_tiles, HAS_LISTS: gl.constexpr):
        """The kv-block of the program's ``t``-th tile (clamped to its last tile)."""
        t = gl.minimum(t, n_tiles - 1)
        if HAS_LISTS:
            kb = gl.load(IDX + t * stride_idx)
        else:
            kb = t
        return kb

    @gluon.jit
    def _tile_softmax(s, t, m_i, l_i, IDX, stride_idx_j, n_tiles, n_full, KPM_b, KVMASKED_b, stride_kpm_n, Nkv,
                      qk_scale, s_layout: gl.constexpr, BLOCK_N: gl.constexpr, HAS_LISTS: gl.constexpr,
                      HAS_KPM: gl.constexpr):
        """``_softmax_tile`` on the scores of the program's ``t``-th tile, masked iff the tile needs it."""
        kb = _tile_block(t, IDX, stride_idx_j, n_tiles, HAS_LISTS)
        if HAS_KPM:
            plain = gl.load(KVMASKED_b + kb) == 0
        else:
            plain = t < n_full
        # The unmasked step needs no -inf guard in any order: its tile has only visible keys.
        if plain:
            p, m_new, alpha, l_new = _softmax_tile(s, m_i, l_i, kb * BLOCK_N, KPM_b, stride_kpm_n, Nkv, qk_scale,
                                                   s_layout, BLOCK_N, HAS_KPM, False)
        else:
            p, m_new, alpha, l_new = _softmax_tile(s, m_i, l_i, kb * BLOCK_N, KPM_b, stride_kpm_n, Nkv, qk_scale,
                                                   s_layout, BLOCK_N, HAS_KPM, True)
        return p, m_new, alpha, l_new

    @gluon.jit
    def _consume_tiles(q2, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, s, acc, m_i, l_i, IDX,
                       stride_idx_j, n_tiles, n_full, KPM_b, KVMASKED_b, stride_kpm_n, Nkv, qk_scale,
                       s_layout: gl.constexpr, p_layout: gl.constexpr, row_o: gl.constexpr,
                       BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, K_STAGES: gl.constexpr,
                       V_STAGES: gl.constexpr, HAS_LISTS: gl.constexpr, HAS_KPM: gl.constexpr):
        """A consumer's tile loop with FlashAttention-3's intra-warpgroup overlap (Shah et al., 2024, 3.2):
        S_t = Q K_t^T and O += P_{t-1} V_{t-1} are issued together, and the softmax of S_t runs while the
        PV product is on the tensor cores; O is rescaled by alpha_t once that product retires. Returns
        ``(acc, m_i, l_i)``; ``n_tiles >= 1``."""
        dtype: gl.constexpr = k_smem.dtype
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q2, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s, use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        mbarrier.arrive(k_empty.index(0), count=1)
        p, m_i, alpha, l_i = _tile_softmax(s, 0, m_i, l_i, IDX, stride_idx_j, n_tiles, n_full, KPM_b, KVMASKED_b,
                                           stride_kpm_n, Nkv, qk_scale, s_layout, BLOCK_N, HAS_LISTS, HAS_KPM)
        p_op = gl.convert_layout(p.to(dtype), p_layout)          # acc is 0: no rescale for the first tile
        for t in range(1, n_tiles):
            ks = t % K_STAGES
            mbarrier.wait(k_ready.index(ks), (t // K_STAGES) & 1)
            s = warpgroup_mma(q2, k_smem.index(ks).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s, use_acc=False,
                              is_async=True)
            vs = (t - 1) % V_STAGES
            mbarrier.wait(v_ready.index(vs), ((t - 1) // V_STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(vs).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))  # S_t done; PV_{t-1} still in flight
            mbarrier.arrive(k_empty.index(ks), count=1)
            p, m_new, alpha, l_i = _tile_softmax(s, t, m_i, l_i, IDX, stride_idx_j, n_tiles, n_full, KPM_b,
                                                 KVMASKED_b, stride_kpm_n, Nkv, qk_scale, s_layout, BLOCK_N,
                                                 HAS_LISTS, HAS_KPM)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            mbarrier.arrive(v_empty.index(vs), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            m_i = m_new
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        vs = (n_tiles - 1) % V_STAGES
        mbarrier.wait(v_ready.index(vs), ((n_tiles - 1) // V_STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(vs).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(v_empty.index(vs), count=1)
        return acc, m_i, l_i

    # Partitions (module docstring). Stages are handed over with mbarriers: ready (loader -> consumers,
    # TMA byte count) and empty (consumers -> loader, one arrive per consumer partition).
    @gluon.jit
    def _ws_consumer(args, HEAD_DIM: gl.constexpr, HAS_LISTS: gl.constexpr, HAS_KPM: gl.constexpr,
                     CACHE_TERMS: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr,
                     V_STAGES: gl.constexpr, HALF: gl.constexpr, CONSUMERS: gl.constexpr):
        (desc_q, desc_k, desc_v, O, LSE, CACHE, CACHE1, CACHE2, KPM_b, KVMASKED_b, IDX, strides, keep, n_tiles,
         n_full, off_b, off_h, pid_m, half, Nq, Nkv, qk_scale, cache_c1, cache_c2, smem, bars) = args
        stride_cb, stride_ch, stride_cn, stride_cd = strides[7], strides[8], strides[9], strides[10]
        stride_idx_j, stride_kpm_n = strides[11], strides[12]
        q_smem, k_smem, v_smem = smem
        q_bar, k_ready, k_empty, v_ready, v_empty = bars
        WG_M: gl.constexpr = 64
        dtype: gl.constexpr = desc_k.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        if CONSUMERS == 2:
            row0 = pid_m * (2 * WG_M) + HALF * WG_M
        else:
            row0 = pid_m * (2 * WG_M) + half * WG_M     # one consumer a CTA: the program's half of the q-block
        if keep == 0:
            c_off, io_mask = _tile_offsets(off_b, off_h, row0, Nq, stride_cb, stride_ch, stride_cn, stride_cd,
                                           o_layout, WG_M, HEAD_DIM)
            c = gl.load(CACHE + c_off, mask=io_mask).to(gl.float32)
            if CACHE_TERMS > 1:
                c = c + cache_c1 * gl.load(CACHE1 + c_off, mask=io_mask).to(gl.float32)
                if CACHE_TERMS > 2:
                    c = c + cache_c2 * gl.load(CACHE2 + c_off, mask=io_mask).to(gl.float32)
            _store_rows(O, LSE, c, gl.full([WG_M], float("-inf"), gl.float32, layout=row_o), off_b, off_h,
                        row0, Nq, strides, o_layout, WG_M, HEAD_DIM)
        else:
            m_i = gl.full([WG_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([WG_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
            acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, layout=o_layout)
            if n_tiles > 0:
                mbarrier.wait(q_bar.index(HALF), 0)      # HALF is 0 with one consumer (one Q buffer)
                q2 = q_smem.index(HALF).reshape([WG_M, HEAD_DIM])
                s = gl.zeros([WG_M, BLOCK_N], gl.float32, layout=s_layout)
                acc, m_i, l_i = _consume_tiles(q2, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, s, acc, m_i,
                                               l_i, IDX, stride_idx_j, n_tiles, n_full, KPM_b, KVMASKED_b,
                                               stride_kpm_n, Nkv, qk_scale, s_layout, p_layout, row_o, BLOCK_N,
                                               HEAD_DIM, K_STAGES, V_STAGES, HAS_LISTS, HAS_KPM)
            l_o = gl.convert_layout(l_i, row_o)
            m_o = gl.convert_layout(m_i, row_o)
            inv_l = 1.0 / gl.where(l_o == 0.0, 1.0, l_o)
            lse = gl.where(l_o == 0.0, float("-inf"), (m_o + gl.log2(gl.where(l_o == 0.0, 1.0, l_o))) * _LN2)
            _store_rows(O, LSE, acc * gl.expand_dims(inv_l, 1), lse, off_b, off_h, row0, Nq, strides,
                        o_layout, WG_M, HEAD_DIM)

    @gluon.jit
    def _ws_loader(args, HEAD_DIM: gl.constexpr, HAS_LISTS: gl.constexpr, HAS_KPM: gl.constexpr,
                   CACHE_TERMS: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr,
                   V_STAGES: gl.constexpr, HALF: gl.constexpr, CONSUMERS: gl.constexpr):
        (desc_q, desc_k, desc_v, O, LSE, CACHE, CACHE1, CACHE2, KPM_b, KVMASKED_b, IDX, strides, keep, n_tiles,
         n_full, off_b, off_h, pid_m, half, Nq, Nkv, qk_scale, cache_c1, cache_c2, smem, bars) = args
        stride_idx_j = strides[11]
        q_smem, k_smem, v_smem = smem
        q_bar, k_ready, k_empty, v_ready, v_empty = bars
        dtype: gl.constexpr = desc_k.dtype
        box: gl.constexpr = BLOCK_N * HEAD_DIM * dtype.primitive_bitwidth // 8
        b_h = off_b.to(gl.int32)
        h_h = off_h.to(gl.int32)
        if keep != 0:
            if n_tiles > 0:
                if CONSUMERS == 2:
                    for i in gl.static_range(2):
                        mbarrier.expect(q_bar.index(i), box // 2)
                        _tma_load(desc_q, [b_h, h_h, pid_m * 128 + i * 64, 0], q_bar.index(i), q_smem.index(i))
                else:
                    mbarrier.expect(q_bar.index(0), box // 2)
                    _tma_load(desc_q, [b_h, h_h, pid_m * 128 + half * 64, 0], q_bar.index(0), q_smem.index(0))
                for t in range(n_tiles):
                    start = _tile_block(t, IDX, stride_idx_j, n_tiles, HAS_LISTS) * BLOCK_N
                    ks = t % K_STAGES
                    mbarrier.wait(k_empty.index(ks), ((t // K_STAGES) & 1) ^ 1)
                    mbarrier.expect(k_ready.index(ks), box)
                    _tma_load(desc_k, [b_h, h_h, start, 0], k_ready.index(ks), k_smem.index(ks))
                    vs = t % V_STAGES
                    mbarrier.wait(v_empty.index(vs), ((t // V_STAGES) & 1) ^ 1)
                    mbarrier.expect(v_ready.index(vs), box)
                    _tma_load(desc_v, [b_h, h_h, start, 0], v_ready.index(vs), v_smem.index(vs))

    @gluon.jit
    def _sparse_attn_fwd_sm90(desc_q, desc_k, desc_v, O, LSE, CACHE, CACHE1, CACHE2, QKEEP, KVCOUNT,
                                 KVINDEX, KVMASKED, KPM,
                                 stride_ob, stride_oh, stride_on, stride_od,
                                 stride_lb, stride_lh, stride_ln,
                                 stride_cb, stride_ch, stride_cn, stride_cd,
                                 stride_keep_b, stride_keep_h, stride_keep_q,
                                 stride_cnt_b, stride_cnt_h, stride_cnt_q,
                                 stride_idx_b, stride_idx_h, stride_idx_q, stride_idx_j,
                                 stride_kpm_b, stride_kpm_n,
                                 H, Nq, Nkv, NKB, qk_scale, cache_c1, cache_c2,
                                 HEAD_DIM: gl.constexpr, HAS_QKEEP: gl.constexpr, HAS_LISTS: gl.constexpr,
                                 HAS_KPM: gl.constexpr, EVEN_KV: gl.constexpr, CACHE_TERMS: gl.constexpr,
                                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                 K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
                                 num_warps: gl.constexpr):
        if CONSUMERS == 2:
            pid_m = gl.program_id(0)
            half = 0
        else:
            pid_m = gl.program_id(0) // 2       # two programs a q-block, 64 rows each
            half = gl.program_id(0) % 2
        pid_bh = gl.program_id(1).to(gl.int64)
        off_b = pid_bh // H
        off_h = pid_bh % H
        dtype: gl.constexpr = desc_k.dtype
        q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, 1, 1, 64, HEAD_DIM], desc_q.layout)
        k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_v.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(CONSUMERS):
            mbarrier.init(q_bar.index(i), count=1)
        for i in gl.static_range(K_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=CONSUMERS)     # one arrive per consumer warpgroup
        for i in gl.static_range(V_STAGES):
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=CONSUMERS)
        fence_async_shared()
        if HAS_QKEEP:
            keep = gl.load(QKEEP + off_b * stride_keep_b + off_h * stride_keep_h + pid_m * stride_keep_q)
        else:
            # Always true, but not a constant: with a constant, triton 3.6's lowering to LLVM fails an
            # assertion on this kernel (SmallVector index, ConvertTritonGPUToLLVM); 3.9 takes either.
            keep = (pid_m >= 0).to(gl.int32)
        cnt_off = off_b * stride_cnt_b + off_h * stride_cnt_h + pid_m * stride_cnt_q
        if HAS_LISTS:
            n_tiles = gl.load(KVCOUNT + cnt_off)
            IDX = KVINDEX + off_b * stride_idx_b + off_h * stride_idx_h + pid_m * stride_idx_q
        else:
            n_tiles = NKB
            IDX = KVINDEX
        n_full = n_tiles                # without a key padding mask: tiles [0, n_full) need no mask
        if not HAS_KPM and not EVEN_KV:
            if HAS_LISTS:
                last = gl.load(IDX + gl.maximum(n_tiles - 1, 0) * stride_idx_j)
                n_full = n_tiles - ((n_tiles > 0) & (last == NKB - 1)).to(gl.int32)
            else:
                n_full = NKB - 1
        strides = (stride_ob, stride_oh, stride_on, stride_od, stride_lb, stride_lh, stride_ln,
                   stride_cb, stride_ch, stride_cn, stride_cd, stride_idx_j, stride_kpm_n)
        args = (desc_q, desc_k, desc_v, O, LSE, CACHE, CACHE1, CACHE2, KPM + off_b * stride_kpm_b,
                KVMASKED + off_b * NKB, IDX, strides, keep, n_tiles, n_full, off_b, off_h, pid_m, half, Nq, Nkv,
                qk_scale, cache_c1, cache_c2,
                (q_smem, k_smem, v_smem), (q_bar, k_ready, k_empty, v_ready, v_empty))
        if CONSUMERS == 2:
            gl.warp_specialize([
                (_ws_consumer, (args, HEAD_DIM, HAS_LISTS, HAS_KPM, CACHE_TERMS, BLOCK_N, K_STAGES, V_STAGES, 0, 2)),
                (_ws_consumer, (args, HEAD_DIM, HAS_LISTS, HAS_KPM, CACHE_TERMS, BLOCK_N, K_STAGES, V_STAGES, 1, 2)),
                (_ws_loader, (args, HEAD_DIM, HAS_LISTS, HAS_KPM, CACHE_TERMS, BLOCK_N, K_STAGES, V_STAGES, 0, 2)),
            ], [4, 1], [232, 40])
        else:
            gl.warp_specialize([
                (_ws_consumer, (args, HEAD_DIM, HAS_LISTS, HAS_KPM, CACHE_TERMS, BLOCK_N, K_STAGES, V_STAGES, 0, 1)),
                (_ws_loader, (args, HEAD_DIM, HAS_LISTS, HAS_KPM, CACHE_TERMS, BLOCK_N, K_STAGES, V_STAGES, 0, 1)),
            ], [1], [40])

def sparse_attention_sm90(q, k, v, operands, operand_strides, has_qkeep: bool, has_lists: bool, has_kpm: bool,
                          terms: int, scale: float, cache_delta: float, out, lse, launch, *,
                          k_stages: int = K_STAGES, consumers: int = 2, v_stages: int | None = None) -> None:
    """Launch the Gluon kernel into ``out``/``lse`` (allocated by the caller). ``operands`` (cache, its two
    Taylor terms, q_keep, kv_count, kv_index, the per-block mask flags ``attention.masked_kv_blocks``
    (contiguous ``[B, NKB]``, with a key padding mask), key padding mask; q stands in for an absent one)
    and ``operand_strides`` are what the Triton launcher prepared, in the same order."""
    B, H, Nq, D = q.shape
    Nkv = k.shape[2]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    # Q arrives in two 64-row boxes, one per consumer warpgroup.
    box_q, box_kv = [1, 1, BLOCK_M // 2, D], [1, 1, BLOCK_N, D]
    desc_q = GluonDescriptor.from_tensor(q, box_q, gl.NVMMASharedLayout.get_default_for(box_q, gdt))
    desc_k = GluonDescriptor.from_tensor(k, box_kv, gl.NVMMASharedLayout.get_default_for(box_kv, gdt))
    desc_v = GluonDescriptor.from_tensor(v, box_kv, gl.NVMMASharedLayout.get_default_for(box_kv, gdt))
    if consumers not in (1, 2):
        raise ValueError(f"sparse_attention_sm90: consumers must be 1 or 2, got {consumers!r}")
    v_stages = V_STAGES if v_stages is None else v_stages
    if consumers == 1 and (consumers * 64 + (k_stages + v_stages) * BLOCK_N) * D * q.element_size() > TWO_CTA_SMEM:
        # one consumer is for two CTAs an SM; at D = 128 that leaves one K buffer beside two V buffers (112 KB:
        # a single V buffer would hold the next K copy behind the previous PV product every tile)
        raise ValueError(f"sparse_attention_sm90: with one consumer, {k_stages} K + {v_stages} V buffers at "
                         f"head dim {D} exceed the {TWO_CTA_SMEM} bytes of two CTAs an SM; at D = 128 use "
                         f"k_stages=1")
    grid = ((Nq + BLOCK_M - 1) // BLOCK_M * (3 - consumers), B * H)
    launch(
        _sparse_attn_fwd_sm90, grid,
        desc_q, desc_k, desc_v, out, lse, *operands, *out.stride(), *lse.stride(), *operand_strides,
        H, Nq, Nkv, (Nkv + BLOCK_N - 1) // BLOCK_N, float(scale) * _LOG2E,
        float(cache_delta), float(cache_delta) ** 2 / 2.0,
        HEAD_DIM=D, HAS_QKEEP=has_qkeep, HAS_LISTS=has_lists, HAS_KPM=has_kpm, EVEN_KV=Nkv % BLOCK_N == 0,
        CACHE_TERMS=terms,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, K_STAGES=k_stages, V_STAGES=v_stages, CONSUMERS=consumers,
        # Two consumers: 4 warps here (consumer 0) + 4 (consumer 1) + 1 loader warp (a warpgroup's worth of
        # registers): 168 a thread on average, which the partitions redistribute to 232 / 232 / 40
        # (setmaxnreg). One consumer (64 rows a CTA, two CTAs an SM): 128 on average, 216 / 40.
        num_warps=4, maxnreg=168 if consumers == 2 else 128,
    )
