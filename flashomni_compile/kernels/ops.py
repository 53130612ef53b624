"""Every ``torch.library`` op of flashomni, its fake (meta) implementation, and the public wrappers.

Ops are ``custom_op`` + ``register_fake`` (``triton_op`` does not run under ``TRITON_INTERPRET=1`` with
torch.compile on CPU, DESIGN.md section 3). Each op runs the Triton launcher on CUDA tensors and the
torch reference twin elsewhere; ``FLASHOMNI_FORCE_TRITON=1`` forces the Triton path (the tests use it
on CPU together with ``TRITON_INTERPRET=1``).

The public wrappers validate their arguments and raise ``ValueError`` naming the offending argument;
the raw ops trust their caller (the runtime builds their inputs).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from ..symbols import kv_block_lists, validate_symbols
from . import attention, gemm_o, gemm_q

__all__ = ["sparse_attention", "sparse_linear_q", "out_proj_cache", "sparse_linear_o", "use_triton"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def use_triton(t: Tensor) -> bool:
    """Whether the Triton kernels run for tensors on ``t``'s device.

    ``FLASHOMNI_FORCE_TRITON=1`` on tensors off CUDA needs Triton's interpreter (``TRITON_INTERPRET=1``):
    without it Triton would fail deep inside its launcher, so this raises a clear error instead."""
    if t.is_cuda:
        return True
    if os.environ.get("FLASHOMNI_FORCE_TRITON", "0") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(f"FLASHOMNI_FORCE_TRITON=1 with {t.device.type} tensors needs TRITON_INTERPRET=1 "
                           "(Triton runs kernels off the GPU only in its interpreter); unset "
                           "FLASHOMNI_FORCE_TRITON to use the torch reference implementations")
    return True


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("flashomni::sparse_attention", mutates_args=())
def sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, q_keep: Optional[Tensor], kv_count: Optional[Tensor],
                        kv_index: Optional[Tensor], cache: Optional[Tensor], key_padding_mask: Optional[Tensor],
                        scale: float, block_q: int, block_kv: int, cache1: Optional[Tensor] = None,
                        cache2: Optional[Tensor] = None, cache_delta: float = 0.0) -> tuple[Tensor, Tensor]:
    """``cache1``/``cache2``/``cache_delta``: cached rows take the Taylor series
    ``cache + delta * cache1 + delta^2 / 2 * cache2`` (the runtime's feature cache; ``sparse_attention``
    passes ``cache`` alone)."""
    impl = attention.sparse_attention_triton if use_triton(q) else attention.sparse_attention_ref
    return impl(q, k, v, q_keep, kv_count, kv_index, cache, key_padding_mask, scale, block_q, block_kv,
                cache1, cache2, cache_delta)


@sparse_attention_op.register_fake
def _(q, k, v, q_keep, kv_count, kv_index, cache, key_padding_mask, scale, block_q, block_kv, cache1=None,
      cache2=None, cache_delta=0.0):
    return attention.empty_output(q, v)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "expected q [B, H, Nq, D], k and v [B, H, Nkv, D]")
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"head dims differ: q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}")
    if not MIN_HEAD_DIM <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} is not supported: need {MIN_HEAD_DIM} <= D <= {MAX_HEAD_DIM}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequence: Nq={q.shape[2]}, Nkv={k.shape[2]}")


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, q_keep: Optional[Tensor] = None,
                     kv_keep: Optional[Tensor] = None, cache: Optional[Tensor] = None, *,
                     block_q: int = 128, block_kv: int = 128, scale: Optional[float] = None,
                     key_padding_mask: Optional[Tensor] = None, return_lse: bool = False):
    """Attention driven by sparse symbols (DESIGN.md section 2).

    Shapes: ``q [B, H, Nq, D]``, ``k, v [B, H, Nkv, D]`` (any strides, 16 <= D <= 256, fp16/bf16/fp32),
    ``q_keep`` bool ``[B, H, NQB]``, ``kv_keep`` bool ``[B, H, NQB, NKB]`` (``None``: all kept),
    ``cache [B, H, Nq, D]`` (the output of cached q-blocks), ``key_padding_mask`` bool ``[B, Nkv]``
    (``False`` masks the key).

    Returns ``out [B, H, Nq, D]`` (memory order ``[B, Nq, H, D]``), and with ``return_lse`` also the
    natural-log ``lse [B, H, Nq]`` in float32 (``-inf`` on rows with no visible key and on cached rows).
    Rows with no visible key are 0.

    Example::

        >>> q, k, v = (torch.randn(1, 2, 200, 64) for _ in range(3))
        >>> keep = torch.tensor([[[True, False], [True, True]]]).unsqueeze(0).expand(1, 2, 2, 2)
        >>> out = sparse_attention(q, k, v, kv_keep=keep)
        >>> out.shape
        torch.Size([1, 2, 200, 64])
    """
    _check_qkv(q, k, v)
    B, H, Nq, D = q.shape
    Nkv = k.shape[2]
    validate_symbols(q_keep, kv_keep, Nq, Nkv, block_q, block_kv, batch=B, heads=H, device=q.device)
    if cache is not None:
        if not isinstance(cache, Tensor) or tuple(cache.shape) != (B, H, Nq, D):
            raise ValueError(f"cache must have shape {(B, H, Nq, D)} = [B, H, Nq, D], got "
                             f"{tuple(cache.shape) if isinstance(cache, Tensor) else type(cache).__name__}")
        if cache.dtype != q.dtype or cache.device != q.device:
            raise ValueError(f"cache must match q's dtype and device ({q.dtype}, {q.device}), "
                             f"got ({cache.dtype}, {cache.device})")
    elif q_keep is not None:
        # Whether some q-block is cached is data: checking it syncs, so it is refused while compiling.
        if torch.compiler.is_compiling():
            raise ValueError("q_keep was given without cache; pass cache (rows where q_keep is False "
                             "are copied from it)")
        if not bool(q_keep.all()):
            raise ValueError("cache is required when some q_keep entry is False")
    if key_padding_mask is not None:
        if (not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool
                or tuple(key_padding_mask.shape) != (B, Nkv)):
            raise ValueError(f"key_padding_mask must be a bool tensor of shape {(B, Nkv)} = [B, Nkv], got "
                             + (f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                                if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__))
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    kv_count, kv_index = kv_block_lists(kv_keep) if kv_keep is not None else (None, None)
    out, lse = sparse_attention_op(q, k, v, q_keep, kv_count, kv_index, cache, key_padding_mask,
                                   float(scale), block_q, block_kv)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------
# GEMM-Q: head-sparse Q projection (optionally fused with dense K/V columns)
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("flashomni::sparse_linear_q", mutates_args=())
def sparse_linear_q_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, head_dim: int,
                       row_offset: int, block_q: int, sparse_cols: int) -> Tensor:
    impl = gemm_q.sparse_linear_q_triton if use_triton(x) else gemm_q.sparse_linear_q_ref
    return impl(x, weight, bias, q_keep, head_dim, row_offset, block_q, sparse_cols)


@sparse_linear_q_op.register_fake
def _(x, weight, bias, q_keep, head_dim, row_offset, block_q, sparse_cols):
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------
# GEMM-O: reduction-sparse output projection and its update-step cache
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("flashomni::out_proj_cache", mutates_args=())
def out_proj_cache_op(a: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, head_dim: int,
                      row_offset: int, block_q: int) -> Tensor:
    impl = gemm_o.out_proj_cache_triton if use_triton(a) else gemm_o.out_proj_cache_ref
    return impl(a, weight, bias, q_keep, head_dim, row_offset, block_q)


@out_proj_cache_op.register_fake
def _(a, weight, bias, q_keep, head_dim, row_offset, block_q):
    return a.new_empty(a.shape[0], a.shape[1], weight.shape[0])


@torch.library.custom_op("flashomni::sparse_linear_o", mutates_args=())
def sparse_linear_o_op(a: Tensor, weight: Tensor, c: Tensor, q_keep: Tensor, extra: Optional[Tensor],
                       extra_weight: Optional[Tensor], head_dim: int, row_offset: int, block_q: int) -> Tensor:
    impl = gemm_o.sparse_linear_o_triton if use_triton(a) else gemm_o.sparse_linear_o_ref
    return impl(a, weight, c, q_keep, extra, extra_weight, head_dim, row_offset, block_q)


@sparse_linear_o_op.register_fake
def _(a, weight, c, q_keep, extra, extra_weight, head_dim, row_offset, block_q):
    return a.new_empty(a.shape[0], a.shape[1], weight.shape[0])


def sparse_linear_q(x: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, *, head_dim: int,
                    row_offset: int = 0, block_q: int = 128, sparse_cols: Optional[int] = None) -> Tensor:
    """Head-sparse ``y = x @ weight.T + bias``: see ``gemm_q.py`` for the contract."""
    gemm_q.check_inputs(x, weight, bias, q_keep, head_dim, row_offset, block_q, sparse_cols)
    sparse_cols = weight.shape[0] if sparse_cols is None else sparse_cols
    return sparse_linear_q_op(x, weight, bias, q_keep, head_dim, row_offset, block_q, sparse_cols)


def out_proj_cache(a: Tensor, weight: Tensor, bias: Optional[Tensor], q_keep: Tensor, *, head_dim: int,
                   row_offset: int = 0, block_q: int = 128) -> Tensor:
    """``c = bias + sum over cached heads of a_h @ W_h.T``: see ``gemm_o.py`` for the contract."""
    gemm_o.check_inputs(a, weight, None, q_keep, None, None, head_dim, row_offset, block_q, bias=bias)
    return out_proj_cache_op(a, weight, bias, q_keep, head_dim, row_offset, block_q)


def sparse_linear_o(a: Tensor, weight: Tensor, c: Tensor, q_keep: Tensor, *, head_dim: int,
                    row_offset: int = 0, block_q: int = 128, extra: Optional[Tensor] = None,
                    extra_weight: Optional[Tensor] = None) -> Tensor:
    """``y = c + sum over computed heads of a_h @ W_h.T (+ extra @ extra_weight.T)``: see ``gemm_o.py``."""
    gemm_o.check_inputs(a, weight, c, q_keep, extra, extra_weight, head_dim, row_offset, block_q)
    return sparse_linear_o_op(a, weight, c, q_keep, extra, extra_weight, head_dim, row_offset, block_q)



# ===================================================================================================
# Site ops: what the ``flashomni`` backend puts in the graph (passes/rewrite.py). Owned by the backend.
#
# Each takes the index of a registered ``runtime.spec.SiteSpec`` (``site``) and an *anchor*, a weight
# tensor of the site that differs per layer at run time, and forwards to ``runtime.engine``, which is
# looked up at call time (tests and the runtime may swap its functions). Outputs are fresh tensors.
#
# The update/dispatch decision is host-side Python inside these ops, so a CUDA-graph replay would
# freeze whichever step kind was recorded: the ops are tagged ``cudagraph_unsafe``, which keeps them out
# of Inductor's captured graphs. The backend's own step graphs (runtime/graphs.py, on with
# ``cuda_graphs=True`` or ``mode="reduce-overhead"``) capture whole calls instead, one per host state.
# ===================================================================================================
_SITE_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("flashomni::site_attention", mutates_args=(), tags=_SITE_TAGS)
def site_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], site: int,
                   anchor: Tensor, scale: float) -> Tensor:
    """Attention of site ``site``: ``q [B, H, Nq, D]``, ``k, v [B, H, Nkv, D]``, ``key_padding_mask``
    bool ``[B, Nkv]`` (``False`` masks the key). Returns ``[B, H, Nq, D]`` in memory order ``[B, Nq, H, D]``."""
    from ..runtime import engine

    return engine.attention(site, anchor, q, k, v, key_padding_mask, scale)


@site_attention.register_fake
def _(q, k, v, key_padding_mask, site, anchor, scale):
    B, H, Nq, _ = q.shape
    return q.new_empty(B, Nq, H, v.shape[-1]).transpose(1, 2)


@torch.library.custom_op("flashomni::site_linear_q", mutates_args=(), tags=_SITE_TAGS)
def site_linear_q(x: Tensor, weight: Tensor, bias: Optional[Tensor], site: int, anchor: Tensor,
                  row_offset: int, sparse_cols: int) -> Tensor:
    """Q (or fused QKV) projection of site ``site``: ``x [B, M, K]`` holds rows ``row_offset ...`` of the
    joint sequence; the first ``sparse_cols`` output columns are Q (head ``h`` at ``h*D ... (h+1)*D``)."""
    from ..runtime import engine

    return engine.linear_q(site, anchor, x, weight, bias, row_offset, sparse_cols)


@site_linear_q.register_fake
def _(x, weight, bias, site, anchor, row_offset, sparse_cols):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("flashomni::site_linear_kv", mutates_args=(), tags=_SITE_TAGS)
def site_linear_kv(x: Tensor, weight: Tensor, bias: Optional[Tensor], site: int, anchor: Tensor,
                   row_offset: int) -> Tensor:
    """K or V projection of site ``site``: ``x [B, M, K]`` holds rows ``row_offset ...`` of the key/value
    sequence; the ``H*D`` output columns are the heads (head ``h`` at ``h*D ... (h+1)*D``)."""
    from ..runtime import engine

    return engine.linear_kv(site, anchor, x, weight, bias, row_offset)


@site_linear_kv.register_fake
def _(x, weight, bias, site, anchor, row_offset):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("flashomni::site_linear_o", mutates_args=(), tags=_SITE_TAGS)
def site_linear_o(a: Tensor, weight: Tensor, bias: Optional[Tensor], extra: Optional[Tensor],
                  extra_weight: Optional[Tensor], site: int, anchor: Tensor, row_offset: int) -> Tensor:
    """Output projection of site ``site``: ``y = a @ weight.T + bias (+ extra @ extra_weight.T)`` with
    ``a [B, M, H*D]`` rows ``row_offset ...`` of the joint sequence (head ``h`` at columns ``h*D ...``)."""
    from ..runtime import engine

    return engine.linear_o(site, anchor, a, weight, bias, row_offset, extra, extra_weight)


@site_linear_o.register_fake
def _(a, weight, bias, extra, extra_weight, site, anchor, row_offset):
    return a.new_empty(*a.shape[:-1], weight.shape[0])
