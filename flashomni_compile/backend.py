"""The ``flashomni`` torch.compile backend: options -> match -> rewrite -> inner backend (Inductor).

``torch.compile(model, backend="flashomni", options={...})`` reaches ``flashomni_backend`` through the
``torch_dynamo_backends`` entry point (pyproject.toml), no import needed. Options: ``config.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx

from .config import FlashOmniConfig
from .passes import dump
from .passes.dump import SiteInfo, UnmatchedInfo
from .passes.match import find_sites
from .passes.rewrite import rewrite_sites, spec_of

__all__ = ["flashomni_backend", "CompileRecord", "capture"]

log = logging.getLogger("flashomni_compile")


@dataclass
class CompileRecord:
    """What the backend did with one graph (handed to ``capture()`` observers, used by ``explain``)."""

    graph: str
    config: FlashOmniConfig
    sites: list[SiteInfo]
    unmatched: list[UnmatchedInfo]
    gm: fx.GraphModule                  # the graph after the rewrite (what the inner backend compiles)
    report: str
    dump_files: list[str] = field(default_factory=list)


_OBSERVERS: list[Callable[[CompileRecord], None]] = []


@contextlib.contextmanager
def capture() -> Iterator[list[CompileRecord]]:
    """Collect a ``CompileRecord`` for every graph the backend compiles inside the ``with`` block."""
    records: list[CompileRecord] = []
    _OBSERVERS.append(records.append)
    try:
        yield records
    finally:
        _OBSERVERS.remove(records.append)


def flashomni_backend(gm: fx.GraphModule, example_inputs: list, mode: Optional[str] = None,
                      options: Optional[dict] = None, **unexpected: Any):
    """Dynamo backend entry point: ``fn(gm, example_inputs, mode=..., options=...)``."""
    if unexpected:
        raise ValueError(f"flashomni backend got unexpected argument(s) {sorted(unexpected)}; "
                         "pass backend options as torch.compile(..., options={...})")
    config = FlashOmniConfig.from_options(options, mode)
    return compile_graph(gm, example_inputs, config)


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: FlashOmniConfig):
    gid = dump.graph_id()
    dumper = dump.Dumper(config.dump_dir, gid)
    dumper.graph("00_received", gm)
    sites, rejected = find_sites(gm, config)
    unmatched = [UnmatchedInfo(r.name, r.reason, gid) for r in rejected]
    infos = [SiteInfo(spec_of(s, config), s.key_padding is not None, s.norms, tuple(s.notes), -1, gid) for s in sites]
    if sites:
        indices = rewrite_sites(gm, sites, config)
        infos = [dataclasses.replace(i, index=k) for i, k in zip(infos, indices)]
    report = dump.format_report(infos, unmatched)
    if sites or unmatched:
        log.info("%s: %s", gid, report.rstrip())
    dumper.text("01_sites", report)
    dump.trace_artifact("flashomni_sites", report)
    if sites:
        dumper.graph("02_rewritten", gm)
    step_graphs = config.step_graphs and bool(sites)
    inner, patches = _inner_compiler(config, step_graphs)
    dumper.text("03_inner", f"inner_backend: {config.inner_backend}\nconfig_patches: {patches}\n"
                            f"step_graphs: {step_graphs}\n")
    record = CompileRecord(gid, config, infos, unmatched, gm, report, dumper.written)
    for obs in list(_OBSERVERS):
        obs(record)
    compiled = inner(gm, example_inputs)
    if step_graphs:
        from .runtime.graphs import StepGraphs

        compiled = StepGraphs(compiled, example_inputs, gid)
    return compiled


def _inner_compiler(config: FlashOmniConfig, step_graphs: bool = False) -> tuple[Callable, dict]:
    if config.inner_backend == "eager":
        return (lambda gm, ex: gm.forward), {}
    if config.inner_backend == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager, {}
    import torch._inductor
    from torch._inductor.compile_fx import compile_fx

    patches: dict = {}
    if config.mode is not None:
        patches.update(torch._inductor.list_mode_options(config.mode))
    patches.update(config.inductor)
    if step_graphs:   # the whole call is captured by runtime/graphs.py: no CUDA graphs of Inductor's inside
        patches["triton.cudagraphs"] = False
    if not patches:   # exactly what backend="inductor" does with no mode/options
        return compile_fx, patches
    return (lambda gm, ex: compile_fx(gm, ex, config_patches=dict(patches))), patches
