"""Cached Triton launches: Triton's binder runs once per specialization, not once per call.

Why: ``kernel[grid](*args, **kw)`` (Triton's ``JITFunction.run``) binds the 37-75 arguments of our kernels,
specializes each one, turns the specialization and the options into a cache key and reads several
knobs, on every call: 12-20 us per launch before the launch proper on a 2-core CI machine (triton 3.6
and 3.9 alike, timed with a stub driver), where this cache's path takes 4-7 us. On the H100 host a
launcher call cost 105-215 us in all (benchmarks/NOTES.md "Host cost"). For one specialization,
Triton always launches the same compiled kernel object, so:

* the first call with a given key goes through ``kernel[grid](...)`` (compiling if needed) and keeps
  the ``CompiledKernel`` that call returns;
* later calls with the same key call that kernel's low-level launcher directly, exactly as
  ``JITFunction.run`` ends (triton 3.6.0, 3.7.1, 3.8.0, 3.9.0: ``triton/runtime/jit.py``)::

      compiled.run(grid_0, grid_1, grid_2, stream, compiled.function, compiled.packed_metadata,
                   launch_metadata, launch_enter_hook, launch_exit_hook, *bound_args.values())

  where ``bound_args`` holds every parameter in signature order, constexprs included.

The key (``launch_key``) must determine Triton's specialization, or a call would silently run a kernel
compiled for other arguments. What triton 3.6.0 to 3.9.0 specialize on (their ``native_specialize_impl``,
probed value by value, the same in all four; ``tests/test_launch.py`` checks the key against the
installed triton's):

* int: ``== 1`` (becomes a constant), ``% 16 == 0``, and the type: i32 / i64 / u64 by range
  (``do_not_specialize`` keeps only the type). The key holds the raw value: finer than any of these
  rules, so it stays right whatever the rule, and our int arguments (shapes, strides, row offsets) do
  not change across the steps of a site, so it costs no hits.
* tensor: dtype and ``data_ptr() % 16 == 0``; float, bool: the type only (``fp32``, ``u1``);
  None: constant None; host tensor descriptor: base dtype and block shape (the key adds the padding);
  Gluon tensor descriptor: base dtype, block shape and shared-memory layout (the key adds the padding
  and, on 3.9, ``round_f32_to_tf32``). Before the Gluon descriptor was keyed, every Gluon launch took
  the normal path: ~0.15 ms a call on the H200 host, which floored the attention kernel at short
  sequences (0.25 ms at N=4608, kv density 0.25, against 0.15 with a warm queue; NOTES.md session 8).
* constexprs and options (``num_warps``, ``num_stages``): their values; the key holds every keyword
  argument's name, value and type (``True == 1`` in Python, not to Triton).
* the knobs ``JITFunction.run`` copies into the options (``runtime.debug``,
  ``compilation.instrumentation_mode``, 3.9's ``compilation.fpsan_homomorphic_casts``), read from the
  installed triton's ``run`` source, and the current device (Triton keeps one cache per device).

Anything else takes the normal path (``kernel[grid](...)``) and is counted as a fallback: the
interpreter (``TRITON_INTERPRET=1``: the kernels are not ``JITFunction``s), a triton version outside
3.6-3.9 or whose ``run`` does not read as expected, launch hooks in use (the profiler's), pre-run hooks,
a callable grid, an argument type not listed above, a changed global that the kernel reads (Triton
raises for it), or any error while building the key. ``FLASHOMNI_LAUNCH_CACHE=0`` (or
``set_launch_cache("off")``) turns the cache off; ``verify`` launches every call the normal way and
raises if the cached kernel for its key is not the one Triton launched.
"""

from __future__ import annotations

import operator
import os
import re
from typing import Any, Callable, Optional

import torch
import triton

__all__ = ["launch", "launch_key", "set_launch_cache", "launch_stats", "clear_launch_cache", "cdiv",
           "next_power_of_2", "capability", "num_sms", "GLUON_ON"]

