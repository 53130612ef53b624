"""What the ``flashomni::site_*`` ops do at run time: the update/dispatch engine.

Contract (kept by every version of this file):

* ``attention(site, anchor, q, k, v, key_padding_mask, scale) -> out``: ``q [B, H, Nq, D]``,
  ``k, v [B, H, Nkv, D]``; returns ``[B, H, Nq, D]`` in memory order ``[B, Nq, H, D]`` (the fake of
  ``site_attention`` promises that layout).
* ``linear_q(site, anchor, x, weight, bias, row_offset, sparse_cols) -> y``: the Q (or fused QKV)
  projection ``[B, M, N]``; rows ``row_offset ...`` of the joint sequence.
* ``linear_kv(site, anchor, x, weight, bias, row_offset) -> y``: a K or V projection ``[B, M, H*D]``
  (head ``h`` at columns ``h*D ...``); rows ``row_offset ...`` of the key/value sequence.
* ``linear_o(site, anchor, a, weight, bias, row_offset, extra, extra_weight) -> y``: the output
  projection of the attention output ``a [B, M, H*D]`` (plus a dense ``extra`` K-range for
  single-stream blocks).

``site`` is the index of a registered ``SiteSpec``; ``anchor`` is a weight tensor of the site that
differs per layer at run time (its ``data_ptr`` keys the per-layer state).
No host syncs and no data-dependent allocation on dispatch steps.

Per layer and step the calls come as ``linear_q`` / ``linear_kv`` (0..n calls each, one per stream and
tensor, in any order) -> ``attention`` -> ``linear_o`` (0..n calls). The controller
(``controller.begin_pass``) fixes the pass's step and kind at its first call (the first ``linear_q`` or
``linear_kv`` after the layer's previous ``attention``, else ``attention``), so a pass counts one step
whatever the order of its projections:

* **update** (plan): ``linear_q`` and ``linear_kv`` dense; ``attention`` runs dense SDPA (with
  ``sparse_updates``, a scheduled refresh runs the sparse kernel on the kv-block lists in force, every
  q-block computed), pools Q/K per block, asks the policy and the symbol hooks for new symbols, stores
  them in place with their kv-block lists and ``kv_need``, and refreshes the feature cache's Taylor
  terms; ``linear_o`` projects each Taylor term's cached heads once (``out_proj_cache``) and returns
  ``C0 + projection of the computed heads``, i.e. the dense projection of the attention output.
* **dispatch** (run): ``linear_q`` computes only the kept (q-block, head) tiles; ``linear_kv`` only the
  (kv-block, head) tiles some computed q-block attends to (``BranchState.kv_need``, the GEMM-Q kernel
  gated per kv-block; the others are zeros, never read); ``attention`` runs the sparse kernel on the
  stored lists, cached q-blocks taking ``cache(t)`` (the kernel evaluates the Taylor series from the
  cache's terms, for the cached rows only); ``linear_o`` reduces over the computed heads only, on top of
  ``C(t) = C0 + delta C1 + delta^2/2 C2``. Nothing reads device data on the host; the only
  allocations are the ops' fixed-shape outputs.

Sites whose options are ``None`` (or the dense policy with no hook) run the dense path, untouched.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.attention import gluon_takes
from ..kernels.ops import sparse_attention_op, sparse_linear_o_op, sparse_linear_q_op
from ..symbols import SparseSymbols, validate_symbols
from .cache import FeatureCache, order_within_cap
from .controller import begin_pass, in_last_dense, step_kind
from .hooks import _HOOKS, apply_symbol_hooks, symbol_hooks
from .options import RuntimeOptions, resolve_options
from .policies import DensePolicy, PolicyContext, get_policy, pooled_scores
from .spec import SiteSpec, get_site, layer_site
from .state import _STATES, DISPATCH, UPDATE, BranchState, LayerState, Pass, layer_state, reset_state

__all__ = ["attention", "linear_q", "linear_kv", "linear_o", "reset", "set_runtime_options",
           "runtime_options_override"]


def _bnhd(out: Tensor) -> Tensor:
    """Return ``out [B, H, N, D]`` with memory order ``[B, N, H, D]`` (copy only if it is not)."""
    if out.transpose(1, 2).is_contiguous():
        return out
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _dense_attention(q, k, v, key_padding_mask, scale) -> Tensor:
    """The fastest dense attention: SDPA, except with a key padding mask on a call the Gluon kernel takes.
    SDPA then cannot use its flash path and cuDNN reads the mask as a bias: 32.6 ms against 22.3 without
    it on an H200 ([1, 24, 33536, 128] bf16, 64 padded keys), where our kernel masks only the tiles of the
    blocks that hold a padded key (benchmarks/NOTES.md, session 8: a probe; ``benchmarks/bench_padding.py``
    measures it)."""
    if key_padding_mask is not None and gluon_takes(q, k, v):
        out, _ = sparse_attention_op(q, k, v, None, None, None, None, key_padding_mask, float(scale), 128, 128,
                                     None, None, 0.0)
        return out
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return _bnhd(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))


def _add_extra(y: Tensor, extra: Optional[Tensor], extra_weight: Optional[Tensor]) -> Tensor:
    """``y + extra @ extra_weight.T`` (the dense MLP K-range of a single-stream block) through cuBLAS,
    accumulated onto ``y`` in the GEMM's epilogue (``addmm_``, beta = 1): no second output and no add
    pass. ``y`` is a fresh output of the caller, so writing it in place is safe."""
    if extra is None:
        return y
    if y.is_contiguous() and y.dtype == extra.dtype == extra_weight.dtype:
        y.view(-1, y.shape[-1]).addmm_(extra.reshape(-1, extra.shape[-1]), extra_weight.t())
        return y
    return y + F.linear(extra, extra_weight)


def _dense_linear_o(a, weight, bias, extra, extra_weight) -> Tensor:
    return _add_extra(F.linear(a, weight, bias), extra, extra_weight)


# ---------------------------------------------------------------------------------------------------
# Site configuration (resolved once per site index)
# ---------------------------------------------------------------------------------------------------
# site -> (spec, options or None, policy or None, dense-unless-a-hook-is-registered, always dense)
_SITE_CFG: dict[int, tuple[SiteSpec, Optional[RuntimeOptions], Any, bool, bool]] = {}
# set_runtime_options: replaces every flashomni site's compile-time run-time options (None: not set)
_OVERRIDE: Optional[RuntimeOptions] = None


def set_runtime_options(options: Any = None) -> None:
    """Replace the run-time options (policy, schedule, cache, hook, ...) of every site compiled by the
    flashomni backend, without recompiling: the graph carries only site indices, so the next forward
    reads the new options. ``options`` is a dict of run-time keys (validated like ``options=`` of
    ``torch.compile``; compile-side keys such as ``inner_backend`` are refused) or a ``RuntimeOptions``;
    ``None`` returns to the options each site was compiled with. All run-time state (symbols, caches,
    step counters, statistics) is dropped, as by ``reset_runtime()``.

        compiled = torch.compile(model, backend="flashomni")
        for tau in (0.1, 0.2, 0.3):
            flashomni_compile.set_runtime_options({"policy": "pooled_qk", "policy_args": {"tau_kv": tau}})
            run(compiled)                                  # no recompilation between settings
    """
    global _OVERRIDE
    _OVERRIDE = None if options is None else RuntimeOptions.from_dict(options)
    reset()


def runtime_options_override() -> Optional[RuntimeOptions]:
    """The options set by ``set_runtime_options`` (None when the compile-time options apply)."""
    return _OVERRIDE


def _site_cfg(site: int) -> tuple[SiteSpec, Optional[RuntimeOptions], Any, bool, bool]:
    cfg = _SITE_CFG.get(site)
    if cfg is None:
        spec = get_site(site)
        opts = resolve_options(spec.options)
        if opts is not None and _OVERRIDE is not None:
            opts = _OVERRIDE
        if opts is not None:
            opts = opts.for_site(spec.name)
            policy = get_policy(opts.policy, **opts.policy_args)
        else:
            policy = None
        dense_policy = opts is not None and isinstance(policy, DensePolicy) and opts.symbol_hook is None
        cfg = _SITE_CFG[site] = (spec, opts, policy, dense_policy, opts is None)
    return cfg



def reset() -> None:
    """Forget all run-time state: per-layer symbols and caches, step counters, statistics, resolved options
    (an override from ``set_runtime_options`` stays in force), and every captured CUDA graph."""
    global _EPOCH
    reset_state()
    _SITE_CFG.clear()
    _EPOCH += 1


def epoch() -> int:
    """Bumped by every ``reset`` (and ``set_runtime_options``): CUDA graphs captured before are stale."""
    return _EPOCH


def _state(site: int, anchor: Tensor) -> Optional[LayerState]:
    # Runs on every site call: one dict lookup for the resolved site, one for the layer. Registered
    # hooks are read live (a hook registered later makes a dense-policy site take the engine path).
    spec, opts, policy, dense_policy, always_dense = _site_cfg(site)
    if always_dense or (dense_policy and not _HOOKS):
        return None
    key = (layer_site(site), anchor.data_ptr())
    if _TOUCHED is not None:
        _TOUCHED.append(key)
    st = _STATES.get(key)
    return st if st is not None else layer_state(key[0], anchor, spec, opts, policy)


# Hooks of the CUDA-graph step runner (runtime/graphs.py), None when it is not watching:
# _TOUCHED receives the key of every layer state a call touches; while a call is captured, _STATS_LOG
# receives the statistics calls instead of the statistics (the runner applies them after each replay)
# and no host time is taken (a capture's host time is not a step's).
_TOUCHED: Optional[list] = None
_STATS_LOG: Optional[list] = None
_EPOCH = 0   # bumped by reset(): captured graphs refer to state tensors that a reset drops


def _stat(st: LayerState, name: str, *args) -> None:
    if _STATS_LOG is not None:
        _STATS_LOG.append((st.stats, name, args))
    else:
        getattr(st.stats, name)(*args)


def _timed(st: LayerState, kind: str, t0: float, device: torch.device) -> None:
    if _STATS_LOG is not None:
        return
    if st.options.timing and device.type == "cuda":
        torch.cuda.synchronize(device)
    st.stats.add_time(kind, time.perf_counter() - t0)


def _start(st: LayerState, device: torch.device) -> float:
    if st.options.timing and device.type == "cuda" and _STATS_LOG is None:
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _sparse_gemm_pays(st: LayerState, x: Tensor, n: int, gemm_o: bool = False) -> bool:
    """Whether a projection of ``x [B, M, K]`` onto ``n`` head-sparse columns is big enough for the sparse
    GEMM kernels: ``RuntimeOptions.sparse_gemm_min_macs`` multiply-adds, and for GEMM-O also
    ``sparse_gemm_o_min_macs``; host ints only."""
    B, M, K = x.shape
    floor = st.options.sparse_gemm_min_macs
    if gemm_o:
        floor = max(floor, st.options.sparse_gemm_o_min_macs)
    return B * M * K * n >= floor


def _final_update(st: LayerState, p: Pass) -> bool:
    """Whether ``p`` is one of the ``last_dense`` steps of a known total: every later step of the
    generation is a dense update and the next generation starts afresh, so nothing reads what a
    refresh would make there (symbols, feature cache, GEMM-O terms): the step runs dense only."""
    return p.kind == UPDATE and in_last_dense(p.step, p.total, st.options)


def _feeds_dispatch(st: LayerState, p: Pass) -> bool:
    """Whether the step after update ``p`` is a dispatch step, the only reader of GEMM-O's ``C0..Ck``
    (the warm-up updates before the first scheduled one do not project them)."""
    nxt = p.step + 1
    if p.total is not None and nxt >= p.total:
        return False
    return step_kind(nxt, p.total, st.options) == DISPATCH


def _projection_pass(st: LayerState, x: Tensor):
    """The pass a projection call (``linear_q`` / ``linear_kv``) belongs to: the first projection after the
    layer's previous ``attention`` begins it, the others (and ``attention``) join it."""
    if st.attn_done:
        begin_pass(st, (x.shape[0], x.dtype, x.device))
        st.attn_done = False
    return st.current


