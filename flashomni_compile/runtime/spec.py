"""``SiteSpec``: what the compile-time pass knows about one attention site, handed to the runtime.

Specs are registered at compile time (``register_site``) and referred to from the graph by their
integer index, because op arguments must be plain ints/floats/strs/tensors.

Shape legend: ``B`` batch, ``H`` heads, ``D`` head dim, ``N`` joint sequence length (text + image
tokens in the order the model concatenates them), ``T`` text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["SiteSpec", "register_site", "get_site", "all_sites", "layer_site"]


@dataclass(frozen=True)
class SiteSpec:
    """Static description of one attention site.

    Attributes:
        name: stable, readable name (module path from ``nn_module_stack`` when known, else ``site<k>``).
        kind: ``"self"`` | ``"joint"`` (text + image in one sequence) | ``"single"`` (Flux-style
            single-stream block, output projection over ``cat(attn, mlp)``) | ``"cross"``.
        heads, head_dim: ``H`` and ``D``.
        seq_q, seq_kv: ``Nq`` and ``Nkv`` as traced (static shapes).
        text_len: ``T``, the text tokens inside the joint sequence (0 when none).
        text_first: whether the text tokens come first in the joint sequence (Flux, SD3) or last
            (HunyuanVideo); ignored when ``text_len == 0``.
        grid: the token grid ``(frames, height, width)`` of the image/video tokens when known.
        pieces: which pieces were fused: a subset of ``("gemm_q", "gemm_kv", "attention", "gemm_o")``.
        options: the run-time options of the compile call that found the site (policy, schedule,
            feature-cache order, symbol hook, ...): a ``runtime.options.RuntimeOptions`` or ``None``
            (dense).
    """

    name: str
    kind: str
    heads: int
    head_dim: int
    seq_q: int
    seq_kv: int
    text_len: int = 0
    text_first: bool = True
    grid: Optional[tuple[int, int, int]] = None
    pieces: tuple[str, ...] = field(default=("attention",))
    options: Any = field(default=None, compare=False)


_SITES: list[SiteSpec] = []
_LAYER_SITE: list[int] = []    # per index: the first index registered with an equal spec and equal options


def register_site(spec: SiteSpec) -> int:
    """Register a spec and return the index the graph passes to the ``site_*`` ops."""
    _SITES.append(spec)
    _LAYER_SITE.append(next(i for i, other in enumerate(_SITES) if other == spec and _equal(other.options, spec.options)))
    return len(_SITES) - 1


def _equal(a: Any, b: Any) -> bool:
    """``a == b`` as a bool; options whose comparison does not give one (tensors in policy arguments)
    count as equal only to themselves."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- any failing comparison means "not known to be equal"
        return a is b


def layer_site(index: int) -> int:
    """The index that keys the run-time state of a layer reached through site ``index``: the first site
    registered with an equal spec and equal options. Dynamo recompiles a block when a guard fails (Flux's
    first single-stream block gets a contiguous input, the later ones a view of the joint sequence, so
    the second block recompiles it with dynamic strides) and the new graph registers its sites again;
    the layers it then serves keep their symbols, caches and statistics."""
    return _LAYER_SITE[index]


def get_site(index: int) -> SiteSpec:
    return _SITES[index]


def all_sites() -> list[SiteSpec]:
    return list(_SITES)
