"""Sparse-symbol attention for Hopper (sm_90) in Gluon: the dense and sparse forward with the softmax of
one kv tile overlapped with the PV product of the previous one.

Same contract as ``attention.sparse_attention_triton`` (DESIGN.md section 2; formula in
``attention.py``'s docstring), for the common case only: 2-byte dtypes, head dim 64 or 128, symbol blocks
of 128 x 128, K/V (and Q) addressable by TMA. ``supports`` says whether a call qualifies; the launcher in
``attention.py`` falls back to the Triton kernel otherwise, so callers never see the difference.

Why a second kernel. The Triton kernel waits for every QK^T product right after issuing it (Triton's
WGMMA pipeliner keeps a dot asynchronous only if its result feeds nothing but other dots, rule 3 in
``WGMMAPipeline.cpp``), so in each warpgroup the exp2 work and the tensor cores take turns: 0.78-0.82x
cuDNN on an H100 (benchmarks/NOTES.md). Gluon exposes ``warpgroup_mma`` / ``warpgroup_mma_wait`` with an
explicit count of products left in flight, which allows the schedule of FlashAttention-3's intra-warpgroup
pipelining (Shah et al., 2024, section 3.2) without warp specialisation::

    S_0 = Q K_0^T; P_0 = softmax part of S_0
    for j = 1 .. n-1:
        issue S_j = Q K_j^T              (async)
        issue O  += P_{j-1} V_{j-1}      (async)
        wait until one product is left   -> S_j is ready, the PV product still runs
        softmax of S_j (max, exp2, row sums)   <- overlaps the PV product on the tensor cores
        wait for the PV product; one CTA barrier (K_{j-1}, V_{j-1} buffers free); issue TMA for
        K_{j+2} and V_{j+1}; O *= alpha_j; P_j = bf16(p_j)
    O += P_{n-1} V_{n-1}

Shared memory (D=128): Q 32 KB, K 3 x 32 KB, V 2 x 32 KB = 192 KB: K is needed one iteration before V of
the same tile, so it gets the deeper ring.

Notation: program (pid_m, pid_bh) owns BLOCK_M = 128 query rows of one (b, h); BLOCK_N = 128 keys per
tile, one tile per kv symbol block; D = HEAD_DIM. ``t`` counts the tiles a program visits (its list
entries); ``kb`` is a tile's kv-block index. Constexpr flags as in ``attention.py``: HAS_QKEEP,
HAS_LISTS, HAS_KPM (key padding mask; with lists the blocks holding masked keys come last, KVFULL
counts the others; without lists every tile is masked), EVEN_KV (no partial last kv-block),
CACHE_TERMS (Taylor terms of the cached rows).

Not run by the Triton interpreter (Gluon has none): CPU tests compile it for sm_90 and check its
resources; the GPU self-check (``benchmarks/bench_attention.py --selfcheck``) compares it with the
reference twin.
"""

from __future__ import annotations

from typing import Optional

import torch

try:  # Gluon (triton >= 3.5); without it every call takes the Triton kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    # The TMA load was renamed between the two triton versions this runs on (3.6: the long name).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    _LN2 = gl.constexpr(0.6931471805599453)    # lse = log2-sum * ln(2)
except ImportError:  # pragma: no cover - older triton
    gluon = None

__all__ = ["supports", "sparse_attention_sm90", "AVAILABLE"]

AVAILABLE = gluon is not None
BLOCK_M = 128
BLOCK_N = 128
K_STAGES = 3
V_STAGES = 2
NUM_WARPS = 8
_LOG2E = 1.4426950408889634
_HEAD_DIMS = (64, 128)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_kv: int) -> bool:
    """Whether ``sparse_attention_sm90`` takes this call (else the Triton kernel does)."""
    if not AVAILABLE or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.shape[-1] not in _HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return False
    if block_q != BLOCK_M or block_kv != BLOCK_N:
        return False
    return all(_tma_ok(t) for t in (q, k, v))


