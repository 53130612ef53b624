"""Per-site statistics: density, update/dispatch counts, time, cache memory; and a readable report.

Counters and times are host values; densities are device tensors (per-head parts) recorded at update
steps and only read (one sync) when a report is made, so collecting them costs nothing on the hot path.
Each update's densities are weighted by the number of dispatch steps its symbols served, so a policy whose
thresholds ramp over the steps is reported by what the dispatch steps actually ran. Times are host
launch times unless ``options={"timing": True}`` synchronises around every site call.

    >>> print(stats_report())          # doctest: +SKIP
    site                     layers  updates  dispatches  q-density  kv-density  cache MiB  ms/update  ms/dispatch
    transformer_blocks.0.attn    2        4          6       0.62        0.81       12.0      1.30        0.41
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

__all__ = ["LayerStats", "SiteStats", "reset_stats", "site_stats", "stats_report"]


_MAX_PERIODS = 32   # per layer: older update periods are merged into one (LayerStats._fold)


def _pair(densities: Tensor) -> Tensor:
    """``(q, kv)`` density of one update: the sum of its parts, float32 ``[2]``."""
    return densities.reshape(-1, 2).sum(0, dtype=densities.dtype)


@dataclass
class LayerStats:
    """Statistics of one layer of one site (kept in its ``LayerState``)."""

    site_name: str
    site: int
    anchor_ptr: int
    updates: int = 0
    dispatches: int = 0
    sparse_updates: int = 0                  # updates whose attention skipped kv-blocks (sparse_updates)
    update_s: float = 0.0
    dispatch_s: float = 0.0
    # one [densities, dispatches served] entry per update of branch 0, the last update's last (densities:
    # a device tensor [..., 2] summing to (q density, kv density), read only by ``site_stats``)
    periods: list = field(default_factory=list)
    cache_bytes: int = 0
    cache_order: int = -1                    # Taylor order in use after the last update; -1: no cache
    # passes run by a CUDA-graph replay (runtime/graphs.py): counted above, but no host time is recorded
    replayed_updates: int = 0
    replayed_dispatches: int = 0

    def clear(self) -> None:
        """Zero the counters, times and density periods in place (CUDA-graph replays keep a reference
        to this object); ``cache_bytes`` and ``cache_order`` describe the layer's state and stay."""
        fresh = LayerStats(self.site_name, self.site, self.anchor_ptr, cache_bytes=self.cache_bytes,
                           cache_order=self.cache_order)
        self.__dict__.update(vars(fresh))

    def count_update(self, sparse: bool = False, replayed: bool = False) -> None:
        """One update pass; ``sparse``: its attention ran on the kv-blocks in force (``sparse_updates``)."""
        self.updates += 1
        self.sparse_updates += sparse
        self.replayed_updates += replayed

    def count_dispatch(self, primary: bool, replayed: bool = False) -> None:
        """One dispatch pass; ``primary``: of branch 0, whose update periods are weighted by it."""
        if primary:
            self.record_dispatch()
        else:
            self.dispatches += 1
        self.replayed_dispatches += replayed

    def record_update(self, densities: Tensor) -> None:
        """One update's densities: a float32 device tensor ``[..., 2]`` whose entries sum to ``(q density,
        kv density)`` (the per-head parts ``kernels.plan.store_plan`` returns, or one ``[2]`` pair)."""
        if len(self.periods) >= _MAX_PERIODS:
            self._fold()
        self.periods.append([densities, 0])

    def _fold(self) -> None:
        """Merge every finished period into one (its dispatch-weighted means), on the device and without a
        sync, so that a long-running process keeps a bounded number of tensors per layer."""
        served = [(d, n) for d, n in self.periods if n > 0]
        self.periods = []
        if served:
            total = sum(n for _, n in served)
            merged = sum(_pair(d) * (n / total) for d, n in served)
            self.periods.append([merged, total])

    def record_dispatch(self) -> None:
        self.dispatches += 1
        if self.periods:
            self.periods[-1][1] += 1

    def dispatch_densities(self) -> Optional[tuple[float, float]]:
        """``(q, kv)`` densities averaged over the dispatch steps (each update's symbols weighted by the
        dispatch steps they served); the last update's when no dispatch ran; None before any update.
        Reads the device (one sync a period)."""
        served = [(d, n) for d, n in self.periods if n > 0]
        if not served:
            return None if not self.periods else tuple(_pair(self.periods[-1][0]).tolist())
        n = sum(k for _, k in served)
        q, kv = sum(_pair(d) * (k / n) for d, k in served).tolist()
        return q, kv

    def add_time(self, kind: str, seconds: float) -> None:
        if kind == "update":
            self.update_s += seconds
        else:
            self.dispatch_s += seconds


