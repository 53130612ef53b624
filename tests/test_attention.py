"""Sparse-symbol attention: the Triton kernel against its float64 reference twin (DESIGN.md section 6).

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (conftest), reached two ways: the launcher
``sparse_attention_triton`` called directly, and the op with ``FLASHOMNI_FORCE_TRITON=1``. Every
launch writes into poisoned (NaN) outputs, and inputs are fresh random draws (the seed is in each
failure message).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import REL_TOL, rel_err
from flashomni_compile import sparse_attention
from flashomni_compile.kernels import attention, ops
from flashomni_compile.kernels.attention import (KernelConfig, sparse_attention_ref, sparse_attention_triton)
from flashomni_compile.symbols import kv_block_lists, num_blocks


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def gen(device):
    seed = random.SystemRandom().randrange(2 ** 31)
    return torch.Generator(device).manual_seed(seed)  # the seed is gen.initial_seed()


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every launch allocates NaN-filled ``out``/``lse``, so an unwritten element cannot pass."""
    real = attention.empty_output

    def poisoned(q, v):
        out, lse = real(q, v)
        return out.fill_(float("nan")), lse.fill_(float("nan"))

    monkeypatch.setattr(attention, "empty_output", poisoned)


def qkv(B, H, Nq, Nkv, D, dtype, device, gen, layout="bhnd"):
    """Random q, k, v [B, H, N, D] in one of the layouts models hand over (never copied by the kernel).

    ``bhnd``: contiguous; ``bnhd``: ``[B, N, H, D]`` memory seen through ``transpose(1, 2)`` (diffusers);
    ``fused``: slices of one ``[B, N, 3, H, D]`` QKV projection (Nq == Nkv), so row strides are 3*H*D.
    """
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    if layout == "bhnd":
        return rnd(B, H, Nq, D), rnd(B, H, Nkv, D), rnd(B, H, Nkv, D)
    if layout == "bnhd":
        return (rnd(B, Nq, H, D).transpose(1, 2), rnd(B, Nkv, H, D).transpose(1, 2),
                rnd(B, Nkv, H, D).transpose(1, 2))
    assert layout == "fused" and Nq == Nkv
    fused = rnd(B, Nq, 3, H, D)
    return tuple(fused[:, :, i].transpose(1, 2) for i in range(3))


def symbols(B, H, Nq, Nkv, block_q, block_kv, kv_density, q_density, device, gen):
    """Random ``q_keep [B,H,NQB]`` and ``kv_keep [B,H,NQB,NKB]`` with the given keep probabilities."""
    nqb, nkb = num_blocks(Nq, block_q), num_blocks(Nkv, block_kv)
    q_keep = torch.rand(B, H, nqb, generator=gen, device=device) < q_density
    kv_keep = torch.rand(B, H, nqb, nkb, generator=gen, device=device) < kv_density
    return q_keep, kv_keep


def reference(q, k, v, q_keep, kv_keep, cache, kpm, scale, block_q, block_kv):
    """The reference twin on float64 upcasts of the very inputs the kernel saw."""
    cnt, idx = kv_block_lists(kv_keep) if kv_keep is not None else (None, None)
    return sparse_attention_ref(q.double(), k.double(), v.double(), q_keep, cnt, idx,
                                None if cache is None else cache.double(), kpm, scale, block_q, block_kv)


