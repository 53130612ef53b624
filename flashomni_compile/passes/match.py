"""Find attention sites in Dynamo's torch-level FX graph. Returns data; mutates nothing.

``find_sites(gm, config) -> (sites, rejected)``. For every ``scaled_dot_product_attention`` node:

1. *Can the attention itself be rewritten?* Not causal, no dropout, no GQA head mismatch, 4-D inputs
   of one float dtype, head dim 16..256, no autograd, static shapes, and a mask that is either absent
   or provably a key-padding mask (bool, constant over heads and queries). Otherwise: ``Rejected``.
2. *GEMM-Q*: the linears feeding Q (separate, fused QKV, per-stream and concatenated) are found by
   walking up through known ops; ``flow.LabelRun`` then proves that each Q element of token ``n``, head
   ``h`` reads only rows ``n - row_offset`` and head-``h`` columns of one projection, and that the
   projection's Q columns flow nowhere else.
3. *GEMM-KV*: the same label run proves, for each linear feeding K (V), that K (V) element of kv token
   ``n``, head ``h`` reads only its rows ``n - row_offset`` and head-``h`` columns, that all its ``H*D``
   columns go to K (V) alone (a fused QKV or KV linear stays dense), and that nothing off the K (V) path
   reads its output: then a tile whose keys/values no computed q-block attends to may be skipped.
4. *GEMM-O*: the linears consuming the attention output (possibly split into text/image streams, or
   concatenated with an MLP branch in single-stream blocks) are proven to read it with heads in column
   blocks, rows ``row_offset ...``.

Pieces that cannot be proven stay dense; the site is still a site and ``notes`` says why. Module names
(``nn_module_stack``) only name sites and break ties; they never decide a match.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, NamedTuple, Optional

import torch
import torch.fx as fx

from ..config import FlashOmniConfig
from . import flow
from .flow import OFF, POISON, UNDEF, is_linear, is_sdpa, linear_args, op_name, tensor_meta, value_users
from .sites import AttentionSite, OutProjection, Projection, Rejected

__all__ = ["find_sites", "site_name"]

log = logging.getLogger("flashomni_compile")

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
_TEXT_HINTS = ("add_", "context", "encoder", "txt", "text")


def site_name(n: fx.Node) -> str:
    """Readable module path of a node from ``nn_module_stack`` (``transformer_blocks.0.attn``), else its name."""
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return n.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"(\.)?__dict__\['_modules'\]\['([^']+)'\]", r".\2", path)
    path = re.sub(r"(\.)?_modules\['([^']+)'\]", r".\2", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".") or n.name


def _sdpa_args(n: fx.Node) -> dict[str, Any]:
    a = dict(_SDPA_DEFAULTS)
    a.update(zip(_SDPA_ARGS, n.args))
    a.update(n.kwargs)
    return a


def _static(shape) -> Optional[tuple[int, ...]]:
    return None if any(not isinstance(d, int) for d in shape) else tuple(shape)


def find_sites(gm: fx.GraphModule, config: Optional[FlashOmniConfig] = None) -> tuple[list[AttentionSite], list[Rejected]]:
    """Every SDPA node of ``gm`` as either an ``AttentionSite`` or a ``Rejected`` (with reasons)."""
    config = config or FlashOmniConfig()
    sites, rejected = [], []
    for n in list(gm.graph.nodes):
        if not is_sdpa(n):
            continue
        r = _match(n, config)
        (sites if isinstance(r, AttentionSite) else rejected).append(r)
        if isinstance(r, AttentionSite):
            log.debug("site %s: kind=%s pieces=%s heads=%d head_dim=%d Nq=%d Nkv=%d text_len=%d%s", r.name, r.kind,
                      "+".join(r.pieces), r.heads, r.head_dim, r.seq_q, r.seq_kv, r.text_len,
                      f" notes: {'; '.join(r.notes)}" if r.notes else "")
        else:
            log.debug("left alone %s: %s", r.name, r.reason)
    return sites, rejected


# ---------------------------------------------------------------------------------------------------
# 1. the attention call itself
# ---------------------------------------------------------------------------------------------------
def _check_attention(n: fx.Node, a: dict) -> tuple[list[str], Optional[tuple]]:
    reasons = []
    q, k, v = (tensor_meta(a[x]) for x in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return ["query/key/value are not traced tensors"], None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return [f"inputs are not 4-D [B, H, N, D] (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"], None
    qs, ks, vs = (_static(t.shape) for t in (q, k, v))
    if qs is None or ks is None or vs is None:
        return ["dynamic (symbolic) shapes are not supported yet"], None
    B, H, Nq, D = qs
    if a["is_causal"] is not False:
        reasons.append("causal attention (is_causal=True): the sparse kernels compute bidirectional attention")
    if isinstance(a["dropout_p"], fx.Node) or float(a["dropout_p"]) != 0.0:
        reasons.append(f"attention dropout (dropout_p={a['dropout_p']}) is not supported")
    if ks[1] != H or vs[1] != H:
        reasons.append(f"grouped-query attention: q has {H} heads, k {ks[1]}, v {vs[1]}")
    if ks[0] != B or vs[0] != B or ks[2] != vs[2]:
        reasons.append(f"batch/sequence mismatch: q {qs}, k {ks}, v {vs}")
    if ks[3] != D or vs[3] != D:
        reasons.append(f"head dims differ: q {D}, k {ks[3]}, v {vs[3]}")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        reasons.append(f"head dim {D} is outside the supported {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        reasons.append(f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of float16, bfloat16, float32")
    if q.requires_grad or k.requires_grad or v.requires_grad:
        reasons.append("inputs require grad (training): the flashomni site ops have no backward; "
                       "run under torch.no_grad() / inference_mode()")
    if isinstance(a["scale"], fx.Node):
        reasons.append("scale is a traced value, not a constant")
    return reasons, (B, H, Nq, D, ks[2])


def _key_padding(mask: Any, B: int, H: int, Nq: int, Nkv: int) -> tuple[Optional[tuple[fx.Node, int]], Optional[str]]:
    """``(mask node [Bm, ..., Nkv], Bm)`` if ``mask`` is provably a key-padding mask, else a reason."""
    if mask is None:
        return None, None
    if not isinstance(mask, fx.Node) or tensor_meta(mask) is None:
        return None, f"attn_mask {mask!r} is not a tensor"
    m = mask
    # Broadcasting copies values, so a mask expanded from [B, 1, 1, N] is still constant over (H, Nq).
    while op_name(m) in ("expand", "expand_as", "broadcast_to") and isinstance(m.args[0], fx.Node):
        m = m.args[0]
    t = tensor_meta(m)
    if t.dtype != torch.bool:
        return None, (f"float attn_mask ({t.dtype}, shape {tuple(t.shape)}): an additive mask cannot be "
                      "proven to be a key-padding mask; pass a bool mask")
    shape = _static(t.shape)
    if shape is None:
        return None, "attn_mask has a symbolic shape"
    s4 = (1,) * (4 - len(shape)) + shape
    if len(shape) > 4 or s4[1] != 1 or s4[2] != 1 or s4[0] not in (1, B) or s4[3] != Nkv:
        return None, (f"bool attn_mask of shape {shape} varies over heads or queries (need [B, 1, 1, Nkv] "
                      f"= [{B}, 1, 1, {Nkv}], possibly expanded): not a key-padding mask")
    return (m, s4[0]), None


# ---------------------------------------------------------------------------------------------------
# 2. GEMM-Q: projections feeding Q
# ---------------------------------------------------------------------------------------------------
def _seed_q(L: fx.Node, D: int, base: int) -> tuple[torch.Tensor, int, Optional[tuple[int, int, int]]]:
    """Labels of a projection output: one per (batch, row, D-wide column block)."""
    shape = _static(tensor_meta(L).shape)
    if shape is not None and len(shape) == 3:
        b, m, c = shape
        nh = -(-c // D)
        lab = base + torch.arange(b * m * nh, dtype=flow.LABEL_DTYPE).view(b, m, nh)
        return lab.repeat_interleave(D, dim=2)[..., :c].contiguous(), base + b * m * nh, (b, m, nh)
    numel = math.prod(shape) if shape else 1
    return base + torch.arange(numel, dtype=flow.LABEL_DTYPE).view(shape or ()), base + numel, None


class _Flow(NamedTuple):
    """The label run shared by the Q and K/V proofs. ``paths``, ``srcs``, ``blocked``: per role (``"q"``,
    ``"k"``, ``"v"``) what ``flow.backward_path`` found above that SDPA input; ``info[L]``: the label range
    ``[lo, hi)`` of linear ``L`` and its ``(b, m, column blocks)`` (None when not ``[B, M, C]``); ``run``:
    the labels that reach Q, K and V (None when no linear feeds any of them)."""

    paths: dict
    srcs: dict
    blocked: dict
    info: dict
    run: Optional[flow.LabelRun]


def _trace(site_q: fx.Node, k: fx.Node, v: fx.Node, D: int) -> _Flow:
    """Walk up from Q, K and V to the linears above them and run one label flow from all of them."""
    paths, srcs, blocked = {}, {}, {}
    for role, x in (("q", site_q), ("k", k), ("v", v)):
        paths[role], srcs[role], blocked[role] = flow.backward_path(x, is_linear)
    linears = list(dict.fromkeys(srcs["q"] + srcs["k"] + srcs["v"]))
    seeds, info, base = {}, {}, 0
    for L in linears:
        lab, nxt, shp = _seed_q(L, D, base)
        seeds[L], info[L] = lab, (base, nxt, shp)
        base = nxt
    run = flow.LabelRun(seeds, paths["q"] | paths["k"] | paths["v"], keep={site_q, k, v}) if seeds else None
    return _Flow(paths, srcs, blocked, info, run)


def _no_linear_note(piece: str, tensor: str, blocked: list) -> str:
    """The note for an SDPA input with no linear above it (``blocked``: the ops the walk up stopped at)."""
    why = f" (the way up is blocked by {', '.join(sorted(set(blocked)))})" if blocked else ""
    return f"{piece}: no linear projection found above {tensor}{why}"


def _prove_q(fl: _Flow, site_q: fx.Node, k: fx.Node, v: fx.Node, sdpa: fx.Node, dims) -> tuple[list[Projection], list[tuple[int, int, fx.Node]], list[str], tuple[str, ...], dict]:
    """Returns ``(projections, segments, notes, seen, sources)``; segments: (row_offset, rows, linear)."""
    B, H, N, D, Nkv = dims
    paths, srcs, info, run = fl.paths, fl.srcs, fl.info, fl.run
    if not srcs["q"]:
        return [], [], [_no_linear_note("GEMM-Q", "Q", fl.blocked["q"])], (), srcs
    seen = tuple(sorted({s for s, names in (("qk_norm", ("rms_norm", "layer_norm", "rsqrt")),
                                               ("rope", ("setitem", "neg")))
                         if any(op_name(p) in names for p in paths["q"])}))
    lab4 = run.labels(site_q)
    notes: list[str] = []
    problems = "; ".join(f"{site_name(p)}: {why}" for p, why in run.problems.items() if p in paths["q"])
    if lab4 is None or tuple(lab4.shape) != (B, H, N, D):
        return [], [], [f"GEMM-Q: could not follow Q from its projection ({problems or 'unknown shapes'})"], seen, srcs
    lab = lab4[..., 0]
    if not bool((lab4 == lab[..., None]).all()) or bool((lab < 0).any()):
        bad = "tokens/heads are mixed" if bool((lab == POISON).any()) else \
            "part of Q does not come from a projection" if bool((lab == OFF).any()) else \
            "part of Q is never written" if bool((lab == UNDEF).any()) else "head dims are mixed"
        return [], _segments_from(lab, info), [f"GEMM-Q: not head-local ({bad}{': ' + problems if problems else ''})"], seen, srcs
    projections = []
    for L, (lo, hi, shp) in info.items():
        mask = (lab >= lo) & (lab < hi)
        if not bool(mask.any()):
            continue
        if shp is None:
            return [], [], [f"GEMM-Q: projection {L.name} is not [B, M, C]"], seen, srcs
        span = _row_map(lab, mask, lo, shp)
        if span == "partial":
            return [], [], [f"GEMM-Q: {L.name} feeds only some heads of some tokens"], seen, srcs
        if span is None:
            return [], [], [f"GEMM-Q: rows/heads of {L.name} do not map one-to-one onto Q tokens/heads"], seen, srcs
        off, cnt = span
        nh = shp[2]
        if L in srcs["k"] or L in srcs["v"]:  # fused QKV: Q columns must not leak into K or V
            for x in (k, v):
                lx = run.labels(x)
                inl = (lx >= lo) & (lx < hi)
                if lx is None or bool((lx == POISON).any()) or bool((lx == UNDEF).any()) \
                        or bool((((lx - lo) % nh)[inl] < H).any()):
                    return [], [], [f"GEMM-Q: fused projection {L.name} cannot be proven to keep Q columns out of K/V"], seen, srcs
        projections.append(Projection(L, off, cnt, H * D))
    path_all = paths["q"] | paths["k"] | paths["v"]
    for P in projections:
        leak = _escapes(P.node, path_all, sdpa)
        if leak:
            return [], [(p.row_offset, p.rows, p.node) for p in projections], \
                [f"GEMM-Q: output of {P.node.name} is also read by {leak}"], seen, srcs
    covered = sum(p.rows for p in projections)
    if covered != N:
        return [], [], [f"GEMM-Q: projections cover {covered} of {N} Q rows"], seen, srcs
    return projections, [(p.row_offset, p.rows, p.node) for p in projections], notes, seen, srcs


def _row_map(lab: torch.Tensor, mask: torch.Tensor, lo: int, shp: tuple[int, int, int]):
    """Where one linear's labels land in ``lab [B, H, N]`` (the labels of an SDPA input, one per batch,
    head, token): ``mask`` marks them, ``lo`` is the linear's first label, ``shp`` its ``(b, m, column
    blocks)``. Returns ``(row_offset, rows)`` when they fill whole tokens (every head), token ``n`` of
    batch ``b``, head ``h`` holding the linear's row ``n - row_offset``, batch ``b``, column block ``h``,
    and every row of the linear is used; ``"partial"`` when some tokens get only some heads; else None."""
    B, H, N = lab.shape
    b_, m_, nh = shp
    rows = mask.all(dim=0).all(dim=0)
    if not bool((mask.any(dim=0).any(dim=0) == rows).all()):
        return "partial"
    idx = rows.nonzero().flatten()
    off, cnt = int(idx[0]), int(idx.numel())
    rel = lab - lo
    j, m, b = rel % nh, (rel // nh) % m_, rel // (nh * m_)
    hh = torch.arange(H).view(1, H, 1).expand(B, H, N)
    bb = torch.arange(B).view(B, 1, 1).expand(B, H, N)
    nn_ = torch.arange(N).view(1, 1, N).expand(B, H, N)
    ok = (cnt == m_ and int(idx[-1]) - off + 1 == cnt and b_ == B
          and bool((j[mask] == hh[mask]).all()) and bool((b[mask] == bb[mask]).all())
          and bool((m[mask] == nn_[mask] - off).all()))
    return (off, cnt) if ok else None


def _prove_kv(fl: _Flow, k: fx.Node, v: fx.Node, sdpa: fx.Node, dims) -> tuple[list[Projection], list[str]]:
    """Returns ``(K and V projections, notes)``. Each linear feeding K (V) is proven on its own: its
    labels must reach K (V) whole tokens at a time, row ``n - row_offset`` to kv token ``n`` and column
    block ``h`` to head ``h``; its ``H*D`` columns must all go to K (V) and nowhere else (a fused QKV or
    KV linear stays dense); and nothing off the K (V) path may read it (``_escapes``). K (V) elements
    that come from no linear (``OFF``) are allowed; mixed tokens/heads (``POISON``) are not."""
    B, H, N, D, Nkv = dims
    projections: list[Projection] = []
    notes: list[str] = []
    fused_noted: set[fx.Node] = set()
    for role, x in (("k", k), ("v", v)):
        name, others = role.upper(), [r for r in ("q", "k", "v") if r != role]
        if not fl.srcs[role]:
            notes.append(_no_linear_note("GEMM-KV", name, fl.blocked[role]))
            continue
        lab4 = fl.run.labels(x)
        problems = "; ".join(f"{site_name(p)}: {why}" for p, why in fl.run.problems.items() if p in fl.paths[role])
        if lab4 is None or tuple(lab4.shape) != (B, H, Nkv, D):
            notes.append(f"GEMM-KV: could not follow {name} from its projection ({problems or 'unknown shapes'})")
            continue
        lab = lab4[..., 0]
        if not bool((lab4 == lab[..., None]).all()) or bool(((lab == POISON) | (lab == UNDEF)).any()):
            bad = "tokens/heads are mixed" if bool((lab == POISON).any()) else \
                "part of it is never written" if bool((lab == UNDEF).any()) else "head dims are mixed"
            notes.append(f"GEMM-KV: {name} is not head-local ({bad}{': ' + problems if problems else ''})")
            continue
        for L in fl.srcs[role]:
            shared = [r.upper() for r in others if L in fl.srcs[r]]
            if shared:
                if L not in fused_noted:
                    fused_noted.add(L)
                    feeds = "/".join(r for r in "QKV" if r in shared + [name])
                    notes.append(f"GEMM-KV: {L.name} feeds {feeds} together (a fused projection): left dense")
                continue
            lo, hi, shp = fl.info[L]
            mask = (lab >= lo) & (lab < hi)
            cols = _static(tensor_meta(L).shape)
            if shp is None or cols is None or cols[-1] != H * D:
                notes.append(f"GEMM-KV: projection {L.name} is not [B, M, H*D] = [{B}, M, {H * D}]")
                continue
            if not bool(mask.any()):
                notes.append(f"GEMM-KV: {L.name} does not reach {name}")
                continue
            span = _row_map(lab, mask, lo, shp)
            if span is None or span == "partial":
                notes.append(f"GEMM-KV: rows/heads of {L.name} do not map one-to-one onto {name} tokens/heads")
                continue
            leak = _escapes(L, fl.paths[role], sdpa)
            if leak:
                notes.append(f"GEMM-KV: output of {L.name} is also read by {leak}")
                continue
            projections.append(Projection(L, span[0], span[1], H * D, role))
    return projections, notes


def _segments_from(lab: torch.Tensor, info: dict) -> list[tuple[int, int, fx.Node]]:
    """Best-effort row ranges of each projection even when the proof failed (for naming text/image)."""
    segs = []
    for L, (lo, hi, shp) in info.items():
        rows = ((lab >= lo) & (lab < hi)).any(dim=0).any(dim=0).nonzero().flatten()
        if rows.numel() and int(rows[-1]) - int(rows[0]) + 1 == rows.numel():
            segs.append((int(rows[0]), int(rows.numel()), L))
    return segs


def _escapes(L: fx.Node, path: set, sdpa: fx.Node) -> Optional[str]:
    """Name of a node outside ``path`` that reads ``L``'s output (directly or through path nodes).
    ``sdpa``, the site's attention call, is the path's end; another attention call reading it escapes."""
    todo, seen = [L], {L}
    while todo:
        x = todo.pop()
        for u in value_users(x):
            if u is sdpa:
                continue
            if u not in path:
                return f"{u.name} ({op_name(u) or u.op})"
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return None


# ---------------------------------------------------------------------------------------------------
# 3. GEMM-O: projections consuming the attention output
# ---------------------------------------------------------------------------------------------------
def _prove_o(sdpa: fx.Node, dims) -> tuple[list[OutProjection], list[str], bool]:
    """Returns ``(out projections, notes, single_stream)``."""
    B, H, N, D, _ = dims
    HD = H * D
    if B * N * H * D >= 2**31:
        return [], [f"GEMM-O: {B}x{N}x{H}x{D} attention output is too large to label with int32"], False
    fwd, terminals, escapes, todo = set(), [], [], [sdpa]
    while todo:
        x = todo.pop()
        for u in value_users(x):
            if is_linear(u):
                if linear_args(u)[0] is x and u not in terminals:
                    terminals.append(u)
                elif linear_args(u)[0] is not x:
                    escapes.append(f"{u.name} (as a weight)")
            elif op_name(u) in flow.MOVE_OPS:
                if u not in fwd:
                    fwd.add(u)
                    todo.append(u)
            else:
                escapes.append(f"{u.name} ({op_name(u) or u.op})")
    notes = []
    if not terminals:
        return [], [f"GEMM-O: no linear projection reads the attention output (it goes to {', '.join(escapes) or 'nothing'})"], False
    seed = torch.arange(B * N * H * D, dtype=flow.LABEL_DTYPE).view(B, N, H, D).permute(0, 2, 1, 3)
    run = flow.LabelRun({sdpa: seed}, fwd, keep=[linear_args(t)[0] for t in terminals])
    flat = seed.permute(0, 2, 1, 3).reshape(B, N, HD)
    outs, single = [], False
    for L in terminals:
        inp = linear_args(L)[0]
        lab = run.labels(inp) if inp is not sdpa else None
        a_node, extra = inp, None
        if lab is None or lab.dim() != 3 or lab.shape[0] != B:
            notes.append(f"GEMM-O: input of {L.name} is not [B, M, H*D]")
            continue
        if op_name(inp) == "cat" and lab.shape[-1] > HD:
            pieces = inp.args[0] if inp.args else inp.kwargs.get("tensors")
            dim = inp.kwargs.get("dim", inp.args[1] if len(inp.args) > 1 else 0)
            if dim in (-1, 2) and len(pieces) == 2 and all(isinstance(p, fx.Node) for p in pieces):
                a_node, extra = pieces
                single = True
                if not bool((lab[..., HD:] == OFF).all()):
                    notes.append(f"GEMM-O: the part of {L.name}'s input after the attention columns is not independent of it")
                    continue
                lab = lab[..., :HD]
        if lab.shape[-1] != HD or int(lab[0, 0, 0]) < 0:
            notes.append(f"GEMM-O: {L.name} reads {lab.shape[-1]} columns, not the {HD} attention columns first")
            continue
        off, M = (int(lab[0, 0, 0]) // HD) % N, lab.shape[1]
        if off + M > N or not torch.equal(lab, flat[:, off:off + M]):
            notes.append(f"GEMM-O: {L.name}'s input is not the attention output with heads in column blocks")
            continue
        outs.append(OutProjection(L, a_node, extra, off, M))
    if escapes and outs:
        log.debug("attention output %s is also read by %s (left dense there)", sdpa.name, ", ".join(escapes))
    return outs, notes, single


# ---------------------------------------------------------------------------------------------------
# Site assembly
# ---------------------------------------------------------------------------------------------------
def _token_segments(x: Any, depth: int = 16) -> Optional[list[int]]:
    """Sizes of a token-dim ``cat`` that ``x [B, M, C]`` is built from through per-token ops, if any."""
    shape = _static(tensor_meta(x).shape) if tensor_meta(x) is not None else None
    while depth and isinstance(x, fx.Node) and shape is not None and len(shape) == 3:
        depth -= 1
        name = op_name(x)
        if name == "cat":
            dim = x.kwargs.get("dim", x.args[1] if len(x.args) > 1 else 0)
            if dim in (1, -2):
                return [tensor_meta(p).shape[1] for p in x.args[0]]
            return None
        if name in flow.NORM_OPS or name in flow.ELEMENTWISE_OPS or name in flow.IDENTITY_OPS or name == "contiguous":
            nxt = [a for a in x.all_input_nodes if tensor_meta(a) is not None and _static(tensor_meta(a).shape) == shape]
            if not nxt:
                return None
            x = nxt[0]
            continue
        return None
    return None


def _text_hint(nodes) -> bool:
    return any(h in site_name(n).lower() for n in nodes for h in _TEXT_HINTS)


def _weight(L: fx.Node) -> Optional[fx.Node]:
    w = linear_args(L)[1]
    return w if isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr") else None


def _match(n: fx.Node, cfg: FlashOmniConfig):
    a = _sdpa_args(n)
    name = site_name(n)
    reasons, dims = _check_attention(n, a)
    kp = None
    if dims is not None and not reasons:
        kp, why = _key_padding(a["attn_mask"], dims[0], dims[1], dims[2], dims[4])
        if why:
            reasons.append(why)
    if reasons:
        return Rejected(n, name, reasons)
    B, H, Nq, D, Nkv = dims
    q, k, v = a["query"], a["key"], a["value"]
    notes: list[str] = []
    fl = _trace(q, k, v, D)
    q_proj, segs, qnotes, seen, srcs = _prove_q(fl, q, k, v, n, dims)
    if not cfg.fuse_gemm_q and q_proj:
        q_proj, qnotes = [], ["GEMM-Q: disabled by fuse_gemm_q=False"]
    notes += qnotes
    kv_proj, kvnotes = _prove_kv(fl, k, v, n, dims)
    if not cfg.fuse_gemm_kv and kv_proj:
        kv_proj, kvnotes = [], ["GEMM-KV: disabled by fuse_gemm_kv=False"]
    notes += kvnotes
    o_proj, onotes, single = _prove_o(n, dims)
    if not cfg.fuse_gemm_o and o_proj:
        o_proj, onotes = [], ["GEMM-O: disabled by fuse_gemm_o=False"]
    notes += onotes

    # Text/image segments of the joint sequence: per-stream projections, else a token cat under Q's linear.
    sizes, seg_nodes = None, []
    if len(segs) >= 2:
        segs = sorted(segs, key=lambda s: s[0])
        sizes, seg_nodes = [s[1] for s in segs], [s[2] for s in segs]
    elif srcs.get("q") and len(srcs["q"]) == 1:
        sizes = _token_segments(linear_args(srcs["q"][0])[0])
    text_len, text_first = 0, True
    if sizes and len(sizes) == 2 and sum(sizes) == Nq:
        if sizes[0] != sizes[1]:
            text_first = sizes[0] < sizes[1]
        elif seg_nodes:
            text_first = not _text_hint([seg_nodes[1]]) or _text_hint([seg_nodes[0]])
        text_len = sizes[0] if text_first else sizes[1]
    q_in = {linear_args(L)[0] for L in srcs.get("q", [])}
    k_in = {linear_args(L)[0] for L in srcs.get("k", [])}
    if single:
        kind = "single"
    elif text_len:
        kind = "joint"
    elif Nq != Nkv or (q_in and k_in and q_in.isdisjoint(k_in)):
        kind = "cross"
    else:
        kind = "self"

    anchor = None
    for L in [p.node for p in q_proj] + [o.node for o in o_proj] + srcs.get("q", []) + srcs.get("k", []) + srcs.get("v", []):
        anchor = _weight(L)
        if anchor is not None:
            break
    if anchor is None:
        return Rejected(n, name, ["no per-layer weight (a graph input feeding the projections) was found to "
                                  "key the site's run-time state"])
    scale = float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(D)
    return AttentionSite(sdpa=n, name=name, kind=kind, heads=H, head_dim=D, seq_q=Nq, seq_kv=Nkv, batch=B,
                         scale=scale, anchor=anchor, key_padding=kp, text_len=text_len, text_first=text_first,
                         q_proj=q_proj, kv_proj=kv_proj, o_proj=o_proj, notes=notes, norms=seen)
