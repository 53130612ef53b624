"""Sparse-symbol attention: one kernel for block skipping and q-block feature caching.

Formula (DESIGN.md section 2), for token ``i`` of q-block ``qb`` and head ``h``::

    q_keep[b, h, qb] == 0 -> O[i] = cache[i]                                   (copied in the kernel)
    otherwise             -> O[i] = softmax_J(scale * q_i . k_j) v_J,  J = kept kv-blocks, unmasked keys
                             O[i] = 0 when J is empty (never NaN)
    lse[i] = log(sum_J exp(scale * q_i . k_j))  (natural log; -inf for empty rows and cached rows)

The kv-blocks of a row of blocks arrive as ``(kv_count, kv_index)`` lists (see ``symbols.py``), so a
skipped block costs nothing. Online softmax after FlashAttention-2 (Dao, 2023); the exp2 form with
``log2(e)`` folded into the scale and the loop layout follow Triton's fused-attention tutorial (06).

This file holds, in order: the Triton kernels, the launch table and the launcher
``sparse_attention_triton``, and the reference twin ``sparse_attention_ref`` with the same signature.
On Hopper the launcher hands the calls its table marks (``KernelConfig.gluon``: head dims 64 and 128
from ``GLUON_MIN_NKV`` keys) to the warp-specialised Gluon kernel of ``attention_sm90.py`` when they
qualify; short calls take its one-consumer CTA (``gluon_launch``: at head dim 128 sparse calls of at most
``ONE_CONSUMER_MAX_NKV`` keys, at 64 every call of at most 8192).
Output layout for both: ``out`` has shape ``[B, H, Nq, D]`` and memory order ``[B, Nq, H, D]`` (like
SDPA's flash path, so the usual ``transpose(1, 2).reshape(B, Nq, H * D)`` that follows is free);
``lse`` is float32 ``[B, H, Nq]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..symbols import expand_kv_keep
from . import attention_sm90
from .launch import GLUON_ON, capability, cdiv, launch, next_power_of_2

try:  # host-side TMA descriptors (triton >= 3.4); the pointer path never needs them
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

__all__ = ["sparse_attention_triton", "sparse_attention_ref", "empty_output", "kv_keep_from_lists",
           "KernelConfig", "launch_config", "gluon_takes", "masked_kv_blocks"]

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the native MUFU instruction
_LN2 = tl.constexpr(0.6931471805599453)  # lse = log2-sum * ln(2)

# ---------------------------------------------------------------------------------------------------
# Kernels
#
# Notation:
#   B, H        batch, heads                     program (pid_m, pid_bh): BLOCK_M query rows of one (b, h)
#   Nq, Nkv     query / key tokens               HEAD_DIM = D; BLOCK_D = next power of two >= D
#   SYM_Q/SYM_KV  symbol block sizes (block_q, block_kv); the kernel tiles BLOCK_M | SYM_Q, BLOCK_N | SYM_KV,
#               so one kept kv-block is SUB_N = SYM_KV // BLOCK_N kernel tiles
#   NKB         number of kv symbol blocks       t: kernel-tile counter over the kept blocks' tiles
# constexpr flags:
#   HAS_QKEEP   q_keep given (else every q-block is computed)
#   HAS_LISTS   (kv_count, kv_index) given (else every kv-block is kept: dense)
#   HAS_KPM     key_padding_mask given: tiles of blocks holding a masked key take the masked path
#   KPM_SPLIT   with HAS_KPM and HAS_LISTS: each list is ordered with the blocks that need no mask
#               first, and KVFULL[b, h, q-block] counts them (the launcher builds both); without it,
#               every tile takes the masked path
#   EVEN_KV     Nkv % SYM_KV == 0: no partial kv-block, so kept tiles need no key mask
#   USE_TMA     K/V tiles come through host TMA descriptors (sm90+) instead of pointer loads
#   DOT_F32     interpreter only: triton's interpreter (3.6, 3.9) multiplies bf16 tiles as their raw
#               uint16 bits, so bf16 operands are upcast first; exact bf16 values in fp32 give what the
#               tensor cores compute (exact products, fp32 accumulation)
#   MASK        (inner loop) apply the key mask: out-of-range keys and padding -> -inf
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _load_kv_tile(X_bh, desc, off_b, off_h, start_n, stride_n, stride_d, n_ok, d_ok,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  USE_TMA: tl.constexpr, MASK: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_D]`` K or V tile starting at key ``start_n``; masked-out entries are 0."""
    if USE_TMA:
        # TMA zero-fills rows past Nkv and columns past HEAD_DIM: no load masks needed.
        x = desc.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        ptrs = (X_bh + start_n.to(tl.int64) * stride_n
                + tl.arange(0, BLOCK_N)[:, None] * stride_n + tl.arange(0, BLOCK_D)[None, :] * stride_d)
        if MASK:
            x = tl.load(ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)  # interior tile, power-of-two head dim: no mask at all
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _attn_kv_loop(acc, l_i, m_i, q,
                  K_bh, V_bh, desc_k, desc_v, off_b, off_h, KPM_b, IDX, t_lo, t_hi,
                  stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, stride_idx,
                  qk_scale, Nkv,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  SYM_KV: tl.constexpr, HAS_LISTS: tl.constexpr, HAS_KPM: tl.constexpr,
                  USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, MASK: tl.constexpr, STAGES: tl.constexpr):
    """Online-softmax accumulation over kernel tiles ``t_lo <= t < t_hi`` of the kept kv-blocks.

    ``m_i`` is kept in log2 units (scores times ``qk_scale = scale * log2(e)``).
    """
    SUB_N: tl.constexpr = SYM_KV // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for t in tl.range(t_lo, t_hi, num_stages=STAGES):
        if HAS_LISTS:
            # The list holds symbol blocks; a symbol block spans SUB_N kernel tiles.
            kb = tl.load(IDX + (t // SUB_N) * stride_idx)
            start_n = kb * SYM_KV + (t % SUB_N) * BLOCK_N
        else:
            start_n = t * BLOCK_N
        start_n = tl.multiple_of(start_n, BLOCK_N)
        n_ok = (start_n + offs_n) < Nkv
        k = _load_kv_tile(K_bh, desc_k, off_b, off_h, start_n, stride_kn, stride_kd, n_ok, d_ok,
                          HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA, MASK)
        if DOT_F32:
            qk = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32))
        else:
            qk = tl.dot(q, tl.trans(k))
        if MASK:
            valid = n_ok
            if HAS_KPM:
                kpm = tl.load(KPM_b + (start_n + offs_n).to(tl.int64) * stride_kpm_n, mask=n_ok, other=0)
                valid = valid & (kpm != 0)
            qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps
            # exp2(-inf - (-inf)) = NaN out of p and alpha (both become exactly 0).
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
        else:
            # Unmasked tiles hold only finite scores, so m_new is finite after the first tile.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_kv_tile(V_bh, desc_v, off_b, off_h, start_n, stride_vn, stride_vd, n_ok, d_ok,
                          HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA, MASK)
        # P is rounded to the input dtype before the PV product, as in FlashAttention.
        if DOT_F32:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _sparse_attn_fwd(Q, K, V, O, LSE, CACHE, CACHE1, CACHE2, QKEEP, KVCOUNT, KVINDEX, KVFULL, KPM, desc_k, desc_v,
                     stride_qb, stride_qh, stride_qn, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_ob, stride_oh, stride_on, stride_od,
                     stride_lb, stride_lh, stride_ln,
                     stride_cb, stride_ch, stride_cn, stride_cd,
                     stride_keep_b, stride_keep_h, stride_keep_q,
                     stride_cnt_b, stride_cnt_h, stride_cnt_q,
                     stride_idx_b, stride_idx_h, stride_idx_q, stride_idx_j,
                     stride_kpm_b, stride_kpm_n,
                     H, Nq, Nkv, NKB, qk_scale, cache_c1, cache_c2,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, SYM_Q: tl.constexpr, SYM_KV: tl.constexpr,
                     HAS_QKEEP: tl.constexpr, HAS_LISTS: tl.constexpr, HAS_KPM: tl.constexpr,
                     EVEN_KV: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr,
                     KPM_SPLIT: tl.constexpr, CACHE_TERMS: tl.constexpr,
                     STAGES: tl.constexpr, MASKED_STAGES: tl.constexpr):
    """One program: BLOCK_M query rows of one (b, h); walks only the kept kv-blocks of its q-block."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64 before any stride product: B*H*N*D may pass 2**31
    off_b = pid_bh // H
    off_h = pid_bh % H
    qb = pid_m // (SYM_Q // BLOCK_M)  # the symbol q-block holding this tile
    row0 = pid_m.to(tl.int64) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = (row0 + offs_m) < Nq
    io_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_ptrs = (O + off_b * stride_ob + off_h * stride_oh + row0 * stride_on
              + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od)
    lse_ptrs = LSE + off_b * stride_lb + off_h * stride_lh + (row0 + offs_m) * stride_ln

    if HAS_QKEEP:
        keep = tl.load(QKEEP + off_b * stride_keep_b + off_h * stride_keep_h + qb * stride_keep_q)
    else:
        keep = 1
    if keep != 0:
        q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + row0 * stride_qn
                  + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd)
        q = tl.load(q_ptrs, mask=io_mask, other=0.0)  # padded rows/columns are 0: finite scores
        K_bh = K + off_b * stride_kb + off_h * stride_kh
        V_bh = V + off_b * stride_vb + off_h * stride_vh
        KPM_b = KPM + off_b * stride_kpm_b
        if HAS_LISTS:
            cnt = tl.load(KVCOUNT + off_b * stride_cnt_b + off_h * stride_cnt_h + qb * stride_cnt_q)
            IDX = KVINDEX + off_b * stride_idx_b + off_h * stride_idx_h + qb * stride_idx_q
        else:
            cnt = NKB
            IDX = KVINDEX
        # Tiles [0, n_full) run unmasked; only the partial last kv-block (and, with a key padding
        # mask, every block) takes the masked path. Kept indices ascend, so a kept last block is the
        # last list entry.
        n_full = cnt
        if HAS_KPM:
            if KPM_SPLIT:   # the list's first KVFULL entries hold no masked key and no partial block
                n_full = tl.load(KVFULL + off_b * stride_cnt_b + off_h * stride_cnt_h + qb * stride_cnt_q)
            else:
                n_full = cnt * 0
        elif not EVEN_KV:
            if HAS_LISTS:
                last = tl.load(IDX + (cnt - 1) * stride_idx_j, mask=cnt > 0, other=-1)
                n_full = cnt - ((cnt > 0) & (last == NKB - 1)).to(tl.int32)
            else:
                n_full = NKB - 1
        SUB_N: tl.constexpr = SYM_KV // BLOCK_N
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc, l_i, m_i = _attn_kv_loop(acc, l_i, m_i, q, K_bh, V_bh, desc_k, desc_v,
                                      off_b.to(tl.int32), off_h.to(tl.int32), KPM_b, IDX,
                                      0, n_full * SUB_N,
                                      stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, stride_idx_j,
                                      qk_scale, Nkv, HEAD_DIM, BLOCK_N, BLOCK_D, SYM_KV,
                                      HAS_LISTS, HAS_KPM, USE_TMA, DOT_F32, False, STAGES)
        if HAS_KPM or not EVEN_KV:
            acc, l_i, m_i = _attn_kv_loop(acc, l_i, m_i, q, K_bh, V_bh, desc_k, desc_v,
                                          off_b.to(tl.int32), off_h.to(tl.int32), KPM_b, IDX,
                                          n_full * SUB_N, cnt * SUB_N,
                                          stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n,
                                          stride_idx_j, qk_scale, Nkv, HEAD_DIM, BLOCK_N, BLOCK_D, SYM_KV,
                                          HAS_LISTS, HAS_KPM, USE_TMA, DOT_F32, True, MASKED_STAGES)
        # Empty rows (no visible key): l = 0 and acc = 0, so out = 0 and lse = -inf, with no 0/0.
        inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(o_ptrs, (acc * inv_l[:, None]).to(O.dtype.element_ty), mask=io_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))) * _LN2)
        tl.store(lse_ptrs, lse, mask=m_ok)
    else:
        # Cached q-block: its only work is its rows of the feature cache, the Taylor series
        # D0 + c1 * D1 + c2 * D2 over CACHE_TERMS terms (one term: a copy), summed in fp32, rounded once.
        c_off = (off_b * stride_cb + off_h * stride_ch + row0 * stride_cn
                 + offs_m[:, None] * stride_cn + offs_d[None, :] * stride_cd)
        c = tl.load(CACHE + c_off, mask=io_mask)
        if CACHE_TERMS > 1:
            c = c.to(tl.float32) + cache_c1 * tl.load(CACHE1 + c_off, mask=io_mask).to(tl.float32)
            if CACHE_TERMS > 2:
                c += cache_c2 * tl.load(CACHE2 + c_off, mask=io_mask).to(tl.float32)
        tl.store(o_ptrs, c.to(O.dtype.element_ty), mask=io_mask)
        tl.store(lse_ptrs, tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), mask=m_ok)


# ---------------------------------------------------------------------------------------------------
# Launch table and launcher
# ---------------------------------------------------------------------------------------------------
# The D=128 Gluon entry applies from this many keys on (``KernelConfig.gluon_min_nkv``'s default). H200,
# D=128, H=24, CUDA-graph replays (benchmarks/NOTES.md, sessions 8 and 12): at N=4608 the Gluon kernel took
# 0.438 ms dense against 0.549 for the Triton kernel and 0.150 vs 0.168 at kv density 0.25; at N=2048 0.096
# dense against the Triton kernel's 0.116 (dense lists) and 0.071 vs 0.080 at q density 0.5; shorter
# sequences were not measured.
GLUON_MIN_NKV = 2048
# Sparse calls (kv lists or cached q-blocks) with at most this many keys run the D=128 Gluon entry's
# one-consumer CTA (64 rows, two CTAs an SM: one's start and epilogue overlap the other's tiles). H200,
# D=128, H=24, graph replays (NOTES.md session 12), one consumer against two, ms:
#   N=2048:  kv density 0.1 0.032 vs 0.040, 0.25 0.041 vs 0.048, q density 0.5 0.064 vs 0.071;
#   N=4608:  kv 0.1 0.084 vs 0.099, 0.25 0.139 vs 0.147, 0.5 0.242 vs 0.247, q 0.5 0.256 vs 0.261;
#   N=8192:  kv 0.1 0.178 vs 0.197, but 0.5 0.731 vs 0.699, q 0.5 0.747 vs 0.700, dense 1.61 vs 1.27;
#   N=16384: slower at every density (kv 0.1 0.685 vs 0.675, dense 5.75 vs 5.15).
# Dense calls keep two consumers (N=4608: 0.437 vs 0.422). Between 4608 and 8192 keys nothing was measured.
ONE_CONSUMER_MAX_NKV = 6144


@dataclass(frozen=True)
class KernelConfig:
    """Kernel tile sizes and launch settings; ``block_m``/``block_n`` are capped by the symbol blocks.

    ``num_stages`` is the software-pipelining depth of the dense loop, ``list_stages`` that of the loop
    over kv lists (``None``: ``num_stages + 2``). Triton's pipeliner spends two stages on the indirect
    index load: at 3 or 4 stages the list loop got 2 K/V buffers and waited for every copy at the top
    of each iteration (3.6 and 3.9 TTGIR), 15% slower than the dense loop at N=16384 (H100); at 5 it
    gets the dense loop's 3 buffers.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    list_stages: Optional[int] = None
    tma: bool = False
    # Hopper only: the warp-specialised Gluon kernel (``attention_sm90.py``) when the call qualifies
    # (``attention_sm90.supports``; from the table also only from ``gluon_min_nkv`` keys on);
    # ``k_stages`` is the depth of its K ring, ``consumers`` its consumer warpgroups a CTA (2: 128 rows, one
    # CTA an SM; 1: 64 rows, two CTAs an SM, with one K buffer at D = 128). ``one_consumer_max_nkv`` /
    # ``one_consumer_dense_max_nkv``: the table's sparse calls (kv lists or cached q-blocks) / dense calls
    # with at most this many keys take one consumer and one K buffer instead (``gluon_launch``). The other
    # fields then do not apply.
    gluon: bool = False
    k_stages: int = 2
    gluon_min_nkv: int = GLUON_MIN_NKV
    consumers: int = 2
    one_consumer_max_nkv: int = 0
    one_consumer_dense_max_nkv: int = 0

    def stages(self, lists: bool) -> int:
        if not lists:
            return self.num_stages
        return self.list_stages if self.list_stages is not None else self.num_stages + 2


