import pytest
import torch

from flashomni_compile.kernels.attention import kv_keep_from_lists
from flashomni_compile.symbols import SparseSymbols, kv_block_lists, num_blocks


def test_num_blocks_partial():
    assert num_blocks(200, 128) == 2 and num_blocks(256, 128) == 2 and num_blocks(1, 128) == 1


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_kv_lists_roundtrip_and_order(density):
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(2, 3, 4, 7, generator=g) < density
    cnt, idx = kv_block_lists(keep)
    assert cnt.dtype == torch.int32 and idx.dtype == torch.int32
    assert torch.equal(cnt, keep.sum(-1).int())
    assert torch.equal(kv_keep_from_lists(cnt, idx), keep)
    # kept indices come first, ascending
    for row_keep, row_cnt, row_idx in zip(keep.view(-1, 7), cnt.view(-1), idx.view(-1, 7)):
        head = row_idx[: int(row_cnt)].tolist()
        assert head == sorted(head) == torch.nonzero(row_keep).flatten().tolist()


def test_density_counts_partial_blocks():
    s = SparseSymbols.dense(1, 1, 200, 200)
    s.kv_keep[..., 1] = False  # the partial block holds 72 of 200 keys
    assert abs(float(s.kv_density()) - 128 / 200) < 1e-6
    s.q_keep[..., 0] = False  # cached q-blocks do no work
    assert abs(float(s.kv_density()) - (72 / 200) * (128 / 200)) < 1e-6
    assert abs(float(s.q_density()) - 72 / 200) < 1e-6


def test_token_mask_matches_blocks():
    s = SparseSymbols.dense(1, 2, 150, 90, block_q=64, block_kv=32)
    s.kv_keep[0, 1, 2, 1] = False
    m = s.token_mask()
    assert m.shape == (1, 2, 150, 90)
    assert not m[0, 1, 128:, 32:64].any() and m[0, 1, 128:, :32].all() and m[0, 0].all()


@pytest.mark.parametrize("bad, match", [
    (dict(q_keep=torch.ones(1, 2, 3, dtype=torch.bool)), r"q_keep has shape \(1, 2, 3\)"),
    (dict(q_keep=torch.ones(1, 2, 2)), "dtype torch.bool"),
    (dict(kv_keep=torch.ones(1, 2, 2, 5, dtype=torch.bool)), "kv_keep has shape"),
    (dict(block_q=100), "block_q must be a power of two"),
])
def test_validation_errors_name_the_argument(bad, match):
    args = dict(q_keep=torch.ones(1, 2, 2, dtype=torch.bool), kv_keep=torch.ones(1, 2, 2, 2, dtype=torch.bool),
                seq_q=200, seq_kv=200)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        SparseSymbols(**args)


def test_densities_equal_token_level_counts():
    """Random symbols with partial blocks in both directions, B and H > 1: the block-weighted densities
    equal counting (query, key) pairs and query rows token by token."""
    g = torch.Generator().manual_seed(3)
    s = SparseSymbols(torch.rand(2, 3, 4, generator=g) < 0.6, torch.rand(2, 3, 4, 3, generator=g) < 0.5,
                      200, 150, block_q=64, block_kv=64)
    rows = s.q_keep.repeat_interleave(64, dim=-1)[..., :200]                  # [B, H, Nq]
    pairs = (s.token_mask() & rows[..., None]).sum().item()
    assert abs(float(s.kv_density()) - pairs / (2 * 3 * 200 * 150)) < 1e-6
    assert abs(float(s.q_density()) - rows.sum().item() / (2 * 3 * 200)) < 1e-6
