"""Whether a step-graph capture is in progress, and a cache of device tensors that captures do not fill.

A tensor created while a CUDA graph is being captured lives in the graph's memory pool, where other
graphs of the same pool write their intermediates. Caching it for later calls would hand them memory
that a replay overwrites, so ``device_cache`` computes a miss during a capture without storing it (the
captured graph recomputes it on every replay). Outside captures it is an LRU cache like
``functools.lru_cache``. This module imports nothing of the package (symbols.py and the runtime use it).
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from typing import Callable, Iterator

import torch

__all__ = ["capturing", "capture_scope", "device_cache"]

_DEPTH = 0


def capturing() -> bool:
    """True inside ``capture_scope`` (the step-graph runner's captures) or any CUDA stream capture."""
    return _DEPTH > 0 or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def capture_scope() -> Iterator[None]:
    global _DEPTH
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1


def device_cache(maxsize: int) -> Callable[[Callable], Callable]:
    """``functools.lru_cache(maxsize)`` for functions returning device tensors (hashable arguments),
    except that a miss during a capture is computed and not stored."""
    def wrap(fn: Callable) -> Callable:
        entries: OrderedDict = OrderedDict()

        @functools.wraps(fn)
        def cached(*args):
            hit = entries.get(args)
            if hit is not None:
                entries.move_to_end(args)
                return hit
            value = fn(*args)
            if not capturing():
                entries[args] = value
                if len(entries) > maxsize:
                    entries.popitem(last=False)
            return value

        cached.cache_clear = entries.clear
        cached.cache_size = lambda: len(entries)
        return cached
    return wrap
