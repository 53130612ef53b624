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
           "ring_mma", "thread_barrier", "tma_ok", "tma_store", "warpgroup_mma", "warpgroup_mma_wait"]

AVAILABLE = gluon is not None

if AVAILABLE:
    @gluon.jit
    def ring_mma(a_smem, w_smem, ready, empty, cnt, nsteps, acc, ROW0: gl.constexpr, ROWS: gl.constexpr,
                 WIDTH: gl.constexpr, STAGES: gl.constexpr):
        """``acc +`` rows ``ROW0 .. ROW0 + ROWS - 1`` of each A stage times the first ``WIDTH`` rows of its W
        stage (transposed), over the ring stages ``cnt .. cnt + nsteps - 1``: one product in flight, each
        stage released on its *empty* mbarrier once its product is done (the GEMM kernels' consumer loop)."""
        BM: gl.constexpr = a_smem.shape[2]
        BK: gl.constexpr = a_smem.shape[3]
        for k in range(nsteps):
            s = (cnt + k) % STAGES
            mbarrier.wait(ready.index(s), ((cnt + k) // STAGES) & 1)
            a2 = a_smem.index(s).reshape([BM, BK])
            if ROWS != BM:
                a2 = a2.slice(ROW0, ROWS, 0)
            w2 = w_smem.index(s)
            if WIDTH != w_smem.shape[1]:
                w2 = w2.slice(0, WIDTH)
            acc = warpgroup_mma(a2, w2.permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if k > 0:
                mbarrier.arrive(empty.index((cnt + k - 1) % STAGES), count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if nsteps > 0:
            mbarrier.arrive(empty.index((cnt + nsteps - 1) % STAGES), count=1)
        return acc


def tma_ok(t: torch.Tensor) -> bool:
    """TMA needs a unit last stride and 16-byte aligned base and outer strides."""
    es = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * es) % 16 == 0 for s in t.stride()[:-1]))
