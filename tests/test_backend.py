"""The backend around the passes: options, entry point, inner backends, dumps, logging, explain, run-time
contract (per-layer anchors, zero recompiles), and graphs without attention left exactly as Inductor gets them."""

import logging
import os

import pytest
import torch
from torch import nn

import _dit_models as M
from _backend_util import compile_flashomni, count_ops, first, reset_dynamo  # noqa: F401  (autouse fixture)
import flashomni_compile
from flashomni_compile import backend as fo_backend
from flashomni_compile.config import FlashOmniConfig
from flashomni_compile.runtime import engine
from flashomni_compile.runtime.spec import get_site


def test_entry_point_name_is_registered():
    from torch._dynamo import list_backends

    assert "flashomni" in list_backends(exclude_tags=())


@pytest.mark.parametrize("options,fragment", [
    ({"polcy": "dense"}, "unknown flashomni option(s) 'polcy'; valid: dump_dir, inner_backend"),
    ({"policy": "nope"}, "valid: dense"),
    ({"interval": 0}, "'interval'=0 is not valid"),
    ({"inner_backend": "tvm"}, "valid: inductor, eager, aot_eager"),
    ({"block_q": 100}, "power of two"),
    ({"fuse_gemm_q": 1}, "True or False"),
    ({"inductor": 3}, "must be a dict"),
    ({"runtime": {"interval": 2}}, "unknown flashomni option(s) 'runtime'"),
])
def test_bad_options_raise_with_valid_choices(options, fragment):
    with pytest.raises(ValueError) as e:
        fo_backend.flashomni_backend(None, [], options=options)
    assert fragment in str(e.value)


def test_bad_option_surfaces_through_torch_compile():
    model, kw = M.vit()
    with pytest.raises(Exception, match="unknown flashomni option"):
        torch.compile(model, backend="flashomni", options={"bogus": 1})(**kw)


def test_mode_and_env_dump_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHOMNI_DUMP_DIR", str(tmp_path))
    cfg = FlashOmniConfig.from_options({"interval": 5, "block_q": 64}, mode="max-autotune")
    assert cfg.mode == "max-autotune" and cfg.dump_dir == str(tmp_path)
    assert (cfg.runtime.interval, cfg.block_q, cfg.policy) == (5, 64, "flashomni")   # flat run-time keys
    flashomni_compile.register_policy("test_only_policy", flashomni_compile.DensePolicy)
    assert FlashOmniConfig.from_options({"policy": "test_only_policy"}).policy == "test_only_policy"


def test_dumps_and_logging(tmp_path, caplog):
    model, kw = M.hunyuan_video()
    with caplog.at_level(logging.DEBUG, logger="flashomni_compile"):
        _, records = compile_flashomni(model, kw, inner_backend="eager", dump_dir=str(tmp_path))
    (gdir,) = os.listdir(tmp_path)
    assert gdir == "graph_0_0"
    files = sorted(os.listdir(tmp_path / gdir))
    assert files == ["00_received.txt", "01_sites.txt", "02_rewritten.txt", "03_inner.txt"]
    sites = (tmp_path / gdir / "01_sites.txt").read_text()
    assert sites == records[0].report and "left alone:" in sites and "single_transformer_blocks.0.attn" in sites
    assert "scaled_dot_product_attention" in (tmp_path / gdir / "00_received.txt").read_text()
    assert "flashomni.site_attention" in (tmp_path / gdir / "02_rewritten.txt").read_text()
    msgs = [r.getMessage() for r in caplog.records if r.name == "flashomni_compile"]
    assert any("site transformer_blocks.0.attn: kind=joint" in m for m in msgs)
    assert any("left alone context_embedder" in m for m in msgs)


def test_explain_report():
    model, kw = M.hunyuan_video()
    report = flashomni_compile.explain(model, **kw)
    assert [s.name for s in report.sites] == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert [s.kind for s in report.sites] == ["joint", "single"]
    assert report.sites[0].pieces == ("gemm_q", "gemm_kv", "attention", "gemm_o")
    (u,) = report.unmatched
    assert "not a key-padding mask" in u.reason
    text = str(report)
    assert "kind" in text and "pieces" in text and "left alone:" in text


def test_graph_without_attention_goes_to_inductor_untouched(monkeypatch):
    """No site: the received graph object goes to compile_fx unchanged, with no config patches."""
    import torch._inductor.compile_fx as cfx

    seen = []
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, ex, **kw: seen.append((gm.code, kw)) or gm.forward)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    x = torch.randn(2, 8)
    with fo_backend.capture() as records, torch.no_grad():
        out = torch.compile(model, backend="flashomni")(x)
    assert records[0].sites == [] and count_ops(records[0].gm)["attention"] == 0
    ((code, kw),) = seen
    assert kw == {} and code == records[0].gm.code
    torch.testing.assert_close(out, model(x))


