"""One test per matcher rule: what is a site, which pieces are fused, and what is left alone and why.

Each case is a small hand-written module; ``find_sites`` runs on the graph Dynamo gives the backend.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _backend_util import dynamo_graphs, reset_dynamo  # noqa: F401  (autouse fixture)
from flashomni_compile.passes.match import find_sites

B, N, H, D = 1, 12, 2, 16
C = H * D
FULL = ("gemm_q", "gemm_kv", "attention", "gemm_o")


def _x(n=N, c=C):
    return torch.randn(B, n, c)


class Attn(nn.Module):
    """Separate q/k/v/out linears; ``sdpa_kw`` goes to SDPA, ``mask`` (a buffer-free input) is optional."""

    def __init__(self, sdpa_kw=None, positional=False, qnorm=None, post=None):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(C, C) for _ in range(4))
        self.sdpa_kw, self.positional, self.qnorm, self.post = sdpa_kw or {}, positional, qnorm, post

    def forward(self, x, mask=None):
        q, k, v = (f(x).unflatten(-1, (H, D)).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.qnorm == "per_head":
            q = F.rms_norm(q, (D,))
        elif self.qnorm == "across_heads":
            q = F.rms_norm(q.transpose(1, 2).flatten(2), (C,)).unflatten(-1, (H, D)).transpose(1, 2)
        kw = dict(self.sdpa_kw)
        if mask is not None:
            kw["attn_mask"] = mask
        o = F.scaled_dot_product_attention(q, k, v, **kw) if not self.positional else \
            F.scaled_dot_product_attention(q, k, v, kw.get("attn_mask"), 0.0, False)
        o = o.transpose(1, 2).reshape(B, N, C)
        if self.post == "gate":
            o = o * 2.0
        elif self.post == "permuted_heads":
            o = o.unflatten(-1, (H, D)).flip(2).flatten(2)
        return self.o(o)


def _match(model, *args):
    (gm,) = dynamo_graphs(model, *args)
    return find_sites(gm)


@pytest.mark.parametrize("positional", [False, True])
def test_plain_self_attention_is_a_full_site(positional):
    sites, rejected = _match(Attn(positional=positional), _x())
    assert not rejected and len(sites) == 1
    s = sites[0]
    assert (s.kind, s.pieces, s.heads, s.head_dim, s.seq_q) == ("self", FULL, H, D, N)
    assert s.anchor.op == "placeholder" and s.anchor is [p.node for p in s.q_proj][0].args[1]
    assert [(p.role, p.row_offset, p.rows, p.sparse_cols) for p in s.kv_proj] == [("k", 0, N, C), ("v", 0, N, C)]
    assert not s.notes


@pytest.mark.parametrize("kw,fragment", [
    ({"is_causal": True}, "causal"),
    ({"dropout_p": 0.1}, "dropout"),
    ({"enable_gqa": True}, None),           # same head count: GQA flag alone is harmless
])
def test_sdpa_flags(kw, fragment):
    sites, rejected = _match(Attn(kw), _x())
    if fragment is None:
        assert len(sites) == 1 and not rejected
    else:
        assert not sites and fragment in rejected[0].reason


def test_grouped_query_attention_is_left_alone():
    class GQA(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    sites, rejected = _match(GQA(), torch.randn(B, 4, N, D), torch.randn(B, 2, N, D), torch.randn(B, 2, N, D))
    assert not sites and "grouped-query" in rejected[0].reason


def test_float_mask_is_left_alone():
    sites, rejected = _match(Attn(), _x(), torch.zeros(B, 1, N, N))
    assert not sites and "float attn_mask" in rejected[0].reason


def test_bool_mask_over_queries_is_left_alone():
    sites, rejected = _match(Attn(), _x(), torch.ones(B, 1, N, N, dtype=torch.bool))
    assert not sites and "varies over heads or queries" in rejected[0].reason


@pytest.mark.parametrize("shape", [(B, 1, 1, N), (B, N)])
def test_key_padding_mask(shape):
    """[B, 1, 1, N] directly, or a [B, N] mask broadcast by expand: provably key padding."""

    class M(Attn):
        def forward(self, x, keep):
            m = keep[:, None, None, :].expand(B, H, N, N) if keep.dim() == 2 else keep
            return super().forward(x, m)

    keep = torch.ones(shape, dtype=torch.bool)
    sites, rejected = _match(M(), _x(), keep)
    assert not rejected and sites[0].key_padding is not None


def test_head_dim_out_of_range_is_left_alone():
    class Small(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    t = torch.randn(B, H, N, 8)
    sites, rejected = _match(Small(), t, t, t)
    assert not sites and "head dim 8" in rejected[0].reason


def test_training_is_left_alone():
    m = Attn()
    (gm,) = [g for g in _graphs_with_grad(m, _x())]
    sites, rejected = find_sites(gm)
    assert not sites and "require grad" in rejected[0].reason


def _graphs_with_grad(model, *args):
    graphs = []

    def backend(gm, ex, **_):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(*args)
    return graphs


def test_per_head_qk_norm_keeps_gemm_q():
    sites, _ = _match(Attn(qnorm="per_head"), _x())
    assert sites[0].pieces == FULL and "qk_norm" in sites[0].norms


def test_qk_norm_across_heads_drops_gemm_q():
    sites, _ = _match(Attn(qnorm="across_heads"), _x())
    assert sites[0].pieces == ("gemm_kv", "attention", "gemm_o")      # only Q is normalised across heads
    assert any("rms_norm combines values of different tokens or heads" in n for n in sites[0].notes)


@pytest.mark.parametrize("post,fragment", [("gate", "GEMM-O: no linear"), ("permuted_heads", "GEMM-O:")])
def test_output_not_a_plain_rearrangement_drops_gemm_o(post, fragment):
    sites, _ = _match(Attn(post=post), _x())
    assert sites[0].pieces == ("gemm_q", "gemm_kv", "attention")
    assert any(fragment in n for n in sites[0].notes)


def test_q_projection_read_elsewhere_drops_gemm_q():
    class Leak(Attn):
        def forward(self, x):
            q = self.q(x)
            k, v = (f(x).unflatten(-1, (H, D)).transpose(1, 2) for f in (self.k, self.v))
            o = F.scaled_dot_product_attention(q.unflatten(-1, (H, D)).transpose(1, 2), k, v)
            return self.o(o.transpose(1, 2).reshape(B, N, C)) + q

    sites, _ = _match(Leak(), _x())
    assert "gemm_q" not in sites[0].pieces and any("also read by" in n for n in sites[0].notes)


@pytest.mark.parametrize("q_index,fused", [(0, True), (1, False)])
def test_fused_qkv(q_index, fused):
    """Fused QKV is a GEMM-Q only when Q is the leading column block (the runtime's ``sparse_cols``)."""

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = nn.Linear(C, 3 * C), nn.Linear(C, C)

        def forward(self, x):
            t = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
            order = [q_index] + [i for i in range(3) if i != q_index]
            o = F.scaled_dot_product_attention(t[order[0]], t[order[1]], t[order[2]])
            return self.o(o.transpose(1, 2).reshape(B, N, C))

    sites, _ = _match(QKV(), _x())
    assert ("gemm_q" in sites[0].pieces) == fused
    if fused:
        assert sites[0].q_proj[0].sparse_cols == C
    # K and V of a fused QKV linear stay dense, with a note
    assert "gemm_kv" not in sites[0].pieces
    assert any("GEMM-KV: " in n and "feeds Q/K/V together" in n for n in sites[0].notes), sites[0].notes


def test_joint_streams_text_last_and_single_stream_output():
    """Two per-stream projections concatenated (text last) and an output over cat([attn, mlp])."""

    class Joint(nn.Module):
        def __init__(self):
            super().__init__()
            self.qi, self.qt = nn.Linear(C, C), nn.Linear(C, C)
            self.kv = nn.Linear(C, 2 * C)
            self.mlp, self.o = nn.Linear(C, 2 * C), nn.Linear(3 * C, C)

        def forward(self, img, txt):
            x = torch.cat([img, txt], 1)
            q = torch.cat([self.qi(img), self.qt(txt)], 1).unflatten(-1, (H, D)).permute(0, 2, 1, 3)
            k, v = self.kv(x).unflatten(-1, (2, H, D)).permute(2, 0, 3, 1, 4).unbind(0)
            a = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).flatten(2)
            return self.o(torch.cat([a, F.gelu(self.mlp(x))], -1))

    sites, _ = _match(Joint(), _x(10), _x(4))
    s = sites[0]
    assert (s.kind, s.text_len, s.text_first) == ("single", 4, False)
    assert [(p.row_offset, p.rows) for p in s.q_proj] == [(0, 10), (10, 4)]
    assert s.o_proj[0].extra is not None and s.pieces == ("gemm_q", "attention", "gemm_o")
    assert any("GEMM-KV: " in n and "feeds K/V together" in n for n in s.notes), s.notes   # fused KV: dense