# ---------------------------------------------------------------------------------------------------
# The site functions
# ---------------------------------------------------------------------------------------------------
def _gated_projection(site: int, anchor: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      row_offset: int, cols: Optional[int], gate) -> Tensor:
    """``linear(x, weight, bias)``, at dispatch steps (with sparse q) on the GEMM-Q kernel: output tile
    (rows of block ``j``, head ``h``) computed iff ``gate_tensor[b, h, j]``, zeros elsewhere, where
    ``gate(br) -> (gate_tensor, block)``; the first ``cols`` columns are gated (None: the site's
    ``H*D``), the rest dense."""
    st = _state(site, anchor)
    if st is None:
        return F.linear(x, weight, bias)
    t0 = _start(st, x.device)
    p = _projection_pass(st, x)
    br = p.branch
    if cols is None:
        cols = st.spec.heads * st.spec.head_dim
    if p.kind == DISPATCH and br.q_sparse and _sparse_gemm_pays(st, x, cols):
        keep, block = gate(br)
        y = sparse_linear_q_op(x, weight, bias, keep, st.spec.head_dim, row_offset, block, cols)
    else:
        y = F.linear(x, weight, bias)
    _timed(st, p.kind, t0, x.device)
    return y


def linear_q(site: int, anchor: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
             row_offset: int, sparse_cols: int) -> Tensor:
    """Q (or fused QKV) projection: at dispatch steps only the kept (q-block, head) tiles of the first
    ``sparse_cols`` columns are computed."""
    return _gated_projection(site, anchor, x, weight, bias, row_offset, sparse_cols,
                             lambda br: (br.symbols.q_keep, br.symbols.block_q))