# (arch, BLOCK_D) -> config. arch: "sm90" (Hopper), "sm80" (every other CUDA GPU, untuned: no such GPU
# was measured; entries only avoid register spills in ptxas's report), "interp" (the interpreter: tile
# sizes only matter for speed there, and 64 < 128 exercises the sub-tile path).
# 128x128 tiles with 8 warps (two warpgroups of 64 rows) keep the score tile, P and the accumulator
# in registers without spills for D <= 128 (255 regs/thread, ptxas on triton 3.6 and 3.9).
_TABLE = {
    ("sm90", 16): KernelConfig(128, 128, 8, 3),
    ("sm90", 32): KernelConfig(128, 128, 8, 3),   # 4 warps spilled 120 B/thread (ptxas, triton 3.6)
    # D=64: 3.84 ms vs 4.34 for 128x128 (N=16384, H=24, H100). Gluon from 2048 keys, one consumer for every
    # call up to 8192 keys (H200, H=24, graph replays, NOTES.md session 12; ms, one consumer / two / this
    # Triton entry with dense lists): N=2048 dense 0.065 / 0.072 / 0.074, q density 0.5 0.044 / 0.055 / 0.064;
    # N=4608 dense 0.308 / 0.319 / 0.343, q 0.5 0.169 / 0.197 / 0.258, kv density 0.1 0.057 / 0.073 (Triton
    # 128x128 tiles 0.067); N=8192 dense 0.937 / 0.942 (two consumers with dense lists 0.911), kv 0.1 0.120 /
    # 0.145; N=16384 mixed (dense 3.86 / 3.72, kv 0.1 0.427 / 0.464), so two consumers there.
    ("sm90", 64): KernelConfig(128, 64, 8, 3, gluon=True, gluon_min_nkv=2048, one_consumer_max_nkv=8192,
                               one_consumer_dense_max_nkv=8192),
    # Gluon from GLUON_MIN_NKV keys, else these tiles; sparse calls up to ONE_CONSUMER_MAX_NKV keys: one consumer
    ("sm90", 128): KernelConfig(128, 128, 8, 3, gluon=True, one_consumer_max_nkv=ONE_CONSUMER_MAX_NKV),
    ("sm90", 256): KernelConfig(128, 32, 8, 2),   # 128x64 spilled 56 B/thread (ptxas, triton 3.6)
    ("sm80", 16): KernelConfig(128, 64, 4, 3),
    ("sm80", 32): KernelConfig(128, 64, 4, 3),
    ("sm80", 64): KernelConfig(128, 64, 8, 3),
    ("sm80", 128): KernelConfig(128, 32, 8, 3),   # 128x64 spilled 32-56 B/thread (ptxas, triton 3.6)
    ("sm80", 256): KernelConfig(64, 32, 8, 2),
}
_INTERP = KernelConfig(64, 64, 4, 1)