@dataclass
class SiteStats:
    """Aggregate over the layers of one site (what ``site_stats`` returns)."""

    name: str
    site: int
    layers: int
    updates: int
    dispatches: int
    sparse_updates: int              # of ``updates``: those whose attention skipped kv-blocks (sparse_updates)
    q_density: Optional[float]       # fraction of (q-block, head) pairs computed: mean over layers and dispatch steps
    kv_density: Optional[float]      # fraction of (query, key) pairs computed (cached q-blocks count 0): same mean
    cache_mib: float                 # feature cache + GEMM-O cache, all layers
    ms_per_update: Optional[float]   # per layer call set (linear_q + attention + linear_o), host-timed
    ms_per_dispatch: Optional[float]  # passes only (CUDA-graph replays record no host time)


def reset_stats() -> None:
    """Start the statistics over, keeping every layer's symbols, caches and captured CUDA graphs (unlike
    ``reset_runtime``): e.g. after warm-up generations, so that a report covers the timed ones only.
    Densities are attributed to updates, so reset at a generation's start (its first step updates)."""
    from .state import all_layer_states

    for st in all_layer_states():
        st.stats.clear()


def site_stats() -> list[SiteStats]:
    """One ``SiteStats`` per site seen at run time (reads the density tensors: syncs once per layer and update period)."""
    from .state import all_layer_states

    by_site: dict[int, list[LayerStats]] = {}
    for st in all_layer_states():
        by_site.setdefault(st.site, []).append(st.stats)
    out = []
    for site, ls in sorted(by_site.items()):
        dens = [d for d in (s.dispatch_densities() for s in ls) if d is not None]
        qd, kd = [d[0] for d in dens], [d[1] for d in dens]
        up, di = sum(s.updates for s in ls), sum(s.dispatches for s in ls)
        out.append(SiteStats(
            name=ls[0].site_name, site=site, layers=len(ls), updates=up, dispatches=di,
            sparse_updates=sum(s.sparse_updates for s in ls),
            q_density=sum(qd) / len(qd) if qd else None, kv_density=sum(kd) / len(kd) if kd else None,
            cache_mib=sum(s.cache_bytes for s in ls) / 2**20,
            ms_per_update=_per_call(sum(s.update_s for s in ls), up - sum(s.replayed_updates for s in ls)),
            ms_per_dispatch=_per_call(sum(s.dispatch_s for s in ls), di - sum(s.replayed_dispatches for s in ls))))
    return out


def _per_call(seconds: float, calls: int) -> Optional[float]:
    return 1e3 * seconds / calls if calls else None


def _f(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def stats_report() -> str:
    """A readable table of ``site_stats()`` (one row per site)."""
    rows = site_stats()
    head = ("site", "layers", "updates", "dispatches", "q-density", "kv-density", "cache MiB", "ms/update",
            "ms/dispatch")
    body = [(s.name, str(s.layers), f"{s.updates} ({s.sparse_updates} sparse)" if s.sparse_updates else str(s.updates),
             str(s.dispatches), _f(s.q_density, ".3f"),
             _f(s.kv_density, ".3f"), _f(s.cache_mib, ".1f"), _f(s.ms_per_update, ".2f"),
             _f(s.ms_per_dispatch, ".2f")) for s in rows]
    if not body:
        return "flashomni runtime: no site has run yet\n"
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in body]) + "\n"
