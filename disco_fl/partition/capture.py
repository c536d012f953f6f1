"""Capture: a standard PyTorch model -> :class:`~disco_fl.partition.program.Program`.

The model is traced with ``torch.fx`` and its shapes measured on the example input. Each fx
node is turned into program ops by a capture function registered for its module type, its
function, or its method name, or for modules recognised by their structure
(:func:`capture_leaf`, traced as leaves). Where a mixing layer reads a sharded tensor, an
``exchange`` op is inserted once per tensor (layers reading the same tensor share the exchange
and its gates).

Tensor attributes of the model (``get_attr``: a class token, a positional embedding) are placed
by their first consumer: added to or concatenated (along another dim) with a sharded activation
whose channel dim they share, they become a ``param`` op split the same way, each node holding
and training its slice; otherwise they are replicated ``const`` ops (not trained). A size read
from a tensor's shape (``x.shape[0]``) that feeds ``expand`` is read again at run time, so
batch and token counts stay free.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from disco_fl.layout import Layout
from disco_fl.partition.program import Op, Program, TensorInfo
from disco_fl.partition.registry import InferContext, PartitionError, get_spec

CaptureFn = Callable[["Capturer", fx.Node, Any], str]
LeafPredicate = Callable[[nn.Module], bool]
MODULE_CAPTURES: dict[type[nn.Module], CaptureFn] = {}
LEAF_CAPTURES: list[tuple[LeafPredicate, CaptureFn]] = []
FUNCTION_CAPTURES: dict[Any, CaptureFn] = {}
METHOD_CAPTURES: dict[str, CaptureFn] = {}


def capture_module(*types: type[nn.Module]) -> Callable[[CaptureFn], CaptureFn]:
    def deco(fn: CaptureFn) -> CaptureFn:
        for t in types:
            MODULE_CAPTURES[t] = fn
        return fn

    return deco


def capture_leaf(predicate: LeafPredicate) -> Callable[[CaptureFn], CaptureFn]:
    """Register a capture function for user modules recognised by ``predicate`` (by structure,
    not by type). Such modules are traced as leaves: fx does not look inside them, and the
    capture function is called with the module (its example input and output are in
    ``node.meta["disco_example"]`` as ``(args, kwargs, output)``, for verification)."""

    def deco(fn: CaptureFn) -> CaptureFn:
        LEAF_CAPTURES.append((predicate, fn))
        return fn

    return deco


def leaf_capture(module: nn.Module) -> CaptureFn | None:
    """The capture function of a structurally recognised leaf module, if any."""
    if any(t in MODULE_CAPTURES for t in type(module).__mro__):
        return None
    for predicate, fn in LEAF_CAPTURES:
        if predicate(module):
            return fn
    return None


class _Tracer(fx.Tracer):
    """fx tracer that also keeps structurally recognised modules (see :func:`capture_leaf`)
    as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return leaf_capture(m) is not None or super().is_leaf_module(m, module_qualified_name)


