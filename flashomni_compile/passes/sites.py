"""The records the matcher returns: ``AttentionSite`` (one rewritable attention) and ``Rejected``.

A site, as plain torch (the shape of the subgraph the matcher looks for; every piece but the SDPA call
is optional, and any number of projections may feed one side)::

    def site(x_img, x_txt, W):                       # x_*: [B, M_s, C]
        q = cat([linear(x_txt, W.q_txt), linear(x_img, W.q_img)], dim=1)     # or one linear / fused QKV
        q = rope(norm(q.unflatten(-1, (H, D))))                              # per-token, per-head only
        ...same for k, v (GEMM-KV: separate K and V linears only, not a fused QKV/KV one)...
        o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_padding[:, None, None])
        o = o.transpose(1, 2).flatten(2)                                     # [B, N, H*D]
        o_txt, o_img = o.split([T, N - T], dim=1)                            # optional
        return linear(o_txt, W.o_txt), linear(o_img, W.o_img)                # or linear(cat([o, mlp], -1))

Shape legend: ``B`` batch, ``H`` heads, ``D`` head dim, ``N`` joint sequence, ``T`` text tokens,
``M`` rows of one projection (``row_offset`` is where they start inside the joint sequence).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

__all__ = ["Projection", "OutProjection", "AttentionSite", "Rejected", "PIECES"]

PIECES = ("gemm_q", "gemm_kv", "attention", "gemm_o")


@dataclass
class Projection:
    """A linear feeding Q (``role="q"``), K or V: ``linear(x, weight, bias)`` whose output rows are rows
    ``row_offset ...`` of the joint (Q) or key/value (K, V) sequence and whose first ``sparse_cols``
    columns are that tensor's heads (head-major). A K/V projection has exactly ``H*D`` columns."""

    node: fx.Node
    row_offset: int
    rows: int
    sparse_cols: int
    role: str = "q"                 # "q" | "k" | "v"


@dataclass
class OutProjection:
    """A linear consuming the attention output: ``linear(a, W)`` (or ``linear(cat([a, extra], -1), W)``)."""

    node: fx.Node
    a: fx.Node                      # the node holding the attention part ``[B, M, H*D]``
    extra: Optional[fx.Node]        # single-stream blocks: the MLP part concatenated after ``a``
    row_offset: int
    rows: int


@dataclass
class AttentionSite:
    """One attention site found in a graph.

    ``sdpa`` is the ``scaled_dot_product_attention`` node; ``q_proj`` / ``kv_proj`` / ``o_proj`` are the
    projections proven rewritable (empty when not proven: those stay dense, ``notes`` says why).
    """

    sdpa: fx.Node
    name: str
    kind: str                       # "self" | "joint" | "single" | "cross"
    heads: int
    head_dim: int
    seq_q: int
    seq_kv: int
    batch: int
    scale: float
    anchor: fx.Node                 # a per-layer weight: keys the run-time state
    key_padding: Optional[tuple[fx.Node, int]] = None   # (mask node before broadcasting, its batch size)
    text_len: int = 0
    text_first: bool = True
    q_proj: list[Projection] = field(default_factory=list)
    kv_proj: list[Projection] = field(default_factory=list)   # K and V projections (``role`` "k"/"v")
    o_proj: list[OutProjection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why a piece was not fused (words)
    norms: tuple[str, ...] = ()     # "qk_norm", "rope": what the Q path was seen to contain

    @property
    def pieces(self) -> tuple[str, ...]:
        return tuple(p for p, on in (("gemm_q", bool(self.q_proj)), ("gemm_kv", bool(self.kv_proj)),
                                     ("attention", True), ("gemm_o", bool(self.o_proj))) if on)


@dataclass
class Rejected:
    """An attention call left alone, with the reasons in words."""

    node: fx.Node
    name: str
    reasons: list[str]

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)
