"""Step graphs (runtime/graphs.py): every call of a compiled graph captured once per host state and
replayed, on a tiny Flux.

On CPU the CUDA graph is emulated (tests/_graph_emulation.py): the capture records the ATen/flashomni
ops with their tensors and a replay re-runs only those ops, so any host decision or host-state change
the runner fails to reproduce shows up as a different output or statistic. Every run is compared with
the same compiled model without step graphs, step by step over several generations. A replay re-executes
the same ops on the same values, but the static input buffers sit at other addresses, which can change
a CPU GEMM's blocking: float32 outputs (sites take no float64) differ by up to ~2e-7. A wrong host
decision (a stale Taylor delta, old symbols, a skipped cache update) moves them by 1e-3 and more, far
outside the 2e-6 tolerance (test_emulation_detects_a_missing_host_update checks that it does).
"""

import pytest
import torch

import _dit_models as M
from _backend_util import reset_dynamo  # noqa: F401  (autouse fixture)
from _runtime_util import fresh_runtime  # noqa: F401  (autouse: no state, step or hooks)
from _graph_emulation import emulated_graphs
from flashomni_compile.config import FlashOmniConfig
from flashomni_compile.runtime import engine, graphs
from flashomni_compile.runtime.controller import clear_step, set_step
from flashomni_compile.runtime.policies import FlashOmniPolicy
from flashomni_compile.runtime.stats import site_stats

pytest.importorskip("diffusers")

STEPS = 6
# 16-token blocks on 64 image + 6 text tokens: 5 q-blocks, so that caching and skipping really happen
SPARSE = {"total_steps": STEPS, "warmup": 1, "interval": 2, "sparse_gemm_min_macs": 0, "sparse_gemm_o_min_macs": 0,
          "block_q": 16, "block_kv": 16, "policy_args": {"tau_kv": 0.5, "cache_fraction": 0.5, "layer_threshold": 0.0}}


def _flux(single: int = 1):
    model, kw = M.flux(num_layers=2, num_single_layers=single)
    side = 8
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                         indexing="ij"), -1).reshape(-1, 3)
    g = torch.Generator().manual_seed(5)
    kw = dict(kw, hidden_states=torch.randn(1, side * side, 4, generator=g), img_ids=img_ids)
    return model, kw


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=2e-6, atol=2e-6))


def _inputs(kw: dict, step: int) -> dict:
    x = kw["hidden_states"]
    return dict(kw, hidden_states=x * (1.0 - 0.1 * step),
                timestep=torch.tensor([1.0 - step / STEPS], device=x.device, dtype=x.dtype))


def _generations(compiled, kw: dict, gens: int, explicit: bool = False, between=None) -> list:
    outs = []
    with torch.no_grad():
        for g in range(gens):
            if between is not None:
                between(g)
            for i in range(STEPS):
                if explicit:
                    set_step(i, STEPS)
                outs.append(compiled(**_inputs(kw, i))[0].clone())
    clear_step()
    return outs


def _stats():
    return [(s.name, s.layers, s.updates, s.dispatches, s.q_density, s.kv_density, s.sparse_updates)
            for s in site_stats()]


def _run(options: dict, gens: int, graphs_on: bool, explicit: bool = False, between=None):
    torch._dynamo.reset()
    engine.set_runtime_options(None)       # also resets
    model, kw = _flux()
    compiled = torch.compile(model, backend="flashomni", fullgraph=True,
                             options={"inner_backend": "aot_eager", "cuda_graphs": graphs_on, **options})
    before = graphs.graph_stats()
    outs = _generations(compiled, kw, gens, explicit, between)
    after = graphs.graph_stats()
    return outs, _stats(), {k: after[k] - before[k] for k in after}


@pytest.mark.parametrize("explicit", [False, True], ids=["counted", "set_step"])
@pytest.mark.parametrize("order,sparse_updates", [(0, False), (1, False), (2, False), (1, True)],
                         ids=["order0", "order1", "order2", "order1-sparse-updates"])