def test_inductor_end_to_end():
    model, kw = M.vit()
    with torch.no_grad():
        ref = model(**kw)
    out, records = compile_flashomni(model, kw, inner_backend="inductor")
    assert count_ops(records[0].gm)["attention"] == 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


class _Recorder:
    """Stands in for the runtime: records (site, anchor) per call and updates a persistent device tensor
    in place, as the real runtime does with its symbols, so the state changes between calls."""

    def __init__(self, monkeypatch):
        self.calls, self.state = [], torch.zeros(())
        orig = engine.attention

        def attention(site, anchor, q, k, v, kpm, scale):
            self.calls.append((site, anchor.data_ptr()))
            self.state += 1
            return orig(site, anchor, q, k, v, kpm, scale)

        monkeypatch.setattr(engine, "attention", attention)


def test_no_recompiles_over_ten_steps(monkeypatch):
    rec = _Recorder(monkeypatch)
    model, kw = M.flux()
    compiled = torch.compile(model, backend="flashomni", fullgraph=True, options={"inner_backend": "aot_eager"})
    with fo_backend.capture() as records, torch.no_grad():
        for step in range(10):
            kw = dict(kw, hidden_states=torch.randn_like(kw["hidden_states"]),
                      timestep=torch.tensor([1.0 - step / 10]))
            out = first(compiled(**kw))
            torch.testing.assert_close(out, first(model(**kw)), rtol=1e-5, atol=1e-5)
    assert len(records) == 1, "compiled once"
    assert float(rec.state) == 20 and len(rec.calls) == 20   # 2 sites x 10 steps


def test_repeated_blocks_get_one_anchor_per_layer(monkeypatch):
    """compile_repeated_blocks: as many graphs as plain torch.compile makes (one per block class, plus
    the stride recompile Flux's first single block causes in plain torch.compile too), and a distinct
    anchor per layer."""
    plain, kw = M.flux(num_layers=2, num_single_layers=3)
    plain_graphs = []
    plain.compile_repeated_blocks(backend=lambda gm, ex: plain_graphs.append(gm) or gm.forward, fullgraph=True)
    with torch.no_grad():
        plain(**kw), plain(**kw)
    torch._dynamo.reset()
    rec = _Recorder(monkeypatch)
    model, kw = M.flux(num_layers=2, num_single_layers=3)
    with torch.no_grad():
        ref = first(model(**kw))
    rec.calls.clear()
    model.compile_repeated_blocks(backend="flashomni", fullgraph=True, options={"inner_backend": "aot_eager"})
    with fo_backend.capture() as records, torch.no_grad():
        out = first(model(**kw))
        first(model(**kw))
    assert len(records) == len(plain_graphs), [r.graph for r in records]
    kinds = {get_site(s.index).kind for r in records for s in r.sites}
    assert kinds == {"joint", "single"}
    anchors = {a for _, a in rec.calls}
    assert len(rec.calls) == 10 and len(anchors) == 5          # 5 layers, 2 calls each
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_recompiled_block_keeps_its_layers_state():
    """Flux's stride recompile (above) registers the single-stream site again: the layers the new graph
    serves, the first single block included, keep the state they had (one LayerState per layer, every
    update counted on it). Keyed by the raw site index, the first single block's step-0 state was orphaned
    and it started over at step 1 with no history (a full-size Flux run reported it as a site of its own)."""
    from flashomni_compile.runtime.spec import layer_site
    from flashomni_compile.runtime.state import all_layer_states

    model, kw = M.flux(num_layers=1, num_single_layers=3)
    flashomni_compile.reset_runtime()
    steps = 4
    model.compile_repeated_blocks(backend="flashomni", fullgraph=True, options=dict(
        inner_backend="aot_eager", policy="flashomni", block_q=16, block_kv=16, warmup=1, interval=2,
        total_steps=steps, sparse_gemm_min_macs=0, sparse_gemm_o_min_macs=0))
    with fo_backend.capture() as records, torch.no_grad():
        for step in range(steps):
            flashomni_compile.set_step(step, steps)
            model(**dict(kw, timestep=torch.tensor([1.0 - step / steps])))
    flashomni_compile.clear_step()
    singles = [s.index for r in records for s in r.sites if get_site(s.index).kind == "single"]
    assert len(singles) == 2 and layer_site(singles[1]) == layer_site(singles[0]) == singles[0]
    states = all_layer_states()
    assert len(states) == 4, [(st.site, st.spec.name) for st in states]          # 1 joint + 3 single layers
    assert {st.site for st in states if st.spec.kind == "single"} == {singles[0]}
    assert len({(st.stats.updates, st.stats.dispatches) for st in states}) == 1, \
        [(st.spec.name, st.stats.updates, st.stats.dispatches) for st in states]