# ---------------------------------------------------------------------------------------------------
# GEMM-KV: K and V projections
# ---------------------------------------------------------------------------------------------------
def test_k_projection_read_elsewhere_stays_dense():
    """A K projection whose output is also read outside the K path is refused with a note (its skipped
    tiles would be zeros there); V, read only by attention, is still fused."""

    class Leak(Attn):
        def forward(self, x):
            k = self.k(x)
            q, v = (f(x).unflatten(-1, (H, D)).transpose(1, 2) for f in (self.q, self.v))
            o = F.scaled_dot_product_attention(q, k.unflatten(-1, (H, D)).transpose(1, 2), v)
            return self.o(o.transpose(1, 2).reshape(B, N, C)) + k

    sites, _ = _match(Leak(), _x())
    s = sites[0]
    assert s.pieces == FULL
    assert [p.role for p in s.kv_proj] == ["v"]
    assert any(n.startswith("GEMM-KV: output of") and "also read by" in n for n in s.notes), s.notes


def test_k_read_by_a_second_attention_stays_dense():
    """The same K (and Q) feeding two attention calls: the other call would read the tiles this site skips."""

    class Two(Attn):
        def forward(self, x):
            q, k, v = (f(x).unflatten(-1, (H, D)).transpose(1, 2) for f in (self.q, self.k, self.v))
            o1 = F.scaled_dot_product_attention(q, k, v)
            o2 = F.scaled_dot_product_attention(q * 2.0, k, v * 2.0)
            return self.o((o1 + o2).transpose(1, 2).reshape(B, N, C))

    sites, _ = _match(Two(), _x())
    assert len(sites) == 2
    for s in sites:
        assert "gemm_kv" not in s.pieces and "gemm_q" not in s.pieces, (s.name, s.pieces)
        assert any(n.startswith("GEMM-KV: output of linear_1 is also read by") and "(sdpa)" in n for n in s.notes)