def linear_kv(site: int, anchor: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
              row_offset: int) -> Tensor:
    """K or V projection: at dispatch steps (with sparse q) only the tiles (rows of kv-block ``j``, head
    ``h``) with ``kv_need[b, h, j]`` are computed, zeros elsewhere; dense otherwise."""
    return _gated_projection(site, anchor, x, weight, bias, row_offset, None,
                             lambda br: (br.kv_need, br.symbols.block_kv))


def attention(site: int, anchor: Tensor, q: Tensor, k: Tensor, v: Tensor,
              key_padding_mask: Optional[Tensor], scale: float) -> Tensor:
    st = _state(site, anchor)
    if st is None:
        return _dense_attention(q, k, v, key_padding_mask, scale)
    t0 = _start(st, q.device)
    if st.attn_done:       # no linear_q / linear_kv in this site (none fused): the pass begins here
        begin_pass(st, (q.shape[0], q.dtype, q.device))
    p = st.current
    if _final_update(st, p):
        out = _dense_attention(q, k, v, key_padding_mask, scale)
        _stat(st, "count_update", False)
    elif p.kind == UPDATE:
        out, sparse = _attention_update(st, p.branch, p.step, p.total, q, k, v, key_padding_mask, scale)
        _stat(st, "count_update", sparse)
    else:
        out = _attention_dispatch(st, p.branch, p.step, q, k, v, key_padding_mask, scale)
        _stat(st, "count_dispatch", p.branch is st.branches[0])
    st.attn_done = True
    _timed(st, p.kind, t0, q.device)
    return out


