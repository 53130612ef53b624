"""Dataflow proofs by label propagation: which projection element reaches which attention element.

The matcher must prove that, between a Q projection and the SDPA call, every Q element of token ``m``
and head ``h`` depends only on projection rows ``m`` and columns of head ``h`` (so a head-sparse GEMM-Q
that skips a (q-block, head) tile changes nothing that is read); and that the input of an output
projection is the attention output rearranged with heads in column blocks (so GEMM-O may split it by
head). Rather than pattern-match every way models spell reshapes, norms and RoPE, we *run* the nodes
between the two ends on integer label tensors:

* seeds: each source tensor gets a distinct label per element group (Q side: one per (batch, row, head
  column block); O side: one per element);
* shape ops (view, permute, cat, getitem, unbind, ...) run for real on the labels, so labels move
  exactly as the data does;
* elementwise ops keep the label when their on-path operands agree, otherwise the result is ``POISON``;
  off-path operands (RoPE tables, norm weights, scalars) do not depend on the sources;
* reductions (mean, norms over the last dims, softmax) keep the label only if it is constant over the
  reduced dims: a norm over one head keeps it, a norm over all heads poisons it;
* unknown ops poison their output and record the op name (the reason shown to the user).

Checking the labels that arrive at the far end is then a proof for the traced shapes.
"""

from __future__ import annotations

import operator
import sys
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["OFF", "UNDEF", "POISON", "LabelRun", "op_name", "is_linear", "is_sdpa", "linear_args",
           "value_users", "tensor_meta"]

OFF, UNDEF, POISON = -1, -2, -3
LABEL_DTYPE = torch.int32  # half the memory of int64; every label count here is < 2**31 (checked)

_FN_NAMES: dict[Any, str] = {
    operator.getitem: "getitem", operator.setitem: "setitem", operator.add: "add", operator.sub: "sub",
    operator.mul: "mul", operator.truediv: "div", operator.neg: "neg", operator.pow: "pow",
    torch.cat: "cat", torch.concat: "cat", torch.stack: "stack", torch.unbind: "unbind", torch.chunk: "chunk",
    torch.split: "split", torch.reshape: "reshape", torch.permute: "permute", torch.transpose: "transpose",
    torch.flatten: "flatten", torch.unflatten: "unflatten", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
    torch.narrow: "narrow", torch.select: "select", torch.clone: "clone", torch.movedim: "movedim",
    torch.swapaxes: "transpose", torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div",
    torch.neg: "neg", torch.pow: "pow", torch.rsqrt: "rsqrt", torch.sqrt: "sqrt", torch.exp: "exp",
    torch.sin: "sin", torch.cos: "cos", torch.tanh: "tanh", torch.sigmoid: "sigmoid", torch.abs: "abs",
    torch.reciprocal: "reciprocal", torch.clamp: "clamp", torch.mean: "mean", torch.sum: "sum",
    torch.amax: "amax", torch.amin: "amin", torch.softmax: "softmax", torch.empty_like: "empty_like",
    torch.zeros_like: "zeros_like", torch.ones_like: "ones_like", torch.full_like: "full_like",
    torch.rms_norm: "rms_norm", torch.layer_norm: "layer_norm", F.rms_norm: "rms_norm",
    F.layer_norm: "layer_norm", F.gelu: "gelu", F.silu: "silu", F.softmax: "softmax", F.linear: "linear",
    F.scaled_dot_product_attention: "sdpa", F.dropout: "dropout",
}

SHAPE_OPS = {"view", "reshape", "permute", "transpose", "flatten", "unflatten", "unbind", "chunk", "split",
             "split_with_sizes", "squeeze", "unsqueeze", "getitem", "cat", "stack", "narrow", "select",
             "clone", "movedim", "expand", "repeat", "contiguous", "swapaxes"}
