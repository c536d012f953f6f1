"""Capture: a standard PyTorch model -> :class:`~disco_fl.partition.program.Program`.

The model is traced with ``torch.fx`` and its shapes measured on the example input. Each fx
node is turned into program ops by a capture function registered for its module type, its
function, or its method name. Where a mixing layer reads a sharded tensor, an ``exchange`` op is
inserted once per tensor (layers reading the same tensor share the exchange and its gates).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from disco_fl.partition.program import Op, Program, TensorInfo
from disco_fl.partition.registry import InferContext, PartitionError, get_spec

CaptureFn = Callable[["Capturer", fx.Node, Any], str]
MODULE_CAPTURES: dict[type[nn.Module], CaptureFn] = {}
FUNCTION_CAPTURES: dict[Any, CaptureFn] = {}
METHOD_CAPTURES: dict[str, CaptureFn] = {}


def capture_module(*types: type[nn.Module]) -> Callable[[CaptureFn], CaptureFn]:
    def deco(fn: CaptureFn) -> CaptureFn:
        for t in types:
            MODULE_CAPTURES[t] = fn
        return fn

    return deco


def capture_function(*targets: Any) -> Callable[[CaptureFn], CaptureFn]:
    def deco(fn: CaptureFn) -> CaptureFn:
        for t in targets:
            FUNCTION_CAPTURES[t] = fn
        return fn

    return deco


def capture_method(*names: str) -> Callable[[CaptureFn], CaptureFn]:
    def deco(fn: CaptureFn) -> CaptureFn:
        for n in names:
            METHOD_CAPTURES[n] = fn
        return fn

    return deco


class _ConstHolder(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value.detach().clone())


class Capturer:
    """Walks one traced graph and builds the program."""

    def __init__(
        self, gm: fx.GraphModule, num_nodes: int, capacities: Sequence[float] | None
    ) -> None:
        self.gm = gm
        self.num_nodes = num_nodes
        self.capacities = capacities
        self.ops: list[Op] = []
        self.infos: dict[str, TensorInfo] = {}
        self.modules: dict[str, nn.Module] = {}
        self.values: dict[fx.Node, str] = {}  # fx node -> program value name
        self.consts: dict[fx.Node, Any] = {}  # fx node -> python value (sizes, shapes)
        self._exchanged: dict[str, str] = {}
        self._names: set[str] = set()

    # -- helpers for capture functions ---------------------------------------------------
    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return (
                f"module {node.target!r} ({type(self.gm.get_submodule(str(node.target))).__name__})"
            )
        if node.op == "call_function":
            return f"function {getattr(node.target, '__name__', node.target)!r}"
        return f"{node.op} {node.target!r}"

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise PartitionError(
                f"{self.describe(node)} at {node.name!r} does not produce a tensor"
            )
        return tuple(int(s) for s in meta.shape)

    def is_tensor(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in self.values

    def value(self, arg: Any, node: fx.Node) -> str:
        if not self.is_tensor(arg):
            raise PartitionError(
                f"{self.describe(node)} at {node.name!r}: expected a tensor argument"
            )
        return self.values[arg]

    def const(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            if arg in self.consts:
                return self.consts[arg]
            raise PartitionError(f"argument {arg.name!r} is a tensor where a constant is expected")
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.const(a) for a in arg)
        return arg

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def add(
        self,
        node: fx.Node,
        kind: str,
        inputs: list[str],
        attrs: dict[str, Any] | None = None,
        module: str | None = None,
        *,
        name: str | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> str:
        name = name or node.name
        base, i = name, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        op = Op(name, kind, inputs, attrs or {}, module)
        spec = get_spec(kind)
        if spec.mixing:
            op.inputs = [
                self._gathered(v, node) if self.infos[v].kind == "sharded" else v for v in inputs
            ]
        ctx = InferContext(
            self.num_nodes, shape if shape is not None else self.shape(node), self.capacities
        )
        try:
            info = spec.infer(op, [self.infos[v] for v in op.inputs], ctx)
        except ValueError as e:  # PartitionError included
            raise PartitionError(f"{self.describe(node)} at {node.name!r}: {e}") from None
        self.ops.append(op)
        self.infos[name] = info
        return name

    def _gathered(self, value: str, node: fx.Node) -> str:
        if value not in self._exchanged:
            src = self.infos[value]
            self._exchanged[value] = self.add(
                node, "exchange", [value], name=f"{value}_x", shape=src.shape
            )
        return self._exchanged[value]

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    # -- driver -----------------------------------------------------------------------------
    def run(self) -> Program:
        inputs = 0
        out_name: str | None = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                inputs += 1
                if inputs > 1:
                    raise PartitionError("models with more than one input tensor are not supported")
                self.values[node] = self.add(node, "input", [])
            elif node.op == "get_attr":
                obj = _fetch_attr(self.gm, str(node.target))
                if isinstance(obj, torch.Tensor):
                    name = self.add(node, "const", [], module=f"const:{node.name}")
                    self.modules[f"const:{node.name}"] = _ConstHolder(obj)
                    self.values[node] = name
                else:
                    self.consts[node] = obj
            elif node.op == "output":
                arg = node.args[0]
                if not self.is_tensor(arg):
                    raise PartitionError("the model must return a single tensor")
                out_name = self.add(
                    node, "output", [self.values[arg]], shape=self.infos[self.values[arg]].shape
                )
            else:
                self._call(node)
        if out_name is None:
            raise PartitionError("the traced graph has no output")
        return Program(self.num_nodes, self.ops, self.infos)

    def _call(self, node: fx.Node) -> None:
        fn: CaptureFn | None = None
        target: Any = node.target
        if node.op == "call_module":
            mod = self.module(node)
            target = mod
            for t in type(mod).__mro__:
                if t in MODULE_CAPTURES:
                    fn = MODULE_CAPTURES[t]
                    break
        elif node.op == "call_function":
            fn = FUNCTION_CAPTURES.get(node.target)
        elif node.op == "call_method":
            fn = METHOD_CAPTURES.get(str(node.target))
        if fn is None:
            tensors = [a for a in node.all_input_nodes if a in self.values]
            if tensors and all(self.infos[self.values[a]].kind == "replicated" for a in tensors):
                raise PartitionError(
                    f"unsupported op: {self.describe(node)} at {node.name!r} (even on the "
                    "replicated input, every op must be in the registry)"
                )
            if not tensors and node.op != "call_module":
                self.consts[node] = _eval_const(self, node)
                return
            raise PartitionError(
                f"unsupported op: {self.describe(node)} at {node.name!r}; supported modules: "
                f"{sorted(t.__name__ for t in MODULE_CAPTURES)}"
            )
        result = fn(self, node, target)
        if result:
            self.values[node] = result


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _eval_const(cap: Capturer, node: fx.Node) -> Any:
    args = cap.const(tuple(node.args))
    kwargs = {k: cap.const(v) for k, v in node.kwargs.items()}
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    raise PartitionError(f"cannot evaluate {cap.describe(node)}")


def capture(
    model: nn.Module,
    num_nodes: int,
    example_input: torch.Tensor,
    capacities: Sequence[float] | None = None,
) -> tuple[Program, dict[str, nn.Module]]:
    """Trace ``model`` and build the program for ``num_nodes`` nodes.

    Returns the program and the modules its ops slice parameters from (by qualified name).
    """
    if not isinstance(example_input, torch.Tensor):
        raise PartitionError("example_input must be a tensor (batch first)")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types; report them uniformly
        raise PartitionError(f"torch.fx could not trace the model: {e}") from e
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    gm.train(was_training)
    cap = Capturer(gm, num_nodes, capacities)
    program = cap.run()
    modules = dict(cap.modules)
    for op in program.ops:
        if op.module is not None and op.module not in modules:
            modules[op.module] = gm.get_submodule(op.module)
    return program, modules


# ---------------------------------------------------------------------------------------
# capture functions
# ---------------------------------------------------------------------------------------


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
        return cap.add(node, "binary", [cap.values[a], cap.values[b]], {"fn": fn})  # type: ignore[index]
    if ta or tb:
        scalar = cap.const(b if ta else a)
        if not isinstance(scalar, (int, float)):
            raise PartitionError(
                f"{cap.describe(node)} at {node.name!r}: non-scalar constant operand"
            )
        x = cap.values[a if ta else b]  # type: ignore[index]
        return cap.add(node, "binary", [x], {"fn": fn, "scalar": scalar, "scalar_first": tb})
    cap.consts[node] = _eval_const(cap, node)
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
    names = [cap.value(t, node) for t in tensors]
    nd = len(cap.shape(node))
    return cap.add(node, "cat", names, {"dim": _norm_dim(int(cap.const(dim)), nd)})


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


@capture_method("size", "dim")
def _size(cap: Capturer, node: fx.Node, target: Any) -> str:
    x = node.args[0]
    shape = cap.info(cap.value(x, node)).shape
    if node.target == "dim":
        cap.consts[node] = len(shape)
        return ""
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    cap.consts[node] = torch.Size(shape) if d is None else shape[cap.const(d)]
    return ""


@capture_function(getattr)
def _getattr(cap: Capturer, node: fx.Node, target: Any) -> str:
    obj, attr = node.args[0], node.args[1]
    if cap.is_tensor(obj) and attr == "shape":
        cap.consts[node] = torch.Size(cap.info(cap.values[obj]).shape)  # type: ignore[index]
        return ""
    raise PartitionError(f"{cap.describe(node)} at {node.name!r}: attribute {attr!r} of a tensor")


@capture_function(operator.getitem)
def _getitem(cap: Capturer, node: fx.Node, target: Any) -> str:
    if cap.is_tensor(node.args[0]):
        raise PartitionError(
            f"{cap.describe(node)} at {node.name!r}: indexing a tensor is not supported"
        )
    cap.consts[node] = _eval_const(cap, node)
    return ""
