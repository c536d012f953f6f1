"""Capture: a standard PyTorch model -> :class:`~disco_fl.partition.program.Program`.

The model is traced with ``torch.fx`` and its shapes measured on the example input. Each fx
node is turned into program ops by a capture function registered for its module type, its
function, or its method name, or for modules recognised by their structure
(:func:`capture_leaf`, traced as leaves). The rules live in :mod:`.capture_layers` (layers),
:mod:`.capture_tensor` (tensor operations) and :mod:`.capture_attention` (attention). Where a
mixing layer reads a sharded tensor, an ``exchange`` op is inserted once per tensor (layers
reading the same tensor share the exchange and its gates).

Tensor attributes of the model (``get_attr``: a class token, a positional embedding) are placed
by their first consumer: added to or concatenated (along another dim) with a sharded activation
whose channel dim they share, they become a ``param`` op split the same way, each node holding
and training its slice; otherwise they are replicated ``const`` ops (not trained). A size read
from a tensor's shape (``x.shape[0]``) that feeds ``expand`` is read again at run time, so
batch and token counts stay free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from disco_fl.core.layout import Layout
from disco_fl.partition.builder import ProgramBuilder, _ConstHolder
from disco_fl.partition.program import Program, TensorInfo
from disco_fl.partition.registry import PartitionError

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


@dataclass
class _Pending:
    """A tensor attribute of the model (``get_attr``), optionally expanded, whose ownership is
    decided by its first consumer: sharded like the tensor it is added to / concatenated with
    (a trainable ``param`` op holding each node's slice), or replicated (a ``const`` op)."""

    source: fx.Node  # the get_attr node
    tensor: torch.Tensor
    expand: fx.Node | None = None  # an ``expand`` of the attribute, applied after it


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
            self._placed[ekey] = emit_expand(self, p.expand, value)
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
                self.consts[node] = eval_const(self, node)
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


def eval_const(cap: Capturer, node: fx.Node) -> Any:
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
    except Exception as e:  # e.g. an optional argument traced as a Proxy; "auto" falls back
        raise PartitionError(f"the fx trace does not run on the example input: {e}") from e
    finally:
        gm.train(was_training)
    cap = Capturer(gm, num_nodes, capacities)
    program = cap.run()
    modules = dict(cap.modules)
    for op in program.ops:
        if op.module is not None and op.module not in modules:
            modules[op.module] = gm.get_submodule(op.module)
    return program, modules


def emit_expand(cap: Capturer, node: fx.Node, x: str) -> str:
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
