"""ATen capture rules of the ``torch.export`` front end (:mod:`.capture_export`).

One function per family of ATen ops, registered with :func:`~.capture_export.capture_aten`:
it receives the op's arguments by schema name and emits ops of the registry (see
:mod:`.ops_local`, :mod:`.ops_shape`, :mod:`.ops_comm`, :mod:`.ops_norm`, :mod:`.ops_view`,
:mod:`.ops_vision`); linear layers, permutes, indexing and the ops of attention are in
:mod:`.aten_rules_attention`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

from disco_fl.partition.capture_export import (
    ExportCapturer,
    _Permuted,
    _Tensor,
    _ViewChain,
    capture_aten,
)
from disco_fl.partition.ops_drop import DROP_PATH_OP
from disco_fl.partition.ops_local import ACTIVATIONS
from disco_fl.partition.ops_view import reshape_info
from disco_fl.partition.ops_vision import group_owners, shuffle_spans_nodes
from disco_fl.partition.registry import PartitionError

aten = torch.ops.aten


def _x(a: dict[str, Any]) -> Any:
    """The first argument (the input tensor of every op captured here)."""
    return next(iter(a.values()))


def _pair(v: Any) -> Any:
    if isinstance(v, str):
        return v
    v = list(v) if isinstance(v, (tuple, list)) else [v]
    return v * 2 if len(v) == 1 else v


def _norm(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


@capture_aten(aten.conv2d, aten.convolution, aten.conv_transpose2d)
def _conv(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    transposed = node.target.overloadpacket is aten.conv_transpose2d or bool(  # type: ignore[union-attr]
        a.get("transposed", False)
    )
    x = cap.value(_x(a))
    w = cap.values[a["weight"]]
    if not isinstance(w, _Tensor) or w.tensor.dim() != 4:
        raise cap.fail("only 2-d convolutions with parameter weights are supported")
    groups = int(a["groups"])
    attrs: dict[str, Any] = {
        "stride": _pair(a["stride"]),
        "padding": _pair(a["padding"]),
        "dilation": _pair(a["dilation"]),
    }
    tensors = {"weight": a["weight"], "bias": a["bias"]}
    if transposed:
        if groups != 1:
            raise cap.fail("transposed convolution with groups > 1")
        attrs["output_padding"] = _pair(a.get("output_padding", 0))
        return cap.add("conv_transpose2d", [x], attrs, cap.module_of(tensors))
    c_in = cap.info(x).shape[1]
    if groups == 1:
        return cap.add("conv2d", [x], attrs, cap.module_of(tensors))
    c_out = w.tensor.shape[0]
    if groups == c_in and c_out % c_in == 0:
        attrs["multiplier"] = c_out // c_in
        return cap.add("dwconv2d", [x], attrs, cap.module_of(tensors))
    info = cap.info(x)
    if info.kind == "sharded" and info.layout is not None and group_owners(info.layout, groups):
        attrs["groups"] = groups
        return cap.add("gconv2d", [x], attrs, cap.module_of(tensors))
    # groups straddle node slices: a mixing conv with the block-diagonal dense weight
    wt = w.tensor.detach()
    dense = torch.zeros(c_out, c_in, *wt.shape[2:], dtype=wt.dtype)
    per_in, per_out = c_in // groups, c_out // groups
    for g in range(groups):
        dense[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] = wt[
            g * per_out : (g + 1) * per_out
        ]
    attrs["groups"] = groups
    return cap.add("gconv2d_mixing", [x], attrs, cap.module_of(tensors, dense=dense))


@capture_aten(aten.batch_norm, aten._native_batch_norm_legit_no_training)
def _batch_norm(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> Any:
    x = cap.value(_x(a))
    tensors = {
        "weight": a["weight"],
        "bias": a["bias"],
        "running_mean": a["running_mean"],
        "running_var": a["running_var"],
    }
    path = cap.module_of(tensors, nn.modules.batchnorm._BatchNorm)
    bn = cap.modules[path]
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    if bn.momentum is None:
        raise cap.fail("BatchNorm with momentum=None is not supported")
    attrs = {"eps": float(a["eps"]), "momentum": bn.momentum}
    if node.target.overloadpacket is aten.batch_norm:  # type: ignore[union-attr]
        return cap.add("batch_norm", [x], attrs, path)
    out = cap.add("batch_norm", [x], attrs, path, shape=cap.info(x).shape)
    return [out, None, None]


@capture_aten(aten.layer_norm)
def _layer_norm(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    x = cap.value(_x(a))
    ns = [int(s) for s in a["normalized_shape"]]
    if len(ns) != 1 and cap.info(x).kind != "replicated":
        raise cap.fail("LayerNorm over more than the last dim")
    attrs = {"eps": float(a["eps"]), "normalized_shape": ns}
    return cap.add(
        "layer_norm", [x], attrs, cap.module_of({"weight": a["weight"], "bias": a["bias"]})
    )


@capture_aten(aten.group_norm)
def _group_norm(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    x = cap.value(_x(a))
    attrs = {"eps": float(a["eps"]), "num_groups": int(a["num_groups"])}
    return cap.add(
        "group_norm", [x], attrs, cap.module_of({"weight": a["weight"], "bias": a["bias"]})
    )


_ACTS = {
    aten.relu: "relu",
    aten.relu_: "relu",
    aten.relu6: "relu6",
    aten.gelu: "gelu",
    aten.gelu_: "gelu",
    aten.silu: "silu",
    aten.silu_: "silu",
    aten.sigmoid: "sigmoid",
    aten.sigmoid_: "sigmoid",
    aten.tanh: "tanh",
    aten.tanh_: "tanh",
    aten.hardswish: "hardswish",
    aten.hardswish_: "hardswish",
    aten.hardsigmoid: "hardsigmoid",
    aten.hardsigmoid_: "hardsigmoid",
    aten.leaky_relu: "leaky_relu",
    aten.leaky_relu_: "leaky_relu",
    aten.elu: "elu",
    aten.elu_: "elu",
    aten.hardtanh: "hardtanh",
    aten.hardtanh_: "hardtanh",
}


@capture_aten(*_ACTS)
def _act(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    fn = _ACTS[node.target.overloadpacket]  # type: ignore[union-attr]
    attrs: dict[str, Any] = {"fn": fn}
    if fn == "gelu":
        attrs["approximate"] = a.get("approximate", "none")
    elif fn == "leaky_relu":
        attrs["negative_slope"] = float(a["negative_slope"])
    elif fn == "elu":
        if float(a.get("scale", 1.0)) != 1.0 or float(a.get("input_scale", 1.0)) != 1.0:
            raise cap.fail("elu with scale")
        attrs["alpha"] = float(a["alpha"])
    elif fn == "hardtanh":
        lo, hi = float(a["min_val"]), float(a["max_val"])
        if (lo, hi) == (0.0, 6.0):
            attrs = {"fn": "relu6"}
        else:
            attrs.update(min_val=lo, max_val=hi)
    assert attrs["fn"] in ACTIVATIONS
    return cap.add("act", [cap.value(_x(a))], attrs)


@capture_aten(aten.dropout, aten.dropout_, aten.feature_dropout, aten.feature_dropout_)
def _dropout(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    x = cap.value(_x(a))
    attrs: dict[str, Any] = {"p": float(a["p"])}
    if node.target.overloadpacket in (aten.feature_dropout, aten.feature_dropout_):  # type: ignore[union-attr]
        attrs["feature"] = True
    return cap.add("dropout", [x], attrs)


@capture_aten(DROP_PATH_OP)
def _drop_path(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    """Stochastic depth, kept as one node by :func:`~.ops_drop.keep_drop_path`."""
    attrs = {"p": float(a["p"]), "mode": str(a["mode"]), "scale": bool(a["scale"])}
    return cap.add("drop_path", [cap.value(a["x"])], attrs)


@capture_aten(aten.contiguous, aten.clone, aten.alias, aten.detach, aten.lift_fresh_copy)
def _identity(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> Any:
    src = _x(a)
    v = cap.values.get(src)
    if isinstance(v, (_ViewChain, _Tensor, _Permuted)):
        return v  # stays pending
    return cap.add("identity", [cap.value(src)])


@capture_aten(aten.max_pool2d, aten.max_pool2d_with_indices)
def _max_pool(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> Any:
    x = cap.value(_x(a))
    k = _pair(a["kernel_size"])
    stride = _pair(a["stride"]) if a["stride"] else k
    attrs = {
        "type": "max",
        "kernel_size": k,
        "stride": stride,
        "padding": _pair(a["padding"]),
        "dilation": _pair(a["dilation"]),
        "ceil_mode": bool(a["ceil_mode"]),
    }
    if node.target.overloadpacket is aten.max_pool2d_with_indices:  # type: ignore[union-attr]
        shape = tuple(int(s) for s in node.meta["val"][0].shape)
        return [cap.add("pool", [x], attrs, shape=shape), None]
    return cap.add("pool", [x], attrs)


@capture_aten(aten.avg_pool2d)
def _avg_pool(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    if a.get("divisor_override") is not None:
        raise cap.fail("divisor_override is not supported")
    x = cap.value(_x(a))
    k = _pair(a["kernel_size"])
    attrs = {
        "type": "avg",
        "kernel_size": k,
        "stride": _pair(a["stride"]) if a["stride"] else k,
        "padding": _pair(a["padding"]),
        "ceil_mode": bool(a["ceil_mode"]),
        "count_include_pad": bool(a["count_include_pad"]),
    }
    return cap.add("pool", [x], attrs)


@capture_aten(aten.adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten._adaptive_avg_pool2d)
def _adaptive_pool(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> Any:
    x = cap.value(_x(a))
    is_max = node.target.overloadpacket is aten.adaptive_max_pool2d  # type: ignore[union-attr]
    attrs = {"type": "adaptive_max" if is_max else "adaptive_avg"}
    attrs["output_size"] = _pair(a["output_size"])
    if is_max:
        shape = tuple(int(s) for s in node.meta["val"][0].shape)
        return [cap.add("pool", [x], attrs, shape=shape), None]
    return cap.add("pool", [x], attrs)


_REDUCE = {aten.mean: "mean", aten.sum: "sum", aten.amax: "amax"}


@capture_aten(*_REDUCE)
def _reduce(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    x = cap.value(_x(a))
    dims = a.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        raise cap.fail("reduction over all dims")
    if a.get("dtype") is not None:
        raise cap.fail("reduction with a dtype")
    dims = [dims] if isinstance(dims, int) else list(dims)
    nd = len(cap.info(x).shape)
    attrs = {
        "fn": _REDUCE[node.target.overloadpacket],  # type: ignore[union-attr]
        "dims": sorted(_norm(int(d), nd) for d in dims),
        "keepdim": bool(a.get("keepdim", False)),
    }
    return cap.add("reduce", [x], attrs)


_BINARY = {
    aten.add: "add",
    aten.add_: "add",
    aten.sub: "sub",
    aten.sub_: "sub",
    aten.mul: "mul",
    aten.mul_: "mul",
    aten.div: "div",
    aten.div_: "div",
}


@capture_aten(*_BINARY)
def _binary(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    fn = _BINARY[node.target.overloadpacket]  # type: ignore[union-attr]
    if float(a.get("alpha", 1) or 1) != 1.0:
        raise cap.fail("add / sub with alpha != 1")
    if a.get("rounding_mode") is not None:
        raise cap.fail("division with a rounding mode")
    lhs, rhs = a["self"], a["other"]
    tl, tr = cap.is_tensor(lhs), cap.is_tensor(rhs)
    if tl and tr:
        placed = [
            cap.value(t) if not isinstance(cap.values[t], _Tensor) else None for t in (lhs, rhs)
        ]
        infos = [cap.info(p) for p in placed if p is not None]
        partner = next((i for i in infos if i.kind == "sharded"), None)
        names = [
            p if p is not None else cap.value(t, partner)
            for p, t in zip(placed, (lhs, rhs), strict=True)
        ]
        return cap.add("binary", names, {"fn": fn})
    if tl or tr:
        scalar = rhs if tl else lhs
        if not isinstance(scalar, (int, float)):
            raise cap.fail("non-scalar constant operand")
        x = cap.value(lhs if tl else rhs)
        return cap.add("binary", [x], {"fn": fn, "scalar": scalar, "scalar_first": tr})
    raise cap.fail("elementwise op without a tensor operand")


@capture_aten(aten.cat, aten.concat)
def _cat(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    tensors = list(a["tensors"])
    d = _norm(int(a["dim"]), len(cap.shape(node)))
    placed = {
        i: cap.value(t) for i, t in enumerate(tensors) if not isinstance(cap.values[t], _Tensor)
    }
    partner = next((cap.info(v) for v in placed.values() if cap.info(v).kind == "sharded"), None)
    if partner is not None and partner.cdim == d:
        partner = None  # a channel concat: model tensors are not split like the other operand
    names = [placed[i] if i in placed else cap.value(t, partner) for i, t in enumerate(tensors)]
    return cap.add("cat", names, {"dim": d})


# -- views -----------------------------------------------------------------------------------


def _reshape_to(cap: ExportCapturer, src: Any, out: tuple[int, ...]) -> Any:
    v = cap.values.get(src)
    if isinstance(v, _ViewChain):
        return _ViewChain(v.source, v.positions.reshape(1, *out[1:]))
    x = cap.value(src)
    info = cap.info(x)
    try:
        reshape_info(info, out, cap.num_nodes)
    except PartitionError:
        if info.kind != "sharded" or info.batch_mult != 1 or out[0] != info.shape[0]:
            raise
        if math.prod(out[1:]) != math.prod(info.shape[1:]):
            raise
        n = math.prod(info.shape[1:])
        return _ViewChain(x, torch.arange(n).view(1, *info.shape[1:]).reshape(1, *out[1:]))
    return cap.add("reshape", [x], {"shape": list(out[1:])}, shape=out)


@capture_aten(
    aten.view,
    aten.reshape,
    aten._unsafe_view,
    aten.flatten,
    aten.unsqueeze,
    aten.squeeze,
    aten.unflatten,
)
def _reshape(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> Any:
    return _reshape_to(cap, _x(a), cap.shape(node))


def _select(cap: ExportCapturer, x: str, dim: int, idx: list[int], out: tuple[int, ...]) -> str:
    """Entries ``idx`` of dim ``dim`` (a ``reindex`` of the channel dim, else an ``index``)."""
    info = cap.info(x)
    nd = len(info.shape)
    if dim == 0:
        raise cap.fail("slicing the batch dim 0")
    if info.kind == "sharded" and info.cdim == dim:
        return cap.add("reindex", [x], {"dim": dim, "src": idx}, shape=out)
    if idx == list(range(info.shape[dim])):
        return cap.add("identity", [x], shape=out)
    start, stop = idx[0], idx[-1] + 1
    step = idx[1] - idx[0] if len(idx) > 1 else 1
    if list(range(start, stop, step)) != idx:
        raise cap.fail("a non-strided selection")
    entries: list[list[Any]] = [["all"]] * nd
    entries[dim] = ["slice", start, stop, step]
    return cap.add("index", [x], {"index": entries}, shape=out)


@capture_aten(aten.slice, aten.narrow)
def _slice(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    x = cap.value(_x(a))
    shape = cap.info(x).shape
    d = _norm(int(a["dim"]), len(shape))
    if "length" in a:  # narrow
        start = int(a["start"])
        rng = range(start, start + int(a["length"]))
    else:
        rng = range(shape[d])[slice(a["start"], a["end"], a["step"])]
    return _select(cap, x, d, list(rng), cap.shape(node))


@capture_aten(aten.chunk, aten.split, aten.split_with_sizes, aten.unsafe_split)
def _split(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> list[str]:
    x = cap.value(_x(a))
    shape = cap.info(x).shape
    d = _norm(int(a["dim"]), len(shape))
    outs = node.meta["val"]
    parts: list[str] = []
    start = 0
    for o in outs:
        size = int(o.shape[d])
        out_shape = tuple(int(s) for s in o.shape)
        parts.append(_select(cap, x, d, list(range(start, start + size)), out_shape))
        start += size
    return parts


@capture_aten(aten.upsample_nearest2d, aten.upsample_bilinear2d, aten._upsample_bilinear2d_aa)
def _upsample(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    if node.target.overloadpacket is aten._upsample_bilinear2d_aa:  # type: ignore[union-attr]
        raise cap.fail("antialiased bilinear resizing is not supported")
    x = cap.value(_x(a))
    bilinear = node.target.overloadpacket is aten.upsample_bilinear2d  # type: ignore[union-attr]
    attrs: dict[str, Any] = {"mode": "bilinear" if bilinear else "nearest"}
    if bilinear:
        attrs["align_corners"] = bool(a["align_corners"])
    scales = a.get("scale_factors")
    if scales is None and a.get("scales_h") is not None:
        scales = [a["scales_h"], a["scales_w"]]
    if a.get("output_size") is not None or scales is None:
        attrs["size"] = list(cap.shape(node)[2:])
        attrs["scale_factor"] = None
    else:
        attrs["size"] = None
        attrs["scale_factor"] = [float(s) for s in scales]
    return cap.add("resize", [x], attrs)


@capture_aten(aten.pad, aten.constant_pad_nd)
def _pad(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    x = cap.value(_x(a))
    mode = a.get("mode", "constant") or "constant"
    value = a.get("value")
    attrs = {"pad": [int(p) for p in a["pad"]], "mode": mode, "value": float(value or 0.0)}
    return cap.add("pad", [x], attrs)


@capture_aten(aten.pixel_shuffle, aten.pixel_unshuffle)
def _pixel_shuffle(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    x = cap.value(_x(a))
    inverse = node.target.overloadpacket is aten.pixel_unshuffle  # type: ignore[union-attr]
    factor = int(a["downscale_factor"] if inverse else a["upscale_factor"])
    if not inverse and shuffle_spans_nodes(cap.info(x), factor):  # ESPCN's last layer
        if any(u.op != "output" for u in node.users):
            raise cap.fail("a pixel shuffle of channels of several nodes must be the output")
        return cap.add("gather_pixel_shuffle", [x], {"factor": factor})
    return cap.add("pixel_shuffle", [x], {"factor": factor, "inverse": inverse})


@capture_aten(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def _softmax(cap: ExportCapturer, node: fx.Node, a: dict[str, Any]) -> str:
    x = cap.value(_x(a))
    nd = len(cap.info(x).shape)
    log = node.target.overloadpacket in (aten.log_softmax, aten._log_softmax)  # type: ignore[union-attr]
    return cap.add("softmax", [x], {"dim": _norm(int(a["dim"]), nd), "log": log})
