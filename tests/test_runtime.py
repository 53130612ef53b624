"""The run-time engine driven directly (no torch.compile): schedule, update/dispatch semantics, feature
cache and GEMM-O consistency, per-layer state, dispatch-step hygiene (no sync, no allocation in the state).

Float64 inputs make the sparse references exact, so dispatch steps are checked against an independent
computation of DESIGN.md section 2's reference semantics to 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from flashomni_compile.kernels.attention import sparse_attention_ref
from flashomni_compile.runtime import engine
from flashomni_compile.runtime.controller import clear_step, set_step
from flashomni_compile.runtime.hooks import register_symbol_hook
from flashomni_compile.runtime.policies import FlashOmniPolicy
from flashomni_compile.runtime.state import all_layer_states
from flashomni_compile.symbols import kv_block_lists

from _runtime_util import Layer, dense_forward, forward, fresh_runtime, inputs, make_site, rel  # noqa: F401

TOL64 = 1e-10
STEPS = 10
# An aggressive schedule and policy so that dispatch steps really skip and cache. Update steps dense
# (``sparse_updates=False``, not the default) so that they can be checked against plain SDPA; the sparse
# update steps have their own tests below.
SPARSE = dict(block_q=32, block_kv=32, warmup=2, interval=3, last_dense=1, total_steps=STEPS, sparse_updates=False,
              policy="flashomni", policy_args=dict(tau_kv=0.3, cache_fraction=0.5, layer_threshold=0.0))


def _state(site, layer, branch=0):
    st = engine._state(site, layer.anchor)
    return st, st.branches[branch]


def _kinds(site, layer, steps, x_of=inputs, **kw):
    """Run ``steps`` forwards; return [(kind, trace, dense trace)]."""
    out = []
    for s in range(steps):
        x = x_of(s)
        tr = forward(site, layer, x, **kw)
        out.append((engine._state(site, layer.anchor).current.kind, tr, dense_forward(layer, x, kw.get("kpm"))))
    return out


# ---------------------------------------------------------------------------------------------------
# Full density = dense
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [None, {"policy": "dense"}, {"policy": "dense", "block_q": 32}])
def test_dense_policy_equals_sdpa_every_step(options):
    site = make_site(options)
    L = Layer.random(dtype=torch.float32)
    kpm = torch.ones(1, 200, dtype=torch.bool)
    kpm[:, 180:] = False
    for s in range(6):
        x = inputs(s, dtype=torch.float32)
        tr, ref = forward(site, L, x, kpm=kpm), dense_forward(L, x, kpm)
        assert torch.equal(tr.out, ref.out) and torch.equal(tr.y, ref.y)
        assert tr.out.transpose(1, 2).is_contiguous()      # the [B, N, H, D] memory-order promise


def _noop_hook(spec, step, scores, symbols):
    return None     # a hook forces the sparse kernels on (the engine cannot know it keeps everything)


@pytest.mark.parametrize("policy,args", [("flashomni", dict(tau_kv=0.0, cache_fraction=0.0, layer_threshold=0.0)),
                                         ("pooled_qk", dict(tau_kv=0.0)), ("qcache", dict(fraction=0.0))])
@pytest.mark.parametrize("through_kernels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thresholds_zero_equal_dense(policy, args, through_kernels, dtype):
    site = make_site(dict(SPARSE, policy=policy, policy_args=args, taylor_order=1,
                          symbol_hook=_noop_hook if through_kernels else None))
    L = Layer.random(dtype=dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    runs = _kinds(site, L, STEPS, x_of=lambda s: inputs(s, dtype=dtype))
    assert {k for k, _, _ in runs} == {"update", "dispatch"}
    for kind, tr, ref in runs:
        assert rel(tr.out, ref.out) < tol, kind
        assert rel(tr.y, ref.y) < tol, kind
    _, br = _state(site, L)
    assert br.symbols.q_keep.all() and br.symbols.kv_keep.all()
    assert br.q_sparse == through_kernels and br.kv_sparse == through_kernels


# ---------------------------------------------------------------------------------------------------
# Update steps = dense; dispatch steps = the reference semantics with the stored symbols + cache
# ---------------------------------------------------------------------------------------------------
def _taylor(history, step, order):
    """Independent TaylorSeer extrapolation from [(step, output)] of the updates so far."""
    (s0, f0) = history[-1]
    k = min(order, len(history) - 1)
    if k == 0:
        return f0
    d = s0 - history[-2][0]
    d1 = (f0 - history[-2][1]) / d
    delta = step - s0
    if k == 1:
        return f0 + delta * d1
    s2, f2 = history[-3]
    d1_prev = (history[-2][1] - f2) / (history[-2][0] - s2)
    d2 = (d1 - d1_prev) / d
    return f0 + delta * d1 + delta * delta / 2 * d2


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("head_dim,text_first", [(64, True), (72, False)])
def test_update_dense_and_dispatch_reference(order, head_dim, text_first):
    H, T = 2, 40
    site = make_site(dict(SPARSE, taylor_order=order, interval=2, warmup=1), head_dim=head_dim,
                     text_first=text_first)
    L = Layer.random(head_dim=head_dim)
    # text rows are the text stream only when text comes first; otherwise use one stream
    streams = text_first
    history, seen_sparse = [], False
    for s in range(STEPS):
        x = inputs(s, width=H * head_dim)
        tr, ref = forward(site, L, x, streams=streams), dense_forward(L, x, streams=streams)
        st, br = _state(site, L)
        kind = st.current.kind
        if kind == "update":
            assert torch.equal(tr.out, ref.out)
            assert rel(tr.y, ref.y) < TOL64
            history.append((s, tr.out.clone()))
            continue
        sym = br.symbols
        seen_sparse |= bool((~sym.q_keep).any()) and bool((~sym.kv_keep).any())
        cache = _taylor(history, s, order)
        count, index = kv_block_lists(sym.kv_keep)
        q_ref = ref.q.clone()
        want, _ = sparse_attention_ref(q_ref, tr.k, tr.v, sym.q_keep, count, index, cache, None, head_dim ** -0.5,
                                       32, 32)
        assert rel(tr.out, want) < TOL64
        # GEMM-Q computed exactly the kept tiles (the others are never read by attention)
        rows = sym.q_keep.repeat_interleave(32, dim=-1)[..., :200]                  # [B, H, N]
        assert torch.allclose(tr.q[rows.unsqueeze(-1).expand_as(tr.q)], ref.q[rows.unsqueeze(-1).expand_as(tr.q)])
        # GEMM-O: the projection of exactly what attention() returned
        assert rel(tr.y, dense_forward_o(L, tr.a, streams)) < TOL64
    assert seen_sparse, "the schedule/policy never produced sparse symbols: the test would prove nothing"


@pytest.mark.parametrize("order,padded", [(0, False), (1, False), (1, True)], ids=["order0", "order1", "order1-kpm"])
def test_sparse_updates(order, padded):
    """``sparse_updates``: scheduled refreshes after warm-up run attention on the kv-blocks in force with
    every q-block computed (reference: the sparse semantics with no cached block); warm-up and
    ``last_dense`` updates stay dense; the feature cache, the new symbols and GEMM-O are built from that
    output, so dispatch steps extrapolate from the sparse update outputs. ``padded``: with a key padding
    mask (HunyuanVideo's padded text), which the sparse update must apply too."""
    site = make_site(dict(SPARSE, taylor_order=order, sparse_updates=True))
    L = Layer.random()
    kpm = None
    if padded:
        kpm = torch.ones(1, 200, dtype=torch.bool)
        kpm[:, 25:40] = False                         # the text tail (text is tokens 0..39) is padding
    history, kinds, sparse_steps = [], [], []
    for s in range(STEPS):
        x = inputs(s)
        st = engine._state(site, L.anchor)
        br = st.branches[0] if st.branches else None
        before = None if br is None or br.symbols is None else br.symbols.kv_keep.clone()
        tr, ref = forward(site, L, x, kpm=kpm), dense_forward(L, x, kpm)
        st, br = _state(site, L)
        kinds.append(st.current.kind)
        assert rel(tr.y, dense_forward_o(L, tr.a, True)) < TOL64          # GEMM-O: the projection of tr.a
        if st.current.kind == "update":
            if 2 <= s < STEPS - 1:       # scheduled refresh: warm-up is steps 0-1, last_dense step 9
                assert not before.all(), "the symbols in force should skip kv-blocks for this test to bite"
                count, index = kv_block_lists(before)
                want, _ = sparse_attention_ref(ref.q, tr.k, tr.v, None, count, index, None, kpm, 64 ** -0.5, 32, 32)
                assert rel(tr.out, want) < TOL64 and rel(tr.out, ref.out) > 1e-3
                sparse_steps.append(s)
            else:
                assert torch.equal(tr.out, ref.out)
            if s < STEPS - 1:
                assert torch.equal(br.cache.terms[0], tr.out)
                history.append((s, tr.out.clone()))
            else:                        # the final step refreshes nothing (nothing reads it)
                assert torch.equal(br.cache.terms[0], history[-1][1]) and br.last_update == history[-1][0]
            continue
        sym = br.symbols
        count, index = kv_block_lists(sym.kv_keep)
        want, _ = sparse_attention_ref(ref.q, tr.k, tr.v, sym.q_keep, count, index, _taylor(history, s, order), kpm,
                                       64 ** -0.5, 32, 32)
        assert rel(tr.out, want) < TOL64
    assert sparse_steps == [2, 5, 8] and kinds.count("update") == 6
    (stats,) = engine_site_stats()
    assert (stats.updates, stats.sparse_updates) == (6, 3)
    assert "6 (3 sparse)" in __import__("flashomni_compile").stats_report()


def test_sparse_updates_need_kv_skipping():
    """A policy that never skips kv-blocks has no kv-blocks to run on: its updates stay dense."""
    site = make_site(dict(SPARSE, policy="qcache", policy_args=dict(fraction=0.5), sparse_updates=True))
    L = Layer.random()
    for s in range(STEPS):
        x = inputs(s)
        tr, ref = forward(site, L, x), dense_forward(L, x)
        if engine._state(site, L.anchor).current.kind == "update":
            assert torch.equal(tr.out, ref.out)
    (stats,) = engine_site_stats()
    assert (stats.updates, stats.sparse_updates) == (6, 0)


def engine_site_stats():
    from flashomni_compile.runtime.stats import site_stats
    return site_stats()


def dense_forward_o(L, a, streams):
    T = L.text_len
    if streams:
        return torch.cat([F.linear(a[:, :T], L.wo_txt, L.bo_txt), F.linear(a[:, T:], L.wo_img, L.bo_img)], dim=1)
    return F.linear(a, L.wo_img, L.bo_img)


@pytest.mark.parametrize("order", [0, 1])
def test_gemm_o_consistent_with_attention_output(order):
    site = make_site(dict(SPARSE, taylor_order=order, interval=4))
    L = Layer.random(dtype=torch.float32)
    n_dispatch = 0
    for kind, tr, _ in _kinds(site, L, STEPS, x_of=lambda s: inputs(s, dtype=torch.float32)):
        assert rel(tr.y, dense_forward_o(L, tr.a, True)) < 1e-5, kind
        n_dispatch += kind == "dispatch"
    assert n_dispatch >= 3
    _, br = _state(site, L)
    assert (~br.symbols.q_keep).any()
    assert br.cache.active_order == order


def _single_stream_step(site, L, x, g, mlp_w):
    """One Flux single-stream layer call set: (attention output a, MLP activations, linear_o output)."""
    B, N, _ = x.shape
    q = engine.linear_q(site, L.anchor, x, L.wq_img, L.bq_img, 0, 128)
    k, v = F.linear(x, L.wk), F.linear(x, L.wv)
    out = engine.attention(site, L.anchor, *(t.view(B, N, 2, 64).transpose(1, 2) for t in (q, k, v)), None, 0.125)
    a = out.transpose(1, 2).reshape(B, N, 128)
    mlp = torch.randn(B, N, 96, generator=g, dtype=torch.float64)
    return a, mlp, engine.linear_o(site, L.anchor, a, L.wo_img, L.bo_img, 0, mlp, mlp_w)


def test_single_stream_extra_range():
    """Flux single-stream blocks: linear_o over cat(attn, mlp) with the MLP part dense."""
    site = make_site(dict(SPARSE, taylor_order=1))
    L = Layer.random()
    g = torch.Generator().manual_seed(3)
    mlp_w = torch.randn(128, 96, generator=g, dtype=torch.float64) / 10
    for s in range(STEPS):
        x = inputs(s)
        a, mlp, y = _single_stream_step(site, L, x, g, mlp_w)
        assert rel(y, F.linear(torch.cat([a, mlp], -1), torch.cat([L.wo_img, mlp_w], 1), L.bo_img)) < TOL64


@pytest.mark.parametrize("order", [0, 1])
def test_single_stream_split_gemm_o_equals_reference(order):
    """Single-stream GEMM-O: update steps take one dense cuBLAS projection (C0.. still written into the
    cache), dispatch steps take the sparse GEMM-O over the attention heads and the dense MLP K-range
    through ``addmm_`` on top; both equal the reference ``sparse_linear_o_ref`` with the extra range."""
    from flashomni_compile.kernels.gemm_o import out_proj_cache_ref, sparse_linear_o_ref
    site = make_site(dict(SPARSE, taylor_order=order))
    L = Layer.random()
    g = torch.Generator().manual_seed(7)
    mlp_w = torch.randn(128, 96, generator=g, dtype=torch.float64) / 10
    kinds = set()
    for s in range(STEPS):
        x = inputs(s)
        a, mlp, y = _single_stream_step(site, L, x, g, mlp_w)
        st, br = _state(site, L)
        sym, kind = br.symbols, st.current.kind
        kinds.add(kind)
        if kind == "update":
            assert torch.equal(y, torch.addmm(F.linear(a, L.wo_img, L.bo_img).view(-1, 128), mlp.view(-1, 96),
                                              mlp_w.t()).view(y.shape))
            if engine._feeds_dispatch(st, st.current):
                c0 = out_proj_cache_ref(a, L.wo_img, L.bo_img, sym.q_keep, 64, 0, 32)
                assert rel(br.cache.out_terms[0][0], c0) < TOL64
            else:                    # no dispatch step follows: no projection, older terms invalid
                assert not br.cache.has_out(0)
        else:
            c = br.cache.out_terms[0][0] if br.cache.active_order == 0 else br.cache.out_buf[0]
            want = sparse_linear_o_ref(a, L.wo_img, c, sym.q_keep, mlp, mlp_w, 64, 0, 32)
            assert rel(y, want) < TOL64
    assert kinds == {"update", "dispatch"}


def test_store_symbols_lists_in_place_equal_kv_block_lists():
    from flashomni_compile.runtime.state import BranchState
    from flashomni_compile.symbols import SparseSymbols
    g = torch.Generator().manual_seed(2)
    br = BranchState()
    for i in range(3):
        kv = torch.rand(1, 2, 7, 7, generator=g) < 0.5
        br.store_symbols(SparseSymbols(torch.rand(1, 2, 7, generator=g) < 0.5, kv, 200, 200, 32, 32))
        ptrs = [t.data_ptr() for t in br.tensors()]
        if i:
            assert ptrs == first
        first = ptrs
        count, index = kv_block_lists(kv)
        assert torch.equal(br.kv_count, count) and br.kv_count.dtype == torch.int32
        assert torch.equal(br.kv_index, index) and br.kv_index.dtype == torch.int32
        assert torch.equal(br.symbols.kv_keep, kv)


def test_cache_update_with_shared_diff_equals_without():
    from flashomni_compile.runtime.cache import FeatureCache
    g = torch.Generator().manual_seed(3)
    outs = [torch.randn(1, 2, 200, 64, generator=g) for _ in range(4)]
    a, b = FeatureCache(2), FeatureCache(2)
    for s, o in zip((0, 2, 5, 6), outs):
        diff = o - a.terms[0] if a.updates else None
        a.update(o, s, diff=diff)
        b.update(o, s)
        for ta, tb in zip(a.terms[:a.active_order + 1], b.terms):
            torch.testing.assert_close(ta, tb, rtol=1e-6, atol=1e-6)
    assert a.active_order == 2


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("kernel", [False, True])
def test_cache_refresh_then_update_equals_update(order, kernel, monkeypatch):
    """``refresh`` (the fused pass the change metric calls) then ``update`` leaves the same terms as
    ``update`` alone, returns the block norms of ``out - D0`` and ``D0``, and does not touch ``D0``
    (the policy still reads it as ``prev_out``); with ``kernel`` through the Triton kernel (interpreter)."""
    from flashomni_compile.runtime.cache import FeatureCache
    from flashomni_compile.kernels.refresh import block_norm
    dev = "cuda" if kernel and torch.cuda.is_available() else "cpu"
    if kernel and dev == "cpu":
        monkeypatch.setenv("FLASHOMNI_FORCE_TRITON", "1")     # the interpreter (conftest sets it off GPUs)
    g = torch.Generator().manual_seed(4)
    outs = [torch.randn(1, 200, 2, 64, generator=g).to(dev).transpose(1, 2) for _ in range(4)]
    a, b = FeatureCache(order), FeatureCache(order)
    for s, o in zip((0, 2, 5, 6), outs):
        if a.updates:
            d0 = a.terms[0].clone()
            num, den = a.refresh(o, s, 32)
            assert torch.equal(a.terms[0], d0)
            torch.testing.assert_close(num, block_norm(o - d0, 32), rtol=1e-5, atol=0)
            torch.testing.assert_close(den, block_norm(d0, 32), rtol=1e-5, atol=0)
        else:
            with pytest.raises(RuntimeError, match="earlier update"):
                a.refresh(o, s, 32)
        a.update(o, s)
        b.update(o, s)
        for ta, tb in zip(a.terms[:a.active_order + 1], b.terms):
            torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-5)
    assert a.active_order == order


