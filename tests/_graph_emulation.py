"""A CPU stand-in for CUDA graphs, to test the step-graph runner (runtime/graphs.py) without a GPU.

``EmulatedGraph.capture(fn)`` runs ``fn`` once under a ``TorchDispatchMode`` that records every ATen op
(and every flashomni op, which the mode sees whole) with the tensor objects it read and wrote;
``replay()`` re-runs the recorded ops on those same tensors and writes each result into the tensor the
capture produced. That is what a CUDA graph does with device addresses: no Python of the caller runs
on replay, the inputs must be written into the captured input tensors, and anything the host logic
would have done differently on a later call is not redone. Like a real capture, reading a tensor's value
on the host (``.item()``, ``bool(t)``) raises.

Use it with ``emulated_graphs()`` (a context manager that swaps ``graphs.GRAPH_BACKEND``).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flashomni_compile.runtime import graphs


class CaptureSyncError(RuntimeError):
    pass


_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class _Recorder(TorchDispatchMode):
    """Records the ops. A CUDA capture executes nothing, so every storage an op writes is saved before
    its first write and restored when the capture ends: the replay then starts from the true state."""

    def __init__(self, program: list) -> None:
        super().__init__()
        self.program = program
        self.saved: dict[int, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name.startswith("flashomni::site_"):
            # A site op is host logic (the engine) around kernels: run its Python under the recorder so
            # that only the ops it issues are recorded, as a CUDA capture records only kernels.
            with self:
                return _maybe_get_opdef(func)._init_fn(*args, **kwargs)
        if func in _HOST_READS:
            raise CaptureSyncError(f"{func} reads a device value on the host during a capture")
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            t = args[i] if i < len(args) else kwargs.get(a.name)
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.data_ptr() not in self.saved:
                    self.saved[st.data_ptr()] = (st, st.clone())
        out = func(*args, **kwargs)
        self.program.append((func, args, kwargs, out))
        return out

    def restore(self) -> None:
        for st, copy in self.saved.values():
            st.copy_(copy)


class EmulatedGraph:
    accepts_cpu = True
    replays = 0
    holds_refs = True    # its program keeps tensor objects alive, where a CUDA graph keeps raw addresses
    _live: "weakref.WeakSet[EmulatedGraph]" = weakref.WeakSet()

    def __init__(self, pool, stream) -> None:
        self.program: list = []
        EmulatedGraph._live.add(self)

    @staticmethod
    def new_pool():
        return object()

    @staticmethod
    def new_stream():
        return None

    def capture(self, fn):
        rec = _Recorder(self.program)
        try:
            with rec:
                return fn()
        finally:
            rec.restore()

    @classmethod
    def refs(cls, t: torch.Tensor) -> int:
        """Storage references of ``t`` held by the recorded programs of every live emulated graph (tensor
        objects other than ``t`` on its storage). A CUDA graph holds none; the runner's liveness check
        (graphs.StepGraphs._free) discounts these, so that it sees what it would see with real graphs."""
        ptr = t.untyped_storage().data_ptr()
        seen = {}
        for g in list(cls._live):
            for func, args, kwargs, out in g.program:
                for x in tree_flatten((args, kwargs, out))[0]:
                    if isinstance(x, torch.Tensor) and x is not t and x.untyped_storage().data_ptr() == ptr:
                        seen[id(x)] = x
        return len(seen)

    def replay(self) -> None:
        EmulatedGraph.replays += 1
        for func, args, kwargs, out in self.program:
            new = func(*args, **kwargs)
            for o, n in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                if isinstance(o, torch.Tensor) and o is not n and not _same_view(o, n):
                    o.copy_(n)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


@contextlib.contextmanager
def emulated_graphs():
    saved = graphs.GRAPH_BACKEND
    graphs.GRAPH_BACKEND = EmulatedGraph
    try:
        yield EmulatedGraph
    finally:
        graphs.GRAPH_BACKEND = saved