def test_replays_equal_eager_over_generations(explicit, order, sparse_updates):
    opts = dict(SPARSE, taylor_order=order, sparse_updates=sparse_updates)
    ref, ref_stats, none = _run(opts, 3, graphs_on=False, explicit=explicit)
    assert none["captures"] == 0 and none["eager"] == 0, "no runner without cuda_graphs"
    with emulated_graphs():
        out, stats, n = _run(opts, 3, graphs_on=True, explicit=explicit)
    # One graph (fullgraph), STEPS distinct host states. Generation 0 runs eagerly; generation 1 captures
    # (and replays) steps 1.., but its step 0 starts from "generation 0 done", a state generation 0 never
    # started from, so it runs eagerly and is captured in generation 2, which replays the rest.
    assert n["captures"] == STEPS and n["capture_failures"] == 0, n
    assert n["eager"] == STEPS + 1, n
    assert n["replays"] == 2 * STEPS - 1, n     # each capture is replayed at once (the call's GPU work)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert _same(a, b), f"call {i} (generation {i // STEPS}, step {i % STEPS}) differs"
    # the runner restores the host state and re-applies the statistics after each replay
    assert stats == ref_stats
    assert any(s[3] > 0 for s in stats), "dispatch steps ran"
    assert any(s[4] is not None and s[4] < 1.0 for s in stats), "the symbols were sparse"
    assert any(s[6] > 0 for s in stats) == sparse_updates


def test_memory_plan_phases_are_host_state(monkeypatch):
    """The feature cache's two-phase memory plan (CUDA only: engine._device_memory, here faked with ample
    room) raises a branch's order at its second update and keeps it: generation 1's first update starts
    from a planned order-1 cache, a host state generation 0 never had. The runner must key on it (a new
    key: eager, captured in generation 2), and replays must equal eager calls."""
    monkeypatch.setattr(engine, "_device_memory", lambda device: (1 << 40, 1 << 41))
    opts = dict(SPARSE, taylor_order=1, cache_min_free=0.1)
    ref, ref_stats, _ = _run(opts, 3, graphs_on=False)
    with emulated_graphs():
        out, stats, n = _run(opts, 3, graphs_on=True)
    assert n["captures"] == STEPS and n["capture_failures"] == 0 and n["drops"] == 0, n
    assert n["eager"] == STEPS + 2 and n["replays"] == 2 * STEPS - 2, n
    for i, (a, b) in enumerate(zip(out, ref)):
        assert _same(a, b), f"call {i} (generation {i // STEPS}, step {i % STEPS}) differs"
    assert stats == ref_stats


def _wrappers(monkeypatch) -> list:
    """Every StepGraphs the backend builds from now on."""
    made = []
    init = graphs.StepGraphs.__init__

    def record(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)
    monkeypatch.setattr(graphs.StepGraphs, "__init__", record)
    return made


def _regional(graphs_on: bool):
    torch._dynamo.reset()
    engine.set_runtime_options(None)
    model, kw = _flux(single=2)
    model.compile_repeated_blocks(backend="flashomni", fullgraph=True,
                                  options={"inner_backend": "aot_eager", "cuda_graphs": graphs_on, **SPARSE})
    return model, kw