class _ExampleRecorder(ShapeProp):
    """Shape propagation that also records the example input and output of leaf modules
    matched by :func:`capture_leaf` (their capture verifies them)."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_module(target, args, kwargs)
        node = getattr(self, "_disco_node", None)
        if node is not None and leaf_capture(self.fetch_attr(str(target))) is not None:
            node.meta["disco_example"] = (args, dict(kwargs), out)
        return out

    def run_node(self, n: fx.Node) -> Any:
        self._disco_node = n
        return super().run_node(n)


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


@dataclass
class _Pending:
    """A tensor attribute of the model (``get_attr``), optionally expanded, whose ownership is
    decided by its first consumer: sharded like the tensor it is added to / concatenated with
    (a trainable ``param`` op holding each node's slice), or replicated (a ``const`` op)."""

    source: fx.Node  # the get_attr node
    tensor: torch.Tensor
    expand: fx.Node | None = None  # an ``expand`` of the attribute, applied after it


class ProgramBuilder:
    """Appends ops to a program under construction: unique names, ownership inferred by each
    op's spec, and one ``exchange`` inserted (once per tensor) before every mixing op that
    reads a sharded value. Shared by the fx and the ``torch.export`` front ends."""

    def __init__(self, num_nodes: int, capacities: Sequence[float] | None) -> None:
        self.num_nodes = num_nodes
        self.capacities = capacities
        self.ops: list[Op] = []
        self.infos: dict[str, TensorInfo] = {}
        self._exchanged: dict[str, str] = {}
        self._names: set[str] = set()

    def emit(
        self,
        name: str,
        kind: str,
        inputs: list[str],
        attrs: dict[str, Any] | None,
        module: str | None,
        out_shape: tuple[int, ...],
        where: Callable[[], str],
    ) -> str:
        """Append one op; ``where()`` names it in a :class:`PartitionError`."""
        base, i = name, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        op = Op(name, kind, inputs, attrs or {}, module)
        spec = get_spec(kind)
        if spec.mixing:
            op.inputs = [
                self._gathered(v, where) if self.infos[v].kind == "sharded" else v for v in inputs
            ]
        ctx = InferContext(self.num_nodes, out_shape, self.capacities)
        try:
            info = spec.infer(op, [self.infos[v] for v in op.inputs], ctx)
        except ValueError as e:  # PartitionError included
            raise PartitionError(f"{where()}: {e}") from None
        self.ops.append(op)
        self.infos[name] = info
        return name

    def _gathered(self, value: str, where: Callable[[], str]) -> str:
        if value not in self._exchanged:
            src = self.infos[value]
            self._exchanged[value] = self.emit(
                f"{value}_x", "exchange", [value], None, None, src.shape, where
            )
        return self._exchanged[value]

    def program(self) -> Program:
        return Program(self.num_nodes, self.ops, self.infos)


class Capturer:
    """Walks one traced graph and builds the program."""

    def __init__(
        self, gm: fx.GraphModule, num_nodes: int, capacities: Sequence[float] | None
    ) -> None:
        self.gm = gm
        self.num_nodes = num_nodes
        self.capacities = capacities
        self.builder = ProgramBuilder(num_nodes, capacities)
        self.ops = self.builder.ops
        self.infos = self.builder.infos
        self.modules: dict[str, nn.Module] = {}
        self.values: dict[fx.Node, str] = {}  # fx node -> program value name
        self.consts: dict[fx.Node, Any] = {}  # fx node -> python value (sizes, shapes)
        self.pending: dict[fx.Node, _Pending] = {}  # tensor attributes not yet placed
        self.tuples: dict[fx.Node, list[str | None]] = {}  # tuple outputs (None: unsupported)
        self.shape_of: dict[fx.Node, str] = {}  # fx node of ``v.shape`` / ``v.size()`` -> v
        self.dim_of: dict[fx.Node, tuple[str, int]] = {}  # ``v.shape[d]`` -> (v, d)
        self._placed: dict[tuple[Any, ...], str] = {}

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
        return isinstance(arg, fx.Node) and (arg in self.values or arg in self.pending)

    def is_pending(self, arg: Any) -> bool:
        """A tensor attribute whose ownership its consumer decides (see :meth:`value_like`)."""
        return isinstance(arg, fx.Node) and arg in self.pending

    def value(self, arg: Any, node: fx.Node) -> str:
        """Program value of a tensor argument (a pending attribute becomes replicated)."""
        if isinstance(arg, fx.Node) and self.is_pending(arg):
            return self.place(arg, None)
        if not self.is_tensor(arg):
            raise PartitionError(
                f"{self.describe(node)} at {node.name!r}: expected a tensor argument"
            )
        return self.values[arg]

    def value_like(self, arg: Any, partner: TensorInfo | None, node: fx.Node) -> str:
        """Like :meth:`value`, but a pending tensor attribute is sharded like ``partner`` (a
        sharded tensor it is combined with) where one of its dims is ``partner``'s channel dim
        (right-aligned broadcasting); otherwise it is replicated."""
        if not (isinstance(arg, fx.Node) and self.is_pending(arg)):
            return self.value(arg, node)
        if partner is None or partner.kind != "sharded" or partner.cdim is None:
            return self.place(arg, None)
        return self.place(arg, partner)

    def const(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            if arg in self.consts:
                return self.consts[arg]
            raise PartitionError(f"argument {arg.name!r} is a tensor where a constant is expected")
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.const(a) for a in arg)
        if isinstance(arg, slice):
            return slice(self.const(arg.start), self.const(arg.stop), self.const(arg.step))
        return arg

    def place(self, arg: fx.Node, partner: TensorInfo | None) -> str:
        """Emit the ops of a pending tensor attribute (once per placement)."""
        p = self.pending[arg]
        src = p.source
        shape = tuple(int(s) for s in p.tensor.shape)
        full = self.shape(p.expand) if p.expand is not None else shape  # shape of ``arg``
        cdim: int | None = None
        layout: Layout | None = None
        pad = 0  # leading dims added so that the channel dim lines up with the partner's
        if partner is not None and partner.cdim is not None:
            channels = partner.shape[partner.cdim]
            ed = partner.cdim - (len(partner.shape) - len(full))  # channel dim within ``full``
            pd = ed - (len(full) - len(shape))  # ... within the attribute itself
            if 0 <= ed < len(full) and full[ed] == channels and pd >= 0 and shape[pd] == channels:
                cdim, layout = pd, partner.layout
                if p.expand is None:
                    pad = len(partner.shape) - len(full)
        key = (src, cdim, None if layout is None else layout.owners, pad)
        if key not in self._placed:
            holder = f"const:{src.name}"
            if holder not in self.modules:
                self.modules[holder] = _ConstHolder(p.tensor)
            if cdim is None:
                self._placed[key] = self.add(src, "const", [], module=holder, shape=shape)
            else:
                assert layout is not None
                attrs = {
                    "cdim": cdim + pad,
                    "layout": layout.to_json(),
                    "trainable": isinstance(p.tensor, nn.Parameter) and p.tensor.requires_grad,
                }
                self._placed[key] = self.add(
                    src, "param", [], attrs, holder, shape=(1,) * pad + shape
                )
        value = self._placed[key]
        if p.expand is None:
            return value
        ekey = (p.expand, key)
        if ekey not in self._placed:
            self._placed[ekey] = _emit_expand(self, p.expand, value)
        return self._placed[ekey]

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
        out_shape = shape if shape is not None else self.shape(node)
        return self.builder.emit(
            name or node.name,
            kind,
            inputs,
            attrs,
            module,
            out_shape,
            lambda: f"{self.describe(node)} at {node.name!r}",
        )

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
                    self.pending[node] = _Pending(node, obj)
                else:
                    self.consts[node] = obj
            elif node.op == "output":
                arg = node.args[0]
                if not self.is_tensor(arg):
                    raise PartitionError("the model must return a single tensor")
                value = self.value(arg, node)
                out_name = self.add(node, "output", [value], shape=self.infos[value].shape)
            else:
                self._call(node)
        if out_name is None:
            raise PartitionError("the traced graph has no output")
        return self.builder.program()

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
            if fn is None:
                fn = leaf_capture(mod)
        elif node.op == "call_function":
            fn = FUNCTION_CAPTURES.get(node.target)
        elif node.op == "call_method":
            fn = METHOD_CAPTURES.get(str(node.target))
        if fn is None:
            tensors = [a for a in node.all_input_nodes if self.is_tensor(a)]
            if tensors and all(
                a in self.pending or self.infos[self.values[a]].kind == "replicated"
                for a in tensors
            ):
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
        tracer = _Tracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:  # fx raises many types; report them uniformly
        raise PartitionError(f"torch.fx could not trace the model: {e}") from e
    was_training = model.training
    gm.eval()
    try:
        with torch.no_grad():
            _ExampleRecorder(gm).propagate(example_input)
    finally:
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
    cap.consts[node] = _eval_const(cap, node)
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


def _emit_expand(cap: Capturer, node: fx.Node, x: str) -> str:
    """``x.expand(*sizes)``; a size read from a tensor's shape follows that tensor at run time
    (e.g. ``cls_token.expand(x.shape[0], -1, -1)`` follows the batch size)."""
    sizes_arg: Any = list(node.args[1:])
    if not sizes_arg:
        sizes_arg = node.kwargs.get("size")
    if isinstance(sizes_arg, list) and len(sizes_arg) == 1:
        first = sizes_arg[0]
        if isinstance(first, (list, tuple)) or (
            isinstance(first, fx.Node) and first in cap.shape_of
        ):
            sizes_arg = first
    if isinstance(sizes_arg, fx.Node):  # x.expand(y.shape)
        v = cap.shape_of.get(sizes_arg)
        size = cap.const(sizes_arg)
        entries: list[Any] = [(v, d) if v is not None else int(s) for d, s in enumerate(size)]
    else:
        entries = [
            cap.dim_of[s] if isinstance(s, fx.Node) and s in cap.dim_of else int(cap.const(s))
            for s in sizes_arg
        ]
    sizes: list[int] = []
    inputs = [x]
    dynamic: list[list[int]] = []
    for pos, e in enumerate(entries):
        if isinstance(e, tuple):
            v, d = e
            info = cap.info(v)
            if info.kind != "replicated" and info.cdim == d:  # channel counts are fixed
                sizes.append(info.shape[d])
                continue
            if v not in inputs:
                inputs.append(v)
            dynamic.append([pos, inputs.index(v), d])
            sizes.append(info.shape[d])
        else:
            sizes.append(e)
    return cap.add(node, "expand", inputs, {"sizes": sizes, "dynamic": dynamic})


@capture_method("expand")
def _expand(cap: Capturer, node: fx.Node, target: Any) -> str:
    src = node.args[0]
    if isinstance(src, fx.Node) and src in cap.pending and cap.pending[src].expand is None:
        p = cap.pending[src]
        cap.pending[node] = _Pending(p.source, p.tensor, node)  # placed by its consumer
        return ""
    return _emit_expand(cap, node, cap.value(src, node))
