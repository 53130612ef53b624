"""Euler sampler for rectified-flow models, usable with an eager or a ``torch.compile``-d model.

Convention (as in training): ``x_t = (1 - t) x0 + t noise``, ``t = 1`` is pure noise, the model
predicts the velocity ``v = noise - x0``; Euler steps go from ``t = 1`` to ``t = 0``:
``x_{t'} = x_t + (t' - t) v``.

The timestep reaches the model as a tensor, never a Python float, so a compiled model is traced once
and not recompiled at every step.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .data import PAD

__all__ = ["flow_timesteps", "sample"]


def flow_timesteps(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """``num_steps + 1`` times from 1 to 0; ``shift > 1`` spends more steps at high noise (SD3's shift)."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=torch.float64)
    t = shift * t / (1.0 + (shift - 1.0) * t)
    return t.float()


@torch.no_grad()
def sample(model: Callable[[Tensor, Tensor, Tensor], Tensor], caption_ids: Tensor, noise: Tensor, *,
           num_steps: int = 20, guidance: float = 1.0, shift: float = 1.0,
           callback: Optional[Callable[[int, int], None]] = None,
           dtype: Optional[torch.dtype] = None) -> Tensor:
    """Integrate from ``noise`` (``[B, C, S, S]`` or ``[B, C, F, S, S]``) to samples, in float32.

    Args:
        model: ``model(x, t, caption_ids) -> velocity`` (a ``TinyMMDiT``, compiled or not).
        caption_ids: ``[B, T]`` int64 (``data.tokenize``).
        noise: the starting point; pass the same noise to compare two models on equal terms.
        num_steps: Euler steps.
        guidance: classifier-free guidance scale; ``!= 1`` runs the empty caption and the caption as
            one batch of ``2B`` (empty first) and mixes ``v_u + guidance * (v_c - v_u)``.
        shift: timestep shift (see :func:`flow_timesteps`).
        callback: called as ``callback(step, num_steps)`` before each model call, e.g. to tell a
            run-time controller the step.
        dtype: the dtype fed to the model (its parameters' dtype, e.g. bfloat16); default float32.
    Returns:
        The final sample, float32, same shape as ``noise`` (pixels, roughly in [-1, 1]).
    """
    dtype = dtype or torch.float32
    x = noise.float()
    B = x.shape[0]
    ts = flow_timesteps(num_steps, shift, x.device)
    cfg = guidance != 1.0
    ids = torch.cat([torch.full_like(caption_ids, PAD), caption_ids]) if cfg else caption_ids
    for i in range(num_steps):
        if callback is not None:
            callback(i, num_steps)
        t = ts[i].expand(2 * B if cfg else B).contiguous()
        xin = torch.cat([x, x]) if cfg else x
        v = model(xin.to(dtype), t, ids).float()
        if cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + (ts[i + 1] - ts[i]) * v
    return x