_MODES = ("on", "off", "verify")
_ENV = os.environ.get("FLASHOMNI_LAUNCH_CACHE", "on")
_MODE = {"0": "off", "1": "on"}.get(_ENV, _ENV)
if _MODE not in _MODES:
    raise ValueError(f"FLASHOMNI_LAUNCH_CACHE={_ENV!r}: expected 0, 1, on, off or verify")
_MAX_ENTRIES = 256   # per kernel; a site needs one or two, so this only bounds a pathological caller
_VERSIONS = ((3, 6), (3, 9))   # inclusive: each of 3.6-3.9's JITFunction.run and launcher was read
# Keyword values that may enter a key (hashed by value, never by identity).
_PLAIN = frozenset((int, bool, float, str, type(None)))


def set_launch_cache(mode: str) -> str:
    """``"on"`` (default), ``"off"`` (every launch through ``kernel[grid]``) or ``"verify"``; returns the
    mode it replaces."""
    global _MODE
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}: expected one of {_MODES}")
    prev, _MODE = _MODE, mode
    return prev


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host ints. Triton's is a ``constexpr_function`` wrapper: 1.6 us a call on the
    host (CPU, triton 3.6 and 3.9) for one integer division."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host ints ``n >= 0`` (same values; without its 1.6 us wrapper)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


_CAPABILITY: dict[int, tuple[int, int]] = {}
_SMS: dict[int, int] = {}
# FLASHOMNI_GLUON=0 (read at import) keeps every call on the Triton kernels: the Gluon kernels for Hopper
# (attention_sm90.py, gemm_o_sm90.py) are never chosen, to compare or to rule them out.
GLUON_ON = os.environ.get("FLASHOMNI_GLUON", "1") != "0"


def capability(device: torch.device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability`` of a CUDA ``device``, asked once per device index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(index)
    if cap is None:
        cap = _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return cap


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (the grid of a persistent kernel), asked once per index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def _current_device() -> int:
    # The same calls JITFunction.run makes (torch's current device and stream via triton's driver).
    from triton.runtime.driver import driver
    return driver.active.get_current_device()


def _current_stream(device: int) -> int:
    from triton.runtime.driver import driver
    return driver.active.get_current_stream(device)


# ---------------------------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------------------------
def _tuple_of(make: Callable, keys: list) -> Callable[[Any], tuple]:
    """A C-level ``obj -> tuple of make(key)(obj) for each key`` (``make``: ``operator.itemgetter`` or
    ``operator.attrgetter``, which return a bare value, not a 1-tuple, for a single key)."""
    if not keys:
        return lambda o: ()
    if len(keys) == 1:
        one = make(keys[0])
        return lambda o: (one(o),)
    return make(*keys)


def _getter(keys: list) -> Callable[[Any], tuple]:
    """``args -> tuple(args[i] for i in keys)``; also for dicts (``kwargs -> tuple of kwargs[name]``)."""
    return _tuple_of(operator.itemgetter, keys)


class _Layout:
    """What a call's argument types and keyword names imply, computed once per such layout."""

    __slots__ = ("ints", "tensors", "descs", "ok")

    def __init__(self, arg_types: tuple, kw_types: tuple):
        from triton.tools.tensor_descriptor import TensorDescriptor

        from .gluon_hopper import GluonDescriptor
        ints, tensors, descs = [], [], []
        ok = all(t in _PLAIN for t in kw_types)
        for i, t in enumerate(arg_types):
            if t is int:
                ints.append(i)
            elif issubclass(t, torch.Tensor):
                tensors.append(i)
            elif t is TensorDescriptor or (GluonDescriptor is not None and t is GluonDescriptor):
                descs.append(i)
            elif t not in (float, bool, type(None)):
                ok = False   # numpy scalars, tuples, dtypes...: left to Triton
        self.ints, self.tensors, self.descs, self.ok = _getter(ints), _getter(tensors), _getter(descs), ok


_LAYOUTS: dict[tuple, _Layout] = {}


def launch_key(args: tuple, kwargs: dict) -> Optional[tuple]:
    """The part of the launch key that comes from the arguments (``None``: a type the cache leaves to
    Triton). Equal keys imply equal Triton specializations (module docstring); the full key adds the
    device and the option knobs."""
    arg_types = tuple(map(type, args))
    kw_types = tuple(map(type, kwargs.values()))
    lay_key = (arg_types, tuple(kwargs), kw_types)
    lay = _LAYOUTS.get(lay_key)
    if lay is None:
        lay = _LAYOUTS.setdefault(lay_key, _Layout(arg_types, kw_types))
    if not lay.ok:
        return None
    # The layout object stands for the types and names (hashed by identity: cheaper than the tuple).
    return (lay, lay.ints(args),
            tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in lay.tensors(args)]),
            tuple([(d.base.dtype, tuple(d.block_shape), d.padding, getattr(d, "layout", None),
                    getattr(d, "round_f32_to_tf32", False)) for d in lay.descs(args)]),
            tuple(kwargs.values()))