def test_k_norm_across_heads_keeps_k_dense_and_fuses_v():
    """Wan-style K norm over all heads: K is not head-local, V is."""

    class KNorm(Attn):
        def forward(self, x):
            q, v = (f(x).unflatten(-1, (H, D)).transpose(1, 2) for f in (self.q, self.v))
            k = F.rms_norm(self.k(x), (C,)).unflatten(-1, (H, D)).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v)
            return self.o(o.transpose(1, 2).reshape(B, N, C))

    sites, _ = _match(KNorm(), _x())
    assert [p.role for p in sites[0].kv_proj] == ["v"]
    assert any(n.startswith("GEMM-KV: K is not head-local (tokens/heads are mixed") for n in sites[0].notes)


def test_kv_projection_wider_than_the_heads_stays_dense():
    """A K linear with more columns than K uses (the rest dropped): not all its columns go to K."""

    class Wide(Attn):
        def __init__(self):
            super().__init__()
            self.k = nn.Linear(C, 2 * C)

        def forward(self, x):
            q, v = (f(x).unflatten(-1, (H, D)).transpose(1, 2) for f in (self.q, self.v))
            k = self.k(x)[..., :C].unflatten(-1, (H, D)).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v)
            return self.o(o.transpose(1, 2).reshape(B, N, C))

    sites, _ = _match(Wide(), _x())
    assert [p.role for p in sites[0].kv_proj] == ["v"]
    assert any("GEMM-KV: projection" in n and "is not [B, M, H*D]" in n for n in sites[0].notes)


def test_kv_per_stream_projections_and_cross_attention():
    """Per-stream K/V linears concatenated text last (row offsets in the key sequence), and a cross
    attention whose K/V come from a shorter context."""

    class Joint(nn.Module):
        def __init__(self):
            super().__init__()
            self.qi, self.qt, self.ki, self.kt, self.vi, self.vt = (nn.Linear(C, C) for _ in range(6))
            self.o = nn.Linear(C, C)

        def forward(self, img, txt):
            heads = lambda t: t.unflatten(-1, (H, D)).permute(0, 2, 1, 3)  # noqa: E731
            q = heads(torch.cat([self.qi(img), self.qt(txt)], 1))
            k = heads(torch.cat([self.ki(img), self.kt(txt)], 1))
            v = heads(torch.cat([self.vi(img), self.vt(txt)], 1))
            return self.o(F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).flatten(2))

    sites, _ = _match(Joint(), _x(10), _x(4))
    s = sites[0]
    assert s.pieces == FULL and (s.text_len, s.text_first) == (4, False)
    assert [(p.role, p.row_offset, p.rows) for p in s.kv_proj] == [("k", 0, 10), ("k", 10, 4),
                                                                    ("v", 0, 10), ("v", 10, 4)]

    class Cross(Attn):
        def forward(self, x, ctx):
            q = self.q(x).unflatten(-1, (H, D)).transpose(1, 2)
            k, v = (f(ctx).unflatten(-1, (H, D)).transpose(1, 2) for f in (self.k, self.v))
            o = F.scaled_dot_product_attention(q, k, v)
            return self.o(o.transpose(1, 2).reshape(B, N, C))

    sites, _ = _match(Cross(), _x(), _x(5))
    s = sites[0]
    assert s.kind == "cross" and s.pieces == FULL
    assert [(p.role, p.row_offset, p.rows) for p in s.kv_proj] == [("k", 0, 5), ("v", 0, 5)]


def test_fuse_gemm_kv_false_leaves_kv_dense():
    from flashomni_compile.config import FlashOmniConfig

    (gm,) = dynamo_graphs(Attn(), _x())
    sites, _ = find_sites(gm, FlashOmniConfig(fuse_gemm_kv=False))
    assert sites[0].pieces == ("gemm_q", "attention", "gemm_o") and not sites[0].kv_proj
    assert "GEMM-KV: disabled by fuse_gemm_kv=False" in sites[0].notes
