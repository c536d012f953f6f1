"""ATen capture rules for linear layers, permutes, indexing and attention written out in ATen
ops (Swin's shifted window attention, MaxViT's relative attention), for the ``torch.export``
front end (:mod:`.capture_export`; the other rules are in :mod:`.aten_rules`).

- ``linear`` whose output is reshaped into attention heads (``(..., 3, heads, hd)`` or
  ``(..., heads, hd)``) gets a layout that gives each node whole heads (of q, k and v alike),
  so the reshape keeps one channel dim: the heads. With fewer heads than nodes, the last
  nodes own none of that layer's heads.
- a permutation that moves the batch dim away (``qkv.permute(2, 0, 3, 1, 4)``) stays pending
  (:class:`~.capture_export._Permuted`) until the dim moved to the front is indexed
  (``qkv[0]``), which gives an ``index`` of the source and a batch-first ``permute``.
- ``scaled_dot_product_attention`` of per-head q, k, v: the ``sdpa`` op, local to the node
  owning the heads (a mask with a heads dim is split like them);
- ``matmul`` / ``einsum`` of per-head tensors (``q @ k^T``, ``attn @ v``): the ``matmul`` op
  (:mod:`.ops_window`), local to the node owning the heads; einsum only for equations that
  are a batched matmul after permutes (each operand and the output keep the same leading
  dims), any other equation is a :class:`PartitionError` naming it.
- ``roll`` (shifted windows) and the attention mask: the mask is built from ``new_zeros`` and
  in-place fills of constants only, so it is folded into a constant of the program.
- ``F.normalize`` (Swin V2's cosine attention): ``linalg_vector_norm``, ``clamp_min``,
  ``expand_as`` and a division.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

from disco_fl.core.layout import Layout, split_sizes
from disco_fl.partition.aten_rules import _norm, _x
from disco_fl.partition.capture_export import (
    ExportCapturer,
    _Permuted,
    _Tensor,
    _ViewChain,
    capture_aten,
)

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _heads_of(cap: ExportCapturer, node: fx.Node, lead: int) -> tuple[int, int, int] | None:
    """``(parts, heads, hd)`` when ``node``'s only use reshapes its last dim into
    ``(3, heads, hd)`` (``parts`` 3) or ``(heads, hd)`` (``parts`` 1), or chunks it into 3
    parts that are each reshaped into ``(heads, hd)`` (MaxViT)."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    packet = getattr(user.target, "overloadpacket", None)
    if packet in (aten.chunk, aten.split, aten.split_with_sizes):
        parts = [u for u in user.users if u.target is operator.getitem]
        found = {_heads_of(cap, p, lead) for p in parts}
        if len(parts) != 3 or len(found) != 1:
            return None
        one = found.pop()
        return None if one is None or one[0] != 1 else (3, one[1], one[2])
    if user.target not in _VIEWS:
        return None
    shape, out = cap.shape(node), cap.shape(user)
    # the dims after which the output's product is the features (leading dims may merge)
    cut = next(
        (k for k in range(len(out)) if math.prod(out[k:]) == shape[-1]),
        None,
    )
    if cut is None or math.prod(out[:cut]) != math.prod(shape[:lead]):
        return None
    tail = out[cut:]
    if len(tail) == 3 and tail[0] == 3:
        return 3, tail[1], tail[2]
    if len(tail) == 2:
        return 1, tail[0], tail[1]
    return None