def assert_close(out, lse, ref_out, ref_lse, dtype, seed):
    err = rel_err(out, ref_out)  # also asserts out is finite (poisoned NaN would fail here)
    assert err < REL_TOL[dtype], f"rel err {err:.2e} >= {REL_TOL[dtype]:.0e} for {dtype} (seed {seed})"
    assert not torch.isnan(lse).any(), f"lse holds NaN: unwritten or 0/0 (seed {seed})"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"-inf pattern of lse differs (seed {seed})"
    fin = torch.isfinite(ref_lse)
    lse_err = (lse[fin].double() - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
    assert lse_err < 1e-3 * (1 + ref_lse[fin].abs().max().item() if fin.any() else 1), \
        f"lse max abs err {lse_err:.2e} (seed {seed})"


# ---------------------------------------------------------------------------------------------------
# the launcher against the reference
# ---------------------------------------------------------------------------------------------------
# (Nq, Nkv, D, dtype, block_q, block_kv, kv_density, q_density, layout, key padding, config override)
CASES = [
    (96, 96, 64, torch.float32, 64, 64, 0.5, 0.7, "bhnd", False, None),
    (200, 200, 72, torch.bfloat16, 128, 128, 0.6, 1.0, "bnhd", False, None),      # partial last blocks
    (200, 200, 64, torch.float16, 64, 64, 0.3, 0.5, "fused", True, None),
    (96, 200, 72, torch.float16, 64, 128, 0.5, 0.8, "bnhd", True, None),          # Nq != Nkv
    (200, 96, 40, torch.bfloat16, 128, 32, 0.7, 0.6, "bhnd", False, None),
    (200, 200, 128, torch.float32, 128, 64, 0.25, 0.8, "bnhd", False, None),
    (200, 96, 64, torch.bfloat16, 128, 64, 0.5, 0.5, "bhnd", True, KernelConfig(32, 16, 4, 1)),  # sub-tiles
]


@pytest.mark.parametrize("Nq, Nkv, D, dtype, block_q, block_kv, kv_density, q_density, layout, padded, config",
                         CASES)
def test_launcher_matches_reference(Nq, Nkv, D, dtype, block_q, block_kv, kv_density, q_density, layout, padded,
                                    config, device, gen):
    B, H = 1, 2
    q, k, v = qkv(B, H, Nq, Nkv, D, dtype, device, gen, layout)
    q_keep, kv_keep = symbols(B, H, Nq, Nkv, block_q, block_kv, kv_density, q_density, device, gen)
    q_keep[0, 0, 0] = True  # at least one computed block, and (below) one cached block per case
    q_keep[0, 1, -1] = q_density == 1.0
    cache = torch.randn(B, H, Nq, D, generator=gen, device=device).to(dtype)
    kpm = torch.rand(B, Nkv, generator=gen, device=device) < 0.8 if padded else None
    scale = 1.0 / math.sqrt(D)
    cnt, idx = kv_block_lists(kv_keep)
    out, lse = sparse_attention_triton(q, k, v, q_keep, cnt, idx, cache, kpm, scale, block_q, block_kv,
                                       config=config)
    assert out.shape == (B, H, Nq, D) and out.transpose(1, 2).is_contiguous() and out.dtype == dtype
    assert lse.shape == (B, H, Nq) and lse.dtype == torch.float32
    ref_out, ref_lse = reference(q, k, v, q_keep, kv_keep, cache, kpm, scale, block_q, block_kv)
    assert_close(out, lse, ref_out, ref_lse, dtype, gen.initial_seed())


@pytest.mark.parametrize("D", [16, 88, 96, 112, 256])
def test_dit_head_dims(D, device, gen):
    """The other head dims real DiTs use (64, 72, 40, 128 are in CASES): padded to a power of two."""
    B, H, N = 1, 2, 96
    q, k, v = qkv(B, H, N, N, D, torch.bfloat16, device, gen, "bnhd")
    q_keep, kv_keep = symbols(B, H, N, N, 64, 32, 0.6, 1.0, device, gen)
    cnt, idx = kv_block_lists(kv_keep)
    scale = D ** -0.5
    out, lse = sparse_attention_triton(q, k, v, None, cnt, idx, None, None, scale, 64, 32)
    ref_out, ref_lse = reference(q, k, v, None, kv_keep, None, None, scale, 64, 32)
    assert_close(out, lse, ref_out, ref_lse, torch.bfloat16, gen.initial_seed())


@pytest.mark.parametrize("N", [96, 200])
def test_all_dense_symbols_equal_no_symbols(N, device, gen):
    """All-ones symbols run the list path; no symbols run the dense path: both equal the reference."""
    B, H, D = 1, 2, 64
    q, k, v = qkv(B, H, N, N, D, torch.float16, device, gen)
    nb = num_blocks(N, 128)
    q_keep = torch.ones(B, H, nb, dtype=torch.bool, device=device)
    cnt, idx = kv_block_lists(torch.ones(B, H, nb, nb, dtype=torch.bool, device=device))
    cache = torch.full_like(q, float("nan"))  # never read: every q-block is computed
    listed = sparse_attention_triton(q, k, v, q_keep, cnt, idx, cache, None, 0.125, 128, 128)
    dense = sparse_attention_triton(q, k, v, None, None, None, None, None, 0.125, 128, 128)
    ref_out, ref_lse = reference(q, k, v, None, None, None, None, 0.125, 128, 128)
    for out, lse in (listed, dense):
        assert_close(out, lse, ref_out, ref_lse, torch.float16, gen.initial_seed())


def test_all_cached_copies_cache_exactly(device, gen):
    B, H, N, D = 1, 2, 200, 72
    q, k, v = qkv(B, H, N, N, D, torch.bfloat16, device, gen, "bnhd")
    cache = torch.randn(B, H, N, D, generator=gen, device=device).to(torch.bfloat16)
    q_keep = torch.zeros(B, H, 4, dtype=torch.bool, device=device)
    cnt, idx = kv_block_lists(torch.ones(B, H, 4, 4, dtype=torch.bool, device=device))
    out, lse = sparse_attention_triton(q, k, v, q_keep, cnt, idx, cache, None, 0.1, 64, 64)
    assert torch.equal(out, cache)
    assert torch.isneginf(lse).all()


def test_empty_rows_are_zero_never_nan(device, gen):
    """A q-block with no kept kv-block, and a batch whose keys are all padding: out 0, lse -inf."""
    B, H, N, D = 2, 2, 200, 64
    q, k, v = qkv(B, H, N, N, D, torch.float16, device, gen)
    kv_keep = torch.ones(B, H, 4, 4, dtype=torch.bool, device=device)
    kv_keep[0, 1, 2] = False                                   # q-block 2 of (b=0, h=1) sees nothing
    kv_keep[0, 0, 3, :3] = False                               # partial last q-block sees only the partial kv-block
    kpm = torch.ones(B, N, dtype=torch.bool, device=device)
    kpm[1] = False                                             # batch 1: every key is padding
    kpm[0, 192:] = False                                       # ... and batch 0's partial block is all padding
    cnt, idx = kv_block_lists(kv_keep)
    out, lse = sparse_attention_triton(q, k, v, None, cnt, idx, None, kpm, 0.125, 64, 64)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    for sl in ((0, 1, slice(128, 192)), (0, 0, slice(192, 200)), (1, slice(None), slice(None))):
        assert (out[sl] == 0).all() and torch.isneginf(lse[sl]).all()
    ref_out, ref_lse = reference(q, k, v, None, kv_keep, None, kpm, 0.125, 64, 64)
    assert_close(out, lse, ref_out, ref_lse, torch.float16, gen.initial_seed())


def test_suffix_padding_takes_the_unmasked_loop_where_it_can(device, gen):
    """HunyuanVideo's layout: text last, padded at the end, a different text length per batch element,
    Nkv not a multiple of the block. The launcher moves the blocks holding padding (and the partial
    block) to the end of each list so the others run unmasked; the result must still be the reference."""
    from flashomni_compile.kernels.attention import split_masked_blocks

    B, H, N, D = 2, 2, 300, 64
    q, k, v = qkv(B, H, N, N, D, torch.bfloat16, device, gen)
    q_keep, kv_keep = symbols(B, H, N, N, 64, 64, 0.7, 0.8, device, gen)
    q_keep[:, :, 0] = True
    cache = torch.randn(B, H, N, D, generator=gen, device=device).to(torch.bfloat16)
    kpm = torch.ones(B, N, dtype=torch.bool, device=device)
    kpm[0, 150:] = False                  # blocks 2 (partly), 3, 4 hold padding
    kpm[1, 290:] = False                  # only the partial last block
    cnt, idx = kv_block_lists(kv_keep)
    new_idx, full = split_masked_blocks(cnt, idx, kpm, 64)
    # same kept set per row; unmasked blocks first (ascending), then masked ones (ascending)
    blk_masked = torch.tensor([[False, False, True, True, True], [False, False, False, False, True]], device=device)
    for b in range(B):
        for h in range(H):
            for qb in range(5):
                n, f = int(cnt[b, h, qb]), int(full[b, h, qb])
                kept = idx[b, h, qb, :n].tolist()
                got = new_idx[b, h, qb, :n].tolist()
                assert sorted(got) == kept
                assert got[:f] == [j for j in kept if not blk_masked[b, j]]
                assert got[f:] == [j for j in kept if blk_masked[b, j]]
    assert (full > 0).any() and (full < cnt).any(), "both loops must run somewhere for this test to bite"
    out, lse = sparse_attention_triton(q, k, v, q_keep, cnt, idx, cache, kpm, 1 / 8, 64, 64)
    ref_out, ref_lse = reference(q, k, v, q_keep, kv_keep, cache, kpm, 1 / 8, 64, 64)
    assert_close(out, lse, ref_out, ref_lse, torch.bfloat16, gen.initial_seed())


def test_masked_kv_blocks_flags_padded_and_partial_blocks(device):
    """The Gluon kernel's per-block mask flags: a block is flagged iff it holds a padded key or keys past
    Nkv (the partial last block)."""
    from flashomni_compile.kernels.attention import masked_kv_blocks

    kpm = torch.ones(2, 300, dtype=torch.bool, device=device)
    kpm[0, 70] = False                    # one key of block 1
    kpm[0, 128:192] = False               # all of block 2
    kpm[1, :] = False                     # every key
    flags = masked_kv_blocks(kpm, 64)
    assert flags.dtype == torch.uint8 and flags.is_contiguous() and flags.shape == (2, 5)
    assert flags.tolist() == [[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]]
    assert masked_kv_blocks(kpm[:, :256], 64).tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]   # no partial block


