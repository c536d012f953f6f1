"""fx capture rules for tensor operations: arithmetic, ``cat``, ``flatten`` / ``view`` /
``reshape``, reductions, shape reads (``x.shape[0]``, ``x.size(1)``), indexing, ``transpose`` /
``permute`` and ``expand``. Registered at import (through :mod:`disco_fl.partition`)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from disco_fl.partition.capture import (
    Capturer,
    _Pending,
    capture_function,
    capture_method,
    capture_module,
    emit_expand,
    eval_const,
)
from disco_fl.partition.registry import PartitionError

_BINARY: dict[Any, str] = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
}


def _binary(cap: Capturer, node: fx.Node, fn: str) -> str:
    a, b = node.args[0], node.args[1]
    if len(node.args) > 2 or node.kwargs:
        raise PartitionError(
            f"{cap.describe(node)} at {node.name!r}: extra arguments are not supported"
        )
    ta, tb = cap.is_tensor(a), cap.is_tensor(b)
    if ta and tb:
        # a tensor attribute (e.g. a positional embedding) is sharded like its partner
        va = None if cap.is_pending(a) else cap.value(a, node)
        vb = None if cap.is_pending(b) else cap.value(b, node)
        if va is None:
            va = cap.value_like(a, cap.info(vb) if vb is not None else None, node)
        if vb is None:
            vb = cap.value_like(b, cap.info(va), node)
        return cap.add(node, "binary", [va, vb], {"fn": fn})
    if ta or tb:
        scalar = cap.const(b if ta else a)
        if not isinstance(scalar, (int, float)):
            raise PartitionError(
                f"{cap.describe(node)} at {node.name!r}: non-scalar constant operand"
            )
        x = cap.value(a if ta else b, node)
        return cap.add(node, "binary", [x], {"fn": fn, "scalar": scalar, "scalar_first": tb})
    cap.consts[node] = eval_const(cap, node)
    return ""


@capture_function(*_BINARY)
def _binary_function(cap: Capturer, node: fx.Node, target: Any) -> str:
    return _binary(cap, node, _BINARY[target])


@capture_method("add", "sub", "mul", "div", "add_", "mul_")
def _binary_method(cap: Capturer, node: fx.Node, target: Any) -> str:
    return _binary(cap, node, str(node.target).rstrip("_"))


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


@capture_function(torch.cat, torch.concat)
def _cat(cap: Capturer, node: fx.Node, target: Any) -> str:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)):
        raise PartitionError(f"{cap.describe(node)}: expected a list of tensors")
    nd = len(cap.shape(node))
    d = _norm_dim(int(cap.const(dim)), nd)
    placed = {i: cap.value(t, node) for i, t in enumerate(tensors) if not cap.is_pending(t)}
    partner = next((cap.info(v) for v in placed.values() if cap.info(v).kind == "sharded"), None)
    if partner is not None and partner.cdim == d:
        partner = None  # a channel concat: attributes are not split like the other operand
    names = [
        placed[i] if i in placed else cap.value_like(t, partner, node)
        for i, t in enumerate(tensors)
    ]
    return cap.add(node, "cat", names, {"dim": d})


def _flatten(cap: Capturer, node: fx.Node, x: str, start: int, end: int) -> str:
    nd = len(cap.info(x).shape)
    attrs = {"start_dim": _norm_dim(start, nd), "end_dim": _norm_dim(end, nd)}
    return cap.add(node, "flatten", [x], attrs)


@capture_function(torch.flatten)
def _flatten_function(cap: Capturer, node: fx.Node, target: Any) -> str:
    args = list(node.args) + [None] * 3
    start = args[1] if args[1] is not None else node.kwargs.get("start_dim", 0)
    end = args[2] if args[2] is not None else node.kwargs.get("end_dim", -1)
    return _flatten(cap, node, cap.value(node.args[0], node), cap.const(start), cap.const(end))


@capture_method("flatten")
def _flatten_method(cap: Capturer, node: fx.Node, target: Any) -> str:
    return _flatten_function(cap, node, target)


@capture_module(nn.Flatten)
def _flatten_module(cap: Capturer, node: fx.Node, m: nn.Flatten) -> str:
    return _flatten(cap, node, cap.value(node.args[0], node), m.start_dim, m.end_dim)


@capture_method("view", "reshape")
def _view(cap: Capturer, node: fx.Node, target: Any) -> str:
    x = cap.value(node.args[0], node)
    src, out = cap.info(x).shape, cap.shape(node)
    if cap.info(x).kind == "replicated":
        raise PartitionError(f"{cap.describe(node)} at {node.name!r}: view/reshape of the input")
    if len(out) == 2 and out[0] == src[0]:
        return _flatten(cap, node, x, 1, -1)  # x.view(x.size(0), -1)
    raise PartitionError(
        f"{cap.describe(node)} at {node.name!r}: only flattening reshapes (B, ...) -> (B, -1) are "
        "supported; use torch.flatten"
    )


def _reduce(cap: Capturer, node: fx.Node, fn: str) -> str:
    x = cap.value(node.args[0], node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dim is None:
        raise PartitionError(f"{cap.describe(node)} at {node.name!r}: reduction over all dims")
    dims = cap.const(dim)
    dims = [dims] if isinstance(dims, int) else list(dims)
    nd = len(cap.info(x).shape)
    attrs = {
        "fn": fn,
        "dims": sorted(_norm_dim(d, nd) for d in dims),
        "keepdim": bool(cap.const(keepdim)),
    }
    return cap.add(node, "reduce", [x], attrs)


@capture_function(torch.mean, torch.sum, torch.amax)
def _reduce_function(cap: Capturer, node: fx.Node, target: Any) -> str:
    return _reduce(cap, node, {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax"}[target])


@capture_method("mean", "sum", "amax")
def _reduce_method(cap: Capturer, node: fx.Node, target: Any) -> str:
    return _reduce(cap, node, str(node.target))


def _shape_source(cap: Capturer, x: Any, node: fx.Node) -> tuple[tuple[int, ...], str | None]:
    """Shape of a tensor argument and the value it can be read from at run time (``None`` for
    a tensor attribute, whose shape is fixed: it is not placed just to read its shape)."""
    if cap.is_pending(x):
        return cap.shape(x), None
    v = cap.value(x, node)
    return cap.info(v).shape, v


@capture_method("size", "dim")
def _size(cap: Capturer, node: fx.Node, target: Any) -> str:
    shape, v = _shape_source(cap, node.args[0], node)
    if node.target == "dim":
        cap.consts[node] = len(shape)
        return ""
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if d is None:
        cap.consts[node] = torch.Size(shape)
        if v is not None:
            cap.shape_of[node] = v
    else:
        dim = _norm_dim(int(cap.const(d)), len(shape))
        cap.consts[node] = shape[dim]
        if v is not None:
            cap.dim_of[node] = (v, dim)
    return ""


@capture_function(getattr)
def _getattr(cap: Capturer, node: fx.Node, target: Any) -> str:
    obj, attr = node.args[0], node.args[1]
    if cap.is_tensor(obj) and attr == "shape":
        shape, v = _shape_source(cap, obj, node)
        cap.consts[node] = torch.Size(shape)
        if v is not None:
            cap.shape_of[node] = v
        return ""
    raise PartitionError(f"{cap.describe(node)} at {node.name!r}: attribute {attr!r} of a tensor")


def _index_entries(cap: Capturer, node: fx.Node, index: Any, ndim: int) -> list[list[Any]]:
    """``x[index]`` as one entry per dim: ``["all"]``, ``["int", i]`` or ``["slice", a, b, s]``."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for i in items if i is Ellipsis) > 1:
        raise PartitionError(f"{cap.describe(node)} at {node.name!r}: more than one Ellipsis")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (ndim - len(items) + 1)
    if len(items) > ndim:
        raise PartitionError(f"{cap.describe(node)} at {node.name!r}: too many indices")
    out: list[list[Any]] = []
    for i in items:
        if isinstance(i, bool) or i is None:
            raise PartitionError(
                f"{cap.describe(node)} at {node.name!r}: indexing with {i!r} is not supported"
            )
        if isinstance(i, int):
            out.append(["int", i])
        elif isinstance(i, slice):
            parts = [i.start, i.stop, i.step]
            if any(p is not None and not isinstance(p, int) for p in parts):
                raise PartitionError(
                    f"{cap.describe(node)} at {node.name!r}: slice bounds must be integers"
                )
            out.append(["all"] if parts == [None, None, None] else ["slice", *parts])
        else:
            raise PartitionError(
                f"{cap.describe(node)} at {node.name!r}: indexing with {type(i).__name__} is "
                "not supported (integers and slices only)"
            )
    return out + [["all"]] * (ndim - len(out))


