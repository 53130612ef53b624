"""Step graphs: every call of a compiled graph replayed from a CUDA graph, keyed by the host decisions.

The site ops decide on the host, per call, what each layer does (update or dispatch, the step's Taylor
delta, which buffers to read), so one CUDA graph cannot serve every step. But those decisions are a
pure function of a small host state (step counters, update history, the persistent buffers'
addresses): a call made from the same host state launches the same kernels on the same addresses.
``StepGraphs`` wraps the inner compiled function of a graph that holds flashomni sites and

1. keys each call by that host state (``_decision`` of every layer state the call touches, the
   explicit step, the run-time override, the hooks, the addresses of the graph's static inputs, the
   shapes of the others);
2. runs a key's first call eagerly (kernels compile, lazy buffers are allocated), captures the second
   one (the host logic runs once, inside the capture, exactly as it would eagerly) and replays it at
   once, and from then on replays the graph: no Python, no launches, no Inductor wrapper code;
3. after a replay, puts the host state where the eager call would have left it (``_save``/``_load`` of
   the fields the engine changes; recorded after the capture) and applies the statistics calls the
   capture logged, so counters, ``site_stats`` and the next key are right.

With ``total_steps`` known (or ``set_step``), the host state repeats every generation, so the first
generation runs eagerly, the second captures, and later ones replay. Keys that never repeat (counted
steps with no total) never capture: such runs stay eager and pay the key and one copy of each output
(the hand-over below).

Safety: dynamic inputs are copied into static buffers (one set per input shape, shared by every graph
of the wrapper); each graph ends by copying its outputs into static output buffers (also shared, allocated
outside the pool), so no graph keeps tensors alive in the pool it shares with the others: the pool holds
one call's intermediates, not one output per graph (Flux at 1024^2 with regional compilation: 1,140
graphs, whose outputs alone would take ~30 GB). A capture that allocates or replaces a persistent state
tensor (a first call in disguise) is replayed once and then every graph of the wrapper is dropped; a
capture that fails (a host sync in a user policy or hook, say) restores the host state, runs the call
eagerly and never captures that key again; ``engine.reset`` / ``set_runtime_options`` drop every graph.
Policies and symbol hooks must be functions of their inputs and the step (no hidden host state), which
every built-in is.

Outputs are handed over, not cloned. There are two sets of output buffers; a call returns views of the
set its graph wrote, and a call whose input *is* one of those buffers (the next layer of a regional
compilation, fed the last one's output) reads it in place, with no copy into a static input buffer, and
writes the other set. So a chain of layers ping-pongs between the two sets, and a layer costs one copy
(its outputs into the set) where staging, that copy and a clone cost three (Flux 1024^2: ~1.7 ms of copies
a step). Before a graph writes a set, the runner checks that nothing outside it still holds those buffers
(storage use counts, as torch's CUDA-graph trees check their outputs' liveness): a caller that keeps an
output (or a view or ``detach()`` of it) until its set is written again (the call after next in a chain,
the next call otherwise) would otherwise see it overwritten. If something does, that call runs eagerly
and the wrapper switches to cloning its outputs from then on (its graphs are dropped and recaptured;
counted as ``busy`` in ``graph_stats``).

``_CudaGraph`` is the real backend; tests swap ``GRAPH_BACKEND`` for an emulation that records the ATen
ops of the capture and replays them on CPU (tests/_graph_emulation.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from .._capture import capture_scope
from . import engine
from .controller import current_step
from .hooks import _HOOKS
from .state import _STATES, LayerState, Pass

__all__ = ["StepGraphs", "graph_stats", "graph_failures"]

log = logging.getLogger("flashomni_compile")

_MAX_SEEN = 1 << 14     # keys remembered before their second call (a run whose keys never repeat)


# ---------------------------------------------------------------------------------------------------
# Host state of a layer: what decides a call (the key) and what a call changes (save / load)
# ---------------------------------------------------------------------------------------------------
def _ptrs(st: LayerState) -> tuple:
    return tuple(t.data_ptr() for t in st.tensors())


def _cache_decision(c) -> tuple:
    """What of a feature cache the engine branches on: order and plan, history, which GEMM-O calls have
    buffers (a projection into a missing one allocates) and which hold the update in force's terms."""
    return (c.order, c.planned, c.updates, c.last_step, tuple(sorted(c.out_terms)),
            tuple(sorted(r for r in c.out_terms if c.has_out(r))))