def test_lse_merges_split_attention(device, gen):
    """LSE is what merging partial attentions needs: attention over kv-blocks {0} and {1, 2} merged by
    their LSEs equals attention over all three."""
    B, H, N, D = 1, 2, 150, 64
    q, k, v = qkv(B, H, N, N, D, torch.float32, device, gen)
    full = torch.ones(B, H, 3, 3, dtype=torch.bool, device=device)
    part_a, part_b = full.clone(), full.clone()
    part_a[..., 1:] = False
    part_b[..., 0] = False
    runs = [sparse_attention_triton(q, k, v, None, *kv_block_lists(m), None, None, 0.125, 64, 64)
            for m in (full, part_a, part_b)]
    (o, lse), (oa, la), (ob, lb) = runs
    lse_m = torch.logaddexp(la, lb)
    merged = oa * (la - lse_m).exp().unsqueeze(-1) + ob * (lb - lse_m).exp().unsqueeze(-1)
    assert rel_err(merged, o) < REL_TOL[torch.float32] and (lse_m - lse).abs().max() < 1e-4


def test_launcher_rejects_bad_blocks(device):
    q = torch.randn(1, 2, 96, 64, device=device)
    with pytest.raises(ValueError, match="block_kv=48"):
        sparse_attention_triton(q, q, q, None, None, None, None, None, 0.125, 64, 48)