IDENTITY_OPS = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "detach", "cpu", "cuda"}
ELEMENTWISE_OPS = {"add", "sub", "mul", "div", "truediv", "neg", "pow", "rsqrt", "sqrt", "exp", "sin", "cos",
                   "tanh", "sigmoid", "abs", "reciprocal", "clamp", "gelu", "silu"}
REDUCE_OPS = {"mean", "sum", "amax", "amin"}
NORM_OPS = {"rms_norm", "layer_norm"}
LIKE_OPS = {"empty_like", "zeros_like", "ones_like", "full_like"}
# Ops that move values without arithmetic: the only ones allowed between SDPA and an output projection.
MOVE_OPS = SHAPE_OPS | IDENTITY_OPS
KNOWN_OPS = SHAPE_OPS | IDENTITY_OPS | ELEMENTWISE_OPS | REDUCE_OPS | NORM_OPS | LIKE_OPS | {"softmax", "setitem"}


def op_name(n: fx.Node) -> Optional[str]:
    """A short name for a call node (``"view"``, ``"linear"``, ``"sdpa"``...), ``None`` for others."""
    if n.op == "call_method":
        return n.target
    if n.op == "call_function":
        return _FN_NAMES.get(n.target, getattr(n.target, "__name__", str(n.target)))
    return None


def is_linear(n: fx.Node) -> bool:
    return n.op == "call_function" and op_name(n) == "linear"


def is_sdpa(n: fx.Node) -> bool:
    return n.op == "call_function" and (op_name(n) == "sdpa" or n.target is torch._C._nn.scaled_dot_product_attention)


def linear_args(n: fx.Node) -> tuple[Any, Any, Any]:
    """``(input, weight, bias)`` of a linear node, positional or keyword."""
    a = list(n.args) + [None] * (3 - len(n.args))
    return (n.kwargs.get("input", a[0]), n.kwargs.get("weight", a[1]), n.kwargs.get("bias", a[2]))


def tensor_meta(n: Any) -> Optional[torch.Tensor]:
    if isinstance(n, fx.Node):
        v = n.meta.get("example_value", n.meta.get("val"))
        if isinstance(v, torch.Tensor):
            return v
    return None


def _concrete(v: Any) -> Any:
    if isinstance(v, torch.SymInt):
        return int(v.node.hint) if getattr(v.node, "hint", None) is not None else None
    return v


def value_users(n: fx.Node) -> list[fx.Node]:
    """Users of ``n`` that read its values (a ``type_as(x, n)`` or ``empty_like(n)`` only reads metadata)."""
    out = []
    for u in n.users:
        name = op_name(u)
        if name in ("type_as", "new_empty", "new_zeros", "size", "dim") and u.args and u.args[0] is not n:
            continue
        if name in LIKE_OPS or name in ("size", "dim"):
            continue
        if u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] in ("shape", "dtype", "device"):
            continue
        out.append(u)
    return out


def _shape(n: fx.Node) -> Optional[tuple[int, ...]]:
    t = tensor_meta(n)
    if t is None:
        return None
    s = tuple(_concrete(d) for d in t.shape)
    return None if any(d is None for d in s) else s


