"""Helpers for the backend tests: capture Dynamo graphs, compile with flashomni, count site ops."""

from __future__ import annotations

import torch
import torch.fx as fx

from flashomni_compile.backend import capture
from flashomni_compile.passes.flow import is_sdpa

SITE_OPS = {"attention": torch.ops.flashomni.site_attention.default,
            "gemm_q": torch.ops.flashomni.site_linear_q.default,
            "gemm_kv": torch.ops.flashomni.site_linear_kv.default,
            "gemm_o": torch.ops.flashomni.site_linear_o.default}


def dynamo_graphs(model, *args, **kwargs) -> list[fx.GraphModule]:
    """The torch-level FX graphs Dynamo hands a backend (nothing rewritten)."""
    graphs = []

    def backend(gm, example_inputs, **_):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    return graphs


def compile_flashomni(model, kwargs: dict, fullgraph: bool = True, **options):
    """Compile with ``backend="flashomni"`` (entry point name), run once; returns ``(out, records)``."""
    options.setdefault("inner_backend", "aot_eager")
    with capture() as records, torch.no_grad():
        compiled = torch.compile(model, backend="flashomni", fullgraph=fullgraph, options=options)
        out = compiled(**kwargs)
    return out, records


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    counts = {k: 0 for k in SITE_OPS}
    for n in gm.graph.nodes:
        for k, op in SITE_OPS.items():
            if n.target is op:
                counts[k] += 1
    counts["sdpa"] = sum(1 for n in gm.graph.nodes if is_sdpa(n))
    return counts


def first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def reset_dynamo():
    """Each test starts from a clean Dynamo cache (shared code objects would otherwise turn dynamic)."""
    torch._dynamo.reset()
    yield