# ---------------------------------------------------------------------------------------------------
# the op and the public wrapper
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv("FLASHOMNI_FORCE_TRITON", "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_full_density_equals_sdpa(dtype, device, gen, force_triton):
    B, H, Nq, Nkv, D = 1, 2, 200, 96, 72
    q, k, v = qkv(B, H, Nq, Nkv, D, dtype, device, gen, "bnhd")
    q_keep = torch.ones(B, H, 2, dtype=torch.bool, device=device)
    kv_keep = torch.ones(B, H, 2, 1, dtype=torch.bool, device=device)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    for kw in (dict(), dict(q_keep=q_keep, kv_keep=kv_keep, cache=torch.zeros_like(q))):
        out = sparse_attention(q, k, v, **kw)
        err = rel_err(out, sdpa)
        assert err < REL_TOL[dtype], f"{kw.keys()}: rel err {err:.2e} vs SDPA (seed {gen.initial_seed()})"


def test_op_forced_triton_matches_reference(device, gen, force_triton):
    B, H, N, D = 1, 2, 200, 64
    q, k, v = qkv(B, H, N, N, D, torch.bfloat16, device, gen, "bnhd")
    q_keep, kv_keep = symbols(B, H, N, N, 64, 64, 0.5, 0.6, device, gen)
    cache = torch.randn(B, H, N, D, generator=gen, device=device).to(torch.bfloat16)
    kpm = torch.rand(B, N, generator=gen, device=device) < 0.9
    out, lse = sparse_attention(q, k, v, q_keep, kv_keep, cache, block_q=64, block_kv=64, scale=0.1,
                                key_padding_mask=kpm, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, q_keep, kv_keep, cache, kpm, 0.1, 64, 64)
    assert_close(out, lse, ref_out, ref_lse, torch.bfloat16, gen.initial_seed())


def _valid_args(device):
    q = torch.randn(1, 2, 200, 64, device=device)
    return dict(q=q, k=torch.randn(1, 2, 96, 64, device=device), v=torch.randn(1, 2, 96, 64, device=device),
                q_keep=torch.ones(1, 2, 2, dtype=torch.bool, device=device),
                kv_keep=torch.ones(1, 2, 2, 1, dtype=torch.bool, device=device), cache=torch.zeros_like(q))


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(q=a["q"][0]), r"q must be a 4-D tensor"),
    (lambda a: a.update(k=a["k"].half()), r"q, k, v must share a dtype"),
    (lambda a: a.update(v=a["v"][..., :32]), r"head dims differ"),
    (lambda a: a.update(q=a["q"][..., :8], k=a["k"][..., :8], v=a["v"][..., :8], cache=a["cache"][..., :8]),
     r"head dim 8 is not supported"),
    (lambda a: a.update(kv_keep=a["kv_keep"][..., :1, :]), r"kv_keep has shape \(1, 2, 1, 1\)"),
    (lambda a: a.update(q_keep=a["q_keep"].float()), r"q_keep must have dtype torch.bool"),
    (lambda a: a.update(cache=a["cache"][:, :, :100]), r"cache must have shape"),
    (lambda a: a.update(key_padding_mask=torch.ones(1, 200, dtype=torch.bool)), r"key_padding_mask must be"),
    (lambda a: a.update(block_kv=96), r"block_kv must be a power of two"),
])
def test_validation_errors_name_the_argument(change, match, device):
    args = _valid_args(device)
    change(args)
    with pytest.raises(ValueError, match=match):
        sparse_attention(**args)