def _combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal labels stay, OFF yields to the other, anything else is POISON."""
    return torch.where(a == b, a, torch.where(a == OFF, b, torch.where(b == OFF, a, torch.full_like(a, POISON))))


def _reduce(lab: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    dims = tuple(d % lab.dim() for d in dims) if lab.dim() else ()
    if not dims:
        return lab
    hi = torch.where(lab == OFF, torch.full_like(lab, -10), lab).amax(dim=dims, keepdim=keepdim)
    lo = torch.where(lab == OFF, torch.full_like(lab, torch.iinfo(lab.dtype).max), lab).amin(dim=dims, keepdim=keepdim)
    return torch.where(hi == -10, torch.full_like(hi, OFF), torch.where(hi == lo, hi, torch.full_like(hi, POISON)))


class LabelRun:
    """Runs the ``path`` nodes of a graph on label tensors, in graph order.

    ``seeds`` maps source nodes to their label tensors. Tensor arguments that are neither seeds nor on
    the path are off-path (``OFF`` labels). ``problems`` collects, per node, why labels were poisoned.
    """

    def __init__(self, seeds: dict[fx.Node, torch.Tensor], path: Iterable[fx.Node], keep: Iterable[fx.Node] = ()):
        self.env: dict[fx.Node, Any] = dict(seeds)
        self.problems: dict[fx.Node, str] = {}
        order = {n: i for i, n in enumerate(next(iter(seeds)).graph.nodes)} if seeds else {}
        self.path = sorted(set(path) - set(seeds), key=lambda n: order[n])
        keep = set(keep)
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.path):
            for a in n.all_input_nodes:
                last_use[a] = i
        poisoned: set[fx.Node] = set()
        for i, n in enumerate(self.path):
            self.env[n] = self._eval(n)
            if _contains(self.env[n], POISON):
                if n not in self.problems and not any(a in poisoned for a in n.all_input_nodes):
                    self.problems[n] = f"{op_name(n)} combines values of different tokens or heads"
                poisoned.add(n)
            for a in n.all_input_nodes:     # free labels nobody needs any more (they can be large)
                if last_use.get(a) == i and a not in keep and a in self.env and a.op != "placeholder":
                    if not any(u.op == "call_function" and u.target is operator.setitem for u in a.users):
                        del self.env[a]

    def labels(self, n: fx.Node) -> Optional[torch.Tensor]:
        v = self.env.get(n)
        return v if isinstance(v, torch.Tensor) else None

    # -- evaluation ---------------------------------------------------------------------------------
    def _arg(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in self.env:
                return self.env[a]
            t = tensor_meta(a)
            if t is not None:
                shape = _shape(a)
                if shape is None:
                    raise _Unsupported(f"{a.name} has a symbolic shape")
                return _Off(shape)
            v = a.meta.get("example_value")
            v = _concrete(v)
            if v is None and "example_value" in a.meta:
                raise _Unsupported(f"{a.name} is symbolic")
            return v
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self._arg(v) for k, v in a.items()}
        if isinstance(a, torch.SymInt):
            c = _concrete(a)
            if c is None:
                raise _Unsupported("symbolic size")
            return c
        return a

    def _eval(self, n: fx.Node) -> Any:
        name = op_name(n)
        try:
            args, kwargs = self._arg(n.args), self._arg(n.kwargs)
            out_shape = _shape(n)
            if name in SHAPE_OPS:
                args, kwargs = _materialize(args), _materialize(kwargs)
                if n.op == "call_method":
                    return getattr(args[0], name)(*args[1:], **kwargs)
                if name == "getitem" and not isinstance(args[0], torch.Tensor):
                    return args[0][args[1]]
                if name == "getitem" and _has_tensor(args[1]):
                    raise _Unsupported("indexing with a tensor")
                return n.target(*args, **kwargs)
            if name in IDENTITY_OPS:
                x = args[0]
                if isinstance(x, _Off):
                    return x
                if out_shape is not None and tuple(x.shape) != out_shape:
                    raise _Unsupported(f"{name} changes the shape")
                return x
            if name in ELEMENTWISE_OPS:
                labs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
                if out_shape is None:
                    raise _Unsupported("unknown output shape")
                res = None
                for lab in labs:
                    lab = torch.broadcast_to(lab, out_shape)
                    res = lab if res is None else _combine(res, lab)
                return _Off(out_shape) if res is None else res.clone()
            if name in REDUCE_OPS:
                x = args[0]
                dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
                dims = tuple(range(x.dim())) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
                return _reduce(x, dims, bool(keepdim))
            if name in NORM_OPS:
                x = args[0]
                k = len(args[1]) if isinstance(args[1], (list, tuple)) else 1
                dims = tuple(range(x.dim() - k, x.dim()))
                return torch.broadcast_to(_reduce(x, dims, True), x.shape).clone()
            if name == "softmax":
                x = args[0]
                dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
                return torch.broadcast_to(_reduce(x, (dim,), True), x.shape).clone()
            if name in LIKE_OPS:
                if out_shape is None:
                    raise _Unsupported("unknown output shape")
                return torch.full(out_shape, UNDEF if name == "empty_like" else OFF, dtype=LABEL_DTYPE)
            if name == "setitem" and n.op == "call_function":
                target, idx, value = args[0], args[1], args[2]
                if not isinstance(target, torch.Tensor) or _has_tensor(idx):
                    raise _Unsupported("setitem on an off-path tensor or with a tensor index")
                value = _materialize(value) if isinstance(value, _Off) else value
                target[idx] = value if isinstance(value, torch.Tensor) else OFF
                return None
            raise _Unsupported(f"op {name!r} is not known to keep tokens and heads apart")
        except _Unsupported as e:
            self.problems[n] = str(e)
        except Exception as e:  # a shape op we replayed wrongly: never fatal, just unproven
            self.problems[n] = f"could not replay {name!r}: {type(e).__name__}: {e}"
        shape = _shape(n)
        return torch.full(shape, POISON, dtype=LABEL_DTYPE) if shape is not None else None


class _Unsupported(Exception):
    pass


class _Off:
    """An off-path tensor argument: only its shape matters."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _contains(x: Any, value: int) -> bool:
    if isinstance(x, torch.Tensor):
        return bool((x == value).any())
    if isinstance(x, (list, tuple)):
        return any(_contains(a, value) for a in x)
    return False


