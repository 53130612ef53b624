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


SM90_SMEM_LIMIT = 232448   # bytes of shared memory one block may use on sm_90 (227 KB)


def sm90_compile_rows(*args: str) -> list:
    """Run ``sm90_compile_check.py *args`` in a subprocess (away from this process's triton state, with the
    interpreter off so that it compiles for the stub sm_90 target) and return its JSON rows."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_compile_check.py")), *args],
                         capture_output=True, text=True, env=env, timeout=900)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and rows, f"compile check failed:\n{run.stderr[-3000:]}"
    return rows