def test_regional_layers_hand_outputs_over(monkeypatch):
    """Regional compilation (one graph per block class, called once per layer): the second dual block reads
    the first one's outputs in place from the wrapper's output buffers (no staging copy) and writes the
    other set; replays equal the eager run, nothing is busy (the caller drops each layer's outputs), and
    the third generation only replays."""
    model, kw = _regional(False)
    ref = _generations(model, kw, 4)
    made = _wrappers(monkeypatch)
    copies = []
    stage = graphs.StepGraphs._static_args

    def counted(self, args, handed=()):
        copies.append(sum(1 for j, i in enumerate(self.dynamic_idx) if not (j < len(handed) and handed[j] is not None)))
        return stage(self, args, handed)
    monkeypatch.setattr(graphs.StepGraphs, "_static_args", counted)
    out, per_gen = [], []
    with emulated_graphs():
        model, kw = _regional(True)
        for _ in range(4):
            before = graphs.graph_stats()
            out += _generations(model, kw, 1)
            per_gen.append({k: graphs.graph_stats()[k] - before[k] for k in before})
    for i, (a, b) in enumerate(zip(out, ref)):
        assert _same(a, b), f"call {i} differs"
    assert all(n["busy"] == 0 and n["capture_failures"] == 0 for n in per_gen), per_gen
    # Generation 2 runs nothing eagerly and generation 3 only replays (4 layers x STEPS calls). The single
    # block has two Dynamo graphs (its first layer takes the dual block's contiguous outputs, the second a
    # slice of one joint tensor: another batch stride), so its captures are not spread as with one graph;
    # only these two counts are asserted. Eager calls hand their outputs over too, else each generation
    # would capture only one layer further down the chain.
    assert per_gen[2]["eager"] == 0 and per_gen[2]["replays"] == 4 * STEPS, per_gen
    assert per_gen[3] == dict(per_gen[3], eager=0, captures=0, replays=4 * STEPS), per_gen
    # Both chains read in place: the dual blocks' (contiguous outputs) and the single blocks' (slices of
    # one joint tensor, whose size-1 batch stride a plain view would renormalise, hiding the buffer)
    chained = [w for w in made if any(any(h is not None for h in e.handed) for e in w.entries.values())]
    assert len(chained) == 2, [(w.name, [e.handed for e in w.entries.values()]) for w in made]
    assert all(any(k[0] == 1 for k in w.out_buffers) for w in chained), "each chain writes both sets"
    assert all(w.handover for w in made)


def test_held_outputs_are_never_overwritten(monkeypatch):
    """A caller that keeps every output (no clone) across calls: the buffer a replay would write is still
    held, so that call runs eagerly and the wrapper returns copies from then on. Every kept output must
    still equal the run without step graphs."""
    opts = dict(SPARSE)
    ref, _, _ = _run(opts, 3, graphs_on=False)
    with emulated_graphs():
        torch._dynamo.reset()
        engine.set_runtime_options(None)
        model, kw = _flux()
        compiled = torch.compile(model, backend="flashomni", fullgraph=True,
                                 options={"inner_backend": "aot_eager", "cuda_graphs": True, **opts})
        before = graphs.graph_stats()
        kept = []
        with torch.no_grad():
            for g in range(3):
                for i in range(STEPS):
                    kept.append(compiled(**_inputs(kw, i))[0])      # held, not cloned
        clear_step()
        n = {k: graphs.graph_stats()[k] - before[k] for k in before}
    assert n["busy"] == 1, n
    for i, (a, b) in enumerate(zip(kept, ref)):
        assert _same(a, b), f"kept output {i} (generation {i // STEPS}, step {i % STEPS}) was overwritten"