# ---------------------------------------------------------------------------------------------------
# Per-kernel cache
# ---------------------------------------------------------------------------------------------------
def _read_run(fn) -> Optional[tuple[list, bool]]:
    """``(option knobs, has stages hook)`` of the installed ``JITFunction.run``, or None when its source
    does not end with the launcher call this module replays, or reads a knob this module does not know."""
    import inspect

    from triton.runtime.jit import JITFunction
    src = inspect.getsource(JITFunction.run)
    if ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,"
            not in src or "*bound_args.values())" not in src):
        return None
    hooks = {("runtime", "launch_enter_hook"), ("runtime", "launch_exit_hook"),
             ("runtime", "add_stages_inspection_hook")}
    options = {("runtime", "debug"), ("compilation", "instrumentation_mode"),
               ("compilation", "fpsan_homomorphic_casts")}
    used = set(re.findall(r"knobs\.(\w+)\.(\w+)", src))
    if not used <= hooks | options:
        return None
    return sorted(used & options), ("runtime", "add_stages_inspection_hook") in used


class _Entry:
    __slots__ = ("kernel", "run", "function", "packed", "rest")

    def __init__(self, kernel, rest: Callable[[dict], tuple]):
        self.kernel = kernel   # holds the CompiledKernel (and so its loaded module) alive
        self.run, self.function, self.packed = kernel.run, kernel.function, kernel.packed_metadata
        self.rest = rest       # kwargs -> the keyword-passed parameters, in signature order


