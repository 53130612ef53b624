"""What the Gluon kernels for Hopper (``attention_sm90.py``, ``gemm_o_sm90.py``,
``gemm_q_sm90.py``) share: the Gluon imports
(absent before triton 3.5: then ``AVAILABLE`` is False and every call takes a Triton kernel), the TMA copy
functions under the names of the triton version installed, and the TMA alignment rule."""

from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    # The TMA copies were renamed between the two triton versions this runs on: 3.6 has only the long
    # names, 3.9 keeps those as functions that raise.
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    # the CTA (in a partition: the partition's warps) barrier: ``thread_barrier`` on 3.6, ``barrier`` on 3.9
    thread_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
except ImportError:  # pragma: no cover - older triton
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = None
    GluonDescriptor = tma_load = tma_store = thread_barrier = None

__all__ = ["AVAILABLE", "GluonDescriptor", "fence_async_shared", "gl", "gluon", "mbarrier", "tma", "tma_load",
           "thread_barrier", "tma_ok", "tma_store", "warpgroup_mma", "warpgroup_mma_wait"]

AVAILABLE = gluon is not None


def tma_ok(t: torch.Tensor) -> bool:
    """TMA needs a unit last stride and 16-byte aligned base and outer strides."""
    es = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * es) % 16 == 0 for s in t.stride()[:-1]))