def _has_tensor(x: Any) -> bool:
    if isinstance(x, (torch.Tensor, _Off)):
        return True
    if isinstance(x, (list, tuple)):
        return any(_has_tensor(a) for a in x)
    return False


def _materialize(x: Any) -> Any:
    if isinstance(x, _Off):
        return torch.full(x.shape, OFF, dtype=LABEL_DTYPE)
    if isinstance(x, (list, tuple)):
        return type(x)(_materialize(a) for a in x)
    if isinstance(x, dict):
        return {k: _materialize(v) for k, v in x.items()}
    return x


def backward_path(start: fx.Node, stop: Callable[[fx.Node], bool]) -> tuple[set[fx.Node], list[fx.Node], list[str]]:
    """Nodes between ``start`` and the ``stop`` nodes above it (through known ops only).

    Returns ``(path, sources, blocked)``: ``path`` holds the nodes that reach a source (``start``
    included), ``sources`` the stop nodes reached, ``blocked`` the unknown ops met on the way.
    Nodes mutated by ``setitem`` bring the ``setitem`` and its value along.
    """
    reach: dict[fx.Node, bool] = {}
    sources: list[fx.Node] = []
    blocked: list[str] = []
    on_stack: set[fx.Node] = set()

    def inputs(n: fx.Node) -> list[fx.Node]:
        ins = list(n.all_input_nodes)
        name = op_name(n)
        if name in LIKE_OPS:            # reads only the shape/dtype of its argument
            ins = []
        elif name == "type_as":         # reads only the dtype of its second argument
            ins = [n.args[0]] if isinstance(n.args[0], fx.Node) else []
        for u in n.users:
            if u.op == "call_function" and u.target is operator.setitem and u.args[0] is n:
                ins.append(u)
        return ins

    def visit(n: fx.Node) -> bool:
        if n in reach:
            return reach[n]
        if n in on_stack:
            return False
        if stop(n):
            reach[n] = True
            sources.append(n)
            return True
        name = op_name(n)
        if name is None or name not in KNOWN_OPS:
            if name is not None:
                blocked.append(name)
            reach[n] = False
            return False
        on_stack.add(n)
        r = False
        for a in inputs(n):
            r = visit(a) or r
        on_stack.discard(n)
        reach[n] = r
        return r

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))  # paths are short, but a residual chain can be long
    try:
        visit(start)
    finally:
        sys.setrecursionlimit(limit)
    path = {n for n, r in reach.items() if r and n not in sources}
    return path, sources, blocked