def head_layout(cap: ExportCapturer, node: fx.Node) -> Layout | None:
    """Layout of a linear layer's output features that gives each node whole heads (of q, k
    and v alike) when they are reshaped into heads (:func:`_heads_of`); ``None`` otherwise
    (or when it equals the default contiguous split)."""
    shape = cap.shape(node)
    found = _heads_of(cap, node, len(shape) - 1)
    if found is None:
        return None
    parts, heads, hd = found
    features = shape[-1]
    if heads < (1 if parts == 3 else 2) or parts * heads * hd != features:
        return None
    n = cap.num_nodes
    if heads >= n:
        sizes = split_sizes(heads, n, cap.builder.capacities, what=f"{cap.where(node)} heads")
    else:
        sizes = [1] * heads + [0] * (n - heads)
    head_owner = [k for k, s in enumerate(sizes) for _ in range(s)]
    owners = tuple(head_owner[(f % (heads * hd)) // hd] for f in range(features))
    layout = Layout(owners, n)
    default = Layout.contiguous(split_sizes(features, n, cap.builder.capacities))
    return None if layout == default else layout


@capture_aten(aten.linear)
def _linear(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    x = cap.value(_x(a))
    attrs: dict[str, Any] = {}
    if (layout := head_layout(cap, node)) is not None:
        attrs["layout"] = layout.to_json()
    return cap.add("linear", [x], attrs, cap.module_of({"weight": a["weight"], "bias": a["bias"]}))


def _permute_to(cap: ExportCapturer, src: Any, dims: list[int]) -> Any:
    v = cap.values.get(src)
    if isinstance(v, _ViewChain):
        if dims[0] != 0:
            raise cap.fail("a permutation that moves the batch dim 0")
        return _ViewChain(v.source, v.positions.permute(*dims))
    if isinstance(v, _Permuted):
        return _Permuted(v.source, [v.dims[d] for d in dims])
    x = cap.value(src)
    if dims[0] != 0:
        return _Permuted(x, dims)
    return cap.add("permute", [x], {"dims": dims})


@capture_aten(aten.permute)
def _permute(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> Any:
    nd = len(cap.shape(node))
    return _permute_to(cap, _x(a), [_norm(int(d), nd) for d in a["dims"]])


@capture_aten(aten.transpose, aten.swapaxes, aten.swapdims)
def _transpose(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> Any:
    nd = len(cap.shape(node))
    d0 = _norm(int(a.get("dim0", a.get("axis0", 0))), nd)
    d1 = _norm(int(a.get("dim1", a.get("axis1", 0))), nd)
    dims = list(range(nd))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return _permute_to(cap, _x(a), dims)


def _index_int(cap: ExportCapturer, x: str, d: int, i: int, name: str | None = None) -> str:
    info = cap.info(x)
    if d == 0:
        raise cap.fail("indexing the batch dim 0")
    if info.kind == "sharded" and info.cdim == d:
        raise cap.fail("selecting one channel of the split channel dim")
    entries: list[list[Any]] = [["all"]] * len(info.shape)
    entries[d] = ["int", i]
    shape = tuple(s for j, s in enumerate(info.shape) if j != d)
    return cap.add("index", [x], {"index": entries}, shape=shape, name=name)


def _pick(cap: ExportCapturer, v: _Permuted, i: int, name: str) -> str:
    """``x.permute(dims)[i]`` (e.g. ``qkv.permute(2, 0, 3, 1, 4)[0]``): index the source's dim
    ``dims[0]``, then permute the rest, which must bring the batch dim back to the front."""
    src = v.dims[0]
    i = _norm(i, cap.info(v.source).shape[src])
    rest = [d - (d > src) for d in v.dims[1:]]
    if rest[0] != 0:
        raise cap.fail(f"a permutation {v.dims} that keeps the batch dim 0 away after indexing")
    picked = _index_int(cap, v.source, src, i, name=f"{name}_pick")
    if rest == sorted(rest):
        return picked
    out = tuple(cap.info(picked).shape[d] for d in rest)
    return cap.add("permute", [picked], {"dims": rest}, shape=out, name=name)


@capture_aten(aten.select)
def _select_int(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    v = cap.values.get(_x(a))
    if isinstance(v, _Permuted) and _norm(int(a["dim"]), len(v.dims)) == 0:
        return _pick(cap, v, int(a["index"]), node.name)
    x = cap.value(_x(a))
    info = cap.info(x)
    d = _norm(int(a["dim"]), len(info.shape))
    return _index_int(cap, x, d, _norm(int(a["index"]), info.shape[d]))


@capture_aten(aten.unbind)
def _unbind(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> list[str]:
    v = cap.values.get(_x(a))
    if isinstance(v, _Permuted) and _norm(int(a["dim"]), len(v.dims)) == 0:  # q, k, v = ...
        size = cap.info(v.source).shape[v.dims[0]]
        return [_pick(cap, v, i, f"{node.name}_{i}") for i in range(size)]
    x = cap.value(_x(a))
    info = cap.info(x)
    d = _norm(int(a["dim"]), len(info.shape))
    return [_index_int(cap, x, d, i, name=f"{node.name}_{i}") for i in range(info.shape[d])]


@capture_aten(aten.roll)
def _roll(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    x = cap.value(_x(a))
    nd = len(cap.info(x).shape)
    shifts = [int(s) for s in a["shifts"]]
    dims = [_norm(int(d), nd) for d in a["dims"]]
    return cap.add("roll", [x], {"shifts": shifts, "dims": dims})


@capture_aten(aten.new_zeros, aten.new_ones, aten.new_full)
def _new_tensor(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> _Tensor:
    """A tensor of a given size made from a model value's dtype only (Swin's attention mask
    starts as ``x.new_zeros((H, W))``): a constant of the model, filled in place by what
    follows. A size that looks like the value's own, batch included, is refused: the batch
    size would be baked into the constant."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise cap.fail("does not produce a single tensor")
    src = cap.values.get(_x(a))
    if (
        isinstance(src, str)
        and tuple(val.shape)[:1] == cap.info(src).shape[:1]
        and (val.dim() == len(cap.info(src).shape))
    ):
        raise cap.fail("a new tensor of the batch's size would be a constant of that size")
    packet = node.target.overloadpacket  # type: ignore[union-attr]
    if packet is aten.new_ones:
        fill = 1.0
    elif packet is aten.new_full:
        fill = float(a["fill_value"])
    else:
        fill = 0.0
    return _Tensor(f"folded.{node.name}", torch.full(tuple(val.shape), fill, dtype=val.dtype))


def _matmul_names(cap: ExportCapturer, lhs: Any, rhs: Any) -> list[str]:
    """Program values of matmul operands (a program value name passes through); a model
    tensor is split like the other operand where its dims line up with the split dim."""
    pair = (lhs, rhs)
    placed: list[str | None] = []
    for t in pair:
        if isinstance(t, str):
            placed.append(t)
        else:
            placed.append(None if isinstance(cap.values.get(t), _Tensor) else cap.value(t))
    partner = next((cap.info(p) for p in placed if p is not None), None)
    return [
        p if p is not None else cap.value(t, partner) for p, t in zip(placed, pair, strict=True)
    ]


@capture_aten(aten.matmul, aten.bmm)
def _matmul(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    return cap.add("matmul", _matmul_names(cap, a["self"], a[list(a)[1]]))


@capture_aten(aten.einsum)
def _einsum(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    """``einsum`` equations that are a batched matmul ``...ik,...kj->...ij`` once each operand
    is permuted: same leading (batch-like) letters in both operands and the output, one
    contracted letter, one free letter per operand."""
    eq = str(a["equation"]).replace(" ", "")
    ops = list(a["tensors"])
    if "->" not in eq or "." in eq or len(ops) != 2:
        raise cap.fail(f"einsum {eq!r}: only two-operand equations with an explicit output")
    ins, out = eq.split("->")
    sa, sb = ins.split(",")
    shared = [c for c in sa if c in sb]
    contracted = [c for c in shared if c not in out]
    lead = [c for c in out if c in sa and c in sb]
    free_a = [c for c in sa if c not in sb]
    free_b = [c for c in sb if c not in sa]
    if (
        len(contracted) != 1
        or len(free_a) != 1
        or len(free_b) != 1
        or sorted(lead + contracted) != sorted(shared)
        or out != "".join(lead + free_a + free_b)
        or len(set(sa)) != len(sa)
        or len(set(sb)) != len(sb)
    ):
        raise cap.fail(
            f"einsum {eq!r} is not a batched matrix product (supported: same leading letters in "
            "both operands and the output, one contracted letter, one free letter per operand)"
        )
    k = contracted[0]
    names: list[Any] = []
    for t, letters, want in ((ops[0], sa, lead + free_a + [k]), (ops[1], sb, lead + [k] + free_b)):
        order = [letters.index(c) for c in want]
        if order == sorted(order):
            names.append(t)
            continue
        if isinstance(cap.values.get(t), _Tensor) or order[0] != 0:
            raise cap.fail(f"einsum {eq!r}: operand {letters!r} needs a permutation {order}")
        shape = tuple(cap.shape(t)[d] for d in order)
        x = cap.value(t)
        names.append(
            cap.add("permute", [x], {"dims": order}, shape=shape, name=f"{node.name}_{letters}")
        )
    return cap.add("matmul", _matmul_names(cap, names[0], names[1]))


@capture_aten(aten.scaled_dot_product_attention)
def _sdpa(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, scale=...)`` (eval: no dropout),
    the heads split across nodes: the ``sdpa`` op (:mod:`.ops_window`)."""
    if a.get("enable_gqa"):
        raise cap.fail("grouped-query attention (enable_gqa) is not supported")
    q = cap.value(a["query"])
    names = [q, cap.value(a["key"], cap.info(q)), cap.value(a["value"], cap.info(q))]
    if a.get("attn_mask") is not None:
        names.append(cap.value(a["attn_mask"], cap.info(q)))
    if float(a.get("dropout_p") or 0.0) > 0:
        raise cap.fail("dropout inside scaled_dot_product_attention is not supported")
    scale = a.get("scale")
    attrs: dict[str, Any] = {"is_causal": bool(a.get("is_causal"))}
    attrs["scale"] = None if scale is None else float(scale)
    return cap.add("sdpa", names, attrs)


@capture_aten(aten.linalg_vector_norm)
def _vector_norm(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    if float(a["ord"]) != 2.0 or a.get("dtype") is not None or a.get("dim") is None:
        raise cap.fail("only the 2-norm over given dims is supported")
    x = cap.value(_x(a))
    nd = len(cap.info(x).shape)
    dims = sorted(_norm(int(d), nd) for d in a["dim"])
    return cap.add("reduce", [x], {"fn": "l2", "dims": dims, "keepdim": bool(a["keepdim"])})


@capture_aten(aten.clamp, aten.clamp_min, aten.clamp_max)
def _clamp(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    lo, hi = a.get("min"), a.get("max")
    if any(isinstance(v, fx.Node) for v in (lo, hi)):
        raise cap.fail("clamp with tensor bounds")
    attrs = {
        "fn": "clamp",
        "min": None if lo is None else float(lo),
        "max": None if hi is None else float(hi),
    }
    return cap.add("act", [cap.value(_x(a))], attrs)


@capture_aten(aten.exp)
def _exp(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    return cap.add("act", [cap.value(_x(a))], {"fn": "exp"})


@capture_aten(aten.expand_as)
def _expand_as(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    x = cap.value(a["self"])
    other = cap.value(a["other"], cap.info(x))
    out = cap.shape(node)
    sizes = [-1 if s == t else t for s, t in zip(cap.info(x).shape, out, strict=True)]
    sizes[0] = out[0]
    return cap.add("expand", [x, other], {"sizes": sizes, "dynamic": [[0, 1, 0]]})
