"""Symbol hooks: user functions that set or edit a site's symbols at update steps.

A hook is a bare callable ``fn(spec, step, scores, symbols) -> SparseSymbols | None``:

* ``spec``: the site's ``SiteSpec`` (name, heads, seq lengths, text_len, grid, ...);
* ``step``: the denoising step (host int);
* ``scores``: pooled block scores ``[B, H, NQB, NKB]`` (row softmax of pooled Q.K, float32);
* ``symbols``: the policy's proposal, a ``SparseSymbols`` (``q_keep [B,H,NQB]``, ``kv_keep [B,H,NQB,NKB]``).

It may edit ``symbols.q_keep`` / ``symbols.kv_keep`` in place and return ``None``, or return new
``SparseSymbols`` of the same shapes. Hooks run on the device data of the update step: they should
not read device values on the host (that syncs). The hook given as ``options={"symbol_hook": fn}`` runs
first, then the ones registered with ``register_symbol_hook`` in registration order.

Example (keep only the kv-blocks within one block of the diagonal, for every site)::

    def band(spec, step, scores, symbols):
        nqb, nkb = symbols.kv_keep.shape[-2:]
        i, j = torch.arange(nqb)[:, None], torch.arange(nkb)[None, :]
        symbols.kv_keep &= ((i - j).abs() <= 1).to(symbols.kv_keep.device)

    handle = register_symbol_hook(band)
    ...
    handle.remove()
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from ..symbols import SparseSymbols, validate_symbols
from .spec import SiteSpec

__all__ = ["register_symbol_hook", "clear_symbol_hooks", "symbol_hooks", "apply_symbol_hooks", "HookHandle"]

SymbolHook = Callable[[SiteSpec, int, Tensor, SparseSymbols], Optional[SparseSymbols]]
_HOOKS: list[SymbolHook] = []


class HookHandle:
    """Returned by ``register_symbol_hook``; ``remove()`` unregisters the hook (also as a context manager)."""

    def __init__(self, fn: SymbolHook) -> None:
        self.fn = fn

    def remove(self) -> None:
        if self.fn in _HOOKS:
            _HOOKS.remove(self.fn)

    def __enter__(self) -> "HookHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def register_symbol_hook(fn: SymbolHook) -> HookHandle:
    """Call ``fn(spec, step, scores, symbols)`` at every update step of every site but the ``last_dense``
    ones, which form no symbols (see module docstring)."""
    if not callable(fn):
        raise ValueError(f"a symbol hook must be callable fn(spec, step, scores, symbols), got {type(fn).__name__}")
    _HOOKS.append(fn)
    return HookHandle(fn)


def clear_symbol_hooks() -> None:
    _HOOKS.clear()


def symbol_hooks(option_hook: Optional[SymbolHook] = None) -> list[SymbolHook]:
    """The hooks that apply to a site: its option hook first, then the registered ones."""
    return ([option_hook] if option_hook is not None else []) + list(_HOOKS)


def apply_symbol_hooks(hooks: list[SymbolHook], spec: SiteSpec, step: int, scores: Tensor,
                       symbols: SparseSymbols) -> SparseSymbols:
    """Run ``hooks`` in order on ``symbols``; each sees the previous one's result. Validates the result."""
    for fn in hooks:
        out = fn(spec, step, scores, symbols)
        if out is None:
            out = symbols
        if not isinstance(out, SparseSymbols):
            raise TypeError(f"symbol hook {getattr(fn, '__name__', fn)!r} returned {type(out).__name__}; "
                            "return SparseSymbols or None (after editing in place)")
        try:
            validate_symbols(out.q_keep, out.kv_keep, symbols.seq_q, symbols.seq_kv, symbols.block_q,
                             symbols.block_kv, batch=symbols.q_keep.shape[0], heads=symbols.q_keep.shape[1],
                             device=symbols.q_keep.device)
        except ValueError as e:
            raise ValueError(f"symbol hook {getattr(fn, '__name__', fn)!r} on site {spec.name!r}: {e}") from None
        if (out.block_q, out.block_kv) != (symbols.block_q, symbols.block_kv):
            raise ValueError(f"symbol hook {getattr(fn, '__name__', fn)!r} changed the block sizes to "
                             f"({out.block_q}, {out.block_kv}); the site uses ({symbols.block_q}, {symbols.block_kv})")
        symbols = out
    return symbols