def test_policy_error_after_the_refresh_drops_the_cache_history():
    """A policy that raises after ``ctx.change()`` (whose fused refresh already wrote this step's D1) must
    not leave a torn cache: the history is dropped, so the next update starts the terms afresh."""
    class Boom:
        caches_q = skips_kv = True

        def __call__(self, ctx):
            if ctx.prev_out is not None:
                ctx.change()
                raise RuntimeError("boom")
            return ctx.dense()

    opts = {k: v for k, v in SPARSE.items() if k != "policy_args"}
    site = make_site(dict(opts, policy=Boom(), taylor_order=1))
    L = Layer.random()
    forward(site, L, inputs(0))
    st, br = _state(site, L)
    assert br.cache is not None and br.cache.updates == 1
    with pytest.raises(RuntimeError, match="boom"):
        forward(site, L, inputs(1))
    assert br.cache.updates == 0 and br.cache.refreshed_step is None


def test_attention_only_site_and_key_padding():
    """A site with no fused projections (pass begins at attention) and a key padding mask."""
    site = make_site(dict(SPARSE, taylor_order=1), pieces=("attention",))
    L = Layer.random()
    kpm = torch.ones(1, 200, dtype=torch.bool)
    kpm[:, 150:] = False
    kinds = []
    for s in range(STEPS):
        x = inputs(s)
        tr, ref = forward(site, L, x, kpm=kpm, fused=False), dense_forward(L, x, kpm)
        st, br = _state(site, L)
        kinds.append(st.current.kind)
        if st.current.kind == "update":
            assert torch.equal(tr.out, ref.out)
        else:
            sym = br.symbols
            want, _ = sparse_attention_ref(tr.q, tr.k, tr.v, sym.q_keep, *kv_block_lists(sym.kv_keep),
                                           br.cache.at(s), kpm, 0.125, 32, 32)
            assert rel(tr.out, want) < TOL64
    assert kinds == ["update", "update", "update", "dispatch", "dispatch", "update", "dispatch", "dispatch",
                     "update", "update"]