class _KernelLaunches:
    """The launch cache of one ``@triton.jit`` kernel, and its counters."""

    def __init__(self, fn):
        self.fn = fn
        self.entries: dict[tuple, _Entry] = {}
        self.hits = self.misses = self.fallbacks = 0
        self._setup: Any = None   # None: not tried yet; False: unavailable; else (knobs, hook chain type, ...)
        self.reason = ""          # why the fast path is unavailable (for tests and reports)

    def _prepare(self):
        """Check once whether the fast path can work for this kernel under this triton."""
        self._setup = False
        try:
            from triton import knobs
            from triton.compiler import CompiledKernel
            from triton.runtime.jit import JITFunction
            if knobs.runtime.interpret or not isinstance(self.fn, JITFunction):
                self.reason = "interpreter"
                return
            version = tuple(int(p) for p in triton.__version__.split(".")[:2])
            if not _VERSIONS[0] <= version <= _VERSIONS[1]:
                self.reason = f"triton {triton.__version__} not checked"
                return
            read = _read_run(self.fn)
            if read is None:
                self.reason = "JITFunction.run does not read as expected"
                return
            try:
                from triton.knobs import HookChain
            except ImportError:   # pragma: no cover - every checked version has it
                HookChain = type(None)
            self._setup = (knobs, _attr_tuple([f"{s}.{n}" for s, n in read[0]]), read[1], HookChain,
                           CompiledKernel, [p.name for p in self.fn.params])
        except Exception as e:   # pragma: no cover - a triton this module was not written for
            self.reason = f"setup failed: {e!r}"

    def __call__(self, grid, args: tuple, kwargs: dict):
        setup = self._setup
        if setup is None:
            self._prepare()
            setup = self._setup
        mode = _MODE
        if not setup or mode == "off" or callable(grid):
            self.fallbacks += 1
            return self.fn[grid](*args, **kwargs)
        knobs, option_knobs, stages_hook, chain_type, compiled_type, names = setup
        fn = self.fn
        rt = knobs.runtime
        enter, exit_ = rt.launch_enter_hook, rt.launch_exit_hook
        if (not _quiet(enter, chain_type) or not _quiet(exit_, chain_type) or fn.pre_run_hooks
                or (stages_hook and rt.add_stages_inspection_hook is not None) or self._globals_changed()):
            self.fallbacks += 1
            return fn[grid](*args, **kwargs)
        try:
            akey = launch_key(args, kwargs)
            if akey is None:
                self.fallbacks += 1
                return fn[grid](*args, **kwargs)
            device = _current_device()
            key = (device, option_knobs(knobs), akey)
            entry = self.entries.get(key)
        except Exception:   # e.g. an unhashable keyword value: Triton decides
            self.fallbacks += 1
            return fn[grid](*args, **kwargs)
        if entry is None or mode == "verify":
            kernel = fn[grid](*args, **kwargs)
            if entry is not None:
                if kernel is not entry.kernel:
                    raise RuntimeError(f"launch cache: {fn} launched {kernel} for a key cached with {entry.kernel}; "
                                       f"key {key}")
                self.hits += 1
                return kernel
            self.misses += 1
            self._store(key, kernel, len(args), kwargs, compiled_type, names)
            return kernel
        self.hits += 1
        n = len(grid)
        entry.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _current_stream(device),
                  entry.function, entry.packed, None, None, None, *args, *entry.rest(kwargs))
        return entry.kernel

    def _globals_changed(self) -> bool:
        # JITFunction.run raises when a global the kernel read at compile time has changed: let it.
        for (name, _), (val, globals_dict) in self.fn.used_global_vals.items():
            if globals_dict.get(name, _MISSING) != val:
                return True
        return False

    def _store(self, key, kernel, n_args: int, kwargs: dict, compiled_type, names: list[str]) -> None:
        if not isinstance(kernel, compiled_type):
            return
        rest = names[n_args:]
        if any(r not in kwargs for r in rest):
            return   # a parameter left to its default: not replayed (none of our kernels does this)
        if len(self.entries) >= _MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = _Entry(kernel, _getter(rest))


def _quiet(hook, chain_type) -> bool:
    # An empty HookChain (the knob's default in 3.6-3.9) does nothing when the launcher calls it, so
    # passing None for it (and for the launch metadata only hooks read) is the same launch.
    return hook is None or (type(hook) is chain_type and not hook.calls)


def _attr_tuple(paths: list[str]) -> Callable[[Any], tuple]:
    """``obj -> tuple of the dotted attributes``."""
    return _tuple_of(operator.attrgetter, paths)


_MISSING = object()
_KERNELS: dict[int, _KernelLaunches] = {}


def _launches(kernel) -> _KernelLaunches:
    kl = _KERNELS.get(id(kernel))
    if kl is None or kl.fn is not kernel:
        kl = _KERNELS[id(kernel)] = _KernelLaunches(kernel)
    return kl


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, through the launch cache (module docstring). Returns what
    Triton returns (the compiled kernel; the interpreter returns None)."""
    return _launches(kernel)(grid, args, kwargs)


def launch_stats() -> dict[str, dict]:
    """Per kernel name: cache ``hits``, ``misses`` (normal launches that filled it), ``fallbacks``
    (normal launches that could not use it), ``entries``, and ``reason`` the fast path is off, if it is."""
    out = {}
    for kl in _KERNELS.values():
        name = getattr(kl.fn, "__name__", None) or getattr(getattr(kl.fn, "fn", None), "__name__", repr(kl.fn))
        out[name] = {"hits": kl.hits, "misses": kl.misses, "fallbacks": kl.fallbacks,
                     "entries": len(kl.entries), "reason": kl.reason}
    return out


def clear_launch_cache() -> None:
    """Forget every cached kernel and counter (the next call of each kernel takes the normal path)."""
    _KERNELS.clear()
    _LAYOUTS.clear()