def _tma_ok(t: torch.Tensor) -> bool:
    es = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * es) % 16 == 0 for s in t.stride()[:-1]))


if AVAILABLE:
    @gluon.jit
    def _softmax_tile(s, m_i, l_i, start_n, KPM_b, stride_kpm_n, Nkv, qk_scale,
                      s_layout: gl.constexpr, BLOCK_N: gl.constexpr, HAS_KPM: gl.constexpr,
                      MASK: gl.constexpr):
        """Online-softmax step on one score tile: returns ``(p, m_new, alpha, l_new)``; m in log2 units.

        MASK: keys past Nkv (and padded keys) get -inf; a row that has seen no visible key keeps
        m = -inf and gets p = alpha = 0 (never NaN)."""
        if MASK:
            offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            valid = offs_n < Nkv
            if HAS_KPM:
                kpm = gl.load(KPM_b + offs_n.to(gl.int64) * stride_kpm_n, mask=valid, other=0)
                valid = valid & (kpm != 0)
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
    def _tile_start(t, IDX, stride_idx, n_tiles, HAS_LISTS: gl.constexpr, BLOCK_N: gl.constexpr):
        """First key of the program's ``t``-th tile (clamped to its last tile)."""
        t = gl.minimum(t, n_tiles - 1)
        if HAS_LISTS:
            kb = gl.load(IDX + t * stride_idx)
        else:
            kb = t
        return kb * BLOCK_N

    @gluon.jit
    def _sparse_attn_fwd_sm90(desc_q, desc_k, desc_v, O, LSE, CACHE, CACHE1, CACHE2, QKEEP, KVCOUNT,
                              KVINDEX, KVFULL, KPM,
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
                              K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, P_SMEM: gl.constexpr,
                              num_warps: gl.constexpr):
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1).to(gl.int64)   # int64 before any stride product
        off_b = pid_bh // H
        off_h = pid_bh % H
        row0 = pid_m * BLOCK_M
        dtype: gl.constexpr = desc_k.dtype

        # Two warpgroups, 64 rows each; instr N = full tile width (one wgmma per 16-wide k step).
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        # Output addresses are formed in each branch, next to their stores: a [128, D] tile of int64
        # offsets live across the whole loop costs 128 registers a thread (ptxas spilled, triton 3.9).

        # Shared memory of the computed branch (allocated up front: Gluon allocations are static).
        q_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, HEAD_DIM], desc_q.layout)
        k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_v.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        if P_SMEM:
            p_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N],
                                               gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype))
        if HAS_QKEEP:
            keep = gl.load(QKEEP + off_b * stride_keep_b + off_h * stride_keep_h + pid_m * stride_keep_q)
        else:
            # Always true, but not a constant: with a constant the computed branch is no longer inside
            # an scf.if, and triton 3.6's lowering to LLVM then fails an assertion (SmallVector index,
            # ConvertTritonGPUToLLVM) on this kernel; 3.9 compiles either form.
            keep = (pid_m >= 0).to(gl.int32)
        if keep == 0:
            # Cached q-block: its rows of the feature cache (Taylor terms summed in fp32, rounded once).
            c_off, io_mask = _tile_offsets(off_b, off_h, row0, Nq, stride_cb, stride_ch, stride_cn, stride_cd,
                                           o_layout, BLOCK_M, HEAD_DIM)
            c = gl.load(CACHE + c_off, mask=io_mask).to(gl.float32)
            if CACHE_TERMS > 1:
                c = c + cache_c1 * gl.load(CACHE1 + c_off, mask=io_mask).to(gl.float32)
                if CACHE_TERMS > 2:
                    c = c + cache_c2 * gl.load(CACHE2 + c_off, mask=io_mask).to(gl.float32)
            o_off, io_mask = _tile_offsets(off_b, off_h, row0, Nq, stride_ob, stride_oh, stride_on, stride_od,
                                           o_layout, BLOCK_M, HEAD_DIM)
            gl.store(O + o_off, c.to(O.dtype.element_ty), mask=io_mask)
            offs_m = row0 + gl.arange(0, BLOCK_M, layout=row_o)
            gl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ln,
                     gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_o), mask=offs_m < Nq)
        else:
            cnt_off = off_b * stride_cnt_b + off_h * stride_cnt_h + pid_m * stride_cnt_q
            if HAS_LISTS:
                n_tiles = gl.load(KVCOUNT + cnt_off)
                IDX = KVINDEX + off_b * stride_idx_b + off_h * stride_idx_h + pid_m * stride_idx_q
            else:
                n_tiles = NKB
                IDX = KVINDEX
            # Tiles [0, n_full) need no key mask; the rest (the partial last block, blocks holding a
            # padded key) take the masked softmax.
            n_full = n_tiles
            if HAS_KPM:
                if HAS_LISTS:
                    n_full = gl.load(KVFULL + cnt_off)
                else:
                    n_full = 0
            elif not EVEN_KV:
                if HAS_LISTS:
                    last = gl.load(IDX + gl.maximum(n_tiles - 1, 0) * stride_idx_j)
                    n_full = n_tiles - ((n_tiles > 0) & (last == NKB - 1)).to(gl.int32)
                else:
                    n_full = NKB - 1
            KPM_b = KPM + off_b * stride_kpm_b

            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
            acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
            if n_tiles > 0:
                mbarrier.init(q_bar, count=1)
                for i in gl.static_range(K_STAGES):
                    mbarrier.init(k_bar.index(i), count=1)
                for i in gl.static_range(V_STAGES):
                    mbarrier.init(v_bar.index(i), count=1)
                fence_async_shared()
                # 2-D views of the [1, 1, rows, D] TMA boxes for the tensor cores (same bytes).
                smem2d: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
                b_h = off_b.to(gl.int32)
                h_h = off_h.to(gl.int32)
                kv_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * dtype.primitive_bitwidth // 8

                # Prologue: Q, K_0..K_2 and V_0, V_1 in flight.
                mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * dtype.primitive_bitwidth // 8)
                _tma_load(desc_q, [b_h, h_h, row0, 0], q_bar, q_smem)
                for i in gl.static_range(K_STAGES):
                    if i < n_tiles:
                        start = _tile_start(i, IDX, stride_idx_j, n_tiles, HAS_LISTS, BLOCK_N)
                        mbarrier.expect(k_bar.index(i), kv_bytes)
                        _tma_load(desc_k, [b_h, h_h, start, 0], k_bar.index(i),
                                                        k_smem.index(i))
                for i in gl.static_range(V_STAGES):
                    if i < n_tiles:
                        start = _tile_start(i, IDX, stride_idx_j, n_tiles, HAS_LISTS, BLOCK_N)
                        mbarrier.expect(v_bar.index(i), kv_bytes)
                        _tma_load(desc_v, [b_h, h_h, start, 0], v_bar.index(i),
                                                        v_smem.index(i))
                q2 = q_smem.reshape([BLOCK_M, HEAD_DIM])
                mbarrier.wait(q_bar, 0)
                mbarrier.wait(k_bar.index(0), 0)
                k2 = k_smem.index(0).reshape([BLOCK_N, HEAD_DIM])
                s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
                s = warpgroup_mma(q2, k2.permute((1, 0)), s, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
                start0 = _tile_start(0, IDX, stride_idx_j, n_tiles, HAS_LISTS, BLOCK_N)
                if n_full > 0:
                    p, m_i, alpha, l_i = _softmax_tile(s, m_i, l_i, start0, KPM_b, stride_kpm_n, Nkv, qk_scale,
                                                       s_layout, BLOCK_N, HAS_KPM, False)
                else:
                    p, m_i, alpha, l_i = _softmax_tile(s, m_i, l_i, start0, KPM_b, stride_kpm_n, Nkv, qk_scale,
                                                       s_layout, BLOCK_N, HAS_KPM, True)
                if P_SMEM:
                    p_smem.store(p.to(dtype))
                    fence_async_shared()
                    _cta_barrier()
                    p_op = p_smem
                else:
                    p_op = gl.convert_layout(p.to(dtype), p_layout)
                # Index of the tile whose K load is issued next (K_STAGES ahead), carried one step
                # ahead so its list entry is read before it is needed.
                for j in range(1, n_tiles):
                    ks = j % K_STAGES
                    vs = (j - 1) % V_STAGES
                    mbarrier.wait(k_bar.index(ks), (j // K_STAGES) & 1)
                    k2 = k_smem.index(ks).reshape([BLOCK_N, HEAD_DIM])
                    s = warpgroup_mma(q2, k2.permute((1, 0)), s, use_acc=False, is_async=True)
                    mbarrier.wait(v_bar.index(vs), ((j - 1) // V_STAGES) & 1)
                    v2 = v_smem.index(vs).reshape([BLOCK_N, HEAD_DIM])
                    acc = warpgroup_mma(p_op, v2, acc, is_async=True)
                    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
                    start_j = _tile_start(j, IDX, stride_idx_j, n_tiles, HAS_LISTS, BLOCK_N)
                    if j < n_full:
                        p, m_new, alpha, l_i = _softmax_tile(s, m_i, l_i, start_j, KPM_b, stride_kpm_n, Nkv,
                                                             qk_scale, s_layout, BLOCK_N, HAS_KPM, False)
                    else:
                        p, m_new, alpha, l_i = _softmax_tile(s, m_i, l_i, start_j, KPM_b, stride_kpm_n, Nkv,
                                                             qk_scale, s_layout, BLOCK_N, HAS_KPM, True)
                    # p goes through the wait too: otherwise LLVM sinks the (pure) exp2 work below the
                    # wait, next to its uses, and the overlap is gone (seen in the sm_90 SASS).
                    if P_SMEM:
                        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))
                        p_smem.store(p.to(dtype))
                        fence_async_shared()
                    else:
                        acc, p_op, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op, p))
                    # Every warp is past QK_{j-1} and PV_{j-1}: K stage of j-1 and V stage of j-1 are free.
                    _cta_barrier()
                    tk = j + K_STAGES - 1
                    if tk < n_tiles:
                        kst = tk % K_STAGES
                        start = _tile_start(tk, IDX, stride_idx_j, n_tiles, HAS_LISTS, BLOCK_N)
                        mbarrier.expect(k_bar.index(kst), kv_bytes)
                        _tma_load(desc_k, [b_h, h_h, start, 0], k_bar.index(kst),
                                                        k_smem.index(kst))
                    tv = j + V_STAGES - 1
                    if tv < n_tiles:
                        vst = tv % V_STAGES
                        start = _tile_start(tv, IDX, stride_idx_j, n_tiles, HAS_LISTS, BLOCK_N)
                        mbarrier.expect(v_bar.index(vst), kv_bytes)
                        _tma_load(desc_v, [b_h, h_h, start, 0], v_bar.index(vst),
                                                        v_smem.index(vst))
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                    if not P_SMEM:
                        p_op = gl.convert_layout(p.to(dtype), p_layout)
                    m_i = m_new
                # Last PV product.
                vs = (n_tiles - 1) % V_STAGES
                mbarrier.wait(v_bar.index(vs), ((n_tiles - 1) // V_STAGES) & 1)
                v2 = v_smem.index(vs).reshape([BLOCK_N, HEAD_DIM])
                acc = warpgroup_mma(p_op, v2, acc, is_async=True)
                if P_SMEM:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                else:
                    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
                mbarrier.invalidate(q_bar)
                for i in gl.static_range(K_STAGES):
                    mbarrier.invalidate(k_bar.index(i))
                for i in gl.static_range(V_STAGES):
                    mbarrier.invalidate(v_bar.index(i))
            # Empty rows (no visible key, or no kept block): l = 0, acc = 0 -> out 0, lse -inf.
            l_o = gl.convert_layout(l_i, row_o)
            m_o = gl.convert_layout(m_i, row_o)
            inv_l = 1.0 / gl.where(l_o == 0.0, 1.0, l_o)
            o_off, io_mask = _tile_offsets(off_b, off_h, row0, Nq, stride_ob, stride_oh, stride_on, stride_od,
                                           o_layout, BLOCK_M, HEAD_DIM)
            gl.store(O + o_off, (acc * gl.expand_dims(inv_l, 1)).to(O.dtype.element_ty), mask=io_mask)
            lse = gl.where(l_o == 0.0, float("-inf"), (m_o + gl.log2(gl.where(l_o == 0.0, 1.0, l_o))) * _LN2)
            offs_m = row0 + gl.arange(0, BLOCK_M, layout=row_o)
            gl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ln, lse, mask=offs_m < Nq)


def sparse_attention_sm90(q, k, v, q_keep, kv_count, kv_index, kv_full, cache, cache1, cache2, terms,
                          key_padding_mask, scale: float, cache_delta: float, out, lse, launch, *,
                          p_smem: bool = False, k_stages: int = K_STAGES) -> None:
    """Launch the Gluon kernel into ``out``/``lse`` (allocated by the caller). Arguments are those the
    Triton launcher has prepared (``kv_index``/``kv_full`` already split for a key padding mask)."""
    B, H, Nq, D = q.shape
    Nkv = k.shape[2]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    box_q, box_kv = [1, 1, BLOCK_M, D], [1, 1, BLOCK_N, D]
    desc_q = GluonDescriptor.from_tensor(q, box_q, gl.NVMMASharedLayout.get_default_for(box_q, gdt))
    desc_k = GluonDescriptor.from_tensor(k, box_kv, gl.NVMMASharedLayout.get_default_for(box_kv, gdt))
    desc_v = GluonDescriptor.from_tensor(v, box_kv, gl.NVMMASharedLayout.get_default_for(box_kv, gdt))
    qk_, cnt_, idx_ = (q_keep if q_keep is not None else q, kv_count if kv_count is not None else q,
                       kv_index if kv_index is not None else q)
    full_ = kv_full if kv_full is not None else q
    cache_ = cache if cache is not None else q
    c1_ = cache1 if terms > 1 else q
    c2_ = cache2 if terms > 2 else q
    kpm_ = key_padding_mask if key_padding_mask is not None else q
    s_keep = q_keep.stride() if q_keep is not None else (0, 0, 0)
    s_cnt = kv_count.stride() if kv_count is not None else (0, 0, 0)
    s_idx = kv_index.stride() if kv_index is not None else (0, 0, 0, 0)
    s_kpm = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    grid = ((Nq + BLOCK_M - 1) // BLOCK_M, B * H)
    launch(
        _sparse_attn_fwd_sm90, grid,
        desc_q, desc_k, desc_v, out, lse, cache_, c1_, c2_, qk_, cnt_, idx_, full_, kpm_,
        *out.stride(), *lse.stride(), *cache_.stride(), *s_keep, *s_cnt, *s_idx, *s_kpm,
        H, Nq, Nkv, (Nkv + BLOCK_N - 1) // BLOCK_N, float(scale) * _LOG2E,
        float(cache_delta), float(cache_delta) ** 2 / 2.0,
        HEAD_DIM=D, HAS_QKEEP=q_keep is not None, HAS_LISTS=kv_count is not None,
        HAS_KPM=key_padding_mask is not None, EVEN_KV=Nkv % BLOCK_N == 0, CACHE_TERMS=terms,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, K_STAGES=k_stages, V_STAGES=V_STAGES, P_SMEM=p_smem,
        num_warps=NUM_WARPS,
    )
