"""The step controller: which denoising step a layer is at, and whether it updates or dispatches.

Steps are host-side ints. Two sources:

* **Counted** (default): each layer counts its own passes. A pass begins at the first site call
  (``linear_q`` or ``linear_kv``, else ``attention``) after the layer's previous attention call, so no
  global "forward started" signal is needed and every layer of a reused compiled block counts separately.
  When ``total_steps`` is known, the count wraps at it, so back-to-back generations need nothing more.
  With classifier-free guidance run as **one batch** (B = 2) a step is one pass: nothing to do. With
  CFG as **two forward calls** per step, each call counts as a step: use ``set_step`` (below), or
  give ``total_steps = 2 * steps`` and remember that warm-up/interval then count calls.
* **Explicit**: ``set_step(i, total)`` before step ``i`` (or the diffusers callback
  ``StepCallback`` / ``step_callback()``, which sets it for you). While a step is set, a layer's
  second pass within the same step is a separate *branch* with its own symbols and caches, which is
  exactly what CFG as two calls needs. ``clear_step()`` returns to counting.

Schedule (``step_kind``): update (dense + refresh) for the ``warmup`` first steps, every ``interval``
steps after them, and for the ``last_dense`` last steps when the total is known; dispatch otherwise.
"""

from __future__ import annotations

from typing import Any, Optional

from .options import RuntimeOptions
from .state import DISPATCH, UPDATE, LayerState, Pass

__all__ = ["set_step", "clear_step", "current_step", "step_kind", "in_last_dense", "StepCallback", "step_callback",
           "begin_pass"]

_EXPLICIT: Optional[tuple[int, Optional[int]]] = None


def set_step(step: int, total: Optional[int] = None) -> None:
    """Tell every site that the next forward is denoising step ``step`` (0-based) of ``total``."""
    global _EXPLICIT
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"set_step: step must be an int >= 0, got {step!r}")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
        raise ValueError(f"set_step: total must be an int >= 1 or None, got {total!r}")
    if total is not None and step >= total:
        raise ValueError(f"set_step: step {step} is past the last step of total={total} (steps are 0-based)")
    _EXPLICIT = (step, total)


def clear_step() -> None:
    """Forget the explicit step: layers go back to counting their passes."""
    global _EXPLICIT
    _EXPLICIT = None


def current_step() -> Optional[tuple[int, Optional[int]]]:
    """The explicit ``(step, total)``, or ``None`` when steps are counted."""
    return _EXPLICIT


def in_last_dense(step: int, total: Optional[int], opts: RuntimeOptions) -> bool:
    """Whether ``step`` is one of the ``last_dense`` last steps of a known ``total``."""
    return total is not None and step >= total - opts.last_dense


def step_kind(step: int, total: Optional[int], opts: RuntimeOptions) -> str:
    """``"update"`` or ``"dispatch"`` for ``step`` under ``opts``' schedule (pure host logic)."""
    if step < opts.warmup or in_last_dense(step, total, opts):
        return UPDATE
    return UPDATE if (step - opts.warmup) % opts.interval == 0 else DISPATCH


def begin_pass(st: LayerState, signature: tuple) -> Pass:
    """Start a pass of layer ``st``: pick its step, branch and kind (update is forced when the branch has
    no symbols yet, its buffers were built for other inputs, or the step went backwards: a new run)."""
    if _EXPLICIT is not None:
        step, total = _EXPLICIT
        total = total if total is not None else st.options.total_steps
        st.branch_index = st.branch_index + 1 if step == st.explicit_step else 0
        st.explicit_step = step
    else:
        total = st.options.total_steps
        st.counted_step += 1
        if total is not None and st.counted_step >= total:
            st.counted_step = 0
        step = st.counted_step
        st.branch_index = 0
    br = st.branch(st.branch_index)
    kind = step_kind(step, total, st.options)
    if br.last_update is not None and step <= br.last_update:
        br.last_update = None                      # a new generation: forget the Taylor history
        if br.cache is not None:
            br.cache.reset()
    if br.symbols is None or br.signature != signature or br.last_update is None:
        kind = UPDATE
    st.current = Pass(step, total, kind, br)
    return st.current


class StepCallback:
    """A diffusers ``callback_on_step_end`` that keeps flashomni's step in sync with the pipeline.

        pipe(prompt, num_inference_steps=28, callback_on_step_end=StepCallback())

    Construction sets step 0; after step ``i`` the callback sets ``i + 1`` (and 0 again after the last
    step, ready for the next generation). ``total`` defaults to ``pipe.num_timesteps``. With CFG run as
    two calls per step, both calls of a step then share the step and get separate branches.
    """

    def __init__(self, total: Optional[int] = None) -> None:
        self.total = total
        set_step(0, total)

    def __call__(self, pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
        total = self.total if self.total is not None else getattr(pipe, "num_timesteps", None)
        total = int(total) if total is not None else None
        nxt = i + 1
        if total is not None and nxt >= total:
            nxt = 0
        set_step(nxt, total)
        return callback_kwargs


def step_callback(total: Optional[int] = None) -> StepCallback:
    """``StepCallback(total)``: pass it as ``callback_on_step_end=`` to a diffusers pipeline."""
    return StepCallback(total)
