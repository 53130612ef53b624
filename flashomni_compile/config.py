"""Options of the ``flashomni`` backend: one frozen dataclass, validated, with errors that list the choices.

    torch.compile(model, backend="flashomni", options={"policy": "pooled_qk", "policy_args": {"tau_kv": 0.2},
                                                       "interval": 4, "dump_dir": "fo_dump"})

``FlashOmniConfig.from_options(options, mode)`` builds it from what ``torch.compile`` hands the backend.
``options`` is one flat dict: the compile-side keys below plus every run-time key of
``runtime.options.RuntimeOptions`` (policy, schedule, feature cache, symbol hook, ...), which are
validated here, at compile time, and handed to each site as ``SiteSpec.options``. Unknown keys and bad
values raise ``ValueError`` naming the key, the value seen and the valid choices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .runtime.options import RuntimeOptions

__all__ = ["FlashOmniConfig", "INNER_BACKENDS", "DUMP_DIR_ENV"]

DUMP_DIR_ENV = "FLASHOMNI_DUMP_DIR"
INNER_BACKENDS = ("inductor", "eager", "aot_eager")
# torch.compile's own modes; "default" never reaches a custom backend (torch drops it).
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class FlashOmniConfig:
    """Backend options.

    Attributes:
        dump_dir: directory for the debugging dumps (docs/debugging.md); default: ``$FLASHOMNI_DUMP_DIR``.
        inner_backend: what compiles the rewritten graph: ``"inductor"`` | ``"eager"`` | ``"aot_eager"``.
        mode: Inductor mode for the inner compile (``torch.compile``'s ``mode=`` lands here too).
        inductor: extra Inductor config patches for the inner compile (never applied globally).
        fuse_gemm_q, fuse_gemm_o: rewrite the Q projection / output projection onto the head-sparse
            GEMMs when the pass proves it equivalent. ``False`` leaves them dense.
        fuse_gemm_kv: rewrite the K and V projections (separate ones, not a fused QKV/KV linear) so that
            dispatch steps compute only the (kv-block, head) tiles some computed q-block attends to
            (GEMM-KV), when the pass proves it equivalent. ``False`` leaves them dense.
        cuda_graphs: run every graph that holds sites through step graphs (``runtime/graphs.py``): each
            call is captured into a CUDA graph keyed by the run-time state it starts from, and replayed
            when that state comes back (from the third generation on, with ``total_steps`` or
            ``set_step``). ``None`` (default): on when ``mode="reduce-overhead"``. Inductor's own
            CUDA graphs are switched off for those graphs.
        runtime: the run-time options (``RuntimeOptions``: policy, block sizes, schedule, cache, hook);
            in ``options=`` their keys are given flat, next to the keys above.

    ``policy``, ``block_q`` and ``block_kv`` read through to ``runtime``.
    """

    dump_dir: Optional[str] = None
    inner_backend: str = "inductor"
    mode: Optional[str] = None
    inductor: Mapping[str, Any] = field(default_factory=dict)
    fuse_gemm_q: bool = True
    fuse_gemm_kv: bool = True
    fuse_gemm_o: bool = True
    cuda_graphs: Optional[bool] = None
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    def __post_init__(self):
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ValueError(f"flashomni option 'dump_dir' must be a path string or None, got {self.dump_dir!r}")
        if self.inner_backend not in INNER_BACKENDS:
            raise ValueError(f"flashomni option 'inner_backend'={self.inner_backend!r} is not valid; "
                             f"valid: {', '.join(INNER_BACKENDS)}")
        if self.mode is not None and self.mode not in INDUCTOR_MODES:
            raise ValueError(f"flashomni option 'mode'={self.mode!r} is not valid; valid: {', '.join(INDUCTOR_MODES)}")
        for name in ("fuse_gemm_q", "fuse_gemm_kv", "fuse_gemm_o"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"flashomni option {name!r} must be True or False, got {getattr(self, name)!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"flashomni option 'cuda_graphs' must be True, False or None, got {self.cuda_graphs!r}")
        if not isinstance(self.inductor, Mapping):
            raise ValueError(f"flashomni option 'inductor' must be a dict, got {type(self.inductor).__name__}")
        object.__setattr__(self, "inductor", MappingProxyType(dict(self.inductor)))
        if not isinstance(self.runtime, RuntimeOptions):
            raise ValueError(f"FlashOmniConfig.runtime must be a RuntimeOptions, got {type(self.runtime).__name__}")
        if self.dump_dir is not None:
            object.__setattr__(self, "dump_dir", os.fspath(self.dump_dir))

    @property
    def step_graphs(self) -> bool:
        """Whether graphs with sites run through step graphs (``cuda_graphs``, else ``mode``)."""
        return self.cuda_graphs if self.cuda_graphs is not None else self.mode == "reduce-overhead"

    @property
    def policy(self) -> Any:
        return self.runtime.policy

    @property
    def block_q(self) -> int:
        return self.runtime.block_q

    @property
    def block_kv(self) -> int:
        return self.runtime.block_kv

    @classmethod
    def compile_option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "runtime")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Every key ``options=`` accepts: compile-side keys, then the run-time keys."""
        return cls.compile_option_names() + RuntimeOptions.option_names()

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> "FlashOmniConfig":
        """Build from ``torch.compile(..., mode=, options=)``; ``FLASHOMNI_DUMP_DIR`` fills ``dump_dir``."""
        if options is None:
            options = {}
        if isinstance(options, FlashOmniConfig):
            cfg = options
        else:
            if not isinstance(options, Mapping):
                raise ValueError(f"flashomni options must be a dict, got {type(options).__name__}")
            unknown = sorted(set(options) - set(cls.option_names()))
            if unknown:
                raise ValueError(f"unknown flashomni option(s) {', '.join(map(repr, unknown))}; "
                                 f"valid: {', '.join(cls.option_names())}")
            compile_kw = {k: v for k, v in options.items() if k in cls.compile_option_names()}
            runtime_kw = {k: v for k, v in options.items() if k not in compile_kw}
            if compile_kw.get("dump_dir") is None and os.environ.get(DUMP_DIR_ENV):
                compile_kw["dump_dir"] = os.environ[DUMP_DIR_ENV]
            cfg = cls(**compile_kw, runtime=RuntimeOptions(**runtime_kw))   # keys checked above
        if mode is not None and mode != "default":
            if cfg.mode is not None and cfg.mode != mode:
                raise ValueError(f"mode={mode!r} conflicts with options['mode']={cfg.mode!r}")
            cfg = replace(cfg, mode=mode)
        return cfg
