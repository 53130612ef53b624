"""The update step's planning kernels (``kernels/plan.py``) against their torch twins.

``store_plan`` is exact: it moves bools and counts integers, so the kernel must equal the twin bit for
bit (the densities are float32 sums in another order: 1e-5 relative). ``kv_select`` sums the same
float32 masses as the twin's cumsum in a different order, so the two may disagree on an entry whose
float64 cumulative mass (in stable ascending order) is within 1e-5 of ``tau``: float32 rounding over at
most a few hundred terms of a unit mass stays under 3e-5 in the worst case and under 1e-6 in practice;
the tests count such entries and require every other one to match. Every kernel output is poisoned
before the launch (bytes that are neither 0 nor 1, counts and indices of -7).
"""

from __future__ import annotations

import pytest
import torch

from flashomni_compile.kernels.plan import (kv_select_ref, kv_select_triton, q_select_ref, q_select_triton,
                                            store_plan_ref, store_plan_triton,
                                            text_block_range)
from flashomni_compile.runtime.policies import text_blocks
from flashomni_compile.symbols import SparseSymbols, kv_block_lists, kv_need, num_blocks

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # the kernels: on the GPU, else under the interpreter
AMBIGUOUS = 1e-5


def _scores(B, H, nqb, nkb, g, spread=3.0):
    return torch.softmax(spread * torch.randn(B, H, nqb, nkb, generator=g, dtype=torch.float64), -1).float()


