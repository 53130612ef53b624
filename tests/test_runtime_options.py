"""RuntimeOptions validation, the schedule and step controller, the diffusers callback, and the runnable
examples of docs/policies.md (every ```python block runs here, in order, in one namespace)."""

from __future__ import annotations

import pathlib
import re

import pytest

from flashomni_compile.runtime.controller import StepCallback, clear_step, current_step, set_step, step_kind
from flashomni_compile.runtime.options import RuntimeOptions, resolve_options
from flashomni_compile.runtime.policies import FlashOmniPolicy, PooledQKPolicy

from _runtime_util import fresh_runtime  # noqa: F401  (autouse)

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "policies.md"


# ---------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------
def test_defaults_and_from_dict():
    o = RuntimeOptions()
    assert (o.policy, o.warmup, o.interval, o.last_dense, o.taylor_order, o.block_q) == ("flashomni", 2, 3, 1, 1, 128)
    o = RuntimeOptions.from_dict({"policy": "pooled_qk", "policy_args": {"tau_kv": 0.2}, "interval": 4})
    assert o.interval == 4 and o.policy_args["tau_kv"] == 0.2
    assert RuntimeOptions.from_dict(None) == RuntimeOptions()
    inst = PooledQKPolicy(tau_kv=0.3)
    assert RuntimeOptions(policy=inst).policy is inst


@pytest.mark.parametrize("kw,match", [
    ({"policy": "sparse"}, r"'policy'='sparse' is not a known policy; valid: dense, flashomni, layer, pooled_qk"),
    ({"policy": 3}, r"'policy' must be a policy name or a policy instance"),
    ({"policy": "pooled_qk", "policy_args": {"tau": 1}}, r"policy 'pooled_qk' has no argument\(s\) 'tau'"),
    ({"policy": PooledQKPolicy(), "policy_args": {"tau_kv": 0.1}}, r"'policy_args' applies to a policy given by name"),
    ({"taylor_order": 3}, r"'taylor_order'=3 is not valid; valid: 0, 1, 2"),
    ({"interval": 0}, r"'interval'=0 is not valid; need an int >= 1"),
    ({"warmup": -1}, r"'warmup'=-1 is not valid"),
    ({"total_steps": 0}, r"'total_steps'=0 is not valid; need an int >= 1 or None"),
    ({"block_q": 48}, r"'block_q'=48 is not valid; need a power of two in 16..256"),
    ({"cache_cap_mb": -1}, r"'cache_cap_mb'=-1 is not valid"),
    ({"cache_min_free": 1.0}, r"'cache_min_free'=1.0 is not valid"),
    ({"symbol_hook": 5}, r"'symbol_hook' must be callable"),
    ({"timing": "yes"}, r"'timing' must be True or False"),
    ({"sparse_updates": 1}, r"'sparse_updates' must be True or False, got 1"),
    ({"sparse_gemm_min_macs": -1}, r"'sparse_gemm_min_macs'=-1 is not valid; need an int >= 0"),
    ({"sparse_gemm_o_min_macs": 1.5}, r"'sparse_gemm_o_min_macs'=1.5 is not valid; need an int >= 0"),
    ({"site_overrides": {"a.*": {"block_q": 64}}}, r"sets 'block_q', which a site override cannot set; valid: policy,"),
    ({"site_overrides": {"a.*": {"interval": 0}}}, r"'interval'=0 is not valid"),
])
def test_option_errors_name_value_and_choices(kw, match):
    with pytest.raises(ValueError, match=match):
        RuntimeOptions(**kw)


def test_from_dict_unknown_key_lists_valid():
    with pytest.raises(ValueError, match=r"unknown flashomni run-time option\(s\) 'intervall'; valid: policy, "):
        RuntimeOptions.from_dict({"intervall": 2})


def test_resolve_from_backend_config():
    from flashomni_compile.config import FlashOmniConfig

    cfg = FlashOmniConfig.from_options({"policy": "flashomni", "block_q": 64, "interval": 2, "taylor_order": 0})
    o = resolve_options(cfg.runtime)
    assert (o.policy, o.block_q, o.block_kv, o.interval, o.taylor_order) == ("flashomni", 64, 128, 2, 0)
    assert resolve_options(None) is None
    assert resolve_options({"interval": 4}).interval == 4
    with pytest.raises(ValueError, match="unknown flashomni run-time option"):
        resolve_options({"bogus": 1})


def test_site_override_applies_to_matching_names_only():
    o = RuntimeOptions(site_overrides={"single_*": {"policy": "dense", "interval": 1}})
    assert o.for_site("single_transformer_blocks.3.attn").policy == "dense"
    assert o.for_site("single_transformer_blocks.3.attn").interval == 1
    assert o.for_site("transformer_blocks.0.attn") is o