def test_missing_cache_is_an_error_only_when_some_block_is_cached(device):
    args = _valid_args(device)
    del args["cache"]
    sparse_attention(**args)  # every q_keep is True: no cache needed
    args["q_keep"][0, 1, 0] = False
    with pytest.raises(ValueError, match="cache is required"):
        sparse_attention(**args)


def _op_args(device, gen):
    B, H, N, D = 1, 2, 96, 64
    q, k, v = qkv(B, H, N, N, D, torch.float32, device, gen, "bnhd")
    q_keep = torch.tensor([[[True, False], [True, True]]], device=device)
    cnt, idx = kv_block_lists(torch.rand(B, H, 2, 2, generator=gen, device=device) < 0.6)
    kpm = torch.rand(B, N, generator=gen, device=device) < 0.9
    return (q, k, v, q_keep, cnt, idx, torch.randn_like(q), kpm, 0.125, 64, 64)


def test_opcheck_reference_path(device, gen):
    torch.library.opcheck(ops.sparse_attention_op, _op_args(device, gen))


def test_opcheck_triton_path(device, gen, force_triton):
    torch.library.opcheck(ops.sparse_attention_op, _op_args(device, gen),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compile_fullgraph_has_no_graph_break(device, gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    B, H, N, D = 1, 2, 200, 64
    q, k, v = qkv(B, H, N, N, D, torch.float32, device, gen, "bnhd")
    q_keep, kv_keep = symbols(B, H, N, N, 128, 128, 0.7, 1.0, device, gen)
    cache = torch.randn_like(q)

    def block(q, k, v, q_keep, kv_keep, cache):
        out = sparse_attention(q, k, v, q_keep, kv_keep, cache)
        return out.transpose(1, 2).reshape(B, N, H * D) * 2.0

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    got = compiled(q, k, v, q_keep, kv_keep, cache)
    assert counter.frame_count == 1
    assert torch.allclose(got, block(q, k, v, q_keep, kv_keep, cache), atol=1e-5)


def test_force_triton_off_gpu_needs_the_interpreter(monkeypatch):
    """FLASHOMNI_FORCE_TRITON=1 on CPU tensors without TRITON_INTERPRET=1 is refused with a clear error."""
    from flashomni_compile.kernels.ops import use_triton

    t = torch.zeros(1)
    monkeypatch.setenv("FLASHOMNI_FORCE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(t)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        use_triton(t)
    monkeypatch.delenv("FLASHOMNI_FORCE_TRITON")
    assert not use_triton(t)


@pytest.mark.parametrize("terms, dtype", [(2, torch.bfloat16), (3, torch.float32), (3, torch.float16)])
def test_cached_rows_take_the_taylor_series(terms, dtype, device, gen):
    """Cached rows = cache + delta * cache1 + delta^2 / 2 * cache2, evaluated by the kernel for the cached
    q-blocks only (poisoned output, partial last block, random terms); computed rows are untouched by it."""
    B, H, N, D = 1, 2, 200, 64
    q, k, v = qkv(B, H, N, N, D, dtype, device, gen)
    q_keep, kv_keep = symbols(B, H, N, N, 64, 64, 0.6, 0.5, device, gen)
    q_keep[0, 0, 0], q_keep[0, 1, -1] = True, False
    c0, c1, c2 = (torch.randn(B, N, H, D, generator=gen, device=device).to(dtype).transpose(1, 2)
                  for _ in range(3))
    c2 = c2 if terms == 3 else None
    cnt, idx = kv_block_lists(kv_keep)
    out, lse = sparse_attention_triton(q, k, v, q_keep, cnt, idx, c0, None, 0.125, 64, 64, c1, c2, 2.5)
    ref_out, ref_lse = sparse_attention_ref(q.double(), k.double(), v.double(), q_keep, cnt, idx, c0.double(),
                                            None, 0.125, 64, 64, c1.double(),
                                            None if c2 is None else c2.double(), 2.5)
    assert_close(out, lse, ref_out, ref_lse, dtype, gen.initial_seed())
    # the series really entered: a plain copy of cache would be far off on the cached rows
    plain, _ = sparse_attention_ref(q.double(), k.double(), v.double(), q_keep, cnt, idx, c0.double(), None,
                                    0.125, 64, 64)
    assert rel_err(out, plain) > 0.1
    with pytest.raises(ValueError, match="cache2 needs cache1"):
        sparse_attention_triton(q, k, v, q_keep, cnt, idx, c0, None, 0.125, 64, 64, None, c0, 1.0)