def _decision(st: LayerState) -> tuple:
    """Everything of ``st`` that the engine's host logic branches on, plus its buffers' addresses."""
    brs = tuple((b.signature, b.symbols is None, b.last_update, b.q_sparse, b.kv_sparse,
                 None if b.cache is None else _cache_decision(b.cache))
                for b in st.branches)
    return (st.attn_done, st.counted_step, st.explicit_step, st.branch_index, brs, _ptrs(st))


def _save(st: LayerState) -> tuple:
    """The host fields a call may change (references, not copies: the tensors stay where they are)."""
    cur = st.current
    cur = None if cur is None else (cur.step, cur.total, cur.kind, cur.branch)
    brs = []
    for b in st.branches:
        c = b.cache
        cs = None if c is None else (c, c.order, list(c.terms), c.updates, c.last_step, c.extrap,
                                     {k: list(v) for k, v in c.out_terms.items()}, dict(c.out_buf), dict(c.out_step))
        brs.append((b, b.signature, b.symbols, b.kv_count, b.kv_index, b.kv_need, b.last_update, b.q_sparse,
                    b.kv_sparse, None if b.symbols is None else getattr(b.symbols, "_lists", None), cs))
    return (st.attn_done, st.counted_step, st.explicit_step, st.branch_index, cur, brs,
            st.stats.cache_bytes, st.stats.cache_order)


def _load(st: LayerState, saved: tuple) -> None:
    (st.attn_done, st.counted_step, st.explicit_step, st.branch_index, cur, brs,
     st.stats.cache_bytes, st.stats.cache_order) = saved
    st.current = None if cur is None else Pass(*cur)
    st.branches = [b for b, *_ in brs]
    for (b, b.signature, b.symbols, b.kv_count, b.kv_index, b.kv_need, b.last_update, b.q_sparse,
         b.kv_sparse, lists, cs) in brs:
        if b.symbols is not None and lists is not None:
            b.symbols._lists = lists
        b.cache = None if cs is None else cs[0]
        if cs is not None:
            c = cs[0]
            (_, c.order, terms, c.updates, c.last_step, c.extrap, out_terms, out_buf, out_step) = cs
            c.terms = list(terms)
            c.out_terms = {k: list(v) for k, v in out_terms.items()}
            c.out_buf = dict(out_buf)
            c.out_step = dict(out_step)


def _global_key() -> tuple:
    return (current_step(), id(engine.runtime_options_override()), tuple(id(h) for h in _HOOKS))


# ---------------------------------------------------------------------------------------------------
# Graph backends
# ---------------------------------------------------------------------------------------------------
class _CudaGraph:
    """``torch.cuda.CUDAGraph`` captured on a side stream into the wrapper's memory pool."""

    accepts_cpu = False

    def __init__(self, pool, stream) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool, self.stream = pool, stream

    @staticmethod
    def new_pool():
        return torch.cuda.graph_pool_handle()

    @staticmethod
    def new_stream():
        return torch.cuda.Stream()

    def capture(self, fn: Callable[[], Any]) -> Any:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out = fn()
            except BaseException:
                try:
                    self.graph.capture_end()
                except Exception:
                    pass
                raise
            self.graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def replay(self) -> None:
        self.graph.replay()


GRAPH_BACKEND: Any = _CudaGraph


# ---------------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    graph: Any
    outputs: Any              # the static output buffers the graph writes (pytree of the call's result)
    states: list              # the layer states touched, in first-touch order
    post: list                # their host fields after the call (_save)
    stats_log: list           # (LayerStats, method, args) the call made
    handed: tuple = ()        # per dynamic input: the output buffer (set, index) it is read from in place, or None


_COUNTS = {"eager": 0, "captures": 0, "replays": 0, "capture_failures": 0, "drops": 0, "busy": 0}

_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)   # None: no liveness check, so no hand-over


def _alias(b: Tensor) -> Tensor:
    """A new tensor on ``b``'s memory with ``b``'s exact strides (``view`` would renormalise the stride of a
    size-1 dimension, and the next call would then not recognise its input as this buffer)."""
    return b.as_strided(b.shape, b.stride(), b.storage_offset())