def linear_o(site: int, anchor: Tensor, a: Tensor, weight: Tensor, bias: Optional[Tensor], row_offset: int,
             extra: Optional[Tensor], extra_weight: Optional[Tensor]) -> Tensor:
    st = _state(site, anchor)
    if st is None or st.current is None or not st.attn_done:
        return _dense_linear_o(a, weight, bias, extra, extra_weight)
    t0 = _start(st, a.device)
    p = st.current
    br = p.branch
    head_dim, sym = st.spec.head_dim, br.symbols
    if not br.q_sparse or br.cache is None or not _sparse_gemm_pays(st, a, weight.shape[0], gemm_o=True):
        # dense: also right at dispatch steps, where ``a``'s cached rows hold the feature cache
        y = _dense_linear_o(a, weight, bias, extra, extra_weight)
    elif p.kind == UPDATE and not _feeds_dispatch(st, p):
        # the next step updates again: nobody reads C0..Ck, so no projection (``has_out`` is False until
        # an update projects them); the buffers are reserved all the same, for the memory plan
        br.cache.reserve_out(row_offset, weight, a)
        y = _dense_linear_o(a, weight, bias, extra, extra_weight)
        st.stats.cache_bytes = _cache_bytes(st)
    elif p.kind == UPDATE:
        # C0 over the cached heads (+ bias), C1.. for the Taylor terms, written into the cache's buffers.
        c0 = br.cache.project(row_offset, weight, bias, sym.q_keep, a, head_dim, sym.block_q)
        if extra is None:
            # the computed heads on top of C0 make the dense result: the two Triton passes together
            # are one dense GEMM, vs cuBLAS dense + the C0 pass again (better only below ~25% cached)
            y = sparse_linear_o_op(a, weight, c0, sym.q_keep, None, None, head_dim, row_offset, sym.block_q)
        else:
            # single-stream: the dense MLP K-range (4x the attention width in Flux) dominates; one cuBLAS
            # projection of everything beats carrying it through the Triton GEMM-O (~0.75x cuBLAS)
            y = _dense_linear_o(a, weight, bias, extra, extra_weight)
        st.stats.cache_bytes = _cache_bytes(st)
    elif br.cache.has_out(row_offset):
        c = br.cache.out_at(row_offset, p.step)
        y = sparse_linear_o_op(a, weight, c, sym.q_keep, None, None, head_dim, row_offset, sym.block_q)
        y = _add_extra(y, extra, extra_weight)      # the dense K-range through cuBLAS, not the Triton kernel
    else:  # a call the update step did not see: the dense projection of ``a`` is always right
        y = _dense_linear_o(a, weight, bias, extra, extra_weight)
    _timed(st, p.kind, t0, a.device)
    return y


