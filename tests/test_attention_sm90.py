"""The Hopper Gluon attention kernel (``kernels/attention_sm90.py``).

Gluon has no interpreter, so on CPU machines (CI) the kernel is only compiled for sm_90 (a subprocess
with a stub driver, ``sm90_compile_check.py``): every variant must compile on the installed triton without
register spills and within Hopper's 227 KB of shared memory. On a Hopper GPU it runs against the float64
reference twin with fresh random inputs and NaN-poisoned outputs: partial blocks, empty rows, all-cached
and all-dense symbols, key padding, Taylor cache terms, both head dims, both 2-byte dtypes, both layouts.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import triton

from conftest import REL_TOL, SM90_SMEM_LIMIT, rel_err, sm90_compile_rows
from flashomni_compile.kernels import attention, attention_sm90
from flashomni_compile.kernels.attention import KernelConfig, sparse_attention_ref, sparse_attention_triton
from flashomni_compile.symbols import kv_block_lists, num_blocks

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
GLUON = {"k2": KernelConfig(128, 128, 8, 3, gluon=True),          # K ring depth 2 (the table's) and 3
         "k3": KernelConfig(128, 128, 8, 3, gluon=True, k_stages=3),
         "c1": KernelConfig(128, 128, 8, 3, gluon=True, k_stages=1, consumers=1)}   # one consumer a CTA


# Known: on triton 3.6 (not 3.9) ptxas spills 16 B in the one variant with lists, a key padding mask,
# cached rows and a partial last kv-block at D=128 (since the intra-warpgroup overlap; more registers for
# the partitions did not change it; NOTES.md session 8), and two of its local-memory accesses are in the
# kv loop (sm90_compile.local_accesses_in_loops). The one-consumer CTA (``consumers=1``: 216 registers for
# the consumer, so that two CTAs share an SM; the table's choice for short sparse calls) spills in a
# cached-rows variant at D=128 on each triton, in the loop (NOTES.md session 11). Every other variant must
# not spill. Keys: (variant, D, consumers) -> (bytes, accesses in the kv loop).
KNOWN_SPILL = {"3.6": {("lists_cache_kpm", 128, 2): (16, 2), ("lists_cache_kpm", 128, 1): (72, 19)},
               "3.9": {("cache", 128, 1): (48, 11)}}
TWO_CTA_SMEM = 228 * 1024 // 2 - 1024     # two CTAs of the one-consumer kernel on an SM (1 KB reserved each)


@pytest.mark.skipif(not attention_sm90.AVAILABLE, reason="this triton has no Gluon")
def test_compiles_for_sm90_without_spills():
    rows = sm90_compile_rows()
    assert len(rows) == 2 * len({r["variant"] for r in rows})
    known = KNOWN_SPILL.get(".".join(triton.__version__.split(".")[:2]), {})
    for r in rows:
        name, rest = r["variant"].rsplit("_k", 1)
        consumers = 1 if rest.endswith("_c1") else 2
        spill, in_loop = known.get((name, r["D"], consumers), (0, 0))
        assert r["spill"] <= spill, f"register spill: {r}"
        assert r["loop_local"] <= in_loop, f"local memory inside the kv loop: {r}"
        assert r["shared"] <= (SM90_SMEM_LIMIT if consumers == 2 else TWO_CTA_SMEM), f"shared memory: {r}"
    assert any(r["variant"].endswith("_c1") for r in rows)


@pytest.mark.skipif(not attention_sm90.AVAILABLE, reason="this triton has no Gluon")
def test_one_consumer_ring_must_fit_two_ctas_an_sm():
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 256)
    args = (q, q, q, (q,) * 8, (0,) * 16, False, False, False, 0, 0.1, 0.5, q, lse, None)
    with pytest.raises(ValueError, match="use k_stages=1"):
        attention_sm90.sparse_attention_sm90(*args, consumers=1)            # 2 K + 2 V buffers at D = 128
    with pytest.raises(ValueError, match="consumers must be 1 or 2"):
        attention_sm90.sparse_attention_sm90(*args, consumers=3)


def test_supports_declines_what_the_kernel_does_not_cover():
    x = torch.zeros(1, 2, 256, 128)
    assert not attention_sm90.supports(x, x, x, 128, 128)   # CPU (and fp32)
    if HOPPER:
        y = torch.zeros(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16)
        assert attention_sm90.supports(y, y, y, 128, 128)
        assert not attention_sm90.supports(y, y, y, 64, 128)              # symbol blocks other than 128
        z = torch.zeros(1, 2, 256, 72, device="cuda", dtype=torch.bfloat16)
        assert not attention_sm90.supports(z, z, z, 128, 128)             # head dim 72
        assert not attention_sm90.supports(y.float(), y.float(), y.float(), 128, 128)


# (Nq, Nkv, D, dtype, kv density, q density, layout, key padding, Taylor terms); key padding: None,
# "random" (every key masked with p = 0.2, so every block takes the masked path) or "runs" (a few masked
# runs: clean, partly masked and fully masked blocks in one row, a masked block first in the lists)
CASES = [
    (1024, 1024, 128, torch.bfloat16, 1.0, 1.0, "bnhd", None, 0),      # dense, no lists
    (1000, 1000, 128, torch.bfloat16, 0.5, 0.6, "bnhd", None, 1),      # partial last blocks, cache copy
    (640, 1000, 64, torch.float16, 0.4, 1.0, "bhnd", "random", 0),     # Nq != Nkv, key padding
    (1000, 1000, 64, torch.bfloat16, 0.7, 0.5, "bnhd", "random", 3),   # padding + lists + 3 Taylor terms
    (1024, 1000, 128, torch.bfloat16, 1.0, 1.0, "bnhd", "runs", 0),    # dense + padding runs
    (1000, 1152, 128, torch.float16, 0.6, 1.0, "bhnd", "runs", 0),     # lists + padding runs
    (520, 520, 128, torch.float16, 0.0, 1.0, "bhnd", None, 0),         # every row empty -> zeros
    (520, 520, 128, torch.bfloat16, 0.5, 0.0, "bnhd", None, 2),        # every q-block cached
]


def _padding(kind, B, Nkv, g):
    if kind is None:
        return None
    if kind == "random":
        kpm = torch.rand(B, Nkv, generator=g, device="cuda") < 0.8
    else:
        kpm = torch.ones(B, Nkv, dtype=torch.bool, device="cuda")
        kpm[:, 5:40] = False                                    # inside block 0
        kpm[:, 256:384] = False                                 # all of block 2
        kpm[:, Nkv - 64:] = False                               # the tail, as a text padding
    kpm[1, :] = False                                           # batch 1: every key padded
    return kpm


def _poison_and_record_launches(monkeypatch) -> list:
    """NaN-fill every output the launcher allocates; return the list of Gluon launches (their consumer
    counts) the calls that follow make."""
    real = attention.empty_output
    monkeypatch.setattr(attention, "empty_output",
                        lambda q_, v_: tuple(t.fill_(float("nan")) for t in real(q_, v_)))
    launched = []
    real_launch = attention_sm90.sparse_attention_sm90
    monkeypatch.setattr(attention_sm90, "sparse_attention_sm90",
                        lambda *a, **kw: launched.append(kw["consumers"]) or real_launch(*a, **kw))
    return launched


@pytest.mark.skipif(not (HOPPER and attention_sm90.AVAILABLE), reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("variant", sorted(GLUON))
@pytest.mark.parametrize("Nq, Nkv, D, dtype, kv_d, q_d, layout, padded, terms", CASES)
def test_matches_reference(Nq, Nkv, D, dtype, kv_d, q_d, layout, padded, terms, variant, monkeypatch):
    seed = random.SystemRandom().randrange(2 ** 31)
    g = torch.Generator("cuda").manual_seed(seed)
    B, H = 2, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    if layout == "bnhd":
        q, k, v = (rnd(B, n, H, D).transpose(1, 2) for n in (Nq, Nkv, Nkv))
    else:
        q, k, v = (rnd(B, H, n, D) for n in (Nq, Nkv, Nkv))
    nqb, nkb = num_blocks(Nq, 128), num_blocks(Nkv, 128)
    q_keep = torch.rand(B, H, nqb, generator=g, device="cuda") < q_d
    kv_keep = torch.rand(B, H, nqb, nkb, generator=g, device="cuda") < kv_d
    if 0 < kv_d < 1:
        kv_keep[0, 0, 0] = False                               # one empty row of blocks
    caches = [rnd(B, H, Nq, D) for _ in range(max(terms, 1))]
    cache, c1, c2 = (caches + [None, None])[:3] if terms else (None, None, None)
    if cache is None:
        q_keep[:] = True
    kpm = _padding(padded, B, Nkv, g)
    cnt, idx = kv_block_lists(kv_keep) if kv_d < 1 else (None, None)
    scale, delta = 1.0 / math.sqrt(D), 0.7

    launched = _poison_and_record_launches(monkeypatch)
    out, lse = sparse_attention_triton(q, k, v, q_keep if cache is not None else None, cnt, idx, cache, kpm,
                                       scale, 128, 128, c1, c2, delta, config=GLUON[variant])
    assert launched, "the Gluon kernel did not run"
    ref_out, ref_lse = sparse_attention_ref(q.double(), k.double(), v.double(),
                                            q_keep if cache is not None else None, cnt, idx,
                                            None if cache is None else cache.double(), kpm, scale, 128, 128,
                                            None if c1 is None else c1.double(),
                                            None if c2 is None else c2.double(), delta)
    err = rel_err(out, ref_out) if ref_out.abs().max() > 0 else float(out.abs().max())
    assert err < REL_TOL[dtype], f"rel err {err:.2e} (seed {seed})"
    assert not torch.isnan(lse).any(), f"lse holds NaN (seed {seed})"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"-inf pattern of lse (seed {seed})"
    fin = torch.isfinite(ref_lse)
    if fin.any():
        assert (lse[fin].double() - ref_lse[fin]).abs().max() < 1e-2, f"lse (seed {seed})"


@pytest.mark.skipif(not (HOPPER and attention_sm90.AVAILABLE), reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("D, N, routed", [(128, attention.GLUON_MIN_NKV, True), (128, attention.GLUON_MIN_NKV - 128, False),
                                          (64, 2048, True), (64, 1920, False)])
def test_table_routes_long_sequences_to_gluon(D, N, routed, monkeypatch):
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, N, 2, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    launched = []
    real_launch = attention_sm90.sparse_attention_sm90
    monkeypatch.setattr(attention_sm90, "sparse_attention_sm90",
                        lambda *a, **kw: launched.append(1) or real_launch(*a, **kw))
    out, _ = sparse_attention_triton(q, k, v, None, None, None, None, None, D ** -0.5, 128, 128)
    assert bool(launched) == routed
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]


def test_gluon_launch_gives_short_calls_one_consumer():
    cfg = attention._TABLE[("sm90", 128)]
    short, long_ = attention.ONE_CONSUMER_MAX_NKV, attention.ONE_CONSUMER_MAX_NKV + 128
    assert attention.gluon_launch(cfg, short, sparse=True) == (1, 1)
    assert attention.gluon_launch(cfg, short, sparse=False) == (cfg.k_stages, cfg.consumers) == (2, 2)
    assert attention.gluon_launch(cfg, long_, sparse=True) == (2, 2)
    d64 = attention._TABLE[("sm90", 64)]     # D = 64: dense calls too, up to 8192 keys
    assert attention.gluon_launch(d64, 8192, sparse=False) == attention.gluon_launch(d64, 8192, sparse=True) == (1, 1)
    assert attention.gluon_launch(d64, 8320, sparse=False) == attention.gluon_launch(d64, 8320, sparse=True) == (2, 2)
    assert attention.gluon_launch(GLUON["k3"], 4608, sparse=True) == (3, 2)     # explicit configs keep their own


@pytest.mark.skipif(not (HOPPER and attention_sm90.AVAILABLE), reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("D, sparse, N, consumers", [(128, True, 4608, 1), (128, False, 4608, 2), (128, True, 16384, 2),
                                                     (64, False, 4608, 1), (64, True, 16384, 2)])
def test_table_launches_one_consumer_for_short_calls(D, sparse, N, consumers, monkeypatch):
    """Through the table, a short call launches the one-consumer CTA (at D = 128 sparse ones only: kv lists,
    cached q-blocks) and matches the reference; long ones keep two consumers."""
    g = torch.Generator("cuda").manual_seed(random.SystemRandom().randrange(2 ** 31))
    B, H = 1, 2
    q, k, v = (torch.randn(B, N, H, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    nb = num_blocks(N, 128)
    kv_keep = torch.rand(B, H, nb, nb, generator=g, device="cuda") < 0.3
    kv_keep |= torch.eye(nb, dtype=torch.bool, device="cuda")
    q_keep = torch.rand(B, H, nb, generator=g, device="cuda") < 0.5
    cache = torch.randn(B, H, N, D, generator=g, device="cuda").to(torch.bfloat16)
    cnt, idx = kv_block_lists(kv_keep)
    if not sparse:
        q_keep = cnt = idx = cache = None
    seen = _poison_and_record_launches(monkeypatch)
    out, _ = sparse_attention_triton(q, k, v, q_keep, cnt, idx, cache, None, D ** -0.5, 128, 128)
    assert seen == [consumers]
    ref, _ = sparse_attention_ref(q.double(), k.double(), v.double(), q_keep, cnt, idx,
                                  None if cache is None else cache.double(), None, D ** -0.5, 128, 128)
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]


@pytest.mark.skipif(not (HOPPER and attention_sm90.AVAILABLE), reason="needs a Hopper GPU and Gluon")
def test_engine_dense_attention_with_padding_takes_gluon(monkeypatch):
    """The runtime's dense attention (update and warm-up steps) goes to the Gluon kernel when a key padding
    mask is given (SDPA reads the mask as a bias there) and to SDPA without one; both match SDPA."""
    from flashomni_compile.runtime import engine

    g = torch.Generator("cuda").manual_seed(random.SystemRandom().randrange(2 ** 31))
    N = attention.GLUON_MIN_NKV + 40
    q, k, v = (torch.randn(1, N, 2, 128, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    kpm = torch.ones(1, N, dtype=torch.bool, device="cuda")
    kpm[:, -100:] = False
    launched = []
    real_launch = attention_sm90.sparse_attention_sm90
    monkeypatch.setattr(attention_sm90, "sparse_attention_sm90",
                        lambda *a, **kw: launched.append(1) or real_launch(*a, **kw))
    for mask in (kpm, None):
        launched.clear()
        out = engine._dense_attention(q, k, v, mask, 128 ** -0.5)
        assert bool(launched) == (mask is not None)
        assert out.transpose(1, 2).is_contiguous()
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=None if mask is None else mask[:, None, None, :])
        assert rel_err(out, ref) < REL_TOL[torch.bfloat16]