def _use_count(t: Tensor) -> int:
    """References to ``t``'s storage (every tensor or view on it holds one)."""
    return _USE_COUNT(t.untyped_storage()._cdata)


_FAILURES: list[str] = []   # the first few capture errors, for reports


def graph_stats() -> dict:
    """Process-wide counters of the step-graph runner: eager calls, captures, replays, failures, drops."""
    return dict(_COUNTS)


def graph_failures() -> list[str]:
    """The first (up to 8) capture errors of this process, as ``"Type: message"``."""
    return list(_FAILURES)


class StepGraphs:
    """``fn(*args)`` (as Dynamo calls a backend's result) that runs ``compiled(*args)`` through step graphs
    (module docstring)."""

    def __init__(self, compiled: Callable, example_inputs: list, name: str = "") -> None:
        self.compiled = compiled
        self.name = name
        self.static_idx = tuple(i for i, x in enumerate(example_inputs) if _is_static(x))
        self.dynamic_idx = tuple(i for i, x in enumerate(example_inputs)
                                 if isinstance(x, Tensor) and i not in self.static_idx)
        self.dynamic_set = frozenset(self.dynamic_idx)
        self.touched: dict[tuple, tuple] = {}      # static-input addresses -> layer keys a call touches
        self.seen: set = set()
        self.failed: set = set()
        self.entries: dict[tuple, _Entry] = {}
        self.buffers: dict[tuple, Tensor] = {}     # (input index, shape, stride, dtype) -> static input
        self.out_buffers: dict[tuple, Tensor] = {}  # (set, output index, shape, stride, dtype) -> static output
        self.out_refs: dict[int, tuple] = {}         # data_ptr -> (set, output index, buffer, use count alone)
        self.handover = _USE_COUNT is not None       # return views of the output buffers (module docstring)
        self.out_meta: dict[tuple, list] = {}       # (static addresses, input metas) -> eager output metas
        self.pool = None
        self.stream = None
        self.epoch = engine.epoch()

    # -- plumbing ---------------------------------------------------------------------------------
    def _call(self, args: list) -> Any:
        return self.compiled(*args)

    def _eager(self, args: list, sig: Optional[tuple]) -> Any:
        _COUNTS["eager"] += 1
        handed = self._handed(args)
        if sig is None:
            return self._hand_over(self._call(args), handed)
        touched: list = []
        engine._TOUCHED = touched
        try:
            out = self._call(args)
        finally:
            engine._TOUCHED = None
        self.touched[sig] = tuple(dict.fromkeys(touched))
        self.out_meta[(sig, _meta(args, self.dynamic_set))] = [_tmeta(t) for t in tree_flatten(out)[0]]
        return self._hand_over(out, handed)

    def _hand_over(self, out: Any, handed: tuple) -> Any:
        """An eager call's outputs, copied into the output-buffer set its graph would write and returned as
        views of it, as a replay returns them: the next call's key (which of its inputs sit in which set)
        is then the same whether this call ran eagerly or from a graph, so a chain of layers captures in
        the second generation, not one layer further each generation."""
        if not self.handover:
            return out
        flat, spec = tree_flatten(out)
        bufs = self._buffers(self._write_set(handed), [_tmeta(t) for t in flat])
        if not self._free(bufs):
            self._give_up()
            return out
        for t, b in zip(flat, bufs):
            if b is not None:
                b.copy_(t)
        return tree_unflatten([t if b is None else _alias(b) for t, b in zip(flat, bufs)], spec)

    def drop(self) -> None:
        """Forget every graph (and the pool they share), e.g. after ``engine.reset``."""
        if self.entries:
            _COUNTS["drops"] += 1
        self.entries.clear()
        self.seen.clear()
        self.failed.clear()
        self.touched.clear()
        self.pool = None
        self.epoch = engine.epoch()

    def _usable(self, args: list) -> bool:
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return False
        if not GRAPH_BACKEND.accepts_cpu and any(isinstance(a, Tensor) and not a.is_cuda for a in args):
            return False
        if GRAPH_BACKEND is _CudaGraph and torch.cuda.is_current_stream_capturing():
            return False
        # an input whose elements share memory (an expanded view) cannot be copied into a static buffer of
        # its strides, and Inductor's code checks the strides it was compiled for: such calls stay eager
        return not any(st == 0 and n > 1 for i in self.dynamic_idx
                       for st, n in zip(args[i].stride(), args[i].shape))

    # -- the call ---------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        args = list(args)
        if not self._usable(args):
            return self._call(args)
        if self.epoch != engine.epoch():
            self.drop()
        sig = tuple(args[i].data_ptr() for i in self.static_idx)
        keys = self.touched.get(sig)
        if keys is None:
            return self._eager(args, sig)
        states = [_STATES.get(k) for k in keys]
        if any(s is None for s in states) or any(s.options.timing for s in states):
            return self._eager(args, sig)
        key = (sig, _meta(args, self.dynamic_set), self._handed(args), _global_key(),
               tuple(_decision(s) for s in states))
        entry = self.entries.get(key)
        if entry is not None:
            if not self._free(entry.outputs):
                return self._busy(args)
            return self._replay(entry, args)
        if key in self.failed:
            return self._eager(args, None)
        if key not in self.seen:
            if len(self.seen) >= _MAX_SEEN:
                self.seen.clear()
            self.seen.add(key)
            return self._eager(args, sig)
        return self._capture(key, args, sig, states)

    def _handed(self, args: list) -> tuple:
        """Per dynamic input: the output buffer it is, as (set, output index), when it is a whole buffer of
        this wrapper (read in place), else None (copied into a static input buffer). Only inputs of the
        first such set count, so that the call can write the other one. The index is part of the key: two
        outputs of one shape passed in swapped order read other addresses."""
        if not self.handover:
            return ()
        found = []
        for i in self.dynamic_idx:
            ref = self.out_refs.get(args[i].data_ptr())
            whole = ref is not None and _tmeta(args[i]) == _tmeta(ref[2])
            found.append(ref[:2] if whole else None)
        first = next((x[0] for x in found if x is not None), None)
        return tuple(x if x is not None and x[0] == first else None for x in found)

    def _write_set(self, handed: tuple) -> int:
        first = next((x[0] for x in handed if x is not None), None)
        return 0 if first is None else 1 - first

    def _free(self, outputs: Any) -> bool:
        """Whether the output buffers a graph writes are held by nobody but this wrapper (module docstring)."""
        if not self.handover:
            return True
        for b in tree_flatten(outputs)[0]:
            if not isinstance(b, Tensor):
                continue
            held = _use_count(b) - self.out_refs[b.data_ptr()][3]
            if getattr(GRAPH_BACKEND, "holds_refs", False):   # tests' emulation: its programs hold tensors
                held -= GRAPH_BACKEND.refs(b)
            if held:
                return False
        return True

    def _busy(self, args: list) -> Any:
        """An output buffer is still in use: this call runs eagerly, and the wrapper clones from now on."""
        self._give_up()
        return self._eager(args, None)

    def _give_up(self) -> None:
        _COUNTS["busy"] += 1
        log.info("flashomni: an output of %s is still held when its buffer is written next; its step graphs now "
                 "return copies", self.name or "a graph")
        self.handover = False
        self.drop()
        self.out_buffers.clear()       # views of them are still out there: later graphs write new ones
        self.out_refs.clear()

    def _static_args(self, args: list, handed: tuple = ()) -> list:
        out = list(args)
        for j, i in enumerate(self.dynamic_idx):
            if j < len(handed) and handed[j] is not None:
                continue                      # one of this wrapper's output buffers: read in place
            a = args[i]
            bk = (i, tuple(a.shape), a.stride(), a.dtype, a.device)
            buf = self.buffers.get(bk)
            if buf is None:
                buf = self.buffers[bk] = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
            if buf.data_ptr() != a.data_ptr():
                buf.copy_(a)
            out[i] = buf
        return out

    def _out_buffers(self, key: tuple) -> list:
        """Static output buffers (allocated outside any capture) for the outputs the eager call made, in the
        set the call writes."""
        return self._buffers(self._write_set(key[2]), self.out_meta[key[:2]])

    def _buffers(self, wset: int, metas: list) -> list:
        bufs = []
        for i, m in enumerate(metas):
            if m is None:
                bufs.append(None)
                continue
            bk = (wset, i, *m)
            if bk not in self.out_buffers:
                shape, stride, dtype, device = m
                buf = self.out_buffers[bk] = torch.empty_strided(shape, stride, dtype=dtype, device=device)
                if _USE_COUNT is not None:
                    self.out_refs[buf.data_ptr()] = (wset, i, buf, _use_count(buf))
            bufs.append(self.out_buffers[bk])
        return bufs

    def _capture(self, key: tuple, args: list, sig: tuple, states: list) -> Any:
        bufs = self._out_buffers(key)
        if not self._free(bufs):
            return self._busy(args)
        static = self._static_args(args, key[2])

        def body():
            # the call, then its outputs copied into the static buffers; the result object carries them
            flat, spec = tree_flatten(self._call(static))
            if len(flat) != len(bufs) or any(_tmeta(t) != (None if b is None else _tmeta(b))
                                             for t, b in zip(flat, bufs)):
                raise RuntimeError("the call's outputs differ from the eager call's (shapes/strides/dtypes)")
            for t, b in zip(flat, bufs):
                if b is not None:
                    b.copy_(t)
            return tree_unflatten([t if b is None else b for t, b in zip(flat, bufs)], spec)

        pre = [_save(s) for s in states]
        ptrs = [_ptrs(s) for s in states]
        if self.pool is None:
            self.pool, self.stream = GRAPH_BACKEND.new_pool(), GRAPH_BACKEND.new_stream()
        graph = GRAPH_BACKEND(self.pool, self.stream)
        stats_log: list = []
        touched: list = []
        engine._STATS_LOG, engine._TOUCHED = stats_log, touched
        error = None
        try:
            with capture_scope():
                outputs = graph.capture(body)
        except Exception as e:   # e.g. a host sync in a user policy: this key stays eager
            error = e
        finally:
            engine._STATS_LOG, engine._TOUCHED = None, None
        if error is not None:
            for s, p in zip(states, pre):
                _load(s, p)
            self.failed.add(key)
            _COUNTS["capture_failures"] += 1
            if len(_FAILURES) < 8:
                _FAILURES.append(f"{type(error).__name__}: {error}")
            # a failed capture may leave the allocator recording into the pool for the capture stream:
            # later captures take a new pool and stream (the graphs already captured keep theirs)
            self.pool = self.stream = None
            log.warning("flashomni: CUDA-graph capture of %s failed (%s: %s); this step runs eagerly",
                        self.name or "a graph", type(error).__name__, error)
            return self._eager(args, None)
        _COUNTS["captures"] += 1
        entry = _Entry(graph, outputs, states, [_save(s) for s in states], stats_log, key[2])
        stable = tuple(dict.fromkeys(touched)) == self.touched.get(sig) and [_ptrs(s) for s in states] == ptrs
        result = self._finish(entry)
        if stable:
            self.entries[key] = entry
        else:
            # The capture allocated or replaced state tensors (or touched other layers): they live in the
            # shared pool, where other graphs' intermediates would overwrite them. Run it once, drop all.
            log.info("flashomni: a captured call changed the layer state; dropping the graphs of %s", self.name)
            self.drop()
        return result

    def _replay(self, entry: _Entry, args: list) -> Any:
        self._static_args(args, entry.handed)
        return self._finish(entry)

    def _finish(self, entry: _Entry) -> Any:
        entry.graph.replay()
        _COUNTS["replays"] += 1
        for s, p in zip(entry.states, entry.post):
            _load(s, p)
        for stats, name, a in entry.stats_log:
            if name == "record_update":        # a device tensor of the graph's pool: keep a copy
                stats.record_update(*(t.clone() for t in a))
            else:
                getattr(stats, name)(*a, replayed=True)
        if self.handover:     # views: the buffers' use counts then say whether the caller still holds them
            return tree_map_only(Tensor, _alias, entry.outputs)
        return tree_map_only(Tensor, torch.clone, entry.outputs)


def _is_static(x: Any) -> bool:
    """Parameters and buffers (Dynamo marks them static): read in place, never copied."""
    if not isinstance(x, Tensor):
        return False
    if isinstance(x, torch.nn.Parameter):
        return True
    get = getattr(torch._dynamo.utils, "get_static_address_type", None)
    return get is not None and get(x) is not None


def _meta(args: list, dynamic: frozenset) -> tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype) if i in dynamic else
                 (None if isinstance(a, Tensor) else a) for i, a in enumerate(args))


def _tmeta(t: Any) -> Optional[tuple]:
    if not isinstance(t, Tensor):
        return None
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


