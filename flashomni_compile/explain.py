"""``explain(model, *args, **kwargs)``: compile with the flashomni backend, run once, report the sites."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .passes.dump import SiteInfo, UnmatchedInfo, format_report

__all__ = ["explain", "ExplainReport"]


@dataclass
class ExplainReport:
    """``sites``: one ``SiteInfo`` per rewritten site (``.name``, ``.kind`` self/joint/single/cross,
    ``.pieces`` among gemm_q/gemm_kv/attention/gemm_o); ``unmatched``: attention left alone, each with ``.reason``.
    ``str(report)`` is a readable table."""

    sites: list[SiteInfo] = field(default_factory=list)
    unmatched: list[UnmatchedInfo] = field(default_factory=list)
    graphs: int = 0
    output: Any = None

    def __str__(self) -> str:
        return f"{self.graphs} graph(s)\n" + format_report(self.sites, self.unmatched)


def explain(model: torch.nn.Module, *args, options: Optional[dict] = None, **kwargs) -> ExplainReport:
    """Compile ``model`` with ``backend="flashomni"`` (``options`` as for torch.compile; the inner backend
    defaults to ``"eager"`` here since only the matching is reported), run ``model(*args, **kwargs)`` once
    under ``torch.no_grad()``, and return what the backend found. ``output`` holds the model's output.

    Example::

        >>> report = flashomni_compile.explain(transformer, **inputs)   # doctest: +SKIP
        >>> print(report)                                               # doctest: +SKIP
    """
    from .backend import capture, flashomni_backend

    opts = dict(options or {})
    opts.setdefault("inner_backend", "eager")
    # A fresh backend object: Dynamo does not reuse code compiled for another backend.
    backend = functools.partial(flashomni_backend, options=opts)
    with capture() as records, torch.no_grad():
        out = torch.compile(model, backend=backend)(*args, **kwargs)
    return ExplainReport([s for r in records for s in r.sites], [u for r in records for u in r.unmatched],
                         len(records), out)