def test_flashomni_policy_args_accept_lists():
    o = RuntimeOptions.from_dict({"policy_args": {"tau_kv": [0.0, 0.2]}})
    assert isinstance(o.policy_args["tau_kv"], list)
    from flashomni_compile.runtime.policies import get_policy

    assert get_policy(o.policy, **o.policy_args) == FlashOmniPolicy(tau_kv=(0.0, 0.2))


# ---------------------------------------------------------------------------------------------------
# Schedule and controller
# ---------------------------------------------------------------------------------------------------
def test_step_kind_table():
    o = RuntimeOptions(warmup=2, interval=3, last_dense=1)
    assert [step_kind(s, 10, o)[0] for s in range(10)] == list("uuuddudduu")
    assert [step_kind(s, None, o)[0] for s in range(10)] == list("uuuddudd" + "ud")   # no total: no last step
    o = RuntimeOptions(warmup=0, interval=1, last_dense=0)
    assert {step_kind(s, 5, o) for s in range(5)} == {"update"}
    o = RuntimeOptions(warmup=1, interval=4, last_dense=2)
    assert [step_kind(s, 8, o)[0] for s in range(8)] == list("uudddu" + "uu")   # 0 warm-up, 1 and 5 interval, 6-7 last


def test_set_step_validation_and_state():
    set_step(3, 10)
    assert current_step() == (3, 10)
    clear_step()
    assert current_step() is None
    for bad, match in (((-1,), "step must be an int >= 0"), ((2, 0), "total must be an int >= 1"),
                       ((10, 10), "past the last step")):
        with pytest.raises(ValueError, match=match):
            set_step(*bad)


def test_step_callback_follows_pipeline():
    class Pipe:
        num_timesteps = 4

    cb = StepCallback()
    assert current_step() == (0, None)
    seen = []
    for i in range(4):
        kw = {"latents": i}
        assert cb(Pipe(), i, 999 - i, kw) is kw
        seen.append(current_step())
    assert seen == [(1, 4), (2, 4), (3, 4), (0, 4)]
    StepCallback(total=7)
    assert current_step() == (0, 7)


# ---------------------------------------------------------------------------------------------------
# docs/policies.md examples
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", ["policies.md", "options.md"])
def test_every_option_has_a_row_in_the_docs(doc):
    """Each ``RuntimeOptions`` field is a row (`` | `name` | ``) of the doc's option table."""
    text = (DOCS.parent / doc).read_text()
    rows = {n for cell in re.findall(r"^\| (`[^|]*`) \|", text, flags=re.M) for n in re.findall(r"`([a-z_]+)`", cell)}
    missing = [n for n in RuntimeOptions.option_names() if n not in rows]
    assert not missing, f"docs/{doc} has no row for {missing}"


def test_docs_examples_run():
    from flashomni_compile.runtime.stats import site_stats

    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) == 2
    ns: dict = {}
    for code in blocks:
        exec(compile(code, str(DOCS), "exec"), ns)
    stats = {round(s.kv_density, 5) for s in site_stats()}
    assert 0.34375 in stats          # the band hook: 22 of 64 block pairs
    assert 0.25 in stats             # the topk policy: 2 of 8 kv-blocks per row
    assert all(s.dispatches == 2 for s in site_stats())


def _literal(cell: str):
    """The Python value of a doc cell holding one backticked literal (``None``/``2**34``/``(0.02, 0.05)``...)."""
    import ast
    return eval(compile(ast.parse(cell, mode="eval"), "<doc>", "eval"), {"__builtins__": {}})


def test_documented_option_defaults_match_the_code():
    """docs/options.md's default column equals ``RuntimeOptions()`` for every option whose cell is one literal."""
    text = (DOCS.parent / "options.md").read_text()
    defaults, checked = RuntimeOptions(), []
    for name_cell, value in re.findall(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)*) \| `([^`|]+)` \|", text, flags=re.M):
        for name in re.findall(r"`([a-z_]+)`", name_cell):
            if name in RuntimeOptions.option_names():
                want = getattr(defaults, name)
                got = _literal(value)
                assert got == want or (want == {} and got == {}), f"docs/options.md: {name} default {value}, code {want!r}"
                checked.append(name)
    assert {"sparse_updates", "warmup", "interval", "taylor_order", "sparse_gemm_min_macs"} <= set(checked)


def test_documented_policy_defaults_match_the_code():
    """docs/policies.md's policy table lists each policy's dataclass defaults (``name=value`` cells)."""
    from flashomni_compile.runtime.policies import get_policy

    text = DOCS.read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| `([A-Za-z]+Policy)` \| (.*?) \|", text, flags=re.M)
    assert {r[0] for r in rows} >= {"pooled_qk", "qcache", "flashomni", "window"}
    for name, _cls, cell in rows:
        pol = get_policy(name)
        for key, value in re.findall(r"`([a-z_0-9]+)=([^`]+)`", cell):
            if "(" in value and not value.startswith("("):
                continue                              # a constructor call, e.g. inner=QCachePolicy()
            assert _literal(value) == getattr(pol, key), f"docs/policies.md: {name}.{key}={value}, code {getattr(pol, key)!r}"
