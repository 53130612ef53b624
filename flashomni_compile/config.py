"""Options of the ``flashomni`` backend: one frozen dataclass, validated, with errors that list the choices.

    torch.compile(model, backend="flashomni", options={"policy": "dense", "dump_dir": "fo_dump"})

``FlashOmniConfig.from_compile_kwargs(mode, options)`` builds it from what ``torch.compile`` hands the
backend. Unknown keys and bad values raise ``ValueError`` naming the key, the value seen and the valid
choices. ``runtime`` holds options the run-time side reads (schedule, cache order, ...): it is passed
through untouched so the runtime can grow without changing this file; the runtime validates it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping, Optional

__all__ = ["FlashOmniConfig", "register_policy", "policy_names", "INNER_BACKENDS", "DUMP_DIR_ENV"]

DUMP_DIR_ENV = "FLASHOMNI_DUMP_DIR"
INNER_BACKENDS = ("inductor", "eager", "aot_eager")
# torch.compile's own modes; "default" never reaches a custom backend (torch drops it).
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Policy name -> policy object (or None for the built-in dense behaviour). The runtime registers more.
_POLICIES: dict[str, Any] = {"dense": None}


def register_policy(name: str, policy: Any = None) -> None:
    """Make ``options={"policy": name}`` valid. ``policy`` is whatever the runtime looks up by name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty string, got {name!r}")
    _POLICIES[name] = policy


def policy_names() -> tuple[str, ...]:
    """Names accepted by ``options={"policy": ...}``: registered here or by the runtime's policy registry."""
    names = set(_POLICIES)
    try:  # the runtime's built-in policies, when that module exists (imported lazily: keeps import lean)
        from .runtime import policies

        names |= set(policies.policy_names())
    except (ImportError, AttributeError):
        pass
    return tuple(sorted(names))


def _frozen(d: Optional[Mapping]) -> Mapping:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class FlashOmniConfig:
    """Backend options.

    Attributes:
        policy: name of the sparsity policy (``"dense"``: every symbol kept; the correctness mode), or a
            policy object (callable) that the runtime uses as is.
        dump_dir: directory for the debugging dumps (docs/debugging.md); default: ``$FLASHOMNI_DUMP_DIR``.
        inner_backend: what compiles the rewritten graph: ``"inductor"`` | ``"eager"`` | ``"aot_eager"``.
        mode: Inductor mode for the inner compile (``torch.compile``'s ``mode=`` lands here too).
        inductor: extra Inductor config patches for the inner compile (never applied globally).
        block_q, block_kv: q-block and kv-block sizes of the sparse symbols (powers of two, 16..256).
        fuse_gemm_q, fuse_gemm_o: rewrite the Q projection / output projection onto the head-sparse
            GEMMs when the pass proves it equivalent. ``False`` leaves them dense.
        runtime: options for the run-time side (schedule, cache order, ...), passed through as given.
    """

    policy: str = "dense"
    dump_dir: Optional[str] = None
    inner_backend: str = "inductor"
    mode: Optional[str] = None
    inductor: Mapping[str, Any] = field(default_factory=dict)
    block_q: int = 128
    block_kv: int = 128
    fuse_gemm_q: bool = True
    fuse_gemm_o: bool = True
    runtime: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.policy, str) or not callable(self.policy):   # an instance: the runtime checks it
            if not isinstance(self.policy, str) or self.policy not in policy_names():
                raise ValueError(f"flashomni option 'policy'={self.policy!r} is not a known policy; "
                                 f"valid: {', '.join(policy_names())} (or a policy object)")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ValueError(f"flashomni option 'dump_dir' must be a path string or None, got {self.dump_dir!r}")
        if self.inner_backend not in INNER_BACKENDS:
            raise ValueError(f"flashomni option 'inner_backend'={self.inner_backend!r} is not valid; "
                             f"valid: {', '.join(INNER_BACKENDS)}")
        if self.mode is not None and self.mode not in INDUCTOR_MODES:
            raise ValueError(f"flashomni option 'mode'={self.mode!r} is not valid; valid: {', '.join(INDUCTOR_MODES)}")
        for name in ("block_q", "block_kv"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v > 256 or v & (v - 1):
                raise ValueError(f"flashomni option {name!r}={v!r} is not valid; need a power of two in 16..256")
        for name in ("fuse_gemm_q", "fuse_gemm_o"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"flashomni option {name!r} must be True or False, got {getattr(self, name)!r}")
        for name in ("inductor", "runtime"):
            v = getattr(self, name)
            if not isinstance(v, Mapping):
                raise ValueError(f"flashomni option {name!r} must be a dict, got {type(v).__name__}")
            object.__setattr__(self, name, _frozen(v))
        if self.dump_dir is not None:
            object.__setattr__(self, "dump_dir", os.fspath(self.dump_dir))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

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
            kw = dict(options)
            if kw.get("dump_dir") is None and os.environ.get(DUMP_DIR_ENV):
                kw["dump_dir"] = os.environ[DUMP_DIR_ENV]
            cfg = cls(**kw)
        if mode is not None and mode != "default":
            if cfg.mode is not None and cfg.mode != mode:
                raise ValueError(f"mode={mode!r} conflicts with options['mode']={cfg.mode!r}")
            cfg = cls(**{**{f.name: getattr(cfg, f.name) for f in fields(cls)}, "mode": mode})
        return cfg