def gluon_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int = 128, block_kv: int = 128,
                config: Optional[KernelConfig] = None) -> bool:
    """Whether this call runs on the Gluon kernel of ``attention_sm90.py``: by the launch table (its
    ``gluon`` entries from ``gluon_min_nkv`` keys, unless ``FLASHOMNI_GLUON=0``), or by an explicit
    ``config`` (benchmarks, tests) whose ``gluon`` is set; either way only calls the kernel ``supports``."""
    if config is None:
        if not (q.is_cuda and GLUON_ON):
            return False
        cfg = launch_config(q.device, q.shape[-1])
        if k.shape[2] < cfg.gluon_min_nkv:
            return False
    else:
        cfg = config
    return cfg.gluon and attention_sm90.supports(q, k, v, block_q, block_kv)


def gluon_launch(cfg: KernelConfig, nkv: int, sparse: bool) -> tuple[int, int]:
    """``(k_stages, consumers)`` of the Gluon kernel for a call under ``cfg``: a sparse call (kv lists or
    cached q-blocks) with at most ``cfg.one_consumer_max_nkv`` keys, or a dense one with at most
    ``cfg.one_consumer_dense_max_nkv``, runs the one-consumer CTA with one K buffer; every other call
    ``cfg``'s own."""
    if nkv <= (cfg.one_consumer_max_nkv if sparse else cfg.one_consumer_dense_max_nkv):
        return 1, 1
    return cfg.k_stages, cfg.consumers