def test_replay_runs_no_python_of_the_engine(monkeypatch):
    """A replay must not call the site ops: make them fail after the capture generation."""
    torch._dynamo.reset()
    model, kw = _flux()
    with emulated_graphs():
        compiled = torch.compile(model, backend="flashomni", fullgraph=True,
                                 options={"inner_backend": "aot_eager", "cuda_graphs": True, **SPARSE})
        _generations(compiled, kw, 3)          # eager, capture, capture step 0 (see above)
        calls = []
        for name in ("attention", "linear_q", "linear_o"):
            real = getattr(engine, name)
            monkeypatch.setattr(engine, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
        before = graphs.graph_stats()["replays"]
        _generations(compiled, kw, 1)
        assert graphs.graph_stats()["replays"] - before == STEPS
        assert calls == [], "a replayed call ran the engine's Python"


class _SyncingPolicy:
    """A user policy that reads a device value on the host (a capture cannot hold that)."""

    def __call__(self, ctx):
        if float(ctx.scores.sum()) < 0:   # host read: syncs on a GPU, raises in the emulated capture
            raise AssertionError
        return FlashOmniPolicy(tau_kv=0.5, cache_fraction=0.5, layer_threshold=0.0)(ctx)


def test_capture_failure_falls_back_to_eager():
    opts = dict(SPARSE)
    opts.pop("policy_args")
    opts["policy"] = _SyncingPolicy()
    ref, ref_stats, _ = _run(opts, 3, graphs_on=False)
    with emulated_graphs():
        out, stats, n = _run(opts, 3, graphs_on=True)
    assert n["capture_failures"] > 0, n
    assert n["captures"] > 0, "dispatch steps (no policy call) still capture"
    for a, b in zip(out, ref):
        assert _same(a, b)
    assert stats == ref_stats


def test_reset_and_new_options_drop_the_graphs():
    """engine.reset / set_runtime_options between generations: graphs refer to dropped state tensors."""
    def between(g):
        if g == 2:
            engine.reset()
        if g == 3:
            engine.set_runtime_options(dict(SPARSE, taylor_order=0))

    ref, _, _ = _run(SPARSE, 5, graphs_on=False, between=between)
    with emulated_graphs():
        out, _, n = _run(SPARSE, 5, graphs_on=True, between=between)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert _same(a, b), f"call {i} differs"
    assert n["drops"] >= 1 and n["replays"] > 0, n
    engine.set_runtime_options(None)


def test_runner_leaves_non_matching_calls_alone():
    """Keys that never repeat (counted steps, no total) never capture; results stay exact."""
    opts = dict(SPARSE)
    opts.pop("total_steps")
    ref, _, _ = _run(opts, 2, graphs_on=False)
    with emulated_graphs():
        out, _, n = _run(opts, 2, graphs_on=True)
    assert n["captures"] == 0 and n["replays"] == 0, n
    for a, b in zip(out, ref):
        assert _same(a, b)


def test_expanded_inputs_stay_eager():
    """An input whose elements share memory cannot be copied into a static buffer: the call runs eagerly."""
    with emulated_graphs(), torch.no_grad():
        runner = graphs.StepGraphs(lambda x, w: x * w, [torch.randn(4, 3), torch.nn.Parameter(torch.randn(3))])
        w = torch.nn.Parameter(torch.randn(3))
        x = torch.randn(1, 3).expand(4, 3)
        before = graphs.graph_stats()
        for _ in range(3):
            torch.testing.assert_close(runner(x, w), x * w)
        assert graphs.graph_stats() == before, "no key, no capture, no replay"
        y = torch.randn(4, 3)
        for _ in range(3):
            out = runner(y, w).clone()     # not held across calls (test_held_outputs_are_never_overwritten)
        torch.testing.assert_close(out, y * w)
        after = graphs.graph_stats()
        assert (after["eager"] - before["eager"], after["captures"] - before["captures"]) == (2, 1)


def test_handed_inputs_are_keyed_by_buffer():
    """Two outputs of one shape fed back in swapped order are other addresses for the in-place reads:
    a graph captured for one order must not replay for the other. Every result equals the function."""
    def fn(x, y):
        return x * 2.0 + y, y - x
    with emulated_graphs(), torch.no_grad():
        runner = graphs.StepGraphs(fn, [torch.randn(3), torch.randn(3)])
        x, y = torch.randn(3), torch.randn(3)
        busy = graphs.graph_stats()["busy"]
        for i in range(12):
            want = fn(x, y)
            out = runner(x, y) if i % 3 else runner(y, x)[::-1]   # every third call swaps its inputs
            if i % 3 == 0:
                want = fn(y, x)[::-1]
            for o, w in zip(out, want):
                torch.testing.assert_close(o, w)
            x, y = (t.clone() if i % 4 == 3 else t for t in out)      # some chains restart from fresh tensors
        assert graphs.graph_stats()["busy"] == busy and runner.handover


def test_options_and_inner_patches():
    assert FlashOmniConfig.from_options({}, "reduce-overhead").step_graphs
    assert not FlashOmniConfig.from_options({"cuda_graphs": False}, "reduce-overhead").step_graphs
    assert FlashOmniConfig.from_options({"cuda_graphs": True}).step_graphs
    assert not FlashOmniConfig.from_options({}).step_graphs
    with pytest.raises(ValueError, match="cuda_graphs"):
        FlashOmniConfig.from_options({"cuda_graphs": "yes"})
    from flashomni_compile.backend import _inner_compiler

    cfg = FlashOmniConfig.from_options({}, "reduce-overhead")
    assert _inner_compiler(cfg, step_graphs=True)[1]["triton.cudagraphs"] is False
    assert _inner_compiler(cfg, step_graphs=False)[1]["triton.cudagraphs"] is True


def test_graphs_without_sites_are_not_wrapped():
    from flashomni_compile.backend import capture

    before = graphs.graph_stats()["eager"]
    with capture() as records, emulated_graphs():
        out = torch.compile(lambda x: torch.relu(x) + 1, backend="flashomni",
                            options={"inner_backend": "eager", "cuda_graphs": True})(torch.randn(4))
    assert records and not records[0].sites and out.shape == (4,)
    assert graphs.graph_stats()["eager"] == before, "no site: the runner is not installed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (real CUDA graphs)")
