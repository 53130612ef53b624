"""The update step's planning kernels: the built-in policies' selections and the symbols' kernel forms.

Between its attention kernel and its cache refresh, an update step turns pooled scores into symbols and
the symbols into what the dispatch steps read. In torch that was ~35 small ops a layer (a sort, a
cumsum, a scatter, masks, an argsort, the list sort, ``kv_need``, the density statistics), each a
separate launch of a tiny kernel: with the pooling, 4777 kernels in an update step of SD3.5 Large against
Inductor's 1435 for a dense one, and 9 ms over its time on an H200 (benchmarks/NOTES.md, session 13).
Each kernel here replaces one group of them with one launch and has its torch twin beside it (the code
the runtime ran before, kept as the reference and as the path off CUDA). The pooling itself
(``policies.pooled_scores``) stays torch: block-view means and a cuBLAS product were faster than a
Triton version at D = 128 (NOTES).

``kv_select``   the pooled-QK kv-block selection (``PooledQKPolicy.kv_keep``): per score row, drop the
                kv-blocks of least pooled mass while their cumulative mass stays under ``tau``; keep the
                text rows and columns and the diagonal.
``q_select``    the q-block caching decision (``QCachePolicy.q_keep`` with layer granularity): per batch
                element, cache the ``k`` (head, q-block) pairs whose output changed least (plus the
                text-guidance score), never text q-blocks; cache a layer whole below a kept fraction.
``store_plan``  the symbols into the branch's persistent tensors with their kernel forms
                (``BranchState.store_symbols``): ``q_keep`` / ``kv_keep`` copies, the kv-block lists
                ``(kv_count, kv_index)``, ``kv_need``, and the per-head parts of the two densities.

Selections without a sort. A row's dropped set is a prefix of its entries in ascending order of
``(value, index)``: entry ``i`` is dropped iff ``S(key_i) < tau``, where ``key_i = (bits(p_i) << b) | i``
(``p >= 0``, so the float's bits order like the float; the index breaks ties as a stable sort does) and
``S(T)`` is the mass of the entries with key ``<= T``. ``S`` does not decrease with ``T``, so the dropped
set is ``key < T*`` with ``T*`` the smallest key where ``S`` reaches ``tau``: a bisection over the key
range (``b = log2`` of the row length rounded up: 31 + b masked row sums), all in registers. The twin
sorts (``torch.sort`` + ``cumsum``). The two sum the same numbers in a different order, so an entry whose
cumulative mass is within float32 rounding of ``tau`` may go either way (the tests allow exactly that).
``q_select`` finds its k-th smallest score the same way over the score's 31 bits, then takes the ties
at that value in index order (a prefix count), as the twin's stable argsort does.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..symbols import _block_weights
from ..symbols import kv_need as kv_need_of
from .launch import launch, next_power_of_2, num_sms

__all__ = ["kv_select", "kv_select_ref", "kv_select_triton", "q_select", "q_select_ref", "q_select_triton", "store_plan", "store_plan_ref",
           "store_plan_triton", "text_block_range", "layer_granularity"]

# elements of the [rows, NKB] tile a program holds in registers: 16 a thread (more spills on sm_90:
# tests/sm90_compile_check.py plan)
_SELECT_TILE, _SELECT_WARPS = 2048, 4
_PLAN_TILE, _PLAN_WARPS = 4096, 8
_MAX_NKB = 1 << 16    # kv-blocks a row may have (the key: 31 bits of a non-negative float32 above the index)


def _use_kernel(t: Tensor) -> bool:
    """``ops.use_triton``: the kernels on CUDA tensors (and on CPU under ``FLASHOMNI_FORCE_TRITON=1``),
    unless ``FLASHOMNI_PLAN_KERNELS=0`` sends every call to the torch twins (to rule these kernels in or
    out when a run looks wrong; docs/debugging.md)."""
    from .ops import use_triton

    return os.environ.get("FLASHOMNI_PLAN_KERNELS", "1") != "0" and use_triton(t)


def text_block_range(n: int, text_len: int, text_first: bool, block: int) -> tuple[int, int]:
    """The blocks ``[lo, hi)`` of a joint sequence of ``n`` tokens that hold a text token (host ints;
    ``lo == hi`` without text): what ``policies.text_blocks`` marks, as a range."""
    if text_len <= 0:
        return 0, 0
    t0, t1 = (0, text_len) if text_first else (n - text_len, n)
    return t0 // block, -(-t1 // block)


# ---------------------------------------------------------------------------------------------------
# kv_select: the pooled-QK kv-block selection
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _kv_select_kernel(P, KEEP, n_rows, NQB, NKB, tau, tq_lo, tq_hi, tk_lo, tk_hi, block_q, block_kv,
                      DIAGONAL: tl.constexpr, ROWS: tl.constexpr, NKB_P2: tl.constexpr, IDX_BITS: tl.constexpr,
                      KEY_BITS: tl.constexpr):
    # program: ROWS consecutive score rows (b, h, i) of the contiguous [B, H, NQB, NKB] scores
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, NKB_P2)
    ok = (rows < n_rows)[:, None] & (cols < NKB)[None, :]
    p = tl.load(P + rows[:, None] * NKB + cols[None, :], mask=ok, other=0.0)
    # keys order the entries by (value, index); padding sorts after every real entry and carries no mass
    key = (p.to(tl.int32, bitcast=True).to(tl.int64) << IDX_BITS) | cols[None, :].to(tl.int64)
    key = tl.where(ok, key, (1 << KEY_BITS) - 1)
    # bisection for the smallest key T with S(T) >= tau (S: the row's mass at keys <= T): [lo, hi]
    lo = tl.zeros([ROWS], dtype=tl.int64)
    hi = tl.full([ROWS], (1 << KEY_BITS) - 1, dtype=tl.int64)
    for _ in range(KEY_BITS):
        mid = lo + (hi - lo) // 2
        s = tl.sum(tl.where(key <= mid[:, None], p, 0.0), 1)
        reached = s >= tau
        hi = tl.where(reached, mid, hi)
        lo = tl.where(reached, lo, mid + 1)
    # rows whose whole mass stays under tau end at the padding key: everything is dropped, as in the twin
    keep = key >= lo[:, None]
    i = rows % NQB
    keep |= ((cols >= tk_lo) & (cols < tk_hi))[None, :] | ((i >= tq_lo) & (i < tq_hi))[:, None]
    if DIAGONAL:
        qs = i * block_q
        ks = cols * block_kv
        keep |= (qs[:, None] < ks[None, :] + block_kv) & (ks[None, :] < qs[:, None] + block_q)
    tl.store(KEEP + rows[:, None] * NKB + cols[None, :], keep.to(tl.int8), mask=ok)


def _check_scores(scores: Tensor, tau: float) -> None:
    if scores.dim() != 4 or scores.dtype != torch.float32:
        raise ValueError(f"kv_select: scores must be float32 [B, H, NQB, NKB], got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"kv_select: tau must be in [0, 1], got {tau}")


def kv_select_ref(scores: Tensor, tau: float, text_q: tuple[int, int], text_kv: tuple[int, int],
                  diagonal: bool, block_q: int, block_kv: int) -> Tensor:
    """Torch twin: bool ``[B, H, NQB, NKB]``. Per row, sort ascending, drop while the inclusive cumulative
    mass is ``< tau``; then keep the q-blocks ``text_q = [lo, hi)`` (rows), the kv-blocks ``text_kv``
    (columns) and, with ``diagonal``, the kv-blocks sharing tokens with the q-block."""
    _check_scores(scores, tau)
    *_, nqb, nkb = scores.shape
    dev = scores.device
    if tau <= 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=dev)
    sorted_p, order = scores.sort(dim=-1)
    drop_sorted = sorted_p.cumsum(-1) < tau
    keep = ~torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    i, j = torch.arange(nqb, device=dev), torch.arange(nkb, device=dev)
    extra = ((j >= text_kv[0]) & (j < text_kv[1]))[None, :] | ((i >= text_q[0]) & (i < text_q[1]))[:, None]
    if diagonal:
        qs, ks = i * block_q, j * block_kv
        extra = extra | ((qs[:, None] < ks[None, :] + block_kv) & (ks[None, :] < qs[:, None] + block_q))
    return keep | extra


def kv_select_triton(scores: Tensor, tau: float, text_q: tuple[int, int], text_kv: tuple[int, int],
                     diagonal: bool, block_q: int, block_kv: int, out: Optional[Tensor] = None) -> Tensor:
    """The kernel (same contract as ``kv_select_ref``): one launch, no host synchronisation. ``scores``
    must be finite and non-negative (a softmax, as ``pooled_scores`` returns); ``out``: a contiguous bool
    tensor of the scores' shape to write (tests poison it), else a new one."""
    _check_scores(scores, tau)
    B, H, nqb, nkb = scores.shape
    if nkb > _MAX_NKB:
        raise ValueError(f"kv_select: {nkb} kv-blocks; the kernel's key holds at most {_MAX_NKB}")
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device) if out is None else out
    if keep.shape != scores.shape or keep.dtype != torch.bool or not keep.is_contiguous():
        raise ValueError(f"kv_select: out must be a contiguous bool tensor {tuple(scores.shape)}")
    n_rows = B * H * nqb
    if tau <= 0 or n_rows == 0 or nkb == 0:       # nothing dropped (the twin's shortcut)
        return keep.fill_(True)
    nkb_p2 = max(16, next_power_of_2(nkb))
    idx_bits = nkb_p2.bit_length() - 1
    # rows a program: as many as fit the tile, but at most what leaves ~4 programs an SM (SD3's 1330 rows
    # of 35 kv-blocks took 62 us in 42 programs of 32 rows on the H200; each program iterates serially)
    spread = next_power_of_2(max(1, n_rows // (4 * num_sms(scores.device)))) if scores.is_cuda else 64
    rows = max(1, min(64, _SELECT_TILE // nkb_p2, spread))
    warps = max(1, min(_SELECT_WARPS, rows * nkb_p2 // 256))
    launch(_kv_select_kernel, (triton.cdiv(n_rows, rows),), scores.contiguous(), keep.view(torch.int8), n_rows,
           nqb, nkb, float(tau), text_q[0], text_q[1], text_kv[0], text_kv[1], block_q, block_kv,
           DIAGONAL=bool(diagonal), ROWS=rows, NKB_P2=nkb_p2, IDX_BITS=idx_bits, KEY_BITS=31 + idx_bits,
           num_warps=warps)
    return keep


def kv_select(scores: Tensor, tau: float, text_q: tuple[int, int], text_kv: tuple[int, int], diagonal: bool,
              block_q: int, block_kv: int) -> Tensor:
    """The kernel on CUDA (and on CPU under ``FLASHOMNI_FORCE_TRITON=1``), else the torch twin."""
    impl = kv_select_triton if _use_kernel(scores) else kv_select_ref
    return impl(scores, tau, text_q, text_kv, diagonal, block_q, block_kv)


# ---------------------------------------------------------------------------------------------------
# q_select: the q-block caching decision (QCachePolicy + layer granularity)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _q_select_kernel(CH, P, KEEP, H, NQB, NKB, k, threshold, tg_weight, layer_threshold, tq_lo, tq_hi, tk_lo,
                     tk_hi, TG: tl.constexpr, CONTRIB: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
                     LAYER: tl.constexpr, E: tl.constexpr):
    # program: one batch element, its H * NQB (head, q-block) pairs in registers (flat index h * NQB + i)
    b = tl.program_id(0).to(tl.int64)
    n = H * NQB
    e = tl.arange(0, E)
    ok = e < n
    h = e // NQB
    i = e % NQB
    c = tl.load(CH + b * n + e, mask=ok, other=0.0)
    score = c / tl.maximum(tl.sum(c, 0) / n, 1e-12, propagate_nan=tl.PropagateNan.ALL)   # NaN stays, as in torch
    if TG:
        # FlashOmni's text-guidance score: the pair's pooled mass on text kv-blocks, plus (equal blocks)
        # the mass text q-blocks put on the kv-block of the same index
        row = ((b * H + h) * NQB + i) * NKB
        g = tl.zeros([E], dtype=tl.float32)
        for j in range(tk_lo, tk_hi):
            g += tl.load(P + row + j, mask=ok, other=0.0)
        if CONTRIB:
            for r in range(tq_lo, tq_hi):
                g += tl.load(P + ((b * H + h) * NQB + r) * NKB + i, mask=ok & (i < NKB), other=0.0)
        score += tg_weight * g / tl.maximum(tl.sum(g, 0) / n, 1e-12, propagate_nan=tl.PropagateNan.ALL)
    text = (i >= tq_lo) & (i < tq_hi)
    # order by (value, index), as the twin's stable argsort: text rows last (+inf), NaN after them,
    # padding after everything
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(score != score, 0x7FC00000, tl.where(text, 0x7F800000, bits))
    bits = tl.where(ok, bits, 0x7FFFFFFF)
    # the k-th smallest value T: the smallest bits with k entries at or below them
    lo = 0
    hi = 0x7FFFFFFF
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        reached = tl.sum((bits <= mid).to(tl.int32), 0) >= k
        hi = tl.where(reached, mid, hi)
        lo = tl.where(reached, lo, mid + 1)
    less = bits < lo
    equal = (bits == lo).to(tl.int32)
    ties_before = tl.cumsum(equal, 0) - equal
    cache = (less | ((equal != 0) & (ties_before < k - tl.sum(less.to(tl.int32), 0)))) & ~text
    if HAS_THRESHOLD:
        cache &= c <= threshold
    keep = (ok & ~cache).to(tl.int8)
    if LAYER:
        whole = tl.sum(keep.to(tl.int32), 0).to(tl.float32) / n < layer_threshold
        keep = tl.where(whole, 0, keep).to(tl.int8)
    tl.store(KEEP + b * n + e, keep, mask=ok)


def _check_q_select(change: Tensor, scores: Optional[Tensor], k: int) -> None:
    if change.dim() != 3 or change.dtype != torch.float32:
        raise ValueError(f"q_select: change must be float32 [B, H, NQB], got {change.dtype} {tuple(change.shape)}")
    if scores is not None and (scores.dim() != 4 or scores.shape[:3] != change.shape or scores.dtype != torch.float32):
        raise ValueError(f"q_select: scores must be float32 [B, H, NQB, NKB] matching change {tuple(change.shape)}, "
                         f"got {scores.dtype} {tuple(scores.shape)}")
    if k < 0:
        raise ValueError(f"q_select: k must be >= 0, got {k}")


def q_select_ref(change: Tensor, scores: Optional[Tensor], k: int, threshold: Optional[float], text_guidance: float,
                 text_q: tuple[int, int], text_kv: tuple[int, int], contribution: bool,
                 layer_threshold: float = 0.0) -> Tensor:
    """Torch twin: ``q_keep`` bool ``[B, H, NQB]``. Per batch element, the ``k`` (head, q-block) pairs of
    lowest score are cached (``False``), where ``score = change / mean(change)`` plus, with ``scores``
    given, ``text_guidance * tg / mean(tg)`` (``tg``: the pair's pooled mass on the text kv-blocks
    ``text_kv``, plus with ``contribution`` the mass the text q-blocks put on the kv-block of the same
    index); text q-blocks (``text_q``) are never cached (``k`` larger than the other pairs caches
    those only); ties go to the lower flat index ``h * NQB + i``.
    With ``threshold`` only pairs whose ``change`` is at most it are cached; then with
    ``layer_threshold > 0`` a batch element whose kept fraction is under it is cached whole."""
    _check_q_select(change, scores, k)
    B, H, nqb = change.shape
    dev = change.device
    keep_all = torch.ones(B, H, nqb, dtype=torch.bool, device=dev)
    if k <= 0:
        return keep_all
    i = torch.arange(nqb, device=dev)
    text = (i >= text_q[0]) & (i < text_q[1])
    score = change / change.mean(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    if scores is not None:
        nkb = scores.shape[-1]
        j = torch.arange(nkb, device=dev)
        tg = (scores * ((j >= text_kv[0]) & (j < text_kv[1]))[None, None, None, :]).sum(dim=3)
        if contribution:
            tg = tg + (scores * text[None, None, :, None]).sum(dim=2)[..., :nqb]
        score = score + text_guidance * tg / tg.mean(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    score = score.masked_fill(text[None, None, :], float("inf")).reshape(B, H * nqb)
    rank = torch.empty_like(score, dtype=torch.long).scatter_(
        -1, score.argsort(dim=-1, stable=True), torch.arange(H * nqb, device=dev).expand(B, -1))
    cache = (rank < k).reshape(B, H, nqb) & ~text         # text stays computed even when k exceeds the rest
    if threshold is not None:
        cache &= change <= threshold
    return layer_granularity(~cache, layer_threshold)


def layer_granularity(q_keep: Tensor, threshold: float) -> Tensor:
    """``q_keep`` with every batch element whose kept fraction is below ``threshold`` cached whole."""
    if threshold <= 0:
        return q_keep
    whole = q_keep.float().mean(dim=(1, 2)) < threshold                # [B], stays on the device
    return q_keep & ~whole[:, None, None]


def q_select_triton(change: Tensor, scores: Optional[Tensor], k: int, threshold: Optional[float],
                    text_guidance: float, text_q: tuple[int, int], text_kv: tuple[int, int], contribution: bool,
                    layer_threshold: float = 0.0, out: Optional[Tensor] = None) -> Tensor:
    """The kernel (same contract as ``q_select_ref``): one launch, no host synchronisation; ``change`` and
    ``scores`` non-negative (NaN sorts last, as in the twin). ``out``: a contiguous bool ``[B, H, NQB]``
    to write (tests poison it), else a new one."""
    _check_q_select(change, scores, k)
    B, H, nqb = change.shape
    keep = torch.empty(change.shape, dtype=torch.bool, device=change.device) if out is None else out
    if keep.shape != change.shape or keep.dtype != torch.bool or not keep.is_contiguous():
        raise ValueError(f"q_select: out must be a contiguous bool tensor {tuple(change.shape)}")
    if k <= 0 or keep.numel() == 0:
        return keep.fill_(True)
    n = H * nqb
    nkb = 0 if scores is None else scores.shape[-1]
    e = max(16, next_power_of_2(n))
    launch(_q_select_kernel, (B,), change.contiguous(), change if scores is None else scores.contiguous(),
           keep.view(torch.int8), H, nqb, max(nkb, 1), int(k), 0.0 if threshold is None else float(threshold),
           float(text_guidance), float(layer_threshold), text_q[0], text_q[1], text_kv[0], text_kv[1],
           TG=scores is not None, CONTRIB=bool(contribution) and scores is not None,
           HAS_THRESHOLD=threshold is not None, LAYER=layer_threshold > 0, E=e,
           num_warps=max(4, min(16, e // 512)))
    return keep


def q_select(change: Tensor, scores: Optional[Tensor], k: int, threshold: Optional[float], text_guidance: float,
             text_q: tuple[int, int], text_kv: tuple[int, int], contribution: bool,
             layer_threshold: float = 0.0) -> Tensor:
    """The kernel on CUDA (and on CPU under ``FLASHOMNI_FORCE_TRITON=1``), else the torch twin."""
    impl = q_select_triton if _use_kernel(change) else q_select_ref
    return impl(change, scores, k, threshold, text_guidance, text_q, text_kv, contribution, layer_threshold)


# ---------------------------------------------------------------------------------------------------
# store_plan: the symbols, their kv-block lists, kv_need and the density parts, in one pass
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _store_plan_kernel(QK, KV, Q_OUT, KV_OUT, COUNT, INDEX, NEED, DENS, H, NQB, NKB, seq_q, seq_kv, block_q,
                       block_kv, q_norm, kv_norm, s_qb, s_qh, s_qi, s_kb, s_kh, s_ki, s_kj,
                       KV_SPARSE: tl.constexpr, ROWS: tl.constexpr, NKB_P2: tl.constexpr):
    # program: one (b, h), its NQB rows ROWS at a time; the outputs are contiguous
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = tl.arange(0, NKB_P2)
    col_ok = cols < NKB
    wk = tl.where(col_ok, tl.minimum(block_kv, seq_kv - cols * block_kv), 0).to(tl.float32)   # keys a block holds
    need = tl.zeros([NKB_P2], dtype=tl.int32)
    q_acc = tl.zeros([ROWS], dtype=tl.float32)
    kv_acc = tl.zeros([ROWS], dtype=tl.float32)
    for r0 in range(0, NQB, ROWS):
        i = r0 + tl.arange(0, ROWS)
        row_ok = i < NQB
        ok = row_ok[:, None] & col_ok[None, :]
        qk = tl.load(QK + b * s_qb + h * s_qh + i * s_qi, mask=row_ok, other=0) != 0
        kv = tl.load(KV + b * s_kb + h * s_kh + i[:, None] * s_ki + cols[None, :] * s_kj, mask=ok, other=0) != 0
        row = bh.to(tl.int64) * NQB + i                                     # flat (b, h, i)
        tl.store(Q_OUT + row, qk.to(tl.int8), mask=row_ok)
        tl.store(KV_OUT + row[:, None] * NKB + cols[None, :], kv.to(tl.int8), mask=ok)
        # lists: the kept kv-blocks in ascending order, then the others in ascending order
        kept = kv.to(tl.int32)
        count = tl.sum(kept, 1)
        before = tl.cumsum(kept, 1) - kept                                  # kept blocks before each column
        pos = tl.where(kv, before, count[:, None] + cols[None, :] - before)
        tl.store(INDEX + row[:, None] * NKB + pos, cols[None, :] + 0 * pos, mask=ok)
        tl.store(COUNT + row, count, mask=row_ok)
        # kv_need: some computed q-block of the head reads the kv-block (every one, without lists)
        if KV_SPARSE:
            need = tl.maximum(need, tl.max((kv & qk[:, None]).to(tl.int32), 0))
        else:
            need = tl.maximum(need, tl.max(qk.to(tl.int32), 0) + 0 * cols)
        # densities: queries computed, and (query, key) pairs attended to by computed q-blocks
        wq = tl.where(row_ok, tl.minimum(block_q, seq_q - i * block_q), 0).to(tl.float32)
        wq = tl.where(qk, wq, 0.0)
        q_acc += wq
        kv_acc += wq * tl.sum(tl.where(kv, wk[None, :], 0.0), 1)
    tl.store(NEED + bh.to(tl.int64) * NKB + cols, need.to(tl.int8), mask=col_ok)
    tl.store(DENS + bh * 2, tl.sum(q_acc, 0) * q_norm)
    tl.store(DENS + bh * 2 + 1, tl.sum(kv_acc, 0) * kv_norm)


def _check_plan(q_keep, kv_keep, q_out, kv_out, kv_count, kv_index, kv_need) -> None:
    B, H, nqb, nkb = kv_out.shape
    want = {"q_keep": (q_keep, (B, H, nqb), torch.bool), "kv_keep": (kv_keep, (B, H, nqb, nkb), torch.bool),
            "q_out": (q_out, (B, H, nqb), torch.bool), "kv_out": (kv_out, (B, H, nqb, nkb), torch.bool),
            "kv_count": (kv_count, (B, H, nqb), torch.int32), "kv_index": (kv_index, (B, H, nqb, nkb), torch.int32),
            "kv_need": (kv_need, (B, H, nkb), torch.bool)}
    for name, (t, shape, dtype) in want.items():
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != kv_out.device:
            raise ValueError(f"store_plan: {name} must be {dtype} {shape} on {kv_out.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    for name, t in (("q_out", q_out), ("kv_out", kv_out), ("kv_count", kv_count), ("kv_index", kv_index),
                    ("kv_need", kv_need)):
        if not t.is_contiguous():
            raise ValueError(f"store_plan: {name} must be contiguous (a persistent buffer of the runtime)")


def store_plan_ref(q_keep: Tensor, kv_keep: Tensor, q_out: Tensor, kv_out: Tensor, kv_count: Tensor,
                   kv_index: Tensor, kv_need: Tensor, seq_q: int, seq_kv: int, block_q: int, block_kv: int,
                   kv_sparse: bool) -> Tensor:
    """Torch twin. Writes ``q_out = q_keep``, ``kv_out = kv_keep`` (either may be the same tensor),
    ``(kv_count, kv_index) = symbols.kv_block_lists(kv_keep)`` and ``kv_need = symbols.kv_need(q_keep,
    kv_keep, kv_sparse)``; returns float32 ``[B * H, 2]``: per (b, h), its part of the q density
    (queries computed / ``seq_q * B * H``) and of the kv density ((query, key) pairs that computed
    q-blocks attend to / ``seq_q * seq_kv * B * H``), so that ``dens.sum(0)`` is
    ``(SparseSymbols.q_density(), SparseSymbols.kv_density())``."""
    _check_plan(q_keep, kv_keep, q_out, kv_out, kv_count, kv_index, kv_need)
    B, H, nqb, nkb = kv_out.shape
    if q_keep is not q_out:
        q_out.copy_(q_keep)
    if kv_keep is not kv_out:
        kv_out.copy_(kv_keep)
    torch.sum(kv_out, dim=-1, dtype=torch.int32, out=kv_count)
    kv_index.copy_(torch.sort(torch.logical_not(kv_out).view(torch.uint8), dim=-1, stable=True).indices)
    kv_need_of(q_out, kv_out, kv_sparse, out=kv_need)
    wq = _block_weights(seq_q, block_q, kv_out.device)
    wk = _block_weights(seq_kv, block_kv, kv_out.device)
    qw = q_out.to(torch.float32) * wq                                        # [B, H, NQB]
    keys = torch.matmul(kv_out.to(torch.float32), wk)                        # keys seen per query
    q_part = qw.sum(-1).reshape(-1) / max(1, seq_q * B * H)
    kv_part = (qw * keys).sum(-1).reshape(-1) / max(1, seq_q * seq_kv * B * H)
    return torch.stack([q_part, kv_part], dim=1)


def store_plan_triton(q_keep: Tensor, kv_keep: Tensor, q_out: Tensor, kv_out: Tensor, kv_count: Tensor,
                      kv_index: Tensor, kv_need: Tensor, seq_q: int, seq_kv: int, block_q: int, block_kv: int,
                      kv_sparse: bool) -> Tensor:
    """The kernel (same contract as ``store_plan_ref``): one launch, no host synchronisation."""
    _check_plan(q_keep, kv_keep, q_out, kv_out, kv_count, kv_index, kv_need)
    B, H, nqb, nkb = kv_out.shape
    if B * H == 0 or nqb == 0 or nkb == 0:        # nothing to launch over: the twin handles the empty shapes
        return store_plan_ref(q_keep, kv_keep, q_out, kv_out, kv_count, kv_index, kv_need, seq_q, seq_kv,
                              block_q, block_kv, kv_sparse)
    dens = torch.empty(B * H, 2, dtype=torch.float32, device=kv_out.device)
    nkb_p2 = max(16, next_power_of_2(nkb))
    rows = max(1, min(next_power_of_2(nqb), _PLAN_TILE // nkb_p2))
    launch(_store_plan_kernel, (B * H,), q_keep.view(torch.int8), kv_keep.view(torch.int8), q_out.view(torch.int8),
           kv_out.view(torch.int8), kv_count, kv_index, kv_need.view(torch.int8), dens, H, nqb, nkb, seq_q, seq_kv,
           block_q, block_kv, 1.0 / max(1, seq_q * B * H), 1.0 / max(1, seq_q * seq_kv * B * H),
           *q_keep.stride(), *kv_keep.stride(), KV_SPARSE=bool(kv_sparse), ROWS=rows, NKB_P2=nkb_p2,
           num_warps=_PLAN_WARPS)
    return dens


def store_plan(q_keep: Tensor, kv_keep: Tensor, q_out: Tensor, kv_out: Tensor, kv_count: Tensor, kv_index: Tensor,
               kv_need: Tensor, seq_q: int, seq_kv: int, block_q: int, block_kv: int, kv_sparse: bool) -> Tensor:
    """The kernel on CUDA (and on CPU under ``FLASHOMNI_FORCE_TRITON=1``), else the torch twin."""
    impl = store_plan_triton if _use_kernel(kv_out) else store_plan_ref
    return impl(q_keep, kv_keep, q_out, kv_out, kv_count, kv_index, kv_need, seq_q, seq_kv, block_q, block_kv,
                kv_sparse)