def _arch(device: torch.device) -> str:
    if device.type != "cuda":
        return "interp"
    return "sm90" if capability(device)[0] == 9 else "sm80"


def launch_config(device: torch.device, head_dim: int) -> KernelConfig:
    """The table's config for ``head_dim`` on ``device`` (before capping by the symbol blocks)."""
    arch = _arch(device)
    if arch == "interp":
        return _INTERP
    return _TABLE[(arch, max(16, next_power_of_2(head_dim)))]


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA needs a unit last stride and 16-byte aligned base and outer strides."""
    return TensorDescriptor is not None and attention_sm90.tma_ok(t)


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            q_keep: Optional[torch.Tensor], kv_count: Optional[torch.Tensor],
                            kv_index: Optional[torch.Tensor], cache: Optional[torch.Tensor],
                            key_padding_mask: Optional[torch.Tensor], scale: float,
                            block_q: int, block_kv: int, cache1: Optional[torch.Tensor] = None,
                            cache2: Optional[torch.Tensor] = None, cache_delta: float = 0.0, *,
                            config: Optional[KernelConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher (same contract as ``sparse_attention_ref``).

    ``config`` overrides the launch table (benchmarks compare variants with it). Inputs are used in
    place with their strides; nothing is copied. The grid is ``(ceil(Nq / BLOCK_M), B * H)`` whatever
    the symbols hold, so no host synchronisation happens.
    """
    B, H, Nq, D = q.shape
    Nkv = k.shape[2]
    for name, blk in (("block_q", block_q), ("block_kv", block_kv)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name}={blk}: the attention kernel needs a power of two >= 16 "
                             "(its tiles must divide the symbol blocks)")
    if (kv_count is None) != (kv_index is None):
        raise ValueError("kv_count and kv_index come together (both None means dense)")
    if cache is None:
        # No cache means no q-block is cached (the public wrapper checks q_keep is all True then):
        # every q-block is computed, and the kernel never touches a cache.
        q_keep = None
    cfg = config or launch_config(q.device, D)
    block_d = max(16, next_power_of_2(D))
    # Capping by the symbol blocks keeps a kept symbol block a whole number of tiles (powers of two).
    block_m, block_n = min(cfg.block_m, block_q), min(cfg.block_n, block_kv)
    stages = cfg.stages(lists=kv_count is not None)
    gluon = gluon_takes(q, k, v, block_q, block_kv, config)
    # With a key padding mask, only the tiles of blocks holding a masked key (or the partial last block)
    # take the masked path. The Gluon kernel reads a per-block flag (``masked_kv_blocks``) for each tile
    # it visits, in any order; the Triton kernel's two loops need the lists reordered so that those blocks
    # come last (``split_masked_blocks``), and without lists send every tile through the masked loop.
    kv_full = None
    if key_padding_mask is not None and gluon:
        kv_full = masked_kv_blocks(key_padding_mask, block_kv)
    elif key_padding_mask is not None and kv_count is not None:
        kv_index, kv_full = split_masked_blocks(kv_count, kv_index, key_padding_mask, block_kv)
    # The masked loop covers only the partial last kv-block (and blocks with masked keys) unless a key
    # padding mask without lists sends every tile through it; 2 stages there keep both loops' buffers
    # under 227 KB (D=128, 128x128 tiles, ptxas).
    masked_stages = cfg.num_stages if (key_padding_mask is not None and kv_full is None) else 2
    if q.element_size() == 4:
        # fp32 tiles take twice the shared memory: 128x128 fp32 K/V tiles overflow Hopper's 227 KB.
        block_m, block_n = min(block_m, 64), min(block_n, 64 if block_d <= 128 else 32)
        stages = masked_stages = 2
    if kv_full is not None and not gluon and kv_full.stride() != kv_count.stride():
        raise AssertionError("kv_full must share kv_count's strides (both kernels read both with them)")
    out, lse = empty_output(q, v)
    terms = cache_terms(cache, cache1, cache2)
    # The symbol and cache operands both kernels take, in their order, then their strides; an absent
    # optional tensor is q as a never-dereferenced placeholder (constexpr flags gate it).
    operands = tuple(t if t is not None else q for t in (
        cache, cache1 if terms > 1 else None, cache2 if terms > 2 else None, q_keep, kv_count, kv_index,
        kv_full, key_padding_mask))
    operand_strides = (*operands[0].stride(),
                       *(q_keep.stride() if q_keep is not None else (0, 0, 0)),
                       *(kv_count.stride() if kv_count is not None else (0, 0, 0)),
                       *(kv_index.stride() if kv_index is not None else (0, 0, 0, 0)),
                       *(key_padding_mask.stride() if key_padding_mask is not None else (0, 0)))
    if gluon:
        k_stages, consumers = gluon_launch(cfg, Nkv, sparse=q_keep is not None or kv_count is not None)
        attention_sm90.sparse_attention_sm90(q, k, v, operands, operand_strides, q_keep is not None,
                                             kv_count is not None, key_padding_mask is not None, terms, scale,
                                             cache_delta, out, lse, launch, k_stages=k_stages,
                                             consumers=consumers)
        return out, lse
    use_tma = cfg.tma and q.is_cuda and _tma_ok(k) and _tma_ok(v)
    if use_tma:
        desc_k = TensorDescriptor.from_tensor(k, [1, 1, block_n, block_d])
        desc_v = TensorDescriptor.from_tensor(v, [1, 1, block_n, block_d])
    else:
        desc_k, desc_v = k, v  # unused by the pointer path
    nkb = cdiv(Nkv, block_kv)
    grid = (cdiv(Nq, block_m), B * H)
    launch(
        _sparse_attn_fwd, grid,
        q, k, v, out, lse, *operands, desc_k, desc_v,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *operand_strides,
        H, Nq, Nkv, nkb, float(scale) * _LOG2E, float(cache_delta), float(cache_delta) ** 2 / 2.0,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SYM_Q=block_q, SYM_KV=block_kv,
        HAS_QKEEP=q_keep is not None, HAS_LISTS=kv_count is not None,
        HAS_KPM=key_padding_mask is not None, EVEN_KV=Nkv % block_kv == 0, USE_TMA=use_tma,
        DOT_F32=q.dtype == torch.bfloat16 and not q.is_cuda, KPM_SPLIT=kv_full is not None, CACHE_TERMS=terms,
        STAGES=stages, MASKED_STAGES=masked_stages,
        num_warps=cfg.num_warps, num_stages=stages,
    )
    return out, lse