@capture_function(operator.getitem)
def _getitem(cap: Capturer, node: fx.Node, target: Any) -> str:
    src = node.args[0]
    if isinstance(src, fx.Node) and src in cap.tuples:
        i = cap.const(node.args[1])
        outs = cap.tuples[src]
        entry = outs[i] if isinstance(i, int) and -len(outs) <= i < len(outs) else None
        if entry is None:
            if node.users:
                raise PartitionError(
                    f"{cap.describe(node)} at {node.name!r}: output {i!r} of {src.name!r} is "
                    "not supported (only the attention output, not its weights)"
                )
            return ""
        return entry
    if cap.is_tensor(src):
        x = cap.value(src, node)
        index = cap.const(node.args[1])
        entries = _index_entries(cap, node, index, len(cap.info(x).shape))
        return cap.add(node, "index", [x], {"index": entries})
    cap.consts[node] = eval_const(cap, node)
    if isinstance(src, fx.Node) and src in cap.shape_of:
        i = cap.const(node.args[1])
        if isinstance(i, int):
            v = cap.shape_of[src]
            cap.dim_of[node] = (v, _norm_dim(i, len(cap.info(v).shape)))
    return ""


def _permute(cap: Capturer, node: fx.Node, x: str, dims: Sequence[int]) -> str:
    nd = len(cap.info(x).shape)
    perm = [_norm_dim(int(d), nd) for d in dims]
    return cap.add(node, "permute", [x], {"dims": perm})