def test_dense_attention_with_padding_routes_to_the_kernel(monkeypatch):
    """With a key padding mask, the engine's dense attention goes to the sparse-attention op with no
    symbols (on Hopper when the table routes the call to the Gluon kernel: ``gluon_takes``, forced here),
    returns SDPA's result in the ``[B, N, H, D]`` memory order, and zeros for a batch row whose every key is
    padded. Without a mask it stays on SDPA."""
    calls = []
    real_op = engine.sparse_attention_op
    monkeypatch.setattr(engine, "gluon_takes", lambda q, k, v: True)
    monkeypatch.setattr(engine, "sparse_attention_op", lambda *a: calls.append(a) or real_op(*a))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 3, 32, generator=g, dtype=torch.float64).transpose(1, 2) for n in (70, 300, 300))
    kpm = torch.rand(2, 300, generator=g) < 0.7
    kpm[1] = False
    out = engine._dense_attention(q, k, v, kpm, 0.2)
    assert len(calls) == 1 and all(t is None for t in calls[0][3:7]) and calls[0][9:11] == (128, 128)
    assert out.shape == (2, 3, 70, 32) and out.transpose(1, 2).is_contiguous()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=kpm[:, None, None, :], scale=0.2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))     # SDPA: zeros or NaN, by backend and version
    assert rel(out[0], ref[0]) < TOL64
    calls.clear()
    assert rel(engine._dense_attention(q, k, v, None, 0.2), F.scaled_dot_product_attention(q, k, v, scale=0.2)) < TOL64
    assert not calls


