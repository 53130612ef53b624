"""Per-layer run-time state of a site: persistent symbol tensors, feature cache, pass tracking.

State is keyed by ``(spec.layer_site(site), anchor.data_ptr())``: ``site`` is the ``SiteSpec`` index the
graph carries (``layer_site``: the same index for every recompiled graph of the block), ``anchor`` a weight
of the layer, so one compiled block reused for every layer (diffusers' ``compile_repeated_blocks``) gets
one ``LayerState`` per layer. Inside a layer, a ``BranchState`` holds
the device tensors of one *branch*: normally one; with classifier-free guidance run as two forward
calls per step and the step set explicitly (``set_step``), the second call of a step is branch 1, so
the conditional and unconditional passes keep separate symbols and caches.

Device tensors (``q_keep``, ``kv_keep``, ``kv_count``, ``kv_index``, ``kv_need``, the cache terms) are
allocated at a branch's first update and overwritten in place by later updates; dispatch steps only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from ..kernels.plan import store_plan
from ..symbols import SparseSymbols
from .cache import FeatureCache
from .options import RuntimeOptions
from .spec import SiteSpec, layer_site
from .stats import LayerStats

__all__ = ["BranchState", "LayerState", "Pass", "layer_state", "all_layer_states", "reset_state", "symbols_of",
           "UPDATE", "DISPATCH"]

UPDATE, DISPATCH = "update", "dispatch"


@dataclass
class BranchState:
    """Device state of one branch of one layer (see the module docstring)."""

    signature: Optional[tuple] = None        # (batch, dtype, device) the buffers were built for
    symbols: Optional[SparseSymbols] = None  # persistent q_keep / kv_keep
    kv_count: Optional[Tensor] = None
    kv_index: Optional[Tensor] = None
    kv_need: Optional[Tensor] = None         # [B, H, NKB]: kv-blocks a dispatch step reads (GEMM-KV's gate)
    cache: Optional[FeatureCache] = None     # None: this branch does not cache (q-blocks all computed)
    last_update: Optional[int] = None        # step of the last update (host int)
    q_sparse: bool = False                   # host flags fixed at the last update: which kernels to run
    kv_sparse: bool = False

    def store_symbols(self, sym: SparseSymbols, kv_sparse: bool = True) -> Tensor:
        """Copy ``sym`` into the persistent tensors (allocated the first time) and rebuild the lists and
        ``kv_need``; returns the update's density parts (float32 ``[B * H, 2]``, summing to
        ``(sym.q_density(), sym.kv_density())``) for the statistics.

        One pass, ``kernels.plan.store_plan`` (one launch on CUDA): the lists are
        ``kv_block_lists(kv_keep)`` and ``kv_need`` is ``symbols.kv_need(q_keep, kv_keep, kv_sparse)``,
        written in place: ``kv_sparse`` says whether dispatch steps run attention on the kv-block lists
        (else every computed q-block reads every kv-block, and a head needs all its kv-blocks as soon as
        one of its q-blocks is computed)."""
        cur = self.symbols
        if cur is None or cur.q_keep.shape != sym.q_keep.shape or cur.kv_keep.shape != sym.kv_keep.shape \
                or cur.q_keep.device != sym.q_keep.device:
            B, H, nqb, nkb = sym.kv_keep.shape
            dev = sym.kv_keep.device
            cur = SparseSymbols(torch.empty(B, H, nqb, dtype=torch.bool, device=dev),
                                torch.empty(B, H, nqb, nkb, dtype=torch.bool, device=dev),
                                sym.seq_q, sym.seq_kv, sym.block_q, sym.block_kv)
            self.kv_count = torch.empty(B, H, nqb, dtype=torch.int32, device=dev)
            self.kv_index = torch.empty(B, H, nqb, nkb, dtype=torch.int32, device=dev)
            self.kv_need = torch.empty(B, H, nkb, dtype=torch.bool, device=dev)
            self.symbols = cur
        dens = store_plan(sym.q_keep, sym.kv_keep, cur.q_keep, cur.kv_keep, self.kv_count, self.kv_index,
                          self.kv_need, sym.seq_q, sym.seq_kv, sym.block_q, sym.block_kv, kv_sparse)
        cur._lists = (self.kv_count, self.kv_index)
        return dens

    def tensors(self) -> list[Tensor]:
        """Every persistent device tensor (tests check that dispatch steps replace none)."""
        ts = [] if self.symbols is None else [self.symbols.q_keep, self.symbols.kv_keep, self.kv_count, self.kv_index,
                                              self.kv_need]
        return ts + ([] if self.cache is None else self.cache.tensors())


@dataclass
class Pass:
    """What the current pass of a layer is: its step, kind (update/dispatch) and branch."""

    step: int
    total: Optional[int]
    kind: str
    branch: BranchState


@dataclass
class LayerState:
    """Run-time state of one layer of one site."""

    site: int
    anchor_ptr: int
    spec: SiteSpec
    options: RuntimeOptions
    policy: Any
    branches: list[BranchState] = field(default_factory=list)
    stats: LayerStats = None
    # pass tracking (host ints): a pass begins at the first site call after the attention call
    # (``linear_q`` or ``linear_kv``, whichever comes first in the graph, else ``attention``)
    attn_done: bool = True
    counted_step: int = -1
    explicit_step: Optional[int] = None
    branch_index: int = 0
    current: Optional[Pass] = None

    def __post_init__(self):
        if self.stats is None:
            self.stats = LayerStats(self.spec.name, self.site, self.anchor_ptr)

    def branch(self, index: int) -> BranchState:
        while len(self.branches) <= index:
            self.branches.append(BranchState())
        return self.branches[index]

    def tensors(self) -> list[Tensor]:
        return [t for b in self.branches for t in b.tensors()]


_STATES: dict[tuple[int, int], LayerState] = {}


def layer_state(site: int, anchor: Tensor, spec: SiteSpec, options: RuntimeOptions, policy: Any) -> LayerState:
    """The state of the layer whose anchor weight is ``anchor`` at site ``site`` (created on first use)."""
    key = (site, anchor.data_ptr())
    st = _STATES.get(key)
    if st is None:
        st = _STATES[key] = LayerState(site, key[1], spec, options, policy)
    return st


def all_layer_states() -> list[LayerState]:
    return list(_STATES.values())


def reset_state() -> None:
    """Drop every layer's state (symbols, caches, step counters, stats)."""
    _STATES.clear()


def symbols_of(site: int, anchor: Tensor, branch: int = 0) -> Optional[SparseSymbols]:
    """The symbols in force for one layer (``None`` before its first update)."""
    st = _STATES.get((layer_site(site), anchor.data_ptr()))
    if st is None or len(st.branches) <= branch:
        return None
    return st.branches[branch].symbols


def signature_of(t: Tensor) -> tuple:
    return (t.shape[0], t.dtype, t.device)