def test_site_ops_opcheck():
    from torch.library import opcheck

    from _runtime_util import make_site

    # its own site (index), not whatever an earlier test left registered
    site = make_site(None, heads=2, head_dim=16, seq=8, text_len=0, name="opcheck.attn")
    q = torch.randn(1, 2, 8, 16)
    kpm = torch.ones(1, 8, dtype=torch.bool)
    opcheck(torch.ops.flashomni.site_attention.default, (q, q, q, kpm, site, q, 0.25))
    x, w = torch.randn(1, 8, 32), torch.randn(48, 32)
    opcheck(torch.ops.flashomni.site_linear_q.default, (x, w, None, site, w, 0, 32))
    opcheck(torch.ops.flashomni.site_linear_kv.default, (x, w, torch.randn(48), site, w, 0))
    opcheck(torch.ops.flashomni.site_linear_o.default, (x, w, torch.randn(48), x, torch.randn(48, 32), site, w, 0))
    out = torch.ops.flashomni.site_attention.default(q, q, q, None, site, q, 0.25)
    assert out.transpose(1, 2).is_contiguous(), "memory order [B, Nq, H, D]"


def test_site_ops_stay_out_of_cuda_graphs():
    # The step schedule is host logic inside the site ops: a CUDA-graph replay would freeze one step kind.
    for op in (torch.ops.flashomni.site_attention, torch.ops.flashomni.site_linear_q,
               torch.ops.flashomni.site_linear_kv, torch.ops.flashomni.site_linear_o):
        assert torch.Tag.cudagraph_unsafe in op.default.tags


def test_set_runtime_options_switches_policy_without_recompiling():
    """One compiled graph serves every setting: the override changes what the site ops do (the dense
    policy keeps no per-layer state; a sparse one does), never the graph; None restores the compile-time
    options; compile-side keys are refused."""
    from flashomni_compile.runtime.state import all_layer_states

    flashomni_compile.reset_runtime()   # earlier tests' layers
    model, kw = M.flux()
    compiled = torch.compile(model, backend="flashomni", fullgraph=True,
                             options={"inner_backend": "aot_eager", "policy": "dense"})
    with torch.no_grad():
        ref = first(model(**kw))
    sparse = {"policy": "pooled_qk", "policy_args": {"tau_kv": 0.5}, "block_q": 16, "block_kv": 16,
              "warmup": 1, "interval": 2}
    with fo_backend.capture() as records, torch.no_grad():
        torch.testing.assert_close(first(compiled(**kw)), ref, rtol=1e-5, atol=1e-5)
        assert all_layer_states() == []                       # compiled policy: dense, no state
        flashomni_compile.set_runtime_options(sparse)
        for _ in range(3):
            out = first(compiled(**kw))
        assert all_layer_states() and all(st.options.policy == "pooled_qk" for st in all_layer_states())
        assert any(st.stats.dispatches for st in all_layer_states())
        assert not torch.equal(out, ref)                      # the dispatch step really skipped blocks
        flashomni_compile.set_runtime_options(None)
        torch.testing.assert_close(first(compiled(**kw)), ref, rtol=1e-5, atol=1e-5)
        assert all_layer_states() == []
    assert len(records) == 1, "compiled once"
    with pytest.raises(ValueError, match=r"unknown flashomni run-time option\(s\) 'inner_backend'"):
        flashomni_compile.set_runtime_options({"inner_backend": "eager"})


