"""Policy properties on hand-made PolicyContexts (no engine): each policy's rule checked against an
independent computation, text/diagonal guarantees, per-head decisions, thresholds 0 = dense, registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flashomni_compile.runtime.options import RuntimeOptions
from flashomni_compile.runtime.policies import (FlashOmniPolicy, LayerCachePolicy, PolicyContext, PooledQKPolicy,
                                                QCachePolicy, WindowPolicy, get_policy, policy_names,
                                                pooled_scores, register_policy)
from flashomni_compile.runtime.spec import SiteSpec

N, T, BLK = 200, 40, 32          # 7 blocks; text tokens 0..39 -> q/kv blocks 0 and 1 hold text
NB = 7


def _spec(text_len=T, text_first=True, grid=None, seq=N):
    return SiteSpec("blocks.0.attn", "joint", 2, 64, seq, seq, text_len, text_first, grid)


def _ctx(spec=None, step=0, total=None, out=None, prev_out=None, scores=None, seed=0, batch=1) -> PolicyContext:
    spec = spec or _spec()
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, 2, spec.seq_q, 64, generator=g) for _ in range(2))
    k = k + q          # correlated, so pooled scores are far from uniform
    pq, pk, sc = pooled_scores(q, k, None, 0.125, BLK, BLK)
    return PolicyContext(spec=spec, step=step, total=total, block_q=BLK, block_kv=BLK, pooled_q=pq, pooled_k=pk,
                         scores=sc if scores is None else scores,
                         out=torch.randn(batch, 2, spec.seq_q, 64, generator=g) if out is None else out,
                         seq_kv=spec.seq_kv, prev_out=prev_out)


def _diag():
    i = torch.arange(NB)
    return i[:, None] == i[None, :]


# ---------------------------------------------------------------------------------------------------
# pooled_qk
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.15, 0.3, 0.5])
def test_pooled_qk_drops_lowest_mass_keeps_text_and_diagonal(tau):
    ctx = _ctx()
    kv = PooledQKPolicy(tau_kv=tau)(ctx).kv_keep
    p = ctx.scores
    text = torch.zeros(NB, dtype=torch.bool)
    text[:2] = True
    dropped_any = False
    for h in range(2):
        for qb in range(NB):
            row = p[0, h, qb].tolist()
            order = sorted(range(NB), key=lambda j: row[j])
            cum, drop = 0.0, set()
            for j in order:                      # independent: drop the smallest while the sum stays < tau
                cum += row[j]
                if cum >= tau:
                    break
                drop.add(j)
            for j in range(NB):
                forced = bool(text[j]) or bool(text[qb]) or j == qb
                assert bool(kv[0, h, qb, j]) == (forced or j not in drop), (h, qb, j)
            dropped_any |= any(not text[qb] and j != qb and not text[j] for j in drop)
    assert dropped_any, "no block was dropped: choose a larger tau"
    assert kv[..., :2].all() and kv[..., :2, :].all() and kv[..., _diag()].all()


def test_pooled_qk_per_head_decisions_and_tau_zero_dense():
    ctx = _ctx(seed=3)
    kv = PooledQKPolicy(tau_kv=0.3)(ctx).kv_keep
    assert not torch.equal(kv[0, 0], kv[0, 1])
    dense = PooledQKPolicy(tau_kv=0.0)(ctx)
    assert dense.kv_keep.all() and dense.q_keep.all()
    assert not PooledQKPolicy(tau_kv=0.0).skips_kv


def test_pooled_scores_respect_key_padding():
    q, k = torch.randn(2, 1, 100, 32), torch.randn(2, 1, 100, 32)
    kpm = torch.ones(2, 100, dtype=torch.bool)
    kpm[1, 64:] = False           # batch 1: kv-blocks 2 and 3 (of 32) hold no visible key
    _, pk, sc = pooled_scores(q, k, kpm, 0.2, 32, 32)
    assert torch.allclose(sc.sum(-1), torch.ones(2, 1, 4))
    assert (sc[1, :, :, 2:] == 0).all() and (sc[0, :, :, 2:] > 0).all()
    assert torch.allclose(pk[1, 0, 1], k[1, 0, 32:64].mean(0))


# ---------------------------------------------------------------------------------------------------
# window
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_first", [True, False])
def test_window_covers_token_window_and_keeps_text(text_first):
    grid, win = (1, 8, 20), (0, 1, 2)
    ctx = _ctx(_spec(grid=grid, text_first=text_first))
    kv = WindowPolicy(window=win)(ctx).kv_keep[0, 0]
    # token-level window, brute force
    img0 = T if text_first else 0
    idx = torch.arange(N) - img0
    img = (idx >= 0) & (idx < 160)
    r, c = idx // 20, idx % 20
    near = img[:, None] & img[None, :] & ((r[:, None] - r[None, :]).abs() <= win[1]) \
        & ((c[:, None] - c[None, :]).abs() <= win[2])
    token_blocks = near.reshape(N, 1, N)  # any token pair in the window -> the block pair is needed
    need = torch.zeros(NB, NB, dtype=torch.bool)
    for i in range(N):
        for j in torch.nonzero(token_blocks[i, 0]).flatten().tolist():
            need[i // BLK, j // BLK] = True
    assert (kv | ~need).all(), "a block pair holding in-window tokens was dropped"
    text_blocks = [0, 1] if text_first else [5, 6]
    assert kv[text_blocks].all() and kv[:, text_blocks].all()
    assert not kv.all()
    far = (2, 6) if text_first else (0, 4)       # image rows 0-1 vs rows 5-7: outside a 1-row window
    assert not kv[far] and not kv[far[::-1]]


def test_window_1d_and_grid_errors():
    ctx = _ctx(_spec(text_len=0))
    i = torch.arange(NB)
    for radius, reach in ((31, 1), (32, 1), (33, 2)):   # blocks i, i+2 are 33 tokens apart (32*(i+2) - (32*i+31))
        kv = WindowPolicy(radius_1d=radius)(ctx).kv_keep[0, 0]
        assert torch.equal(kv, (i[:, None] - i[None, :]).abs() <= reach), radius
    with pytest.raises(ValueError, match=r"grid \(2, 8, 20\) holds 320 tokens but site 'blocks.0.attn' has 160"):
        WindowPolicy(grid=(2, 8, 20))(_ctx())
    with pytest.raises(ValueError, match="window: window="):
        WindowPolicy(window=(1, 2))


# ---------------------------------------------------------------------------------------------------
# qcache, layer
# ---------------------------------------------------------------------------------------------------
def _changed(change: torch.Tensor, seed=0, batch=1):
    """(prev_out, out) whose relative block change is exactly ``change [B, 2, NB]``."""
    g = torch.Generator().manual_seed(seed)
    prev = torch.randn(batch, 2, N, 64, generator=g, dtype=torch.float64)
    rows = change.repeat_interleave(BLK, dim=-1)[..., :N, None]
    return prev, prev * (1 + rows)


def test_qcache_caches_least_changed_pairs_per_head_and_keeps_text():
    change = torch.tensor([[[0.001, 0.001, 0.5, 0.02, 0.3, 0.01, 0.4],
                            [0.001, 0.001, 0.03, 0.6, 0.04, 0.7, 0.8]]], dtype=torch.float64)
    prev, out = _changed(change)
    ctx = _ctx(out=out, prev_out=prev)
    q = QCachePolicy(fraction=0.3)(ctx).q_keep[0]
    # 10 image pairs, 3 cached: the lowest changes among blocks 2..6 -> (0,5) 0.01, (0,3) 0.02, (1,2) 0.03
    cached = {(h, b) for h in range(2) for b in range(NB) if not q[h, b]}
    assert cached == {(0, 5), (0, 3), (1, 2)}
    assert q[:, :2].all()          # text q-blocks (lowest change of all) are never cached
    q_thr = QCachePolicy(fraction=0.3, threshold=0.025)(ctx).q_keep[0]
    assert {(h, b) for h in range(2) for b in range(NB) if not q_thr[h, b]} == {(0, 5), (0, 3)}
    assert QCachePolicy(fraction=0.0)(ctx).q_keep.all()
    assert QCachePolicy(fraction=0.3)(dataclasses.replace(ctx, prev_out=None)).q_keep.all()   # first update


def test_qcache_text_guidance_keeps_text_tied_block():
    change = torch.tensor([[[0.1, 0.1, 0.01, 0.02, 0.03, 0.04, 0.05]] * 2], dtype=torch.float64)
    prev, out = _changed(change)
    scores = torch.full((1, 2, NB, NB), 0.1 / 5)
    scores[..., :2] = 0.45                    # every row puts 0.9 of its mass on text
    scores[:, :, 2, :2] = 0.01                # block 2 ignores the text ...
    scores[:, :, 2, 2:] = 0.98 / 5
    scores[:, :, 3, :2] = 0.499               # ... block 3 is tied to it
    scores[:, :, 3, 2:] = 0.002 / 5
    ctx = _ctx(out=out, prev_out=prev, scores=scores)
    plain = QCachePolicy(fraction=0.4)(ctx).q_keep[0]               # 4 of 10 image pairs cached
    guided = QCachePolicy(fraction=0.4, text_guidance=5.0)(ctx).q_keep[0]
    assert not plain[:, 2].any() and not plain[:, 3].any()    # lowest change: blocks 2 and 3 cached
    assert guided[:, 3].all() and not guided[:, 2].any()      # guidance keeps the text-tied block computed
    assert not guided[:, 4].any()                             # ... and caches the next-least-changed instead


def test_layer_granularity_caches_whole_site_below_threshold():
    change = torch.rand(2, 2, NB, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.01
    prev, out = _changed(change, batch=2)
    ctx = _ctx(out=out, prev_out=prev, batch=2)
    inner = QCachePolicy(fraction=0.9)             # 9 of 10 image pairs cached: density 5/14
    assert not LayerCachePolicy(inner, threshold=0.5)(ctx).q_keep.any()
    q = LayerCachePolicy(inner, threshold=0.3)(ctx).q_keep
    assert torch.equal(q, inner(ctx).q_keep) and q.float().mean() == 5 / 14


# ---------------------------------------------------------------------------------------------------
# flashomni (the default)
# ---------------------------------------------------------------------------------------------------
def test_flashomni_thresholds_zero_is_dense_and_ramp():
    change = torch.linspace(0.01, 0.5, 2 * NB, dtype=torch.float64).reshape(1, 2, NB)
    prev, out = _changed(change)
    ctx = _ctx(out=out, prev_out=prev, total=10)
    zero = FlashOmniPolicy(tau_kv=0.0, cache_fraction=0.0, layer_threshold=0.0)
    s = zero(ctx)
    assert s.q_keep.all() and s.kv_keep.all() and not zero.caches_q and not zero.skips_kv
    ramp = FlashOmniPolicy(tau_kv=(0.0, 0.4), cache_fraction=(0.0, 0.5), layer_threshold=0.0, text_guidance=0.0)
    early, late = ramp(dataclasses.replace(ctx, step=0)), ramp(dataclasses.replace(ctx, step=9))
    assert early.q_keep.all() and early.kv_keep.all()
    assert (~late.q_keep).sum() == 5 and (~late.kv_keep).any()
    assert late.q_keep[..., :2].all() and late.kv_keep[..., :2].all()
    # the kv rule is pooled_qk's at the ramped tau
    assert torch.equal(late.kv_keep, PooledQKPolicy(tau_kv=0.4).kv_keep(ctx, 0.4))


# ---------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------
def test_registry_by_name_and_instance():
    assert set(policy_names()) >= {"dense", "window", "pooled_qk", "qcache", "layer", "flashomni"}
    assert get_policy("pooled_qk", tau_kv=0.2) == PooledQKPolicy(tau_kv=0.2)
    inst = QCachePolicy(fraction=0.1)
    assert get_policy(inst) is inst
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; valid: dense, flashomni, layer, pooled_qk"):
        get_policy("nope")
    with pytest.raises(ValueError, match=r"policy 'pooled_qk' has no argument\(s\) 'tau'; valid: tau_kv"):
        get_policy("pooled_qk", tau=0.2)
    with pytest.raises(ValueError, match=r"tau_kv=1.5 is not valid"):
        get_policy("pooled_qk", tau_kv=1.5)
    with pytest.raises(ValueError, match="cache_fraction"):
        FlashOmniPolicy(cache_fraction=(0.1, 2.0))


def test_register_custom_policy_usable_in_options():
    @dataclasses.dataclass(frozen=True)
    class EveryOther:
        caches_q = False

        def __call__(self, ctx):
            kv = torch.ones(ctx.scores.shape, dtype=torch.bool, device=ctx.device)
            kv[..., 1::2] = False
            return ctx.symbols(torch.ones(ctx.scores.shape[:3], dtype=torch.bool), kv)

    register_policy("every_other_test", EveryOther)
    opts = RuntimeOptions(policy="every_other_test")
    assert isinstance(get_policy(opts.policy), EveryOther)
    from flashomni_compile.config import FlashOmniConfig

    assert "every_other_test" in policy_names() and "flashomni" in policy_names()
    cfg = FlashOmniConfig.from_options({"policy": "every_other_test"})    # the backend accepts it too
    assert cfg.policy == "every_other_test"


# ---------------------------------------------------------------------------------------------------
# Update-step metrics: one-pass forms equal the padded float32 formulas they replace
# ---------------------------------------------------------------------------------------------------
def _pooled_padded(q, k, kpm, scale, bq, bkv):
    """The former pooled_scores: float32 copies, zero-padded block sums, explicit counts."""
    from flashomni_compile.runtime.policies import block_reduce
    cnt_q = block_reduce(torch.ones(q.shape[2], 1), bq, dim=0)
    pq = block_reduce(q.float(), bq) / cnt_q
    kf = k.float()
    if kpm is None:
        cnt_k = block_reduce(torch.ones(k.shape[2], 1), bkv, dim=0).expand(k.shape[0], -1, -1)
    else:
        kf = kf * kpm.float()[:, None, :, None]
        cnt_k = block_reduce(kpm.float()[:, :, None], bkv, dim=1)
    pk = block_reduce(kf, bkv) / cnt_k.clamp_min(1.0)[:, None]
    logits = scale * pq @ pk.transpose(-1, -2)
    if kpm is not None:
        logits = logits.masked_fill((cnt_k[:, None, None, :, 0] == 0), float("-inf"))
    return pq, pk, torch.softmax(logits, dim=-1).nan_to_num(0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n,masked", [(200, False), (192, False), (200, True), (20, True)])
def test_pooled_scores_one_pass_equals_padded_float32(dtype, n, masked):
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 2, n, 64, generator=g).to(dtype) for _ in range(2))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)          # memory order [B, N, H, D], as in the engine
    kpm = None
    if masked:
        kpm = torch.ones(2, n, dtype=torch.bool)
        kpm[1, n // 3:] = False                                  # whole kv-blocks of batch 1 empty
    got = pooled_scores(q, k, kpm, 0.125, 32, 32)
    want = _pooled_padded(q, k, kpm, 0.125, 32, 32)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_change_one_pass_equals_formula_and_diff_is_shared(dtype):
    g = torch.Generator().manual_seed(5)
    prev = torch.randn(1, 2, N, 64, generator=g).to(dtype)
    out = (prev.double() + 0.1 * torch.randn(1, 2, N, 64, generator=g, dtype=torch.float64)).to(dtype)
    ctx = _ctx(out=out, prev_out=prev)
    from flashomni_compile.runtime.policies import block_reduce
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    diff = block_reduce((out.to(acc) - prev.to(acc)).square().sum(-1), BLK)
    ref = block_reduce(prev.to(acc).square().sum(-1), BLK)
    want = (diff / ref.clamp_min(1e-12)).sqrt().float()
    got = ctx.change()
    assert got.dtype == torch.float32 and got.shape == (1, 2, NB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert ctx.change() is got                                   # computed once per update
    assert ctx.output_diff().dtype == acc
    torch.testing.assert_close(ctx.output_diff(), out.to(acc) - prev.to(acc), rtol=0, atol=0)
    assert _ctx(out=out).change() is None and _ctx(out=out).output_diff() is None
