"""Test set-up: without a GPU, Triton kernels run under the interpreter (must be set before import)."""

import os
import shutil

def _has_cuda() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    return shutil.which("nvidia-smi") is not None


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Relative-error tolerances ||out - ref|| / ||ref|| against a float64 reference, per input dtype.
# fp32: Triton's tl.dot on fp32 inputs uses tf32 on GPUs (~3e-4 observed); 2e-3 leaves margin for the
# online softmax. fp16 (10-bit mantissa) and bf16 (7-bit) operands: P is rounded to the input dtype before
# the PV product, as in FlashAttention, which dominates the error: ~5e-4 (fp16) and ~4e-3 (bf16).
REL_TOL = {torch.float32: 2e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    assert torch.isfinite(out64).all(), "output holds NaN/inf"
    denom = ref64.norm().clamp_min(1e-30)
    return float((out64 - ref64).norm() / denom)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _restore_policy_registry():
    """Tests may register policies; the registry is process-global, so each test gets it back as it was."""
    from flashomni_compile.runtime import policies

    saved = dict(policies._REGISTRY)
    yield
    policies._REGISTRY.clear()
    policies._REGISTRY.update(saved)


@pytest.fixture(autouse=True)
def _clear_runtime_override():
    """``set_runtime_options`` is process-global: no test leaks its override into the next."""
    from flashomni_compile.runtime import engine

    yield
    if engine.runtime_options_override() is not None:
        engine.set_runtime_options(None)