# ---------------------------------------------------------------------------------------------------
# Per-layer state, CFG branches, steps
# ---------------------------------------------------------------------------------------------------
def test_two_anchors_keep_separate_state():
    site = make_site(dict(SPARSE, taylor_order=1))
    A, B = Layer.random(seed=0), Layer.random(seed=5)
    xa = lambda s: inputs(s, seed=1)  # noqa: E731
    xb = lambda s: inputs(s, seed=9)  # noqa: E731
    both = [(forward(site, A, xa(s)).y, forward(site, B, xb(s)).y) for s in range(STEPS)]
    assert len(all_layer_states()) == 2
    # the layers really hold different state (else the comparison below proves nothing)
    sa, sb = engine._state(site, A.anchor).branches[0], engine._state(site, B.anchor).branches[0]
    assert not torch.equal(sa.cache.terms[0], sb.cache.terms[0])
    engine.reset()
    alone_a = [forward(site, A, xa(s)).y for s in range(STEPS)]
    engine.reset()
    alone_b = [forward(site, B, xb(s)).y for s in range(STEPS)]
    for (ya, yb), ra, rb in zip(both, alone_a, alone_b):
        assert torch.equal(ya, ra) and torch.equal(yb, rb)


def test_cfg_two_calls_with_set_step_get_branches():
    """With set_step, the second call of a step is branch 1: cond and uncond keep separate caches."""
    site = make_site(dict(SPARSE, taylor_order=1))
    L = Layer.random()
    cond = lambda s: inputs(s, seed=1)    # noqa: E731
    uncond = lambda s: inputs(s, seed=2)  # noqa: E731
    got = []
    for s in range(STEPS):
        set_step(s, STEPS)
        got.append((forward(site, L, cond(s)).y, forward(site, L, uncond(s)).y))
    st = engine._state(site, L.anchor)
    assert len(st.branches) == 2 and st.stats.dispatches > 0
    clear_step()
    engine.reset()
    alone = [forward(site, L, uncond(s)).y for s in range(STEPS)]
    for (_, yu), ra in zip(got, alone):
        assert torch.equal(yu, ra)


def test_counted_steps_wrap_and_new_run_resets_history():
    site = make_site(dict(SPARSE, taylor_order=2))
    L = Layer.random()
    first = [forward(site, L, inputs(s)).y for s in range(STEPS)]
    second = [forward(site, L, inputs(s)).y for s in range(STEPS)]     # counted: wraps at total_steps
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cfg_two_calls_counted_counts_two_steps():
    site = make_site(dict(SPARSE, total_steps=None))
    L = Layer.random()
    for s in range(3):
        forward(site, L, inputs(s, seed=1))
        forward(site, L, inputs(s, seed=2))
    assert engine._state(site, L.anchor).counted_step == 5


# ---------------------------------------------------------------------------------------------------
# Dispatch-step hygiene
# ---------------------------------------------------------------------------------------------------
# host syncs (.item(), bool(t), tolist) and ops whose output size depends on the data
_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2", "argwhere"}


