"""Everything the backend writes for debugging: the site report text and the dump files.

Layout (docs/debugging.md)::

    <dump_dir>/graph_<frame>_<attempt>/        one folder per graph Dynamo hands the backend
        00_received.txt                        the graph as received (code + one line per node)
        01_sites.txt                           the site report (sites with pieces; unmatched with reasons)
        02_rewritten.txt                       the graph after the rewrite pass (only when a site matched)
        03_inner.txt                           the inner backend and the Inductor config patches used

The same report text goes to the ``flashomni_compile`` logger (INFO) and, as a structured-trace
artifact ``flashomni_sites``, to tlparse.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from ..runtime.spec import SiteSpec

__all__ = ["SiteInfo", "UnmatchedInfo", "format_report", "format_graph", "Dumper", "graph_id"]

log = logging.getLogger("flashomni_compile")
_COUNTER = [0]


@dataclass(frozen=True)
class SiteInfo:
    """One rewritten site, as reported: its ``SiteSpec`` (module path ``name``, ``kind``, fused ``pieces``,
    shapes, text layout) plus what only the report needs. Attribute access falls through to the spec."""

    spec: SiteSpec
    key_padding: bool = False
    qk: tuple[str, ...] = ()        # "qk_norm", "rope" when seen between the Q projection and attention
    notes: tuple[str, ...] = ()     # why a piece stayed dense
    index: int = -1                 # the SiteSpec index (``runtime.spec.get_site``)
    graph: str = ""

    def __getattr__(self, name):
        if name == "spec":
            raise AttributeError(name)
        return getattr(self.spec, name)


@dataclass(frozen=True)
class UnmatchedInfo:
    """An attention call left alone; ``reason`` says why, in words."""

    name: str
    reason: str
    graph: str = ""


def graph_id() -> str:
    """``graph_<frame>_<attempt>`` from Dynamo's compile id (stable across runs), else a counter."""
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
        if cid is not None:
            return f"graph_{cid.frame_id}_{cid.frame_compile_id}"
    except Exception:  # pragma: no cover - older/newer torch without these attributes
        pass
    _COUNTER[0] += 1
    return f"graph_x{_COUNTER[0] - 1}"


def format_report(sites: list[SiteInfo], unmatched: list[UnmatchedInfo]) -> str:
    """The readable table used by ``explain`` and ``01_sites.txt``."""
    lines = [f"flashomni: {len(sites)} attention site(s) rewritten, {len(unmatched)} left alone"]
    if sites:
        rows = [("site", "kind", "pieces", "H x D", "Nq/Nkv", "text", "extras")]
        for s in sites:
            text = f"{s.text_len} {'first' if s.text_first else 'last'}" if s.text_len else "-"
            extras = ",".join(list(s.qk) + (["key_padding"] if s.key_padding else [])) or "-"
            rows.append((s.name, s.kind, "+".join(s.pieces), f"{s.heads}x{s.head_dim}", f"{s.seq_q}/{s.seq_kv}", text, extras))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for j, r in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if j == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        notes = [(s.name, n) for s in sites for n in s.notes]
        if notes:
            lines.append("dense pieces:")
            lines += [f"  {name}: {n}" for name, n in notes]
    if unmatched:
        lines.append("left alone:")
        lines += [f"  {u.name}: {u.reason}" for u in unmatched]
    return "\n".join(lines) + "\n"


def format_graph(gm: fx.GraphModule) -> str:
    """Readable code plus one line per node: name, op, target, shape/dtype, module path."""
    from .match import site_name

    out = [gm.print_readable(print_output=False), "", "# nodes: name | op | target | value | module"]
    for n in gm.graph.nodes:
        v = n.meta.get("example_value", n.meta.get("val"))
        val = f"{v.dtype} {tuple(v.shape)}".replace("torch.", "") if isinstance(v, torch.Tensor) else ""
        tgt = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        mod = site_name(n) if n.meta.get("nn_module_stack") else ""
        out.append(f"{n.name} | {n.op} | {tgt} | {val} | {mod}")
    return "\n".join(out) + "\n"


@dataclass
class Dumper:
    """Writes the dump files of one graph (no-op when ``dump_dir`` is ``None``)."""

    dump_dir: Optional[str]
    gid: str
    written: list[str] = field(default_factory=list)

    def text(self, name: str, text: str) -> None:
        if not self.dump_dir:
            return
        d = os.path.join(self.dump_dir, self.gid)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, name + ".txt")
        with open(path, "w") as f:
            f.write(text)
        self.written.append(path)
        log.debug("wrote %s", path)

    def graph(self, name: str, gm: fx.GraphModule) -> None:
        if self.dump_dir:
            self.text(name, format_graph(gm))


def trace_artifact(name: str, text: str) -> None:
    """Emit ``text`` as a structured-trace artifact (shows up in tlparse next to Inductor's graphs)."""
    try:
        from torch._logging import trace_structured

        trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=lambda: text)
    except Exception:  # pragma: no cover
        pass