# ---------------------------------------------------------------------------------------------------
# GEMM-KV in a compiled denoising loop
# ---------------------------------------------------------------------------------------------------
def _tinydit():
    """The tinydit MM-DiT (examples/tinydit) at a tiny random configuration: 64 image + 16 text tokens."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from examples.tinydit import data
    from examples.tinydit.model import TinyDiTConfig, TinyMMDiT

    torch.manual_seed(0)
    m = TinyMMDiT(TinyDiTConfig(width=64, heads=2, layers=2, rope_axes=(8, 12, 12), sample_size=16)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = data.tokenize(["red solid circle center"])
    return m, dict(hidden_states=x, timestep=torch.tensor([0.9]), caption_ids=ids)


def _whole_head_and_diagonal(spec, step, scores, sym):
    """Head 1 cached whole; head 0 computes the even q-blocks, each attending to kv-block 0 (text first in
    both models) and its diagonal one: head 0 needs kv-block 0 and the even kv-blocks, head 1 none."""
    nqb, nkb = sym.kv_keep.shape[-2:]
    i, j = torch.arange(nqb)[:, None], torch.arange(nkb)[None, :]
    sym.q_keep[:] = torch.arange(nqb) % 2 == 0
    sym.q_keep[:, 1] = False
    sym.kv_keep[:] = (i == j) | (j == 0)


def _denoise(model, kw, steps, **options):
    """``steps`` steps of a toy denoising loop through one flashomni compile (fullgraph, recompiles are
    errors); returns (inputs, outputs, records, the symbols each layer ended with, the kv_need tensors
    GEMM-KV ran on)."""
    from flashomni_compile.runtime.state import all_layer_states

    torch._dynamo.reset()
    flashomni_compile.reset_runtime()
    opts = dict(inner_backend="aot_eager", policy="flashomni", block_q=16, block_kv=16, warmup=1, interval=3,
                last_dense=1, total_steps=steps, taylor_order=1, sparse_gemm_min_macs=0,
                sparse_gemm_o_min_macs=0, symbol_hook=_whole_head_and_diagonal, **options)
    compiled = torch.compile(model, backend="flashomni", fullgraph=True, options=opts)
    gates, orig = [], engine.sparse_linear_q_op

    def spy(x, w, b, keep, *a):
        gates.append(keep)
        return orig(x, w, b, keep, *a)

    ins, outs, x = [], [], kw["hidden_states"]
    with fo_backend.capture() as records, torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        engine.sparse_linear_q_op = spy
        try:
            for step in range(steps):
                ins.append(dict(kw, hidden_states=x, timestep=torch.tensor([1.0 - step / steps])))
                out = first(compiled(**ins[-1]))
                outs.append(out)
                x = x - 0.2 * out
        finally:
            engine.sparse_linear_q_op = orig
    states = all_layer_states()
    symbols = sorted((st.spec.name, st.anchor_ptr, st.branches[0].symbols.q_keep.tolist(),
                      st.branches[0].symbols.kv_keep.tolist()) for st in states)
    needs = {st.branches[0].kv_need.data_ptr(): st.branches[0].kv_need for st in states}
    return ins, outs, records, symbols, [needs[g.data_ptr()] for g in gates if g.data_ptr() in needs]


@pytest.mark.parametrize("name", ["flux", "tinydit"])
def test_gemm_kv_equals_dense_kv_in_a_denoising_loop(name, monkeypatch):
    """With GEMM-KV (the default) the K/V projections are ``site_linear_kv`` ops and dispatch steps compute
    only the (kv-block, head) tiles attention reads; every step's output equals the same loop compiled
    with ``fuse_gemm_kv=False`` (same symbols: a hook fixes them), one graph, no recompiles, no graph
    breaks. Tolerance: float32, 1e-5 relative. Both runs compute the same dense values on every tile
    attention reads, so only the GEMM's rounding may differ: the GEMM-KV tiles come from the sparse GEMM
    (on CPU its torch twin, matmul then bias: bitwise equal to ``addmm`` here; on a GPU the Triton kernel,
    another summation order, ~1e-7 relative), and the loop feeds that into later steps. Mutation check:
    with kv-block 0 of head 0 dropped from ``kv_need`` the dispatch steps' outputs move by > 1e-3
    (~3e-2 seen), so the comparison catches a gate that drops a needed block."""
    model, kw = _tinydit() if name == "tinydit" else M.flux()
    steps = 6                                  # updates 0, 1, 4, 5; dispatches 2, 3
    ins, got, rec_kv, sym_kv, gates = _denoise(model, kw, steps)
    _, ref, rec_dense, sym_dense, dense_gates = _denoise(model, kw, steps, fuse_gemm_kv=False)
    assert len(rec_kv) == len(rec_dense) == 1, "one graph each"
    kv_ops = count_ops(rec_kv[0].gm)["gemm_kv"]
    assert kv_ops >= 2 * len(rec_kv[0].sites) and count_ops(rec_dense[0].gm)["gemm_kv"] == 0
    assert all("gemm_kv" in s.pieces for s in rec_kv[0].sites)
    assert sym_kv == sym_dense
    # every K/V op of every layer ran sparse at both dispatch steps, on a gate that skips tiles
    assert len(gates) == 2 * kv_ops and not dense_gates
    assert all(not g[:, 1].any() and g[:, 0].any() and not g.all() for g in gates)
    for step, (a, b) in enumerate(zip(got, ref)):
        assert float((a - b).norm() / b.norm()) < 1e-5, step
    with torch.no_grad():      # the dispatch steps really cached and skipped (else equality proves little)
        for step in (2, 3):
            plain = first(model(**ins[step]))
            assert float((got[step] - plain).norm() / plain.norm()) > 1e-3, step

    from flashomni_compile.runtime import state
    good = state.store_plan

    def drop_block_0(*args):          # kv_need (the 7th argument) without kv-block 0 of head 0
        dens = good(*args)
        args[6][:, 0, 0] = False
        return dens

    monkeypatch.setattr(state, "store_plan", drop_block_0)
    _, bad, *_ = _denoise(model, kw, steps)
    for step in (2, 3):
        assert float((bad[step] - ref[step]).norm() / ref[step].norm()) > 1e-3, step