class _Recorder(TorchDispatchMode):
    """Records every aten op (the custom ops' CPU bodies run below this mode and are not seen)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_recorder_sees_syncs():
    with _Recorder() as r:
        torch.ones(3).sum().item()
        torch.ones(3).nonzero()
    assert {"_local_scalar_dense", "nonzero"} <= set(r.ops)


@pytest.mark.parametrize("order", [0, 2])
def test_dispatch_no_sync_no_state_allocation(order):
    site = make_site(dict(SPARSE, taylor_order=order, interval=4, warmup=3))
    L = Layer.random(dtype=torch.float32)
    x = lambda s: inputs(s, dtype=torch.float32)  # noqa: E731
    for s in range(4):
        forward(site, L, x(s), kv=True)            # warm-up (3 steps) + the first scheduled update
    st = engine._state(site, L.anchor)
    before = [(t.data_ptr(), t.shape) for t in st.tensors()]
    assert before
    for s in range(4, 7):
        with _Recorder() as r:
            forward(site, L, x(s), kv=True)
        assert st.current.kind == "dispatch"
        bad = sorted(set(r.ops) & _SYNC_OPS)
        assert not bad, f"dispatch step ran {bad}"
        assert "scaled_dot_product_attention" not in r.ops and "_scaled_dot_product_flash_attention_for_cpu" not in r.ops
        assert [(t.data_ptr(), t.shape) for t in st.tensors()] == before
    with _Recorder() as r:
        forward(site, L, x(7), kv=True)             # an update writes in place and does not sync either
    assert st.current.kind == "update"
    assert not set(r.ops) & {"_local_scalar_dense", "item"}
    assert [(t.data_ptr(), t.shape) for t in st.tensors()] == before


# ---------------------------------------------------------------------------------------------------
# Hooks, cap, overrides, stats
# ---------------------------------------------------------------------------------------------------
def test_hook_edits_symbols_and_dispatch_follows():
    def band(spec, step, scores, symbols):
        nqb, nkb = symbols.kv_keep.shape[-2:]
        i, j = torch.arange(nqb)[:, None], torch.arange(nkb)[None, :]
        symbols.kv_keep &= (i - j).abs() <= 1

    seen = []
    site = make_site(dict(SPARSE, policy="dense", policy_args={},
                          symbol_hook=lambda spec, step, scores, sym: seen.append((spec.name, step, scores.shape))))
    L = Layer.random()
    with register_symbol_hook(band):
        for s in range(5):
            tr = forward(site, L, inputs(s))
    st, br = _state(site, L)
    nqb = br.symbols.kv_keep.shape[-1]
    i, j = torch.arange(nqb)[:, None], torch.arange(nqb)[None, :]
    assert torch.equal(br.symbols.kv_keep[0, 0], (i - j).abs() <= 1)
    assert seen[0] == ("blocks.0.attn", 0, (1, 2, 7, 7)) and len(seen) == st.stats.updates
    assert st.current.kind == "dispatch"
    want, _ = sparse_attention_ref(tr.q, tr.k, tr.v, None, *kv_block_lists(br.symbols.kv_keep), None, None, 0.125,
                                   32, 32)
    assert rel(tr.out, want) < TOL64


def test_hook_bad_result_is_reported():
    site = make_site(dict(SPARSE, symbol_hook=lambda spec, step, scores, sym: "nope"))
    with pytest.raises(TypeError, match="returned str"):
        forward(site, Layer.random(), inputs(0))


@pytest.mark.parametrize("cap_mb,order", [(None, 2), (1.4, 2), (1.3, 1), (1.0, 1), (0.5, 0), (0.3, -1)])
def test_cache_cap_lowers_order(cap_mb, order):
    # one term: 1*2*200*64*8 B = 0.195 MiB of features + the same of GEMM-O terms; order k keeps k+1 terms
    # of each plus (k > 0) one C(t) buffer: 0.39 / 0.98 / 1.37 MiB for orders 0 / 1 / 2
    site = make_site(dict(SPARSE, taylor_order=2, cache_cap_mb=cap_mb, warmup=3))
    L = Layer.random()
    runs = _kinds(site, L, STEPS)
    st, br = _state(site, L)
    if order < 0:
        assert br.cache is None and br.symbols.q_keep.all() and st.stats.cache_bytes == 0
    else:
        assert br.cache.order == order and 0 < st.stats.cache_bytes
        if cap_mb is not None:
            assert st.stats.cache_bytes <= cap_mb * 2**20
    for kind, tr, ref in runs:
        assert rel(tr.y, dense_forward_o(L, tr.a, True)) < TOL64


def test_cache_order_fits_free_memory(monkeypatch):
    """cache_min_free: order 0 at the first update if it fits, the final order at the second (from the free
    memory plus the buffers held), then kept."""
    from flashomni_compile.runtime import engine

    mib = 2**20
    total = 100 * mib                       # reserve 10% = 10 MiB; orders need 0.39 / 0.98 / 1.37 MiB
    free = {"now": 10.8 * mib}              # 0.8 MiB above the reserve: order 0 now, 0.8 + 0.39 -> order 1
    monkeypatch.setattr(engine, "_device_memory", lambda device: (free["now"], total))
    site = make_site(dict(SPARSE, taylor_order=2, warmup=3))
    L = Layer.random()
    orders = []
    for step in range(STEPS):
        if step == 2:
            free["now"] = 1000.0 * mib      # memory freed later: the order stays what it was
        tr = forward(site, L, inputs(step))
        assert rel(tr.y, dense_forward_o(L, tr.a, True)) < TOL64
        orders.append(_state(site, L)[1].cache.order)
    st, br = _state(site, L)
    assert orders[:3] == [0, 1, 1] and br.cache.order == 1 and st.stats.cache_bytes <= 1.0 * mib
    assert br.cache.active_order == 1       # the raised cache formed D1 from the first update's D0

    engine.reset()
    free["now"] = 10.2 * mib                # 0.2 MiB above the reserve: not even order 0 fits
    seen = []

    class Recording(FlashOmniPolicy):       # the memory check runs at every update here: the policy must
        def __call__(self, ctx):            # still see the step total, not the device's memory
            seen.append(ctx.total)
            return super().__call__(ctx)

    site = make_site(dict(SPARSE, taylor_order=2, warmup=3, policy=Recording(), policy_args={}))
    _kinds(site, L, STEPS)
    st, br = _state(site, L)
    assert br.cache is None and br.symbols.q_keep.all() and st.stats.cache_bytes == 0
    assert seen and set(seen) == {SPARSE.get("total_steps")}

    engine.reset()
    site = make_site(dict(SPARSE, taylor_order=2, warmup=3, cache_min_free=None))   # no check
    _kinds(site, L, STEPS)
    assert _state(site, L)[1].cache.order == 2


def test_cache_memory_plan_keeps_every_layer_cached(monkeypatch):
    """Two layers and room for both order-0 caches plus one order-1 upgrade: the first layer must not take
    order 2 at its first update and leave the second without a cache (what a first-come choice did on
    full-size HunyuanVideo); the raised layer's dispatch steps use its first-order term."""
    from flashomni_compile.runtime import engine

    mib = 2**20
    total = 100 * mib                       # reserve 10 MiB; one layer's orders: 0.39 / 0.98 / 1.37 MiB
    room = 1.5 * mib                        # first-come: 1.37 + 0.13 left (< 0.39): the second gets none

    def memory(device):                     # free memory falls as the caches take it
        held = sum(engine._cache_bytes(st) for st in engine._STATES.values())
        return 10 * mib + room - held, total

    monkeypatch.setattr(engine, "_device_memory", memory)
    site = make_site(dict(SPARSE, taylor_order=2, warmup=3))
    layers = [Layer.random(), Layer.random()]
    for step in range(STEPS):
        for L in layers:
            tr = forward(site, L, inputs(step))
            assert rel(tr.y, dense_forward_o(L, tr.a, True)) < TOL64
    caches = [_state(site, L)[1].cache for L in layers]
    assert [c.order for c in caches] == [1, 0]
    assert [c.active_order for c in caches] == [1, 0]
    assert sum(engine._cache_bytes(_state(site, L)[0]) for L in layers) <= room


def test_site_overrides_apply_by_name():
    opts = dict(SPARSE, site_overrides={"blocks.1.*": {"policy": "dense", "policy_args": {}}})
    s0, s1 = make_site(opts, name="blocks.0.attn"), make_site(opts, name="blocks.1.attn")
    L = Layer.random()
    forward(s0, L, inputs(0))
    forward(s1, L, inputs(0))
    assert engine._state(s0, L.anchor) is not None
    assert engine._state(s1, L.anchor) is None          # dense: no state at all


def test_stats_report():
    from flashomni_compile.runtime.stats import site_stats, stats_report

    # ramped thresholds: each update's symbols differ, so a mean over dispatch steps differs from the last
    site = make_site(dict(SPARSE, policy_args=dict(tau_kv=(0.05, 0.6), cache_fraction=(0.2, 0.6),
                                                   layer_threshold=0.0)))
    L = Layer.random()
    # the densities each dispatch step ran with, taken from the symbols in force at that step
    ran = []
    for step in range(STEPS):
        forward(site, L, inputs(step))
        st = engine._state(site, L.anchor)
        if st.current.kind == "dispatch":
            sym = st.branches[0].symbols
            ran.append((float(sym.q_density()), float(sym.kv_density())))
    (s,) = site_stats()
    assert (s.name, s.layers, s.updates, s.dispatches) == ("blocks.0.attn", 1, 6, 4)
    assert 0 < s.q_density < 1 and 0 < s.kv_density < 1 and s.cache_mib > 0
    assert s.ms_per_update > 0 and s.ms_per_dispatch > 0
    text = stats_report()
    assert "blocks.0.attn" in text and "kv-density" in text
    # reported densities are the means over dispatch steps, not the last update's
    assert len(set(ran)) > 1, "the symbols should change between updates for this test to bite"
    assert math.isclose(s.q_density, sum(q for q, _ in ran) / len(ran), rel_tol=1e-6)
    assert math.isclose(s.kv_density, sum(kv for _, kv in ran) / len(ran), rel_tol=1e-6)


