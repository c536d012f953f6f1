"""fx capture rules for layers: convolution, linear, batch / group / layer norm, activations,
dropout, stochastic depth and pooling, as modules, functions (``F.relu``, ``F.max_pool2d``) or
tensor methods (``x.relu()``). Registered at import (through :mod:`disco_fl.partition`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from disco_fl.partition.capture import (
    Capturer,
    capture_function,
    capture_leaf,
    capture_method,
    capture_module,
)
from disco_fl.partition.ops_drop import drop_path_attrs
from disco_fl.partition.registry import PartitionError


def _pair(v: Any) -> Any:
    if isinstance(v, str):
        return v
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


@capture_module(nn.Conv2d)
def _conv(cap: Capturer, node: fx.Node, m: nn.Conv2d) -> str:
    if m.padding_mode != "zeros":
        raise PartitionError(
            f"module {node.target!r}: padding_mode={m.padding_mode!r} is not supported"
        )
    x = cap.value(node.args[0], node)
    attrs = {"stride": _pair(m.stride), "padding": _pair(m.padding), "dilation": _pair(m.dilation)}
    if m.groups == 1:
        return cap.add(node, "conv2d", [x], attrs, str(node.target))
    if m.groups == m.in_channels:
        attrs["multiplier"] = m.out_channels // m.in_channels
        return cap.add(node, "dwconv2d", [x], attrs, str(node.target))
    raise PartitionError(
        f"module {node.target!r}: grouped conv with groups={m.groups} is not supported "
        "(only groups=1 and depthwise groups=in_channels)"
    )


@capture_module(nn.Linear)
def _linear(cap: Capturer, node: fx.Node, m: nn.Linear) -> str:
    return cap.add(node, "linear", [cap.value(node.args[0], node)], {}, str(node.target))


@capture_module(nn.BatchNorm1d, nn.BatchNorm2d)
def _bn(cap: Capturer, node: fx.Node, m: nn.modules.batchnorm._BatchNorm) -> str:
    if m.momentum is None:
        raise PartitionError(
            f"module {node.target!r}: BatchNorm with momentum=None is not supported"
        )
    attrs = {"eps": m.eps, "momentum": m.momentum}
    return cap.add(node, "batch_norm", [cap.value(node.args[0], node)], attrs, str(node.target))


@capture_module(nn.GroupNorm)
def _gn(cap: Capturer, node: fx.Node, m: nn.GroupNorm) -> str:
    attrs = {"eps": m.eps, "num_groups": m.num_groups}
    return cap.add(node, "group_norm", [cap.value(node.args[0], node)], attrs, str(node.target))


@capture_module(nn.LayerNorm)
def _ln(cap: Capturer, node: fx.Node, m: nn.LayerNorm) -> str:
    x = cap.value(node.args[0], node)
    if len(m.normalized_shape) != 1 and cap.info(x).kind != "replicated":
        raise PartitionError(f"module {node.target!r}: LayerNorm over more than the last dim")
    attrs = {"eps": m.eps, "normalized_shape": list(m.normalized_shape)}
    return cap.add(node, "layer_norm", [x], attrs, str(node.target))


_ACT_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.Identity: "identity",
}


@capture_module(*_ACT_MODULES)
def _act_module(cap: Capturer, node: fx.Node, m: nn.Module) -> str:
    attrs: dict[str, Any] = {"fn": _ACT_MODULES[type(m)]}
    if isinstance(m, nn.GELU):
        attrs["approximate"] = m.approximate
    if isinstance(m, nn.LeakyReLU):
        attrs["negative_slope"] = m.negative_slope
    if isinstance(m, nn.ELU):
        attrs["alpha"] = m.alpha
    return cap.add(node, "act", [cap.value(node.args[0], node)], attrs)


_ACT_FUNCS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.gelu: "gelu",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.hardswish: "hardswish",
    F.leaky_relu: "leaky_relu",
}


@capture_function(*_ACT_FUNCS)
def _act_function(cap: Capturer, node: fx.Node, target: Any) -> str:
    attrs: dict[str, Any] = {"fn": _ACT_FUNCS[target]}
    if target is F.gelu:
        attrs["approximate"] = cap.const(node.kwargs.get("approximate", "none"))
    if target is F.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        attrs["negative_slope"] = cap.const(slope)
    return cap.add(node, "act", [cap.value(node.args[0], node)], attrs)


@capture_method("relu", "sigmoid", "tanh")
def _act_method(cap: Capturer, node: fx.Node, target: Any) -> str:
    return cap.add(node, "act", [cap.value(node.args[0], node)], {"fn": str(node.target)})


@capture_module(nn.Dropout)
def _dropout_module(cap: Capturer, node: fx.Node, m: nn.Dropout) -> str:
    return cap.add(node, "dropout", [cap.value(node.args[0], node)], {"p": m.p})


@capture_function(F.dropout)
def _dropout_function(cap: Capturer, node: fx.Node, target: Any) -> str:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    if not cap.const(training):
        return cap.add(node, "identity", [cap.value(node.args[0], node)])
    return cap.add(node, "dropout", [cap.value(node.args[0], node)], {"p": cap.const(p)})


@capture_leaf(lambda m: drop_path_attrs(m) is not None)
def _drop_path_module(cap: Capturer, node: fx.Node, m: nn.Module) -> str:
    """Stochastic depth (torchvision's ``StochasticDepth``, timm's ``DropPath``), a leaf."""
    attrs = drop_path_attrs(m)
    assert attrs is not None
    return cap.add(node, "drop_path", [cap.value(node.args[0], node)], attrs)


@capture_method("contiguous", "clone", "detach")
def _identity_method(cap: Capturer, node: fx.Node, target: Any) -> str:
    return cap.add(node, "identity", [cap.value(node.args[0], node)])


def _pool_attrs(kind: str, m: Any) -> dict[str, Any]:
    if kind == "max":
        return {
            "type": "max",
            "kernel_size": _pair(m["kernel_size"]),
            "stride": _pair(m["stride"] if m["stride"] is not None else m["kernel_size"]),
            "padding": _pair(m["padding"]),
            "dilation": _pair(m["dilation"]),
            "ceil_mode": bool(m["ceil_mode"]),
        }
    if kind == "avg":
        return {
            "type": "avg",
            "kernel_size": _pair(m["kernel_size"]),
            "stride": _pair(m["stride"] if m["stride"] is not None else m["kernel_size"]),
            "padding": _pair(m["padding"]),
            "ceil_mode": bool(m["ceil_mode"]),
            "count_include_pad": bool(m["count_include_pad"]),
        }
    out = m["output_size"]
    return {"type": kind, "output_size": _pair(out) if not isinstance(out, str) else out}


@capture_module(nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
def _pool_module(cap: Capturer, node: fx.Node, m: nn.Module) -> str:
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise PartitionError(f"module {node.target!r}: return_indices is not supported")
        attrs = _pool_attrs("max", vars(m))
    elif isinstance(m, nn.AvgPool2d):
        if m.divisor_override is not None:
            raise PartitionError(f"module {node.target!r}: divisor_override is not supported")
        attrs = _pool_attrs("avg", vars(m))
    elif isinstance(m, nn.AdaptiveAvgPool2d):
        attrs = _pool_attrs("adaptive_avg", vars(m))
    else:
        attrs = _pool_attrs("adaptive_max", vars(m))
    return cap.add(node, "pool", [cap.value(node.args[0], node)], attrs)


_POOL_DEFAULTS: dict[Any, tuple[str, list[str], dict[str, Any]]] = {
    F.max_pool2d: (
        "max",
        ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"],
        {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False},
    ),
    F.avg_pool2d: (
        "avg",
        ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"],
        {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True},
    ),
    F.adaptive_avg_pool2d: ("adaptive_avg", ["input", "output_size"], {}),
    F.adaptive_max_pool2d: ("adaptive_max", ["input", "output_size"], {}),
}


@capture_function(*_POOL_DEFAULTS)
def _pool_function(cap: Capturer, node: fx.Node, target: Any) -> str:
    kind, names, defaults = _POOL_DEFAULTS[target]
    vals = dict(defaults)
    vals.update({names[i]: a for i, a in enumerate(node.args)})
    vals.update(node.kwargs)
    x = cap.value(vals.pop("input"), node)
    if vals.get("return_indices"):
        raise PartitionError(f"{cap.describe(node)}: return_indices is not supported")
    return cap.add(node, "pool", [x], _pool_attrs(kind, {k: cap.const(v) for k, v in vals.items()}))
