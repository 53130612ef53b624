"""``RuntimeOptions``: what the run-time side reads from ``torch.compile(..., options={...})``.

One frozen dataclass, validated on construction; every error names the option, the value seen and the
valid values. The backend builds it with ``RuntimeOptions.from_dict(d)`` and stores it in each
``SiteSpec.options`` (``None`` there means dense: no policy, no schedule).

    >>> opts = RuntimeOptions.from_dict({"policy": "pooled_qk", "policy_args": {"tau_kv": 0.2}, "interval": 4})
    >>> opts.interval, opts.taylor_order
    (4, 1)

Schedule (host-side ints; see ``controller.step_kind``): steps ``0 .. warmup-1`` are update steps
(dense), then every ``interval``-th step is an update step, and when the total is known the last
``last_dense`` steps are update steps too. Everything else is a dispatch step (sparse).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

__all__ = ["RuntimeOptions", "resolve_options", "DEFAULT_POLICY"]

DEFAULT_POLICY = "flashomni"
TAYLOR_ORDERS = (0, 1, 2)
# Options a per-site override may not change (they belong to the whole compile call).
_NOT_OVERRIDABLE = ("site_overrides", "block_q", "block_kv")


def _int_option(name: str, v: Any, lo: int, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"flashomni option {name!r}={v!r} is not valid; need an int >= {lo}"
                         + (" or None" if allow_none else ""))


@dataclass(frozen=True)
class RuntimeOptions:
    """Run-time options of one compile call.

    Attributes:
        policy: a policy name (``policies.policy_names()``: dense, window, pooled_qk, qcache, layer,
            flashomni) or a policy instance (any object with ``__call__(ctx) -> SparseSymbols``).
        policy_args: keyword arguments for a policy given by name, e.g. ``{"tau_kv": 0.2}``.
        block_q, block_kv: q-block / kv-block sizes of the symbols (powers of two in 16..256).
        warmup: number of first steps that are update steps (dense). Default 2.
        interval: after warm-up, every ``interval``-th step is an update step. Default 3 (1: every step
            is an update step, i.e. dense with the policy still observed).
        last_dense: number of last steps that are update steps; needs the total (``total_steps`` or
            ``set_step(i, total)``). Default 1.
        total_steps: the number of denoising steps when known up front (``set_step`` may also give it).
        sparse_updates: scheduled update steps after warm-up (not the warm-up steps, not the
            ``last_dense`` ones) compute their attention with the kv-blocks of the symbols in force,
            every q-block computed, instead of dense: the update then costs what a dispatch step with
            nothing cached costs. The feature cache and the new symbols come from that output. Default
            True (measured on the trained tinydit models: docs/quality.md); False keeps every update
            step's attention exact (dense).
        taylor_order: feature-cache extrapolation order 0 (reuse), 1 or 2 (TaylorSeer). Default 1.
        cache_cap_mb: cap on the feature cache + GEMM-O cache of one layer, in MiB; over the cap the
            order is lowered, and below order 0 the layer does not cache (q-blocks all computed).
        cache_min_free: fraction of the device's memory the feature caches leave free (CUDA only).
            Two phases: at a layer's first update it takes order 0 if that fits in the memory that is
            free (driver plus PyTorch's unused reserve) minus this fraction; at its second update, when
            every layer holds its order-0 buffers, it rises towards ``taylor_order`` as far as the rest
            allows; the order then stays. Default 0.1: full-size HunyuanVideo (33.5K tokens, ~1 GB of
            order-1 cache per layer beside 26 GB of weights) keeps order 0 everywhere and order 1 where it
            fits instead of running out of memory. None: no check.
        symbol_hook: ``fn(spec, step, scores, symbols) -> SparseSymbols | None`` called at update steps
            (not the ``last_dense`` ones) after the policy (see ``hooks.py``).
        site_overrides: ``{pattern: {option: value}}``; ``pattern`` is matched (fnmatch) against the
            site name, e.g. ``{"single_transformer_blocks.*": {"policy": "dense"}}``. The first
            matching pattern wins; any option but ``site_overrides``/``block_q``/``block_kv`` may be set.
        timing: synchronise the device around each site call to time it exactly (slows the run: for
            profiling only). Without it the stats hold host-side launch times.
        sparse_gemm_min_macs: the smallest projection (``B * M * K * N`` multiply-adds of its head-sparse
            part) that runs on the sparse GEMM-Q / GEMM-O kernels; smaller ones run dense through cuBLAS
            (always correct: cached rows of Q are never read, and the attention output's cached rows
            already hold the feature cache, so its dense projection is what GEMM-O computes). Default
            ``2**34`` (~17 GMAC, ~50 us of H100 tensor-core time): below it the skipped work saves less
            than a Triton launch costs on the host (100-400 us measured on the H100 machine, vs ~30 us
            for cuBLAS). 0 sends every projection through the sparse kernels.
        sparse_gemm_o_min_macs: a second floor for the reduction-sparse GEMM-O alone, which runs only at
            or above both (0: ``sparse_gemm_min_macs`` decides). GEMM-O pays for its dispatch-step savings
            at the update step, which projects the cached heads once per Taylor term (``C0..Ck``) beside
            the output; a projection under this size runs dense at every step, reading the cached rows the
            attention kernel wrote (the same result). Default ``2**36`` (~69 GMAC), between the two sizes measured
            end to end on the H200 (benchmarks/NOTES.md, session 9): Flux's 4608 x 3072 -> 3072 (43 GMAC)
            ran 1.6% faster end to end with GEMM-O dense, HunyuanVideo's 33280 x 3072 -> 3072 (314 GMAC)
            gains from it at dispatch steps.
    """

    policy: Any = DEFAULT_POLICY
    policy_args: Mapping[str, Any] = field(default_factory=dict)
    block_q: int = 128
    block_kv: int = 128
    warmup: int = 2
    interval: int = 3
    last_dense: int = 1
    total_steps: Optional[int] = None
    sparse_updates: bool = True
    taylor_order: int = 1
    cache_cap_mb: Optional[float] = None
    cache_min_free: Optional[float] = 0.1
    symbol_hook: Optional[Callable] = None
    site_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    timing: bool = False
    sparse_gemm_min_macs: int = 2**34
    sparse_gemm_o_min_macs: int = 2**36

    def __post_init__(self) -> None:
        from .policies import get_policy, policy_names

        if isinstance(self.policy, str):
            if self.policy not in policy_names():
                raise ValueError(f"flashomni option 'policy'={self.policy!r} is not a known policy; "
                                 f"valid: {', '.join(policy_names())} (or a policy instance)")
        elif not callable(self.policy):
            raise ValueError(f"flashomni option 'policy' must be a policy name or a policy instance with "
                             f"__call__(ctx), got {type(self.policy).__name__}")
        if not isinstance(self.policy_args, Mapping):
            raise ValueError(f"flashomni option 'policy_args' must be a dict, got {type(self.policy_args).__name__}")
        if self.policy_args and not isinstance(self.policy, str):
            raise ValueError("flashomni option 'policy_args' applies to a policy given by name; "
                             f"configure the instance {type(self.policy).__name__} directly instead")
        object.__setattr__(self, "policy_args", MappingProxyType(dict(self.policy_args)))
        if isinstance(self.policy, str):
            get_policy(self.policy, **self.policy_args)   # raises on bad arguments, naming them
        for name in ("block_q", "block_kv"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 16 <= v <= 256 or v & (v - 1):
                raise ValueError(f"flashomni option {name!r}={v!r} is not valid; need a power of two in 16..256")
        _int_option("warmup", self.warmup, 0)
        _int_option("interval", self.interval, 1)
        _int_option("last_dense", self.last_dense, 0)
        _int_option("total_steps", self.total_steps, 1, allow_none=True)
        if not isinstance(self.sparse_updates, bool):
            raise ValueError(f"flashomni option 'sparse_updates' must be True or False, got {self.sparse_updates!r}")
        if isinstance(self.taylor_order, bool) or self.taylor_order not in TAYLOR_ORDERS:
            raise ValueError(f"flashomni option 'taylor_order'={self.taylor_order!r} is not valid; "
                             f"valid: {', '.join(map(str, TAYLOR_ORDERS))}")
        cap = self.cache_cap_mb
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap < 0):
            raise ValueError(f"flashomni option 'cache_cap_mb'={cap!r} is not valid; need a number >= 0 or None")
        mf = self.cache_min_free
        if mf is not None and (isinstance(mf, bool) or not isinstance(mf, (int, float)) or not 0 <= mf < 1):
            raise ValueError(f"flashomni option 'cache_min_free'={mf!r} is not valid; need a fraction in [0, 1) "
                             "or None")
        if self.symbol_hook is not None and not callable(self.symbol_hook):
            raise ValueError(f"flashomni option 'symbol_hook' must be callable "
                             f"fn(spec, step, scores, symbols), got {type(self.symbol_hook).__name__}")
        _int_option("sparse_gemm_min_macs", self.sparse_gemm_min_macs, 0)
        _int_option("sparse_gemm_o_min_macs", self.sparse_gemm_o_min_macs, 0)
        if not isinstance(self.timing, bool):
            raise ValueError(f"flashomni option 'timing' must be True or False, got {self.timing!r}")
        if not isinstance(self.site_overrides, Mapping):
            raise ValueError(f"flashomni option 'site_overrides' must be a dict {{pattern: {{option: value}}}}, "
                             f"got {type(self.site_overrides).__name__}")
        for pattern, over in self.site_overrides.items():
            if not isinstance(pattern, str) or not isinstance(over, Mapping):
                raise ValueError(f"flashomni option 'site_overrides' must map a site-name pattern (str) to a "
                                 f"dict of options, got {pattern!r}: {type(over).__name__}")
            bad = sorted(set(over) - set(self.option_names()) | set(over) & set(_NOT_OVERRIDABLE))
            if bad:
                valid = [n for n in self.option_names() if n not in _NOT_OVERRIDABLE]
                raise ValueError(f"flashomni option 'site_overrides'[{pattern!r}] sets {', '.join(map(repr, bad))}, "
                                 f"which a site override cannot set; valid: {', '.join(valid)}")
            dataclasses.replace(self, site_overrides={}, **over)   # validates the overridden values
        object.__setattr__(self, "site_overrides",
                           MappingProxyType({p: MappingProxyType(dict(o)) for p, o in self.site_overrides.items()}))

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]] = None) -> "RuntimeOptions":
        """Build from a dict of run-time options; unknown keys raise ``ValueError`` listing the valid ones."""
        if options is None:
            return cls()
        if isinstance(options, RuntimeOptions):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"flashomni run-time options must be a dict, got {type(options).__name__}")
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"unknown flashomni run-time option(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(cls.option_names())}")
        return cls(**dict(options))

    def for_site(self, name: str) -> "RuntimeOptions":
        """These options with the first ``site_overrides`` pattern matching ``name`` applied."""
        for pattern, over in self.site_overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                return dataclasses.replace(self, site_overrides={}, **over)
        return self


def resolve_options(options: Any) -> Optional[RuntimeOptions]:
    """``SiteSpec.options`` -> ``RuntimeOptions`` or ``None`` (dense): accepts ``None``, a
    ``RuntimeOptions`` (what the backend stores) or a dict of run-time options."""
    if options is None or isinstance(options, RuntimeOptions):
        return options
    if isinstance(options, Mapping):
        return RuntimeOptions.from_dict(options)
    raise ValueError(f"SiteSpec.options must be None, a RuntimeOptions or a dict, got {type(options).__name__}")
