"""The Hopper Gluon GEMM-Q kernel (``kernels/gemm_q_sm90.py``) and its device-side plan.

On CPU machines (CI) the kernel is compiled for sm_90 (``sm90_compile_check.py gemm_q``: within Hopper's
shared memory, no local-memory access in any loop) and its plan (a Triton kernel, run by the
interpreter) is checked against a brute force. On a Hopper GPU the kernel runs against the float64 twin:
fresh random inputs, NaN-poisoned outputs (every element must be written: computed, or exactly zero where skipped), partial row and column
blocks, a reduction that is not a multiple of 64, B > 1, row offsets, 64-wide heads (kept and skipped
heads inside one computed half), fused QKV weights (dense columns), all-kept and all-cached symbols, no
bias, and grids of 1-3 programs so that each program walks many items of every kind.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import REL_TOL, SM90_SMEM_LIMIT, rel_err, sm90_compile_rows
from flashomni_compile.kernels import gemm_q, gemm_q_sm90
from flashomni_compile.kernels.gemm_q import Config
from flashomni_compile.kernels.launch import launch

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
GLUON = Config(128, 256, 64, 8, 8, 4, True, split_n=True, gluon=(128, 256, 3))
ENTRY_SPILL = 32          # as for GEMM-O (test_gemm_sm90.py): values saved once at the partitions' split


@pytest.mark.skipif(not gemm_q_sm90.AVAILABLE, reason="this triton has no Gluon")
def test_compiles_for_sm90():
    rows = sm90_compile_rows("gemm_q")
    assert len(rows) == 32       # 16 variants, each a plan (Triton) and a GEMM (Gluon) kernel
    for r in rows:
        assert r["loop_local"] == 0, f"local memory inside a loop: {r}"
        assert r["spill"] <= ENTRY_SPILL, f"register spill: {r}"
        assert r["shared"] <= SM90_SMEM_LIMIT, f"over sm_90's shared memory: {r}"


@pytest.mark.parametrize("B, M, H, D, fused, N_pad, off, bq, density", [
    (1, 1000, 4, 128, False, 0, 0, 128, 0.5),      # partial last row block
    (2, 700, 5, 64, False, 0, 256, 256, 0.3),      # 64-wide heads (two a half), offset rows, q-blocks of 256
    (1, 900, 3, 128, True, 0, 128, 128, 0.25),     # fused QKV: dense halves past sparse_cols
    (2, 300, 5, 64, False, 64, 0, 128, 0.5),       # a half of one head and dense columns, N % 128 != 0
    (1, 512, 4, 128, False, 0, 0, 128, 0.0),       # all cached: zero items only
    (1, 512, 4, 128, True, 0, 0, 128, 1.0),        # all kept: the full items are a GEMM's 128 x 256 tiles
    (3, 4000, 24, 128, False, 0, 0, 128, 0.125),   # more row blocks than one chunk of the plan
])
def test_plan_pairs_kept_halves_per_row_block(B, M, H, D, fused, N_pad, off, bq, density):
    g = torch.Generator().manual_seed(B * M + H + D)
    sparse_cols = H * D
    N = sparse_cols * (3 if fused else 1) + N_pad
    nqb = (off + M + bq - 1) // bq
    keep = torch.rand(B, H, nqb, generator=g) < density
    if torch.cuda.is_available():   # the plan kernel runs where the interpreter is off: on the GPU
        keep = keep.cuda()
    tiles_m, nh = (M + 127) // 128, (N + 127) // 128
    first = off // 128
    items, counts, cap_full, cap_single = gemm_q_sm90.plan(keep.view(torch.uint8), B, tiles_m, first, bq, D,
                                                          sparse_cols, N, launch)
    n_full, n_single, n_zero = counts.tolist()
    full = [(c >> 16, (c >> 8) & 255, c & 255) for c in items[:n_full].tolist()]
    single = [(c >> 16, (c >> 8) & 255, c & 255) for c in items[cap_full:cap_full + n_single].tolist()]
    zero = [(c >> 16, (c >> 8) & 255, c & 255) for c in items[cap_full + cap_single:][:n_zero].tolist()]

    # brute force: a half is kept when any of its columns is; each row block's kept halves are paired in
    # column order, an odd last one is a single item, the unkept ones are zero items; row-block order
    want_full, want_single, want_zero = [], [], []
    keep_host = keep.cpu()
    for rb in range(B * tiles_m):
        b, tm = divmod(rb, tiles_m)
        qb = ((first + tm) * 128) // bq
        kept = [h for h in range(nh) if any(bool(keep_host[b, c // D, qb]) if c < sparse_cols else c < N
                                            for c in range(h * 128, h * 128 + 128))]
        want_full += [(rb, kept[i], kept[i + 1]) for i in range(0, len(kept) - 1, 2)]
        want_single += [(rb, kept[-1], 255)] if len(kept) % 2 else []
        want_zero += [(rb, h, 255) for h in range(nh) if h not in kept]
    # the plan's programs append their runs in the order of their atomics: compare as sets, and each
    # run of 16 row blocks in row-block order
    assert (sorted(full), sorted(single), sorted(zero)) == (want_full, want_single, want_zero)
    for got in (full, single, zero):
        runs = {}
        for item in got:
            runs.setdefault(item[0] // 16, []).append(item)
        assert all(run == sorted(run) for run in runs.values())
        assert [item for run in sorted(runs.values(), key=lambda r: got.index(r[0])) for item in run] == got
    assert n_full <= cap_full and n_single <= cap_single
    if density == 1.0 and nh % 2 == 0:
        assert sorted(full) == [(rb, h, h + 1) for rb in range(B * tiles_m) for h in range(0, nh, 2)]


def test_supports_declines_what_the_kernel_does_not_cover():
    x, w, y = torch.zeros(1, 256, 256), torch.zeros(256, 256), torch.zeros(1, 256, 256)
    assert not gemm_q_sm90.supports(x, w, None, y, 128, 0, 128)        # CPU (and fp32)
    if HOPPER:
        bf = dict(device="cuda", dtype=torch.bfloat16)
        x, w, y = torch.zeros(1, 256, 256, **bf), torch.zeros(256, 256, **bf), torch.zeros(1, 256, 256, **bf)
        assert gemm_q_sm90.supports(x, w, None, y, 128, 0, 128)
        assert gemm_q_sm90.supports(x, w, None, y, 64, 256, 256)       # offset rows, q-blocks of 256
        assert not gemm_q_sm90.supports(x, w, None, y, 128, 64, 128)   # rows not 128-aligned
        assert not gemm_q_sm90.supports(x, w, None, y, 128, 0, 64)     # q-blocks of 64 rows
        assert not gemm_q_sm90.supports(x, w, None, y, 32, 0, 128)     # head dim 32
        assert not gemm_q_sm90.supports(x[..., 1:], w[:, 1:], None, y, 128, 0, 128)   # misaligned rows


def test_table_sends_small_fused_calls_to_triton(monkeypatch):
    """``gemm_q.gluon_takes``: fused-QKV calls of at most ``fused_triton_rows`` rows (B * M) take the Triton
    kernel; Q-only calls and larger fused ones take Gluon wherever ``supports`` does (faked here)."""
    monkeypatch.setattr(gemm_q_sm90, "supports", lambda *a: True)
    monkeypatch.setattr(gemm_q, "GLUON_ON", True)
    table = gemm_q.CONFIGS[("sm90", "q")]
    assert table.fused_triton_rows == 6144
    w_q, w_qkv = torch.empty(3072, 64), torch.empty(9216, 64)

    def takes(b, m, w, cfg=table):
        x = torch.empty(b, m, 64)
        return gemm_q.gluon_takes(x, w, None, x, 128, 0, 128, 3072, cfg)

    assert not takes(1, 4608, w_qkv) and not takes(1, 512, w_qkv) and not takes(1, 6144, w_qkv)
    assert takes(1, 6145, w_qkv) and takes(2, 4096, w_qkv)      # rows count over the batch
    assert takes(1, 4608, w_q) and takes(1, 512, w_q)           # Q alone: Gluon at every size
    assert takes(1, 4608, w_qkv, GLUON)                         # a config without the threshold: Gluon
    assert not takes(1, 33792, w_qkv, table._replace(gluon=()))  # no Gluon in the config
    monkeypatch.setattr(gemm_q_sm90, "supports", lambda *a: False)
    assert not takes(1, 33792, w_qkv)


def _rand(g, *shape, dtype):
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


# (B, M, H, D, fused, K, row_offset, density, dtype, bias, programs)
CASES = [
    (1, 1024, 4, 128, False, 512, 0, 0.5, torch.bfloat16, True, None),   # whole row blocks, one program per SM
    (2, 1000, 3, 128, False, 328, 128, 0.5, torch.bfloat16, True, 3),    # partial rows and columns, K % 64 != 0
    (2, 700, 5, 64, False, 256, 256, 0.3, torch.float16, True, 2),       # 64-wide heads: mixed halves
    (1, 600, 4, 128, True, 512, 0, 0.4, torch.bfloat16, True, 3),        # fused QKV
    (1, 520, 3, 64, True, 192, 0, 0.0, torch.float16, False, 1),         # all cached, fused: only K/V computed
    (2, 384, 5, 128, False, 640, 384, 1.0, torch.bfloat16, True, 2),     # all kept
    (1, 300, 2, 128, False, 256, 0, 0.0, torch.bfloat16, True, 2),       # all cached: all zeros
    (1, 777, 6, 128, False, 384, 0, 0.125, torch.bfloat16, False, 1),    # low density, no bias, one program
]


@pytest.mark.skipif(not (HOPPER and gemm_q_sm90.AVAILABLE), reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("B, M, H, D, fused, K, off, density, dtype, has_bias, programs", CASES)
def test_matches_reference(B, M, H, D, fused, K, off, density, dtype, has_bias, programs):
    seed = random.SystemRandom().randrange(2 ** 31)
    g = torch.Generator("cuda").manual_seed(seed)
    nqb = (off + M + 127) // 128 + 1
    keep = (torch.rand(B, H, nqb, generator=g, device="cuda") < density) if 0 < density < 1 else \
        torch.full((B, H, nqb), bool(density), device="cuda")
    sparse_cols = H * D
    N = sparse_cols * (3 if fused else 1)
    x, w = _rand(g, B, M, K, dtype=dtype), _rand(g, N, K, dtype=dtype) * K ** -0.5
    bias = _rand(g, N, dtype=dtype) if has_bias else None
    y = torch.full((B, M, N), float("nan"), dtype=dtype, device="cuda")
    assert gemm_q_sm90.supports(x, w, bias, y, D, off, 128)       # the case runs on the Gluon kernel
    gemm_q.sparse_linear_q_triton(x, w, bias, keep, D, off, 128, sparse_cols, config=GLUON, out=y,
                                  programs=programs)
    ref = gemm_q.sparse_linear_q_ref(x.double(), w.double(), None if bias is None else bias.double(), keep, D, off,
                                     128, sparse_cols)
    assert not y.isnan().any(), f"unwritten elements (seed {seed})"
    skipped = ~gemm_q.row_keep(keep, M, off, 128).repeat_interleave(D, dim=-1)
    assert (y[..., :sparse_cols][skipped] == 0).all(), f"skipped tiles not zero (seed {seed})"
    assert rel_err(y, ref) < REL_TOL[dtype], f"seed {seed}"


@pytest.mark.skipif(not (HOPPER and gemm_q_sm90.AVAILABLE), reason="needs a Hopper GPU and Gluon")
def test_table_routes_to_gluon_and_declined_calls_fall_back(monkeypatch):
    calls = []
    real = gemm_q_sm90.gemm_q_sm90
    monkeypatch.setattr(gemm_q_sm90, "gemm_q_sm90", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator("cuda").manual_seed(0)
    x, w = _rand(g, 1, 256, 256, dtype=torch.bfloat16), _rand(g, 256, 256, dtype=torch.bfloat16)
    keep = torch.ones(1, 2, 4, dtype=torch.bool, device="cuda")
    gemm_q.sparse_linear_q_triton(x, w, None, keep, 128, 0, 128, 256, config=GLUON)
    assert calls == [1]
    gemm_q.sparse_linear_q_triton(x, w, None, keep, 128, 64, 128, 256, config=GLUON)   # declined: offset
    gemm_q.sparse_linear_q_triton(x, w, None, keep, 128, 0, 128, 256, config=GLUON._replace(gluon=()))
    assert calls == [1]
    with pytest.raises(ValueError, match="one unit shape"):
        gemm_q.sparse_linear_q_triton(x, w, None, keep, 128, 0, 128, 256, config=GLUON._replace(gluon=(64, 256, 3)))
