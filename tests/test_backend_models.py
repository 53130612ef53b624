"""The flashomni backend on real diffusers DiTs (tiny random configs, CPU, policy="dense").

For each model: every attention call is either a site (with the pieces listed here) or left alone with
the expected reason; the compiled graph holds the flashomni ops in place of SDPA; fullgraph=True (no
graph breaks); outputs equal the uncompiled model.
"""

import pytest
import torch

import _dit_models as M
from _backend_util import compile_flashomni, count_ops, first, reset_dynamo  # noqa: F401  (autouse fixture)

pytest.importorskip("diffusers")

FULL = ("gemm_q", "gemm_kv", "attention", "gemm_o")
Q_O = ("gemm_q", "attention", "gemm_o")
# model -> {site name: site_linear_kv ops (one per K/V linear; joint blocks have per-stream ones)}; sites
# not listed have one K and one V projection
KV_COUNT = {"flux": {"transformer_blocks.0.attn": 4}, "sd3": {"transformer_blocks.0.attn": 4,
                                                                "transformer_blocks.1.attn": 4},
            "hunyuan_video": {"transformer_blocks.0.attn": 4}, "wan": {"blocks.0.attn1": 1, "blocks.0.attn2": 1},
            "vit": {"blocks.0": 0, "blocks.1": 0}}
# model -> ({site name: (kind, pieces, text_len, text_first)}, {left-alone name: reason fragment})
EXPECTED = {
    "flux": ({"transformer_blocks.0.attn": ("joint", FULL, 6, True),
              "single_transformer_blocks.0.attn": ("single", FULL, 6, True)}, {}),
    "sd3": ({"transformer_blocks.0.attn": ("joint", FULL, 6, False),
             "transformer_blocks.0.attn2": ("self", FULL, 0, True),
             "transformer_blocks.1.attn": ("joint", FULL, 6, False)}, {}),
    "hunyuan_video": ({"transformer_blocks.0.attn": ("joint", FULL, 6, False),
                       "single_transformer_blocks.0.attn": ("single", FULL, 6, False)},
                      {"context_embedder.token_refiner.refiner_blocks.0.attn": "varies over heads or queries"}),
    # Wan normalises Q and K over all heads at once (rms_norm over H*D): a head-sparse Q or K projection is
    # not exact; V has no norm, so its projection is still GEMM-KV.
    "wan": ({"blocks.0.attn1": ("self", ("gemm_kv", "attention", "gemm_o"), 0, True),
             "blocks.0.attn2": ("cross", ("gemm_kv", "attention", "gemm_o"), 0, True)}, {}),
    "cogvideox": ({"transformer_blocks.0.attn1": ("joint", FULL, 6, True)}, {}),
    "pixart": ({"transformer_blocks.0.attn1": ("self", FULL, 0, True),
                "transformer_blocks.0.attn2": ("cross", FULL, 0, True)}, {}),
    "dit": ({"transformer_blocks.0.attn1": ("self", FULL, 0, True)}, {}),
    # fused QKV linear: GEMM-Q on its Q columns, K and V dense
    "vit": ({"blocks.0": ("self", Q_O, 0, True), "blocks.1": ("self", Q_O, 0, True)}, {}),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_model_sites_ops_and_outputs(name):
    model, kwargs = M.MODELS[name]()
    with torch.no_grad():
        ref = first(model(**kwargs))
    out, records = compile_flashomni(model, kwargs, fullgraph=True)
    assert len(records) == 1, "fullgraph=True: exactly one graph"
    rec = records[0]
    want_sites, want_unmatched = EXPECTED[name]
    got = {s.name: (s.kind, s.pieces, s.text_len, s.text_first) for s in rec.sites}
    assert got == want_sites, rec.report
    assert {u.name for u in rec.unmatched} == set(want_unmatched), rec.report
    for u in rec.unmatched:
        assert want_unmatched[u.name] in u.reason
    counts = count_ops(rec.gm)
    assert counts["attention"] == len(want_sites)
    assert counts["sdpa"] == len(want_unmatched), "every matched SDPA is gone from the graph"
    # one site_linear_q per proven Q projection (two for joint blocks with per-stream projections)
    assert counts["gemm_q"] >= sum(1 for s in rec.sites if "gemm_q" in s.pieces)
    assert counts["gemm_o"] >= sum(1 for s in rec.sites if "gemm_o" in s.pieces)
    kv = KV_COUNT.get(name, {})
    assert counts["gemm_kv"] == sum(kv.get(s.name, 2) for s in rec.sites), rec.report
    torch.testing.assert_close(first(out), ref, rtol=1e-5, atol=1e-5)


def test_hunyuan_key_padding_mask_is_used():
    """The text-padding mask reaches site_attention: padded text tokens change nothing."""
    model, kwargs = M.hunyuan_video()
    _, records = compile_flashomni(model, kwargs, inner_backend="eager")
    att = [n for n in records[0].gm.graph.nodes if n.target is torch.ops.flashomni.site_attention.default]
    assert att and all(n.args[3] is not None for n in att)
    assert all(s.key_padding for s in records[0].sites)


def test_sd3_without_dual_attention_or_qk_norm():
    model, kwargs = M.sd3(dual=False, qk_norm=None, num_layers=1)
    with torch.no_grad():
        ref = first(model(**kwargs))
    out, records = compile_flashomni(model, kwargs, inner_backend="eager")
    # the last (context_pre_only) block keeps only the image output projection
    assert [(s.name, s.kind, s.pieces) for s in records[0].sites] == [("transformer_blocks.0.attn", "joint", FULL)]
    torch.testing.assert_close(first(out), ref, rtol=1e-5, atol=1e-5)


def test_renamed_modules_match_the_same():
    """Matching does not depend on module names: the renamed ViT gives the same sites."""
    (a, kw_a), (b, kw_b) = M.vit(), M.vit(renamed=True)
    _, ra = compile_flashomni(a, kw_a, inner_backend="eager")
    _, rb = compile_flashomni(b, kw_b, inner_backend="eager")
    assert [(s.kind, s.pieces, s.heads, s.head_dim) for s in ra[0].sites] == \
           [(s.kind, s.pieces, s.heads, s.head_dim) for s in rb[0].sites]
    assert [s.name for s in rb[0].sites] == ["zz.0", "zz.1"]
