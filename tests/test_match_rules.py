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
    assert (s.kind, s.pieces, s.heads, s.head_dim, s.seq_q) == ("self", ("gemm_q", "attention", "gemm_o"), H, D, N)
    assert s.anchor.op == "placeholder" and s.anchor is [p.node for p in s.q_proj][0].args[1]


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
    assert sites[0].pieces == ("gemm_q", "attention", "gemm_o") and "qk_norm" in sites[0].norms


def test_qk_norm_across_heads_drops_gemm_q():
    sites, _ = _match(Attn(qnorm="across_heads"), _x())
    assert sites[0].pieces == ("attention", "gemm_o")
    assert any("rms_norm combines values of different tokens or heads" in n for n in sites[0].notes)


@pytest.mark.parametrize("post,fragment", [("gate", "GEMM-O: no linear"), ("permuted_heads", "GEMM-O:")])
def test_output_not_a_plain_rearrangement_drops_gemm_o(post, fragment):
    sites, _ = _match(Attn(post=post), _x())
    assert sites[0].pieces == ("gemm_q", "attention")
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