@pytest.mark.parametrize("memory_plan", [False, True], ids=["no-memory-plan", "memory-plan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager_on_gpu(dtype, memory_plan):
    """Real CUDA graphs against the same model without them, over three generations.

    On CUDA the feature cache's memory plan (``cache_min_free``, engine._cache_order) has two phases: a
    branch's first update takes order 0, its second raises the order, and the order then stays for good.
    So generation 1's step 1 (the first update) starts from a planned order-1 cache, a host state
    generation 0's step 1 never had: a new key, run eagerly, captured in generation 2. Without the plan
    (``cache_min_free=None``, as off CUDA) the counts are those of the CPU test above."""
    opts = dict(SPARSE, cache_min_free=0.1 if memory_plan else None)

    def run(on):
        torch._dynamo.reset()
        engine.reset()
        model, kw = _flux()
        model = model.to("cuda", dtype)
        kw = {k: (v.to("cuda", dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else
                  v.to("cuda") if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        compiled = torch.compile(model, backend="flashomni", fullgraph=True,
                                 options={"cuda_graphs": on, **opts})
        before = graphs.graph_stats()
        outs = _generations(compiled, kw, 3)
        return outs, {k: graphs.graph_stats()[k] - before[k] for k in before}

    ref, _ = run(False)
    out, n = run(True)
    late = 1 if memory_plan else 0       # generation 1's step 1 stays eager with the plan
    assert n["capture_failures"] == 0 and n["drops"] == 0, n
    assert n["captures"] == STEPS, n
    assert n["eager"] == STEPS + 1 + late and n["replays"] == 2 * STEPS - 1 - late, n
    # Same kernels on the same values, but cuBLAS may pick another algorithm inside a capture: rounding-level
    # differences only (fp32 runs tf32 GEMMs). A wrong host decision moves the output by > 1e-2.
    tol = {torch.float32: 2e-3, torch.bfloat16: 1e-2}[dtype]
    errs = [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(out, ref)]
    assert max(errs) <= tol, [f"{e:.2e}" for e in errs]


def test_emulation_detects_a_missing_host_update(monkeypatch):
    """The emulation is strong enough to catch a runner that forgets the host state after a replay."""
    monkeypatch.setattr(graphs, "_load", lambda st, saved: None)
    ref, _, _ = _run(SPARSE, 3, graphs_on=False)
    with emulated_graphs():
        out, _, _ = _run(SPARSE, 3, graphs_on=True)
    assert any(not _same(a, b) for a, b in zip(out, ref))
