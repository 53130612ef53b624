"""The refresh kernel (``kernels/refresh.py``) against its torch twin, and the twin against the formulas
the runtime used before it (``PolicyContext.change`` and ``FeatureCache.update``'s differences).

Fresh random inputs with ``[B, N, H, D]`` memory (the cache's layout), partial last blocks, several head
dims and dtypes, each combination of terms written. Tolerances: norms are float32 sums of squares in a
different order than torch's reduction (1e-5 relative); the terms are rounded once into their dtype from
the same float32 expression, except that the kernel may contract ``diff - delta * d1`` into an FMA: one
float32 rounding apart, far under the terms' own rounding (exact for float32 up to 1e-6 relative).
"""

from __future__ import annotations

import pytest
import torch

from flashomni_compile.kernels.refresh import refresh_terms_ref, refresh_terms_triton
from flashomni_compile.kernels.refresh import block_norm

TERM_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DEV = "cuda" if torch.cuda.is_available() else "cpu"   # the kernel: on the GPU, else under the interpreter


def _bnhd(B, N, H, D, dtype, g, device="cpu"):
    return torch.randn(B, N, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)


@pytest.mark.parametrize("D, N, block", [(64, 200, 64), (40, 96, 32), (128, 130, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("terms", [0, 1, 2])
def test_kernel_matches_twin(D, N, block, dtype, terms):
    g = torch.Generator().manual_seed(D * N + terms)
    B, H = 2, 3
    out, d0 = _bnhd(B, N, H, D, dtype, g, DEV), _bnhd(B, N, H, D, dtype, g, DEV)
    out = d0 + 0.1 * out                                  # a nearby output, as at a real update
    d1 = _bnhd(B, N, H, D, dtype, g, DEV) if terms else None
    d2 = _bnhd(B, N, H, D, dtype, g, DEV) if terms > 1 else None
    got = [None if t is None else t.clone() for t in (d1, d2)]
    want = [None if t is None else t.clone() for t in (d1, d2)]
    num, den = refresh_terms_triton(out, d0, got[0], got[1], 2.0, block)
    rnum, rden = refresh_terms_ref(out, d0, want[0], want[1], 2.0, block)
    assert num.shape == (B, H, -(-N // block)) and num.dtype == torch.float32
    torch.testing.assert_close(num, rnum, rtol=1e-5, atol=0)
    torch.testing.assert_close(den, rden, rtol=1e-5, atol=0)
    for a, b, old in zip(got, want, (d1, d2)):
        if b is not None:
            assert not torch.equal(b, old)               # the twin wrote the term
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
            assert err < TERM_TOL[dtype], err


def test_twin_matches_the_runtime_formulas():
    """num/den are ``block_norm`` of the float32 difference and of D0; D1 and D2 are
    ``FeatureCache.update``'s divided differences."""
    g = torch.Generator().manual_seed(7)
    out, d0, d1 = (_bnhd(1, 100, 2, 64, torch.bfloat16, g) for _ in range(3))
    diff = out.float() - d0.float()
    d1_new, d2_new = d1.clone(), torch.empty_like(d1)
    num, den = refresh_terms_ref(out, d0, d1_new, d2_new, 3.0, 32)
    torch.testing.assert_close(num, block_norm(diff, 32), rtol=1e-5, atol=0)
    torch.testing.assert_close(den, block_norm(d0, 32, dtype=torch.float32), rtol=1e-5, atol=0)
    assert torch.equal(d2_new, torch.div(torch.sub(diff, d1, alpha=3.0), 9.0).to(torch.bfloat16))
    assert torch.equal(d1_new, torch.div(diff, 3.0).to(torch.bfloat16))


def test_bad_input_is_refused():
    x = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="d2 needs d1"):
        refresh_terms_ref(x, x, None, x.clone(), 1.0, 8)
    with pytest.raises(ValueError, match="delta"):
        refresh_terms_ref(x, x, None, None, 0.0, 8)
    with pytest.raises(ValueError, match="one shape"):
        refresh_terms_ref(x, x[:, :1], None, None, 1.0, 8)
    with pytest.raises(ValueError, match="power of two"):
        refresh_terms_triton(x, x, None, None, 1.0, 24)


def test_compiles_for_sm90_without_spills():
    """The kernel path runs only on GPUs (and the interpreter, which compiles nothing): compile every
    variant for sm_90 with the installed triton and check ptxas's report."""
    from conftest import sm90_compile_rows

    rows = sm90_compile_rows("refresh")
    assert {(r["variant"], r["D"]) for r in rows} == {(f"terms{t}", d) for t in range(3) for d in (40, 64, 128)}
    for r in rows:
        assert r["spill"] == 0, f"register spill: {r}"


def test_float64_takes_the_twin(monkeypatch):
    """The kernel accumulates in float32: float64 outputs (the runtime tests' reference runs) take the twin
    and stay exact; float32 takes the kernel."""
    from flashomni_compile.kernels import refresh

    if DEV == "cpu":
        monkeypatch.setenv("FLASHOMNI_FORCE_TRITON", "1")     # the kernel path is open (interpreter)
    took = []
    real = refresh.refresh_terms_triton
    monkeypatch.setattr(refresh, "refresh_terms_triton", lambda *a: took.append(a[0].dtype) or real(*a))
    g = torch.Generator().manual_seed(1)
    out, d0 = (_bnhd(1, 64, 2, 32, torch.float64, g, DEV) for _ in range(2))
    num, _ = refresh.refresh_terms(out, d0, None, None, 1.0, 32)
    torch.testing.assert_close(num, block_norm(out - d0, 32).float(), rtol=1e-12, atol=0)
    refresh.refresh_terms(out.float(), d0.float(), None, None, 1.0, 32)
    assert took == [torch.float32]
