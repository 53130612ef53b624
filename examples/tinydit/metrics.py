"""Image-quality metrics between a run and its dense reference: PSNR, SSIM (Gaussian window), relative L2.

Inputs are pixels in [-1, 1] as the sampler returns them: ``[B, C, S, S]`` images or
``[B, C, F, S, S]`` videos (frames are scored as images). Scores are the mean over images/frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["to_frames", "psnr", "ssim", "rel_l2"]


def to_frames(x: Tensor) -> Tensor:
    """``[B, C, S, S]`` or ``[B, C, F, S, S]`` in [-1, 1] -> ``[B*F, C, S, S]`` in [0, 1], float64."""
    if x.dim() == 5:
        x = x.transpose(1, 2).flatten(0, 1)
    return ((x.double() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: Tensor, ref: Tensor) -> float:
    """Mean PSNR in dB over frames (data range 1 after mapping to [0, 1]); identical frames count 100 dB."""
    a, b = to_frames(x), to_frames(ref)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return float((10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def _gaussian_window(size: int, sigma: float, channels: int, device) -> Tensor:
    g = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    g = torch.exp(-g * g / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: Tensor, ref: Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, valid region)."""
    a, b = to_frames(x), to_frames(ref)
    C = a.shape[1]
    w = _gaussian_window(window, sigma, C, a.device)
    filt = lambda t: F.conv2d(t, w, groups=C)  # noqa: E731
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def rel_l2(x: Tensor, ref: Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64 (final latents; here the latents are the pixels)."""
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
