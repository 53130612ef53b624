"""The Hopper Gluon GEMM-O kernel (``kernels/gemm_o_sm90.py``).

Gluon has no interpreter, so on CPU machines (CI) the kernel is only compiled for sm_90 (a subprocess with
a stub driver, ``sm90_compile_check.py gemm_o``): every variant must compile on the installed triton within
Hopper's 227 KB of shared memory and with no local-memory access inside any loop of its SASS
(``sm90_compile.local_accesses_in_loops``). Both triton versions save a few values at the kernel's entry
for some variants (thread-index and program-id values kept across the partitions' register reallocation:
8-32 bytes, stored once before the split and loaded once at a partition's start), which costs nothing in
the loops; more than ``ENTRY_SPILL`` bytes fails too. On a Hopper GPU it runs against the
float64 twins: fresh random inputs, NaN in the heads the launch must not read, NaN-poisoned outputs,
partial row and column tiles, B > 1, row offsets, 1 and 2 words of heads, all-kept and all-cached
symbols, the extra range, both 2-byte dtypes, head dims 64 and 128, and grids of 1-3 programs so that
every program walks many tiles and both consumers alternate.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import REL_TOL, SM90_SMEM_LIMIT, rel_err, sm90_compile_rows
from flashomni_compile.kernels import gemm_o, gemm_o_sm90
from flashomni_compile.kernels.gemm_q import Config

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
GLUON = Config(128, 128, 64, 8, 8, 4, True, gluon=(128, 256, 3))   # the table's sm_90 entry (cooperative)
# the tiles the kernel is built for (gemm_o_sm90.TILES): two ping-pong, one cooperative
TILES = {"128x128": GLUON._replace(gluon=(128, 128, 4)), "64x256": GLUON._replace(gluon=(64, 256, 4)),
         "128x256": GLUON}
ENTRY_SPILL = 32          # see the module docstring


@pytest.mark.skipif(not gemm_o_sm90.AVAILABLE, reason="this triton has no Gluon")
def test_compiles_for_sm90():
    rows = sm90_compile_rows("gemm_o")
    for r in rows:
        assert r["loop_local"] == 0, f"local memory inside a loop: {r}"
        assert r["spill"] <= ENTRY_SPILL, f"register spill: {r}"
        assert r["shared"] <= SM90_SMEM_LIMIT, f"over sm_90's shared memory: {r}"


def test_the_loop_spill_check_sees_a_loop_spill():
    rows = {r["variant"]: r for r in sm90_compile_rows("probe")}
    assert rows["probe_128"]["loop_local"] > 0 and rows["probe_16"]["loop_local"] == 0, rows


def test_tiles_are_the_kernels():
    assert {tuple(c.gluon[:2]) for c in TILES.values()} == set(gemm_o_sm90.TILES)
    with pytest.raises(ValueError, match="tile 256 x 128"):
        y = torch.zeros(1, 256, 256, dtype=torch.bfloat16)
        gemm_o_sm90.gemm_o_sm90(y, y[0], y, None, y[0, 0].view(torch.uint8), None, None, y, 128, 0, 128, True,
                                None, block_m=256, block_n=128)


def test_supports_declines_what_the_kernel_does_not_cover():
    a, w, y = torch.zeros(1, 256, 256), torch.zeros(256, 256), torch.zeros(1, 256, 256)
    assert not gemm_o_sm90.supports(a, w, y, None, None, y, 128, 0, 128)       # CPU (and fp32)
    if HOPPER:
        bf = dict(device="cuda", dtype=torch.bfloat16)
        a, w, y = torch.zeros(1, 256, 256, **bf), torch.zeros(256, 256, **bf), torch.zeros(1, 256, 256, **bf)
        assert gemm_o_sm90.supports(a, w, y, None, None, y, 128, 0, 128)
        assert gemm_o_sm90.supports(a, w, None, None, None, y, 64, 256, 256)    # the cache, offset rows
        assert not gemm_o_sm90.supports(a, w, y, None, None, y, 128, 64, 128)  # rows not 128-aligned
        assert not gemm_o_sm90.supports(a, w, y, None, None, y, 128, 0, 64)    # q-blocks of 64 rows
        a72, w72 = torch.zeros(1, 256, 216, **bf), torch.zeros(256, 216, **bf)
        assert not gemm_o_sm90.supports(a72, w72, y, None, None, y, 72, 0, 128)   # head dim 72
        e = torch.zeros(1, 256, 96, **bf)
        assert not gemm_o_sm90.supports(a, w, y, e, torch.zeros(256, 96, **bf), y, 128, 0, 128)  # extra 96
        assert not gemm_o_sm90.supports(a, w[:, 1:], y, None, None, y, 128, 0, 128)   # misaligned weight


def _rand(g, *shape, dtype):
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


def _symbols(g, batch, heads, nqb, density):
    if density in (0.0, 1.0):
        return torch.full((batch, heads, nqb), bool(density), device="cuda")
    return torch.rand(batch, heads, nqb, generator=g, device="cuda") < density


# (B, M, H, D, N, KE, row_offset, density, dtype, programs)
CASES = [
    (1, 1024, 4, 128, 256, 0, 0, 0.5, torch.bfloat16, None),       # whole tiles, one program per SM
    (2, 1000, 3, 128, 320, 0, 128, 0.5, torch.bfloat16, 3),        # partial row and column tiles, B=2
    (2, 700, 40, 64, 200, 0, 256, 0.3, torch.float16, 2),          # 2 words of heads, D=64
    (1, 600, 4, 128, 256, 256, 0, 0.4, torch.bfloat16, 3),         # extra range (single-stream)
    (1, 520, 3, 128, 136, 128, 0, 0.0, torch.float16, 1),          # all cached: y = c (+ extra)
    (2, 384, 5, 64, 256, 0, 384, 1.0, torch.bfloat16, 2),          # all kept: the cache is the bias
]


@pytest.mark.skipif(not (HOPPER and gemm_o_sm90.AVAILABLE), reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("tile", sorted(TILES))
@pytest.mark.parametrize("B, M, H, D, N, KE, off, density, dtype, programs", CASES)
def test_matches_reference(B, M, H, D, N, KE, off, density, dtype, programs, tile):
    cfg = TILES[tile]
    seed = random.SystemRandom().randrange(2 ** 31)
    g = torch.Generator("cuda").manual_seed(seed)
    nqb = (off + M + 127) // 128 + 1
    keep = _symbols(g, B, H, nqb, density)
    a, w, bias = _rand(g, B, M, H * D, dtype=dtype), _rand(g, N, H * D, dtype=dtype) * (H * D) ** -0.5, \
        _rand(g, N, dtype=dtype)
    e = _rand(g, B, M, KE, dtype=dtype) if KE else None
    ew = _rand(g, N, KE, dtype=dtype) * KE ** -0.5 if KE else None
    c = torch.full((B, M, N), float("nan"), dtype=dtype, device="cuda")
    assert gemm_o_sm90.supports(a, w, c, e, ew, c, D, off, 128)   # the case runs on the Gluon kernel
    # The heads a launch must not read hold NaN: the cached heads for the dispatch, the kept ones for the cache.
    sel = gemm_o.row_keep(keep, M, off, 128).repeat_interleave(D, dim=-1)
    a_kept, a_cached = a.masked_fill(~sel, float("nan")), a.masked_fill(sel, float("nan"))
    tol = REL_TOL[dtype]

    gemm_o.out_proj_cache_triton(a_cached, w, bias, keep, D, off, 128, config=cfg, out=c, programs=programs)
    ref_c = gemm_o.out_proj_cache_ref(a.double(), w.double(), bias.double(), keep, D, off, 128)
    assert rel_err(c, ref_c) < tol, f"out_proj_cache (seed {seed})"

    y = torch.full((B, M, N), float("nan"), dtype=dtype, device="cuda")
    gemm_o.sparse_linear_o_triton(a_kept, w, c, keep, e, ew, D, off, 128, config=cfg, out=y, programs=programs)
    e64, ew64 = (e.double(), ew.double()) if KE else (None, None)
    ref_y = gemm_o.sparse_linear_o_ref(a.double(), w.double(), c.double(), keep, e64, ew64, D, off, 128)
    assert rel_err(y, ref_y) < tol, f"sparse_linear_o (seed {seed})"
    # The identity of the two launches: the dense projection.
    dense = a.double() @ w.double().T + bias.double() + (e64 @ ew64.T if KE else 0)
    assert rel_err(y, dense) < 2 * tol, f"identity (seed {seed})"
    if density == 0.0:   # nothing kept: y is c plus the extra range, c is the whole projection
        assert rel_err(c, a.double() @ w.double().T + bias.double()) < tol


@pytest.mark.skipif(not (HOPPER and gemm_o_sm90.AVAILABLE), reason="needs a Hopper GPU and Gluon")
def test_table_routes_to_gluon_and_declined_calls_fall_back(monkeypatch):
    calls = []
    real = gemm_o_sm90.gemm_o_sm90
    monkeypatch.setattr(gemm_o_sm90, "gemm_o_sm90", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator("cuda").manual_seed(0)
    a, w = _rand(g, 1, 256, 256, dtype=torch.bfloat16), _rand(g, 256, 256, dtype=torch.bfloat16)
    keep = torch.ones(1, 2, 4, dtype=torch.bool, device="cuda")
    c = torch.zeros(1, 256, 256, dtype=torch.bfloat16, device="cuda")
    gemm_o.sparse_linear_o_triton(a, w, c, keep, None, None, 128, 0, 128, config=GLUON)
    assert calls == [1]
    gemm_o.sparse_linear_o_triton(a, w, c, keep, None, None, 128, 64, 128, config=GLUON)   # declined: offset
    gemm_o.sparse_linear_o_triton(a, w, c, keep, None, None, 128, 0, 128, config=GLUON._replace(gluon=()))
    assert calls == [1]