def test_a_site_registered_again_shares_its_layers_state_only_with_equal_options():
    """A recompiled block registers its sites again (test_backend: Flux's stride recompile): an equal spec
    with equal options reaches the same layer state; other options (another compile call) do not."""
    from flashomni_compile.runtime.spec import layer_site

    first = make_site(SPARSE)
    again = make_site(SPARSE)
    other = make_site(dict(SPARSE, taylor_order=0))
    renamed = make_site(SPARSE, name="blocks.1.attn")
    # (an earlier test may have registered an equal site first: the key is the first equal one)
    assert layer_site(again) == layer_site(first) <= first
    assert len({layer_site(first), layer_site(other), layer_site(renamed)}) == 3
    L = Layer.random()
    for step in range(3):
        forward(first if step < 2 else again, L, inputs(step))   # the third call through the new graph
    assert engine._state(again, L.anchor) is engine._state(first, L.anchor)
    assert engine._state(first, L.anchor).stats.updates + engine._state(first, L.anchor).stats.dispatches == 3
    assert engine._state(other, L.anchor) is not engine._state(first, L.anchor)


def test_reset_stats_keeps_the_state_and_counts_anew():
    from flashomni_compile import reset_stats
    from flashomni_compile.runtime.stats import site_stats

    site = make_site(SPARSE)
    L = Layer.random()
    for step in range(STEPS):
        forward(site, L, inputs(step))
    (first,) = site_stats()
    st = engine._state(site, L.anchor)
    held = [t.data_ptr() for t in st.tensors()]
    reset_stats()
    (s,) = site_stats()
    assert (s.updates, s.dispatches, s.q_density, s.ms_per_update) == (0, 0, None, None)
    assert [t.data_ptr() for t in st.tensors()] == held and st.stats.cache_bytes > 0   # the state stays
    for step in range(STEPS):                     # a second generation: counted on its own
        forward(site, L, inputs(step))
    (second,) = site_stats()
    assert (second.updates, second.dispatches) == (first.updates, first.dispatches) == (6, 4)
    assert math.isclose(second.q_density, first.q_density) and math.isclose(second.kv_density, first.kv_density)


def test_dispatch_through_triton_kernels(monkeypatch):
    """The same loop on the Triton kernels (interpreter on CPU), K and V through GEMM-KV: dispatch = the
    reference semantics on the dense K and V, GEMM-O consistent with the attention output. Slow under the
    interpreter, so one configuration only."""
    if __import__("os").environ.get("TRITON_INTERPRET") != "1":
        # The loop's tensors live on the CPU: the Triton kernels can run them only under the interpreter
        # (on a GPU machine the kernels' own tests and bench_e2e cover the compiled path).
        pytest.skip("needs the Triton interpreter (CPU tensors)")
    monkeypatch.setenv("FLASHOMNI_FORCE_TRITON", "1")

    def cache_head_1(spec, step, scores, sym):   # the policy's symbols, head 1 cached whole: GEMM-KV skips it
        sym.q_keep[:, 1] = False

    site = make_site(dict(SPARSE, taylor_order=1, interval=4, total_steps=7, symbol_hook=cache_head_1))
    L = Layer.random(dtype=torch.float32)
    n_dispatch = 0
    for s in range(7):
        x = inputs(s, dtype=torch.float32)
        tr = forward(site, L, x, kv=True)
        st, br = _state(site, L)
        assert rel(tr.y, dense_forward_o(L, tr.a, True)) < 1e-5
        if st.current.kind == "dispatch":
            n_dispatch += 1
            sym = br.symbols
            assert (~sym.q_keep).any() and (~sym.kv_keep).any()
            assert not br.kv_need[:, 1].any() and br.kv_need[:, 0].any()
            skipped = ~br.kv_need.repeat_interleave(32, -1)[..., :200]
            assert not tr.k[skipped].any() and not tr.v[skipped].any()
            ref = dense_forward(L, x)
            want, _ = sparse_attention_ref(tr.q, ref.k, ref.v, sym.q_keep, *kv_block_lists(sym.kv_keep),
                                           br.cache.at(s), None, 0.125, 32, 32)
            assert rel(tr.out, want) < 2e-3      # conftest.REL_TOL for float32 kernels
    assert n_dispatch == 3


def _record_sparse_gemms(monkeypatch, calls):
    """Append ``(op name, rows of its input)`` to ``calls`` for every sparse GEMM-Q / GEMM-O op call."""
    for name in ("sparse_linear_q_op", "sparse_linear_o_op"):
        orig = getattr(engine, name)

        def rec(*a, _orig=orig, _name=name):
            calls.append((_name, a[0].shape[1]))      # rows of x / a: which stream
            return _orig(*a)
        monkeypatch.setattr(engine, name, rec)


def _steps_beside(s_ref, s_test, L, calls):
    """Run ``STEPS`` steps of both sites on the same inputs; yield ``(step, kind, y_ref, y_test)`` with
    ``calls`` cleared before the tested site's pass (so it holds that pass's calls)."""
    for step in range(STEPS):
        x = inputs(step)
        y_ref = forward(s_ref, L, x).y
        calls.clear()
        y = forward(s_test, L, x).y
        yield step, engine._state(s_test, L.anchor).current.kind, y_ref, y


