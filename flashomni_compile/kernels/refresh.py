"""The update step's refresh pass: change metric and Taylor terms of the feature cache in one read.

At an update step the policy measures how much each (q-block, head) output moved since the previous
update (``PolicyContext.change``: ``||out - D0|| / ||D0||`` per block) and the feature cache forms its
divided differences (``D1 = (out - D0) / delta``, ``D2 = (D1_new - D1_old) / delta``). In torch that is
a float32 difference tensor written and read back four times (~32 bytes moved per element at order 1,
about 1 ms a layer at HunyuanVideo's size on an H200: benchmarks/NOTES.md, session 8). This kernel reads
``out`` and ``D0`` (and the old ``D1`` at order 2) once and writes the terms and the two block norms:
8-12 bytes per element. ``D0`` itself is left alone (the policy may still read it as ``prev_out``); the
cache copies ``out`` into it afterwards.

Formula, with ``diff = float32(out) - float32(D0)`` per element (the torch reference twin
``refresh_terms_ref`` states it in torch)::

    num[b, h, j] = || diff[b, h, rows of block j, :] ||_2        den[b, h, j] = || D0[...] ||_2
    D2 = (diff - delta * float32(D1_old)) / delta^2     (written when d2 is given; reads D1 first)
    D1 = diff / delta                                   (written when d1 is given)

All tensors ``[B, H, N, D]`` with any strides (the cache keeps ``[B, N, H, D]`` memory); the terms
are rounded once into their dtype; ``num``/``den`` are float32 ``[B, H, ceil(N / block)]``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import cdiv, launch, next_power_of_2

__all__ = ["block_norm", "refresh_terms", "refresh_terms_ref", "refresh_terms_triton"]


@triton.jit
def _refresh_kernel(OUT, D0, D1, D2, NUM, DEN, N, H, delta,
                    s_ob, s_oh, s_on, s_od, s_0b, s_0h, s_0n, s_0d, s_1b, s_1h, s_1n, s_1d,
                    s_2b, s_2h, s_2n, s_2d, s_nb, s_nh, s_nj,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                    WRITE_D1: tl.constexpr, WRITE_D2: tl.constexpr):
    # program (j, b*H + h): the rows of block j of one (b, h), ROWS at a time
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    sq_diff = tl.zeros([ROWS], dtype=tl.float32)      # per-row partial sums of squares
    sq_prev = tl.zeros([ROWS], dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK, ROWS):
        rows = (j * BLOCK + r0 + tl.arange(0, ROWS)).to(tl.int64)
        ok = (rows < N)[:, None] & d_ok[None, :]
        o = tl.load(OUT + b * s_ob + h * s_oh + rows[:, None] * s_on + offs_d[None, :] * s_od, mask=ok, other=0.0)
        p = tl.load(D0 + b * s_0b + h * s_0h + rows[:, None] * s_0n + offs_d[None, :] * s_0d, mask=ok, other=0.0)
        p = p.to(tl.float32)
        diff = o.to(tl.float32) - p
        sq_diff += tl.sum(diff * diff, 1)
        sq_prev += tl.sum(p * p, 1)
        d1_ptr = D1 + b * s_1b + h * s_1h + rows[:, None] * s_1n + offs_d[None, :] * s_1d
        if WRITE_D2:
            d1_old = tl.load(d1_ptr, mask=ok, other=0.0).to(tl.float32)
            tl.store(D2 + b * s_2b + h * s_2h + rows[:, None] * s_2n + offs_d[None, :] * s_2d,
                     ((diff - delta * d1_old) / (delta * delta)).to(D2.dtype.element_ty), mask=ok)
        if WRITE_D1:
            tl.store(d1_ptr, (diff / delta).to(D1.dtype.element_ty), mask=ok)
    at = b * s_nb + h * s_nh + j * s_nj
    tl.store(NUM + at, tl.sqrt(tl.sum(sq_diff, 0)))
    tl.store(DEN + at, tl.sqrt(tl.sum(sq_prev, 0)))


def block_norm(x: Tensor, block: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """L2 norm of ``x [B, H, N, D]`` over each block of ``block`` rows (dim 2) and ``D``: ``[B, H, NB]``,
    one reduction pass (partial last block handled as a slice)."""
    n = x.shape[2]
    nfull, rem = divmod(n, block)
    parts = []
    if nfull:
        parts.append(torch.linalg.vector_norm(x[:, :, :nfull * block].unflatten(2, (nfull, block)), dim=(3, 4),
                                              dtype=dtype))
    if rem:
        parts.append(torch.linalg.vector_norm(x[:, :, nfull * block:], dim=(2, 3), dtype=dtype)[..., None])
    if not parts:
        return x.new_zeros(*x.shape[:2], 0, dtype=dtype or x.dtype)
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


def _check(out: Tensor, d0: Tensor, d1: Optional[Tensor], d2: Optional[Tensor], delta: float, block: int) -> None:
    if out.dim() != 4 or d0.shape != out.shape:
        raise ValueError(f"refresh_terms: out and d0 must be [B, H, N, D] of one shape, got {tuple(out.shape)} "
                         f"and {tuple(d0.shape)}")
    for name, t in (("d1", d1), ("d2", d2)):
        if t is not None and (t.shape != out.shape or t.device != out.device):
            raise ValueError(f"refresh_terms: {name} must match out's shape and device, got {tuple(t.shape)}")
    if d2 is not None and d1 is None:
        raise ValueError("refresh_terms: d2 needs d1 (D2 is formed from the old D1)")
    if not delta > 0:
        raise ValueError(f"refresh_terms: delta must be > 0 (steps since the previous update), got {delta}")
    if block < 1:
        raise ValueError(f"refresh_terms: block must be >= 1, got {block}")


def refresh_terms_ref(out: Tensor, d0: Tensor, d1: Optional[Tensor], d2: Optional[Tensor], delta: float,
                      block: int) -> tuple[Tensor, Tensor]:
    """Torch twin of the kernel (module docstring): returns ``(num, den)``, writes ``d2`` then ``d1``."""
    _check(out, d0, d1, d2, delta, block)
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    diff = out.to(acc) - d0.to(acc)
    num, den = block_norm(diff, block).float(), block_norm(d0, block, dtype=acc).float()
    if d2 is not None:
        d2.copy_((diff - delta * d1.to(acc)) / (delta * delta))
    if d1 is not None:
        d1.copy_(diff / delta)
    return num, den


def refresh_terms_triton(out: Tensor, d0: Tensor, d1: Optional[Tensor], d2: Optional[Tensor], delta: float,
                         block: int) -> tuple[Tensor, Tensor]:
    """Triton launcher (same contract as ``refresh_terms_ref``); no host synchronisation."""
    _check(out, d0, d1, d2, delta, block)
    B, H, N, D = out.shape
    nb = cdiv(N, block)
    num = torch.empty(B, H, nb, device=out.device, dtype=torch.float32)
    den = torch.empty_like(num)
    if num.numel() == 0:
        return num, den
    rows = min(32, block)                        # the kernel walks a block ROWS rows at a time
    if block & (block - 1):
        raise ValueError(f"refresh_terms: block={block} must be a power of two on the kernel path")
    s1 = d1.stride() if d1 is not None else (0, 0, 0, 0)
    s2 = d2.stride() if d2 is not None else (0, 0, 0, 0)
    launch(_refresh_kernel, (nb, B * H),
           out, d0, d1 if d1 is not None else out, d2 if d2 is not None else out, num, den, N, H, float(delta),
           *out.stride(), *d0.stride(), *s1, *s2, *num.stride(),
           HEAD_DIM=D, BLOCK=block, ROWS=rows, BLOCK_D=max(16, next_power_of_2(D)),
           WRITE_D1=d1 is not None, WRITE_D2=d2 is not None, num_warps=4)
    return num, den


def refresh_terms(out: Tensor, d0: Tensor, d1: Optional[Tensor], d2: Optional[Tensor], delta: float,
                  block: int) -> tuple[Tensor, Tensor]:
    """The kernel on CUDA tensors (and on CPU under ``FLASHOMNI_FORCE_TRITON=1``), else the torch twin; float64
    always takes the twin (the kernel accumulates in float32)."""
    from .ops import use_triton

    kernel = out.dtype in (torch.float16, torch.bfloat16, torch.float32) and use_triton(out)
    impl = refresh_terms_triton if kernel else refresh_terms_ref
    return impl(out, d0, d1, d2, delta, block)