@capture_method("transpose", "swapaxes", "swapdims")
def _transpose_method(cap: Capturer, node: fx.Node, target: Any) -> str:
    return _transpose_function(cap, node, torch.transpose)


@capture_function(torch.transpose, torch.swapaxes, torch.swapdims)
def _transpose_function(cap: Capturer, node: fx.Node, target: Any) -> str:
    x = cap.value(node.args[0], node)
    args = list(node.args[1:])
    d0 = args[0] if args else node.kwargs.get("dim0")
    d1 = args[1] if len(args) > 1 else node.kwargs.get("dim1")
    nd = len(cap.info(x).shape)
    a, b = _norm_dim(int(cap.const(d0)), nd), _norm_dim(int(cap.const(d1)), nd)
    perm = list(range(nd))
    perm[a], perm[b] = perm[b], perm[a]
    return _permute(cap, node, x, perm)


@capture_method("permute")
def _permute_method(cap: Capturer, node: fx.Node, target: Any) -> str:
    x = cap.value(node.args[0], node)
    dims: Any = cap.const(list(node.args[1:]) or node.kwargs.get("dims"))
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    return _permute(cap, node, x, dims)


@capture_function(torch.permute)
def _permute_function(cap: Capturer, node: fx.Node, target: Any) -> str:
    x = cap.value(node.args[0], node)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    return _permute(cap, node, x, cap.const(dims))


@capture_method("expand")
def _expand(cap: Capturer, node: fx.Node, target: Any) -> str:
    src = node.args[0]
    if isinstance(src, fx.Node) and src in cap.pending and cap.pending[src].expand is None:
        p = cap.pending[src]
        cap.pending[node] = _Pending(p.source, p.tensor, node)  # placed by its consumer
        return ""
    return emit_expand(cap, node, cap.value(src, node))
