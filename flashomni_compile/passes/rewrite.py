"""Rewrite matched sites onto the ``flashomni::site_*`` ops (the only pass that mutates the graph).

Per site: register its ``SiteSpec`` (the index the ops carry), then

* ``sdpa(q, k, v, attn_mask=m)`` -> ``site_attention(q, k, v, key_padding_mask, site, anchor, scale)``,
  where ``key_padding_mask = m.reshape(Bm, Nkv).expand(B, Nkv)`` (the mask before broadcasting);
* each proven Q projection ``linear(x, W, b)`` -> ``site_linear_q(x, W, b, site, anchor, row_offset, sparse_cols)``;
* each proven K or V projection ``linear(x, W, b)`` -> ``site_linear_kv(x, W, b, site, anchor, row_offset)``;
* each proven output projection ``linear(a, W, b)`` -> ``site_linear_o(a, W, b, None, None, site, anchor,
  row_offset)``, and ``linear(cat([a, mlp], -1), W, b)`` -> ``site_linear_o(a, W[:, :H*D], b, mlp,
  W[:, H*D:], ...)`` in single-stream blocks.

``anchor`` is a weight of the site that is a graph input, so one compiled block serving every layer
(``compile_repeated_blocks``) hands the runtime a different tensor per layer.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..config import FlashOmniConfig
from ..kernels import ops  # noqa: F401  (registers torch.ops.flashomni.*)
from ..runtime.spec import SiteSpec, register_site
from .flow import linear_args
from .match import _sdpa_args
from .sites import AttentionSite

__all__ = ["rewrite_sites", "spec_of"]


def spec_of(site: AttentionSite, config: FlashOmniConfig) -> SiteSpec:
    return SiteSpec(name=site.name, kind=site.kind, heads=site.heads, head_dim=site.head_dim, seq_q=site.seq_q,
                    seq_kv=site.seq_kv, text_len=site.text_len, text_first=site.text_first, grid=None,
                    pieces=site.pieces, options=config.runtime)


def _replace(g: fx.Graph, old: fx.Node, target, args) -> fx.Node:
    with g.inserting_before(old):
        new = g.call_function(target, args)
    new.meta.update({k: v for k, v in old.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    old.replace_all_uses_with(new)
    g.erase_node(old)
    return new


def rewrite_sites(gm: fx.GraphModule, sites: list[AttentionSite], config: FlashOmniConfig) -> list[int]:
    """Rewrite ``sites`` in place; returns their ``SiteSpec`` indices (same order)."""
    g = gm.graph
    indices = []
    for s in sites:
        idx = register_site(spec_of(s, config))
        indices.append(idx)
        a = _sdpa_args(s.sdpa)
        kpm = None
        if s.key_padding is not None:
            mask, bm = s.key_padding
            with g.inserting_before(s.sdpa):
                kpm = g.call_method("reshape", (mask, bm, s.seq_kv))
                if bm != s.batch:
                    kpm = g.call_method("expand", (kpm, s.batch, s.seq_kv))
        _replace(g, s.sdpa, torch.ops.flashomni.site_attention.default,
                 (a["query"], a["key"], a["value"], kpm, idx, s.anchor, s.scale))
        for p in s.q_proj:
            x, w, b = linear_args(p.node)
            _replace(g, p.node, torch.ops.flashomni.site_linear_q.default, (x, w, b, idx, s.anchor, p.row_offset, p.sparse_cols))
        for p in s.kv_proj:
            x, w, b = linear_args(p.node)
            _replace(g, p.node, torch.ops.flashomni.site_linear_kv.default, (x, w, b, idx, s.anchor, p.row_offset))
        hd = s.heads * s.head_dim
        for o in s.o_proj:
            x, w, b = linear_args(o.node)
            w_a, w_e = w, None
            if o.extra is not None:
                with g.inserting_before(o.node):
                    w_a = g.call_function(operator.getitem, (w, (slice(None), slice(0, hd))))
                    w_e = g.call_function(operator.getitem, (w, (slice(None), slice(hd, None))))
            _replace(g, o.node, torch.ops.flashomni.site_linear_o.default,
                     (o.a, w_a, b, o.extra, w_e, idx, s.anchor, o.row_offset))
            if o.extra is not None and not x.users:   # the cat([attn, mlp]) nobody reads any more
                g.erase_node(x)
    g.lint()
    gm.recompile()
    return indices