def test_small_projections_run_dense_and_give_the_same_result(monkeypatch):
    """``sparse_gemm_min_macs`` between the two streams' sizes: the text stream's Q and O projections run
    dense (cuBLAS), the image stream's run the sparse kernels; every step's output equals the run with
    every projection sparse (dense projection of the attention output = GEMM-O with the cache)."""
    L = Layer.random()
    T, N = L.text_len, 200
    K = L.wq_img.shape[1]
    text_macs, img_macs = T * K * L.heads * L.head_dim, (N - T) * K * L.heads * L.head_dim
    assert text_macs < img_macs
    s_all = make_site(SPARSE)
    s_mix = make_site(dict(SPARSE, sparse_gemm_min_macs=(text_macs + img_macs) // 2), name="blocks.1.attn")
    calls = []
    _record_sparse_gemms(monkeypatch, calls)
    kinds = set()
    for step, kind, y_all, y_mix in _steps_beside(s_all, s_mix, L, calls):
        kinds.add(kind)
        assert rel(y_mix, y_all) < TOL64, f"step {step} ({kind})"
        if kind == "dispatch":
            assert ("sparse_linear_q_op", N - T) in calls and ("sparse_linear_o_op", N - T) in calls
        assert all(rows == N - T for _, rows in calls), f"the text stream took a sparse GEMM: {calls}"
    assert kinds == {"update", "dispatch"}


def test_gemm_o_threshold_keeps_gemm_q_sparse_and_the_result(monkeypatch):
    """``sparse_gemm_o_min_macs`` above both streams' O projections, ``sparse_gemm_min_macs`` 0: GEMM-Q
    stays sparse at dispatch steps, GEMM-O never runs (nor its update-step cache projections), and
    every step's output equals the run with every projection sparse."""
    from flashomni_compile.runtime import cache as cache_mod

    L = Layer.random()
    N = 200
    K = L.wq_img.shape[1]
    s_all = make_site(SPARSE)
    s_q = make_site(dict(SPARSE, sparse_gemm_o_min_macs=N * K * L.heads * L.head_dim + 1), name="blocks.2.attn")
    calls = []
    _record_sparse_gemms(monkeypatch, calls)
    orig_project = cache_mod.FeatureCache.project
    monkeypatch.setattr(cache_mod.FeatureCache, "project",
                        lambda self, *a, **kw: calls.append(("project", 0)) or orig_project(self, *a, **kw))
    kinds = set()
    for step, kind, y_all, y_q in _steps_beside(s_all, s_q, L, calls):
        kinds.add(kind)
        assert rel(y_q, y_all) < TOL64, f"step {step} ({kind})"
        names = [n for n, _ in calls]
        assert "sparse_linear_o_op" not in names and "project" not in names, f"step {step}: {calls}"
        if kind == "dispatch":
            assert "sparse_linear_q_op" in names
    assert kinds == {"update", "dispatch"}


def test_updates_nothing_reads_skip_their_refresh_work(monkeypatch):
    """Warm-up 2, interval 3, last step dense, over two generations: GEMM-O projects its terms (one call
    per stream) only at the updates a dispatch step follows (2 and 5 of 10; not the warm-up steps 0-1 nor
    step 8, each followed by an update); the final step 9 runs dense attention with no pooled scores,
    policy or refresh and leaves the layer's state as step 8 left it (step 8 still refreshes: only the
    ``last_dense`` steps skip it); every step's output is the dense projection of the attention output,
    which is what GEMM-O computes."""
    from flashomni_compile.runtime import cache as cache_mod

    site = make_site(SPARSE)
    L = Layer.random()
    projected, scored = [], []
    orig_project, orig_scores = cache_mod.FeatureCache.project, engine.pooled_scores
    step = [None]
    monkeypatch.setattr(cache_mod.FeatureCache, "project",
                        lambda self, *a, **kw: projected.append(step[0]) or orig_project(self, *a, **kw))
    monkeypatch.setattr(engine, "pooled_scores", lambda *a, **kw: scored.append(step[0]) or orig_scores(*a, **kw))
    for gen in range(2):
        for s in range(STEPS):
            step[0] = s
            x = inputs(s)
            if s == STEPS - 1:
                st, br = _state(site, L)
                before = (br.last_update, br.symbols, br.cache.last_step, br.cache.terms[0].clone())
            tr = forward(site, L, x)
            assert rel(tr.y, dense_forward_o(L, tr.a, True)) < TOL64, f"generation {gen}, step {s}"
            if s == STEPS - 1:
                st, br = _state(site, L)
                assert torch.equal(tr.out, dense_forward(L, x).out)
                assert (br.last_update, br.symbols, br.cache.last_step) == before[:3]
                assert torch.equal(br.cache.terms[0], before[3])
    assert projected == [2, 2, 5, 5] * 2
    assert scored == [0, 1, 2, 5, 8] * 2


def test_dispatch_after_an_update_that_projected_nothing_stays_exact():
    """Explicit steps that jump (0, 1, then 3): step 1 is followed by an update in the schedule, so it
    projects no GEMM-O terms; the dispatch step 3 must then not read the terms a previous generation
    left (they belong to another update) but project the attention output densely."""
    site = make_site(SPARSE)
    L = Layer.random()
    try:
        for s in range(STEPS):                       # generation 1: GEMM-O terms projected at 2 and 5
            set_step(s, STEPS)
            forward(site, L, inputs(s))
        st, br = _state(site, L)
        assert br.cache.out_terms, "the first generation should have left GEMM-O terms behind"
        for s in (0, 1, 3):
            set_step(s, STEPS)
            tr = forward(site, L, inputs(s, seed=2))
            assert rel(tr.y, dense_forward_o(L, tr.a, True)) < TOL64, f"step {s}"
        st, br = _state(site, L)
        assert st.current.kind == "dispatch" and (~br.symbols.q_keep).any()
        assert not br.cache.has_out(0)
    finally:
        clear_step()


def test_density_history_stays_bounded_and_exact():
    """Many updates: the per-layer history is merged instead of growing, and the dispatch-weighted
    means are unchanged by the merge."""
    import torch as _t
    from flashomni_compile.runtime.stats import _MAX_PERIODS, LayerStats

    st = LayerStats("s", 0, 0)
    qs, ks, ns = [], [], []
    for i in range(3 * _MAX_PERIODS + 5):
        q, kv, n = 0.1 + (i % 7) / 10, 0.05 + (i % 5) / 10, i % 4     # some updates serve no dispatch
        st.record_update(_t.tensor([q, kv]))
        for _ in range(n):
            st.record_dispatch()
        qs.append(q), ks.append(kv), ns.append(n)
    assert len(st.periods) <= _MAX_PERIODS + 1
    total = sum(ns)
    q_mean, kv_mean = st.dispatch_densities()
    assert abs(q_mean - sum(q * n for q, n in zip(qs, ns)) / total) < 1e-6
    assert abs(kv_mean - sum(k * n for k, n in zip(ks, ns)) / total) < 1e-6


# ---------------------------------------------------------------------------------------------------
# GEMM-KV: K and V projections at dispatch steps compute only the tiles attention reads (kv_need)
# ---------------------------------------------------------------------------------------------------
def _kv_need_loop(q_keep, kv_keep):
    """``kv_need`` by its definition, one (b, h, j) at a time."""
    B, H, NQB, NKB = kv_keep.shape
    out = torch.zeros(B, H, NKB, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for j in range(NKB):
                out[b, h, j] = any(bool(q_keep[b, h, i]) and bool(kv_keep[b, h, i, j]) for i in range(NQB))
    return out


def _random_symbols(g, B=2, H=3, nqb=5, nkb=4):
    q_keep = torch.rand(B, H, nqb, generator=g) < 0.6
    kv_keep = torch.rand(B, H, nqb, nkb, generator=g) < 0.4
    q_keep[0, 1] = False                      # a head cached whole: needs no key/value at all
    q_keep[1, 0, 2] = True
    kv_keep[1, 0, 2] = False                  # a computed q-block that attends to nothing
    kv_keep[1, 2, :, 1] = False               # a kv-block nobody attends to
    q_keep[1, 2] = True
    return q_keep, kv_keep


def test_kv_need_equals_direct_computation():
    """``symbols.kv_need`` and ``BranchState.store_symbols`` (written in place at every later update) equal
    the definition on random symbols, including an all-cached head, an empty kv_keep row and a kv-block
    nobody attends to; without kv-block skipping a head needs everything iff one of its q-blocks is kept."""
    from flashomni_compile.runtime.state import BranchState
    from flashomni_compile.symbols import SparseSymbols, kv_need

    g = torch.Generator().manual_seed(11)
    br, first = BranchState(), None
    for i in range(3):
        q_keep, kv_keep = _random_symbols(g)
        want = _kv_need_loop(q_keep, kv_keep)
        assert not want[0, 1].any() and want[1, 2].any() and not want[1, 2, 1]
        assert torch.equal(kv_need(q_keep, kv_keep), want)
        sym = SparseSymbols(q_keep, kv_keep, 150, 120, 32, 32)   # NQB = 5, NKB = 4
        assert torch.equal(sym.kv_need(), want)
        br.store_symbols(sym)
        assert br.kv_need.shape == (2, 3, 4) and br.kv_need.dtype == torch.bool
        assert torch.equal(br.kv_need, want)
        ptrs = [t.data_ptr() for t in br.tensors()]
        assert first is None or ptrs == first, "later updates write kv_need in place"
        first = ptrs
        br.store_symbols(sym, kv_sparse=False)
        assert torch.equal(br.kv_need, q_keep.any(-1, keepdim=True).expand(2, 3, 4))
        assert [t.data_ptr() for t in br.tensors()] == first


def test_kv_need_is_exactly_what_attention_reads():
    """The tiles ``kv_need`` drops can hold anything (the output does not change), and every tile it keeps
    is read (changing it changes the output): the gate is neither too small nor larger than needed."""
    from flashomni_compile.symbols import kv_need

    g = torch.Generator().manual_seed(5)
    B, H, N, D, bs = 2, 3, 150, 16, 32
    q_keep, kv_keep = _random_symbols(g, B, H, 5, 5)
    need = kv_need(q_keep, kv_keep)
    q, k, v, cache = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(4))
    lists = kv_block_lists(kv_keep)

    def attend(k, v):
        return sparse_attention_ref(q, k, v, q_keep, *lists, cache, None, 0.25, bs, bs)[0]

    ref = attend(k, v)
    rows = need.repeat_interleave(bs, dim=-1)[..., :N, None]                  # [B, H, N, 1]
    garbage = torch.randn(B, H, N, D, generator=g, dtype=torch.float64) * 100
    assert torch.equal(attend(torch.where(rows, k, garbage), torch.where(rows, v, -garbage)), ref)
    assert not need.all() and need.any()
    for b, h, j in need.nonzero().tolist():
        k2 = k.clone()
        k2[b, h, j * bs:(j + 1) * bs] = 0.0
        assert rel(attend(k2, v), ref) > 1e-6, f"tile (b={b}, h={h}, kv-block {j}) is never read"


def _hook_whole_head_and_band(spec, step, scores, sym):
    """Deterministic symbols (NQB = NKB = 7): head 1 cached whole; head 0 keeps q-blocks 0, 1, 5, 6 on a
    band |i - j| <= 1, q-block 1 attending to nothing: head 0 needs kv-blocks {0, 1, 4, 5, 6}, not 2, 3."""
    nqb, nkb = sym.kv_keep.shape[-2:]
    i, j = torch.arange(nqb)[:, None], torch.arange(nkb)[None, :]
    sym.q_keep[:] = torch.tensor([True, True, False, False, False, True, True])
    sym.q_keep[:, 1] = False
    sym.kv_keep[:] = (i - j).abs() <= 1
    sym.kv_keep[:, :, 1] = False


KV_NEED_HEAD0 = torch.tensor([True, True, False, False, True, True, True])


@pytest.mark.parametrize("kv_first,streams,fused", [(False, True, True), (True, True, True), (True, False, False)],
                         ids=["q-first", "kv-first", "kv-only"])
def test_gemm_kv_dispatch_equals_dense_kv(kv_first, streams, fused):
    """GEMM-KV on (``linear_kv``) vs off (dense K/V) over a denoising loop, same symbols: every step's
    attention and output projection agree to float64 rounding, the pass counts one step whatever the
    order of the projections (K/V before Q, or K/V the only fused projections), and at dispatch steps K
    and V hold the dense values on the needed tiles and zeros elsewhere (head 1, cached whole, none)."""
    opts = dict(SPARSE, taylor_order=1, symbol_hook=_hook_whole_head_and_band)
    s_kv, s_dense = make_site(opts), make_site(opts, name="blocks.1.attn")
    L = Layer.random()
    kinds = []
    for s in range(STEPS):
        x = inputs(s)
        tr = forward(s_kv, L, x, streams=streams, fused=fused, kv=True, kv_first=kv_first)
        ref = forward(s_dense, L, x, streams=streams, fused=fused)
        st, br = _state(s_kv, L)
        kinds.append(st.current.kind)
        assert rel(tr.out, ref.out) < TOL64 and rel(tr.y, ref.y) < TOL64, (s, kinds[-1])
        if kinds[-1] == "dispatch":
            assert torch.equal(br.kv_need[0, 0], KV_NEED_HEAD0) and not br.kv_need[0, 1].any()
            rows = br.kv_need.repeat_interleave(32, dim=-1)[..., :200, None].expand_as(tr.k)
            for got, dense in ((tr.k, ref.k), (tr.v, ref.v)):
                assert torch.allclose(got[rows], dense[rows], rtol=0, atol=1e-12)
                assert not got[~rows].any(), "skipped tiles are zeros (GEMM-Q's contract)"
        else:
            assert torch.equal(tr.k, ref.k) and torch.equal(tr.v, ref.v)       # update steps: dense
    st_kv, st_dense = engine._state(s_kv, L.anchor), engine._state(s_dense, L.anchor)
    assert kinds.count("dispatch") == 4 and st_kv.counted_step == st_dense.counted_step
    assert (st_kv.stats.updates, st_kv.stats.dispatches) == (st_dense.stats.updates, st_dense.stats.dispatches)


def test_gemm_kv_dropping_a_needed_block_changes_the_output():
    """Mutation check: clear one needed tile of ``kv_need`` at a dispatch step and the output moves away
    from the dense-K/V run (so the equality above would catch a gate that drops a block)."""
    opts = dict(SPARSE, taylor_order=1, symbol_hook=_hook_whole_head_and_band)
    s_kv, s_dense = make_site(opts), make_site(opts, name="blocks.1.attn")
    L = Layer.random()
    checked = 0
    for s in range(STEPS):
        x = inputs(s)
        st = engine._state(s_kv, L.anchor)
        mutate = st.current is not None and s in (3, 4)          # steps 3, 4 dispatch (warmup 2, interval 3)
        if mutate:
            need = st.branches[0].kv_need
            saved = need.clone()
            need[0, 0, 4] = False                              # kv-block 4 of head 0: read by q-block 5
        tr = forward(s_kv, L, x, kv=True)
        ref = forward(s_dense, L, x)
        assert st.current.kind == ("dispatch" if s in (3, 4, 6, 7) else "update")
        if mutate:
            need.copy_(saved)
            assert rel(tr.out, ref.out) > 1e-3 and rel(tr.y, ref.y) > 1e-3
            checked += 1
        else:
            assert rel(tr.y, ref.y) < TOL64
    assert checked == 2