# ---------------------------------------------------------------------------------------------------
# Reference twin and helpers
# ---------------------------------------------------------------------------------------------------
def empty_output(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate ``(out, lse)`` in the layout both implementations (and the fake) return."""
    B, H, Nq, _ = q.shape
    Dv = v.shape[-1]
    out = torch.empty(B, Nq, H, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    return out, lse


def cache_terms(cache: Optional[torch.Tensor], cache1: Optional[torch.Tensor],
                cache2: Optional[torch.Tensor]) -> int:
    """How many Taylor terms the cached rows take (0 without a cache); ``cache1``/``cache2`` must share
    ``cache``'s shape, dtype and strides (the feature cache allocates them alike), ``cache2`` needs
    ``cache1``."""
    if cache is None:
        return 0
    n = 1
    for t in (cache1, cache2):
        if t is None:
            break
        if t.shape != cache.shape or t.stride() != cache.stride() or t.dtype != cache.dtype \
                or t.device != cache.device:
            raise ValueError("cache1/cache2 must match cache's shape, strides, dtype and device")
        n += 1
    if cache2 is not None and cache1 is None:
        raise ValueError("cache2 needs cache1")
    return n


def masked_kv_blocks(key_padding_mask: torch.Tensor, block_kv: int, dtype=torch.uint8) -> torch.Tensor:
    """``[B, NKB]`` (contiguous, ``dtype``): whether kv-block ``j`` of batch ``b`` holds a masked key or
    keys past ``Nkv`` (the partial last block): the tiles that need the key mask."""
    B, Nkv = key_padding_mask.shape
    nkb = cdiv(Nkv, block_kv)
    masked = torch.nn.functional.pad(torch.logical_not(key_padding_mask), (0, nkb * block_kv - Nkv), value=True)
    return masked.view(B, nkb, block_kv).any(-1).to(dtype)


def split_masked_blocks(kv_count: torch.Tensor, kv_index: torch.Tensor, key_padding_mask: torch.Tensor,
                        block_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder the kv lists so that each row's kept blocks needing no mask come first (ascending), then
    the kept blocks holding a masked key or the partial last block (ascending), then the unused entries;
    return ``(index, full)`` with ``full [B, H, NQB]`` (int32, ``kv_count``'s strides) counting the first
    group. The set of kept blocks is unchanged, only the order the kernel visits them (online softmax
    is order-independent up to rounding). Device ops only: no host synchronisation."""
    nkb = kv_index.shape[-1]
    blk_masked = masked_kv_blocks(key_padding_mask, block_kv, torch.bool)       # [B, NKB]
    idx = kv_index.long()
    needs = torch.gather(blk_masked[:, None, None, :].expand(idx.shape), -1, idx)
    valid = torch.arange(nkb, device=idx.device) < kv_count.unsqueeze(-1)
    # sort key: group (0 unmasked, 1 masked, 2 unused) * NKB + block index; stays in int64
    key = idx + nkb * (needs.long() + 2 * torch.logical_not(valid).long())
    order = key.argsort(dim=-1)
    index = torch.gather(kv_index, -1, order)
    full = torch.empty_strided(kv_count.shape, kv_count.stride(), dtype=kv_count.dtype, device=kv_count.device)
    torch.sum(valid & torch.logical_not(needs), dim=-1, dtype=kv_count.dtype, out=full)
    return index, full


def kv_keep_from_lists(kv_count: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
    """Inverse of ``symbols.kv_block_lists``: bool ``[B, H, NQB, NKB]``."""
    nkb = kv_index.shape[-1]
    valid = torch.arange(nkb, device=kv_index.device) < kv_count.unsqueeze(-1)
    keep = torch.zeros(kv_index.shape, dtype=torch.bool, device=kv_index.device)
    return keep.scatter(-1, kv_index.long(), valid)


def sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         q_keep: Optional[torch.Tensor], kv_count: Optional[torch.Tensor],
                         kv_index: Optional[torch.Tensor], cache: Optional[torch.Tensor],
                         key_padding_mask: Optional[torch.Tensor], scale: float,
                         block_q: int, block_kv: int, cache1: Optional[torch.Tensor] = None,
                         cache2: Optional[torch.Tensor] = None,
                         cache_delta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of the kernel. Computes in float32 (float64 if the inputs are float64). Cached rows
    take ``cache + delta * cache1 + delta^2 / 2 * cache2`` (the terms given).

    Inputs are assumed validated (``ops.sparse_attention`` validates). Materialises the
    ``[B, H, Nq, Nkv]`` score matrix: for tests, CPU runs and small problems only.
    """
    B, H, Nq, _ = q.shape
    Nkv = k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(cdt), k.to(cdt)) * scale
    visible = torch.ones(B, H, Nq, Nkv, dtype=torch.bool, device=q.device)
    if kv_count is not None:
        visible &= expand_kv_keep(kv_keep_from_lists(kv_count, kv_index), Nq, Nkv, block_q, block_kv)
    if key_padding_mask is not None:
        visible &= key_padding_mask[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                       # -inf on empty rows
    p = torch.exp(s - lse.nan_to_num(neginf=0.0).unsqueeze(-1))  # empty rows: exp(-inf) = 0
    o = torch.einsum("bhqk,bhkd->bhqd", p, v.to(cdt))
    if q_keep is not None:
        row_keep = q_keep.repeat_interleave(block_q, dim=-1)[..., :Nq]     # [B, H, Nq]
        if cache is not None:
            c = cache.to(cdt)
            terms = cache_terms(cache, cache1, cache2)
            if terms > 1:
                c = c + cache_delta * cache1.to(cdt)
            if terms > 2:
                c = c + (cache_delta ** 2 / 2.0) * cache2.to(cdt)
            o = torch.where(row_keep.unsqueeze(-1), o, c)
        lse = lse.masked_fill(~row_keep, float("-inf"))
    out, lse_out = empty_output(q, v)
    out.copy_(o)
    lse_out.copy_(lse)
    return out, lse_out