# ---------------------------------------------------------------------------------------------------
# Update step (plan)
# ---------------------------------------------------------------------------------------------------
def _device_memory(device: torch.device) -> Optional[tuple[int, int]]:
    """(bytes a new cache may take, device total): free in the driver plus what PyTorch's allocator holds
    unused; None off CUDA. A driver query, no stream sync; asked once per branch, at its first update."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total


def _cache_order(br: BranchState, want: int, opts: RuntimeOptions, device: torch.device, term: int,
                 out_term: int) -> int:
    """The feature-cache order of ``br`` at this update (-1: no cache); ``want`` is what the options and
    ``cache_cap_mb`` allow. Without a memory check (``cache_min_free=None``, or off CUDA) it is ``want``.

    With it, memory is planned in two phases, so that a model whose caches do not all fit degrades evenly
    instead of its last layers losing theirs (full-size HunyuanVideo at order 1: 13 of 60 layers did, when
    each layer took the highest order that fitted at its first update): at a branch's first update it takes
    order 0 if that fits (else no cache, asked again at the next update); at its second update, when every
    layer of the model has taken its order-0 buffers, it rises towards ``want`` as far as the free memory
    (plus the buffers it holds) allows. After that the order stays (``FeatureCache.planned``): one driver
    query per branch and phase, none at dispatch steps."""
    cache = br.cache
    if cache is not None and (cache.planned or cache.order >= want):
        return min(want, cache.order)
    mem = None if opts.cache_min_free is None else _device_memory(device)
    if mem is None:
        return want if cache is None else cache.order
    available, capacity = mem
    room = available - opts.cache_min_free * capacity
    if cache is None:
        return order_within_cap(0, room, term, out_term)
    cache.planned = True
    return max(cache.order, order_within_cap(want, room + cache.nbytes(), term, out_term))


def _cache_bytes(st: LayerState) -> int:
    return sum(b.cache.nbytes() for b in st.branches if b.cache is not None)


def _sparse_update(st: LayerState, br: BranchState, step: int, total: Optional[int]) -> bool:
    """Whether this update's attention runs on the kv-blocks in force (option ``sparse_updates``): only
    for scheduled refreshes (not warm-up, not the ``last_dense`` steps) of a branch that skips kv-blocks
    and has symbols from an earlier update of this generation."""
    opts = st.options
    if not opts.sparse_updates or not br.kv_sparse or br.symbols is None or br.last_update is None:
        return False
    return step >= opts.warmup and not in_last_dense(step, total, opts)


def _attention_update(st: LayerState, br: BranchState, step: int, total: Optional[int], q: Tensor, k: Tensor,
                      v: Tensor, key_padding_mask: Optional[Tensor], scale: float) -> tuple[Tensor, bool]:
    """The update step's attention output and whether it ran sparse (``_sparse_update``); refreshes the
    branch's symbols, kv-block lists and feature cache."""
    opts, spec = st.options, st.spec
    B, H, Nq, D = q.shape
    Nkv = k.shape[2]
    bq, bkv = opts.block_q, opts.block_kv
    signature = (B, q.dtype, q.device)
    if br.signature != signature or br.symbols is None or br.symbols.seq_q != Nq or br.symbols.seq_kv != Nkv:
        br.symbols, br.cache, br.last_update = None, None, None
    sparse = _sparse_update(st, br, step, total)
    if sparse:
        # every q-block computed, on the kv-block lists of the symbols in force (rebuilt below, after use)
        out, _ = sparse_attention_op(q, k, v, None, br.kv_count, br.kv_index, None, key_padding_mask, float(scale),
                                     br.symbols.block_q, br.symbols.block_kv, None, None, 0.0)
    else:
        out = _dense_attention(q, k, v, key_padding_mask, scale)
    pq, pk, scores = pooled_scores(q, k, key_padding_mask, scale, bq, bkv)
    hooks = symbol_hooks(opts.symbol_hook)
    caches_q = bool(getattr(st.policy, "caches_q", True)) or bool(hooks)
    skips_kv = bool(getattr(st.policy, "skips_kv", True)) or bool(hooks)

    # Feature-cache order within the memory cap (GEMM-O terms estimated at H*D output features).
    if caches_q:
        esize = q.element_size()
        term = B * H * Nq * D * esize
        out_term = B * Nq * H * D * esize if "gemm_o" in spec.pieces else 0
        cap = None if opts.cache_cap_mb is None else opts.cache_cap_mb * 2**20
        order = order_within_cap(opts.taylor_order, cap, term, out_term)
        if order >= 0:
            order = _cache_order(br, order, opts, q.device, term, out_term)
        caches_q = order >= 0
        if caches_q and (br.cache is None or order < br.cache.order):
            br.cache = FeatureCache(order)
        elif caches_q and order > br.cache.order:
            br.cache.raise_order(order)
    if not caches_q:
        br.cache = None

    prev_out = br.cache.terms[0] if (br.cache is not None and br.cache.updates > 0) else None
    ctx = PolicyContext(spec=spec, step=step, total=total, block_q=bq, block_kv=bkv, pooled_q=pq, pooled_k=pk,
                        scores=scores, out=out, seq_kv=Nkv, prev_out=prev_out,
                        steps_since_update=None if br.last_update is None else step - br.last_update,
                        prev_symbols=br.symbols)
    if prev_out is not None:
        cache_ = br.cache
        ctx._refresh = lambda: cache_.refresh(out, step, bq)
    try:
        sym = st.policy(ctx)
        if not isinstance(sym, SparseSymbols):
            raise TypeError(f"policy {type(st.policy).__name__} returned {type(sym).__name__}; it must return "
                            "SparseSymbols (use ctx.symbols(q_keep, kv_keep) or ctx.dense())")
        try:
            validate_symbols(sym.q_keep, sym.kv_keep, Nq, Nkv, bq, bkv, batch=B, heads=H, device=q.device)
        except ValueError as e:
            raise ValueError(f"policy {type(st.policy).__name__} on site {spec.name!r}: {e}") from None
        if (sym.block_q, sym.block_kv) != (bq, bkv):
            raise ValueError(f"policy {type(st.policy).__name__} returned symbols with blocks ({sym.block_q}, "
                             f"{sym.block_kv}); the site uses ({bq}, {bkv})")
        if hooks:
            sym = apply_symbol_hooks(hooks, spec, step, scores, sym)
        if not caches_q:  # no cache to take rows from (policy never caches, or over the memory cap)
            sym = SparseSymbols(torch.ones_like(sym.q_keep), sym.kv_keep, Nq, Nkv, bq, bkv)
    except BaseException:
        if br.cache is not None and br.cache.refreshed_step == step:
            br.cache.reset()   # the refresh formed this step's D1/D2 but D0 stays old: drop the history
        raise

    densities = br.store_symbols(sym, kv_sparse=skips_kv)
    br.signature = signature
    br.q_sparse, br.kv_sparse = caches_q, skips_kv
    if br.cache is not None:
        # the policy's change metric already formed out - D0 (float32): the cache reuses it
        br.cache.update(out, step, diff=ctx._diff if prev_out is not None else None)
    br.last_update = step

    if br is st.branches[0]:
        _stat(st, "record_update", densities)
        st.stats.cache_order = -1 if br.cache is None else br.cache.active_order
    st.stats.cache_bytes = _cache_bytes(st)
    return out, sparse


# ---------------------------------------------------------------------------------------------------
# Dispatch step (run): no host sync, no data-dependent allocation
# ---------------------------------------------------------------------------------------------------
def _attention_dispatch(st: LayerState, br: BranchState, step: int, q: Tensor, k: Tensor, v: Tensor,
                        key_padding_mask: Optional[Tensor], scale: float) -> Tensor:
    if not br.q_sparse and not br.kv_sparse:
        return _dense_attention(q, k, v, key_padding_mask, scale)
    sym = br.symbols
    q_keep = sym.q_keep if br.q_sparse else None
    # cached rows: the kernel evaluates the Taylor series from the terms, for the cached q-blocks only
    d0, d1, d2, delta = br.cache.dispatch_terms(step) if br.q_sparse else (None, None, None, 0.0)
    kv_count, kv_index = (br.kv_count, br.kv_index) if br.kv_sparse else (None, None)
    out, _ = sparse_attention_op(q, k, v, q_keep, kv_count, kv_index, d0, key_padding_mask, float(scale),
                                 sym.block_q, sym.block_kv, d1, d2, delta)
    return out