def _exact_drop(scores: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule in float64 with a stable order: (dropped, ambiguous) per entry."""
    s = scores.double()
    order = torch.sort(s, dim=-1, stable=True).indices
    cum = torch.zeros_like(s).scatter(-1, order, s.gather(-1, order).cumsum(-1))
    return cum < tau, (cum - tau).abs() < AMBIGUOUS


def _poisoned_bool(shape, device):
    t = torch.empty(shape, dtype=torch.bool, device=device)
    t.view(torch.uint8).fill_(2)
    return t


@pytest.mark.parametrize("nqb, nkb", [(5, 7), (9, 36), (3, 130), (2, 300)])
@pytest.mark.parametrize("tau", [0.05, 0.3, 0.9])
def test_kv_select_kernel_matches_twin(nqb, nkb, tau):
    g = torch.Generator().manual_seed(nqb * 1000 + nkb + int(tau * 100))
    B, H = 2, 3
    scores = _scores(B, H, nqb, nkb, g)
    scores[0, 1, 0] = 0.0                                  # a row with no mass (every kv-block masked)
    scores[1, 0, -1, : nkb // 2] = 0.0                     # a row whose small entries tie at zero
    scores = scores.to(DEV)
    out = _poisoned_bool(scores.shape, DEV)
    got = kv_select_triton(scores, tau, (0, 0), (0, 0), False, 64, 64, out=out).cpu()
    assert got is not None and out.view(torch.uint8).max() <= 1          # every byte written
    want = kv_select_ref(scores, tau, (0, 0), (0, 0), False, 64, 64).cpu()
    drop, amb = _exact_drop(scores.cpu(), tau)
    assert torch.equal(got[~amb], ~drop[~amb])                            # the rule, in float64, stable
    assert torch.equal(got[~amb], want[~amb])
    assert amb.sum() <= 2
    assert not got[0, 1, 0].any()                                         # no mass: all dropped
    # the selection keeps most of the mass: what is dropped stays under tau in every row
    dropped_mass = (scores.cpu().double() * ~got).sum(-1)
    assert (dropped_mass < tau + AMBIGUOUS).all()
    assert (dropped_mass > 0).any()


def test_kv_select_ties_break_by_index():
    """Equal masses are taken in index order, like a stable sort: with four equal entries of 0.25 and
    tau = 0.6, the first two are dropped (cumulative 0.25, 0.5), the last two kept (0.75, 1.0)."""
    scores = torch.full((1, 1, 2, 4), 0.25, device=DEV)
    got = kv_select_triton(scores, 0.6, (0, 0), (0, 0), False, 64, 64, out=_poisoned_bool(scores.shape, DEV))
    assert got.cpu().tolist() == [[[[False, False, True, True]] * 2]]


@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("text_first", [True, False])
def test_kv_select_keeps_text_and_diagonal(joint, text_first):
    g = torch.Generator().manual_seed(3)
    n_q, n_kv, text, bq, bkv = 300, (300 if joint else 200), 70, 64, 32
    nqb, nkb = num_blocks(n_q, bq), num_blocks(n_kv, bkv)
    scores = _scores(1, 2, nqb, nkb, g, spread=6.0).to(DEV)
    t = text if joint else 0
    tq, tk = text_block_range(n_q, t, text_first, bq), text_block_range(n_kv, t, text_first, bkv)
    text_tok = torch.zeros(nqb * bq, dtype=torch.bool)     # token by token, padded to whole blocks
    if t:
        text_tok[slice(0, t) if text_first else slice(n_q - t, n_q)] = True
    assert torch.equal(torch.arange(nqb).ge(tq[0]) & torch.arange(nqb).lt(tq[1]), text_tok.view(nqb, bq).any(1))
    assert torch.equal(text_blocks(n_q, t, text_first, bq), text_tok.view(nqb, bq).any(1))
    got = kv_select_triton(scores, 0.8, tq, tk, joint, bq, bkv, out=_poisoned_bool(scores.shape, DEV)).cpu()
    want = kv_select_ref(scores, 0.8, tq, tk, joint, bq, bkv).cpu()
    drop, amb = _exact_drop(scores.cpu(), 0.8)
    assert torch.equal(got[~amb], want[~amb]) and amb.sum() <= 2
    if joint:
        assert got[..., tq[0]:tq[1], :].all() and got[..., tk[0]:tk[1]].all()
        for i in range(nqb):                      # kv-blocks sharing a token with q-block i
            lo, hi = (i * bq) // bkv, -(-((i + 1) * bq) // bkv)
            assert got[..., i, lo:hi].all()
    assert (~got).any()                           # and the selection still drops something


def test_kv_select_tau_zero_keeps_everything():
    scores = _scores(1, 2, 3, 5, torch.Generator().manual_seed(0)).to(DEV)
    got = kv_select_triton(scores, 0.0, (0, 0), (0, 0), False, 64, 64, out=_poisoned_bool(scores.shape, DEV))
    assert got.all() and got.view(torch.uint8).max() == 1


def test_kv_select_rejects_bad_input():
    with pytest.raises(ValueError, match="float32"):
        kv_select_triton(torch.zeros(1, 1, 2, 2, dtype=torch.float16), 0.1, (0, 0), (0, 0), False, 64, 64)
    with pytest.raises(ValueError, match="tau"):
        kv_select_triton(torch.zeros(1, 1, 2, 2), 1.5, (0, 0), (0, 0), False, 64, 64)
    with pytest.raises(ValueError, match="out"):
        kv_select_triton(torch.zeros(1, 1, 2, 2), 0.1, (0, 0), (0, 0), False, 64, 64,
                         out=torch.empty(1, 1, 2, 3, dtype=torch.bool))


def _plan_buffers(B, H, nqb, nkb, device):
    return (_poisoned_bool((B, H, nqb), device), _poisoned_bool((B, H, nqb, nkb), device),
            torch.full((B, H, nqb), -7, dtype=torch.int32, device=device),
            torch.full((B, H, nqb, nkb), -7, dtype=torch.int32, device=device),
            _poisoned_bool((B, H, nkb), device))


def _symbols(case, B, H, nqb, nkb, g):
    q = torch.rand(B, H, nqb, generator=g) < 0.6
    kv = torch.rand(B, H, nqb, nkb, generator=g) < 0.4
    if case == "dense":
        q, kv = torch.ones_like(q), torch.ones_like(kv)
    elif case == "all_cached":
        q = torch.zeros_like(q)
    elif case == "empty_rows":
        kv[:, :, ::2] = False                      # every other q-block attends to nothing
        kv[0, 0] = False                           # and one head to nothing at all
    return q, kv


@pytest.mark.parametrize("case", ["random", "dense", "all_cached", "empty_rows"])
@pytest.mark.parametrize("seq_q, seq_kv, bq, bkv", [(200, 200, 32, 32), (300, 4000, 64, 16), (130, 90, 128, 32)])
@pytest.mark.parametrize("kv_sparse", [True, False])
def test_store_plan_kernel_matches_twin(case, seq_q, seq_kv, bq, bkv, kv_sparse):
    g = torch.Generator().manual_seed(seq_q + seq_kv + bq)
    B, H = 2, 3
    nqb, nkb = num_blocks(seq_q, bq), num_blocks(seq_kv, bkv)
    q, kv = (t.to(DEV) for t in _symbols(case, B, H, nqb, nkb, g))
    got = _plan_buffers(B, H, nqb, nkb, DEV)
    want = [t.clone() for t in got]
    dens = store_plan_triton(q, kv, *got, seq_q, seq_kv, bq, bkv, kv_sparse)
    ref = store_plan_ref(q, kv, *want, seq_q, seq_kv, bq, bkv, kv_sparse)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu().view(torch.uint8) if a.dtype == torch.bool else a.cpu(),
                           b.cpu().view(torch.uint8) if b.dtype == torch.bool else b.cpu())
    count, index = kv_block_lists(kv.cpu())
    assert torch.equal(got[2].cpu(), count) and torch.equal(got[3].cpu(), index)
    assert torch.equal(got[4].cpu(), kv_need(q.cpu(), kv.cpu(), kv_sparse))
    torch.testing.assert_close(dens, ref, rtol=1e-5, atol=1e-7)
    sym = SparseSymbols(q.cpu(), kv.cpu(), seq_q, seq_kv, bq, bkv)
    want_q, want_kv = float(sym.q_density()), float(sym.kv_density())
    assert dens.shape == (B * H, 2)
    assert abs(float(dens[:, 0].sum()) - want_q) < 1e-6 and abs(float(dens[:, 1].sum()) - want_kv) < 1e-6


def test_store_plan_in_place_and_strided_inputs():
    """The runtime stores a policy's symbols over its own persistent tensors (``q_keep is q_out``), and
    policies may hand back expanded or transposed views."""
    g = torch.Generator().manual_seed(11)
    B, H, nqb, nkb = 2, 3, 9, 21
    q_base = (torch.rand(B, nqb, H, generator=g) < 0.5).to(DEV)
    q = q_base.transpose(1, 2)                                             # strided [B, H, NQB]
    row = (torch.rand(1, 1, 1, nkb, generator=g) < 0.5).to(DEV)
    kv = row.expand(B, H, nqb, nkb)                                        # stride 0 on three dims
    got = _plan_buffers(B, H, nqb, nkb, DEV)
    store_plan_triton(q, kv, *got, 600, 1300, 64, 64, True)
    assert torch.equal(got[0], q) and torch.equal(got[1], kv)
    # now in place: the outputs are the inputs
    q2, kv2 = got[0], got[1]
    kv2[:, :, 0] = ~kv2[:, :, 0]
    expect_kv = kv2.clone()
    count, index = kv_block_lists(expect_kv.cpu())
    store_plan_triton(q2, kv2, q2, kv2, got[2], got[3], got[4], 600, 1300, 64, 64, True)
    assert torch.equal(kv2, expect_kv)
    assert torch.equal(got[2].cpu(), count) and torch.equal(got[3].cpu(), index)


def test_store_plan_rejects_bad_buffers():
    B, H, nqb, nkb = 1, 2, 3, 4
    q, kv = torch.ones(B, H, nqb, dtype=torch.bool), torch.ones(B, H, nqb, nkb, dtype=torch.bool)
    bufs = list(_plan_buffers(B, H, nqb, nkb, "cpu"))
    bad = list(bufs)
    bad[2] = bad[2].long()
    with pytest.raises(ValueError, match="kv_count"):
        store_plan_triton(q, kv, *bad, 100, 100, 32, 32, True)
    bad = list(bufs)
    bad[3] = torch.empty(B, H, nkb, nqb, dtype=torch.int32).transpose(-1, -2)
    with pytest.raises(ValueError, match="contiguous"):
        store_plan_triton(q, kv, *bad, 100, 100, 32, 32, True)


def test_runtime_plans_the_same_symbols_on_the_kernels(monkeypatch):
    """The default policy driven through the engine (a joint text+image layer, several updates with
    sparse updates and Taylor caching): the planning kernels give the same symbols, kv-block lists,
    ``kv_need`` and statistics as their twins, step by step."""
    if __import__("os").environ.get("TRITON_INTERPRET") != "1":
        # the runtime helpers' layer lives on the CPU: the kernels run its tensors only in the interpreter
        # (on a GPU machine the kernel tests above and bench_e2e's rel_l2 cover the compiled path)
        pytest.skip("needs the Triton interpreter (CPU tensors)")
    import flashomni_compile.kernels.plan as plan
    from _runtime_util import Layer, forward, inputs, make_site
    from flashomni_compile.runtime import engine
    from flashomni_compile.runtime.controller import clear_step
    from flashomni_compile.runtime.state import all_layer_states
    from flashomni_compile.runtime.stats import site_stats

    def run(kernels: bool):
        monkeypatch.setattr(plan, "_use_kernel", lambda t: kernels)
        engine.reset()
        clear_step()
        site = make_site({"policy": "flashomni", "policy_args": {"tau_kv": 0.3, "cache_fraction": 0.5,
                                                                 "layer_threshold": 0.0},
                          "block_q": 32, "block_kv": 32, "interval": 3, "warmup": 2, "last_dense": 1,
                          "total_steps": 10}, seq=200, text_len=40)
        L = Layer.random(dtype=torch.float32)
        seen = []
        for s in range(10):
            forward(site, L, inputs(s, dtype=torch.float32))
            (st,) = all_layer_states()
            br = st.branches[0]
            seen.append([t.clone() for t in (br.symbols.q_keep, br.symbols.kv_keep, br.kv_count, br.kv_index,
                                             br.kv_need)])
        stats = site_stats()
        engine.reset()
        return seen, stats

    twin, twin_stats = run(False)
    kern, kern_stats = run(True)
    assert any((~step[1]).any() for step in twin) and any((~step[0]).any() for step in twin)
    for a, b in zip(twin, kern):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)
    (a,), (b,) = twin_stats, kern_stats
    assert a.q_density == pytest.approx(b.q_density, rel=1e-6) and a.kv_density == pytest.approx(b.kv_density, rel=1e-6)
    assert a.kv_density < 1.0


def _q_case(g, B=2, H=3, nqb=11, ties=False):
    change = torch.rand(B, H, nqb, generator=g) * 0.3
    if ties:
        change = (change * 4).round() / 4                 # few distinct values: ties decided by index
    return change


def _q_ambiguous(change, scores, args) -> torch.Tensor:
    """Pairs whose twin score lies within 1e-5 (relative) of the k-th smallest of their batch element."""
    k, thr, w, tq, tk, contrib = args
    B, H, nqb = change.shape
    score = change.double() / change.double().mean(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    if scores is not None:
        j, i = torch.arange(scores.shape[-1]), torch.arange(nqb)
        tg = (scores.double() * ((j >= tk[0]) & (j < tk[1]))).sum(3)
        if contrib:
            tg = tg + (scores.double() * ((i >= tq[0]) & (i < tq[1]))[:, None]).sum(2)
        score = score + w * tg / tg.mean(dim=(1, 2), keepdim=True)
    i = torch.arange(nqb)
    score = score.masked_fill((i >= tq[0]) & (i < tq[1]), float("inf")).reshape(B, -1)
    kth = score.sort(-1).values[:, min(k, H * nqb) - 1:][:, :1]
    near = ((score - kth).abs() <= 1e-5 * kth.abs()) & (score != kth) & torch.isfinite(kth)
    return near.reshape(B, H, nqb)


@pytest.mark.parametrize("guided, contrib", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("k, threshold, layer", [(5, None, 0.0), (12, 0.15, 0.0), (20, None, 0.6), (1, None, 0.0),
                                                 (40, None, 0.0)])
@pytest.mark.parametrize("ties", [False, True])
def test_q_select_kernel_matches_twin(guided, contrib, k, threshold, layer, ties):
    g = torch.Generator().manual_seed(k * 7 + guided * 3 + contrib + ties * 11)
    B, H, nqb = 2, 3, 11
    change = _q_case(g, B, H, nqb, ties)
    scores = _scores(B, H, nqb, nqb, g) if guided else None
    tq, tk = (0, 2), (0, 2)
    args = (k, threshold, 1.0, tq, tk, contrib)
    out = _poisoned_bool(change.shape, DEV)
    got = q_select_triton(change.to(DEV), None if scores is None else scores.to(DEV), k, threshold, 1.0, tq, tk,
                          contrib, layer, out=out).cpu()
    assert out.view(torch.uint8).max() <= 1
    want = q_select_ref(change, scores, k, threshold, 1.0, tq, tk, contrib, layer)
    amb = _q_ambiguous(change, scores, args)
    assert torch.equal(got[~amb], want[~amb]) and amb.sum() <= 2
    assert got[:, :, tq[0]:tq[1]].all() or layer > 0                  # text q-blocks are computed
    cached = (~want).sum(dim=(1, 2))
    if layer == 0.0:
        assert (cached <= min(k, H * (nqb - 2))).all()               # at most k, never text
        if threshold is None:
            assert (cached == min(k, H * (nqb - 2))).all()
    else:
        assert ((~want).flatten(1).all(1) | want.float().mean(dim=(1, 2)).ge(layer)).all()


def test_q_select_layer_granularity_caches_whole_elements():
    """k = 2 with a change threshold of 0.5: element 0 caches two of three pairs (keeps 1/3, under the
    layer threshold 0.5: cached whole), element 1 only its 0.1 (0.8 is over the threshold; keeps 2/3)."""
    change = torch.tensor([[[0.1, 0.2, 0.3]], [[0.9, 0.8, 0.1]]])
    got = q_select_triton(change.to(DEV), None, 2, 0.5, 0.0, (0, 0), (0, 0), False, 0.5,
                          out=_poisoned_bool(change.shape, DEV)).cpu()
    assert got.tolist() == [[[False, False, False]], [[True, True, False]]]
    assert torch.equal(got, q_select_ref(change, None, 2, 0.5, 0.0, (0, 0), (0, 0), False, 0.5))
    got = q_select_triton(change.to(DEV), None, 2, 0.5, 0.0, (0, 0), (0, 0), False).cpu()
    assert got.tolist() == [[[False, False, True]], [[True, True, False]]]


def test_q_select_nan_sorts_last_and_k_zero_keeps_all():
    change = torch.tensor([[[0.3, float("nan"), 0.1, 0.2]]])
    got = q_select_triton(change.to(DEV), None, 2, None, 0.0, (0, 0), (0, 0), False).cpu()
    want = q_select_ref(change, None, 2, None, 0.0, (0, 0), (0, 0), False)
    assert torch.equal(got, want)
    assert q_select_triton(change.to(DEV), None, 0, None, 0.0, (0, 0), (0, 0), False).all()


def test_q_select_rejects_bad_input():
    with pytest.raises(ValueError, match="change"):
        q_select_triton(torch.zeros(2, 3), None, 1, None, 0.0, (0, 0), (0, 0), False)
    with pytest.raises(ValueError, match="scores"):
        q_select_triton(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4, 3), 1, None, 1.0, (0, 0), (0, 0), False)
    with pytest.raises(ValueError, match="k must"):
        q_select_triton(torch.zeros(1, 2, 3), None, -1, None, 0.0, (0, 0), (0, 0), False)


def test_compiles_for_sm90():
    """The kernels run only on GPUs (and the interpreter, which compiles nothing): compile each at a
    short and a long site's shapes for sm_90 with the installed triton. No spills, except the guided
    q_select at 264 q-blocks (one program a batch element holding 6336 pairs: 96-144 bytes on triton
    3.9 / 3.6, one kernel an update and layer)."""
    from conftest import SM90_SMEM_LIMIT, sm90_compile_rows

    rows = sm90_compile_rows("plan")
    variants = ("kv_select", "q_select", "q_select_tg", "store_plan")
    assert {(r["variant"], r["NB"]) for r in rows} == {(v, nb) for v in variants for nb in (36, 264)}
    for r in rows:
        assert r["shared"] <= SM90_SMEM_LIMIT, r
        assert r["spill"] == 0 or (r["variant"], r["NB"]) == ("q_select_tg", 264) and r["spill"] <= 160, r


def test_plan_kernels_switch_sends_calls_to_the_twins(monkeypatch):
    """``FLASHOMNI_PLAN_KERNELS=0`` takes the twins even where the kernels would run (here: forced on the
    CPU under the interpreter), so a suspect run can be repeated without them."""
    import flashomni_compile.kernels.plan as plan

    monkeypatch.setenv("FLASHOMNI_FORCE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    t = torch.zeros(1)
    assert plan._use_kernel(t)
    monkeypatch.setenv("FLASHOMNI_PLAN_KERNELS", "0")
    assert not plan._use_kernel(t)
    took = []
    monkeypatch.setattr(plan, "kv_select_ref", lambda *a: took.append("twin") or "twin")
    assert plan.kv_select(torch.zeros(1, 1, 2, 2), 0.1, (0, 0), (0, 0), False, 32, 32) == "twin" and took


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (real CUDA graphs)")
def test_kernels_replayed_from_a_cuda_graph_equal_eager():
    """The three kernels captured once in a CUDA graph (as the step graphs capture them), then replayed on
    new inputs copied into the captured ones: every output equals an eager call on those inputs. Shapes
    of the tiny Flux of test_graphs (5 q-blocks, 2 heads), where the step-graph test failed (NOTES,
    session 13)."""
    g = torch.Generator().manual_seed(21)
    B, H, nqb = 1, 2, 5
    tq = tk = (0, 1)

    def make():
        return _scores(B, H, nqb, nqb, g).cuda(), (torch.rand(B, H, nqb, generator=g) * 0.3).cuda()

    def plan_once(scores, change, bufs):
        kv = kv_select_triton(scores, 0.5, tq, tk, True, 16, 16)
        q = q_select_triton(change, scores, 4, None, 1.0, tq, tk, True)
        dens = store_plan_triton(q, kv, *bufs, 70, 70, 16, 16, True)
        return kv, q, dens

    scores, change = make()
    bufs = _plan_buffers(B, H, nqb, nqb, "cuda")
    plan_once(scores, change, bufs)                       # compile outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin()
        outs = plan_once(scores, change, bufs)
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        new_scores, new_change = make()
        scores.copy_(new_scores)
        change.copy_(new_change)
        graph.replay()
        want_bufs = _plan_buffers(B, H, nqb, nqb, "cuda")
        want = plan_once(new_scores, new_change, want_bufs)
        torch.cuda.synchronize()
        for a, b in zip(list(outs) + list(bufs), list(want) + list(want_bufs)):
            assert torch.equal(a, b)
