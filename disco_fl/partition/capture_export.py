"""Capture on ``torch.export``: a model -> :class:`~disco_fl.partition.program.Program`.

The second front end next to the symbolic ``torch.fx`` capture (:mod:`.capture`). The model is
exported (eval mode, the example input's shapes) with ``torch.export.export``, which traces
through Python control flow, ``x.ndim`` checks, optional arguments and functional calls that
symbolic fx cannot, into ATen ops (``aten.conv2d``, ``aten.view``, ...). Each ATen op is
turned into ops of the same registry the fx capture uses (``conv2d``, ``linear``,
``batch_norm``, ``binary``, ...) by a function registered per op (:func:`capture_aten`; the
rules are in :mod:`.aten_rules`), so the resulting program runs on the same op specs in the
emulation, the shard-only execution, the runtime and training.

Channel ownership is propagated op by op, as DTensor propagates ``Shard(dim)``:

- views, flatten, unsqueeze / squeeze: :func:`~disco_fl.partition.ops_view.reshape_info`
  (ownership labels reshaped like the tensor; the output's channel dim is the one the owner
  follows); chains of views and permutes after which no single dim carries the owner (a
  channel shuffle on 4 nodes) are composed on element positions and emitted as one
  ``reindex`` when they end in the input's shape;
- a reshape may also merge each sample's windows into dim 0 or split them out again (Swin's
  window partition ``(B, H, W, C) -> (B * nW, ws * ws, C)`` and its reverse), as DTensor keeps
  ``Shard(C)`` through a view that carries ``C`` unchanged: the value then holds
  ``batch_mult`` rows per sample, sample-major (:func:`.ops_view.rows_per_sample`);
  merging the channel dim into dim 0, or rows that straddle samples, is refused;
- permute / transpose move the channel dim (``permute``); one that moves dim 0 away
  (attention's ``qkv.permute(2, 0, 3, 1, 4)``) stays pending until the dim it moved to the
  front is indexed (``qkv[0]``), see :mod:`.aten_rules_attention`;
- slicing, ``chunk``, ``split`` of the channel dim select channels (``reindex``), of other
  dims index them (``index``); ``cat`` concatenates layouts.

Parameters are lifted by ``torch.export``; an op that uses a module's ``weight`` / ``bias``
slices that module (``op.module`` is its qualified name); any other parameter, buffer or
constant is placed by its consumer: split like the activation it is combined with (a
``param`` op, e.g. ConvNeXt's layer scale) or replicated (a ``const`` op).

Errors name the ATen op, the layer (the module path from the exported graph's
``nn_module_stack``) and the reason.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from disco_fl.partition.builder import ProgramBuilder, _ConstHolder
from disco_fl.partition.ops_drop import keep_drop_path
from disco_fl.partition.outputs import structure_of
from disco_fl.partition.program import Program, TensorInfo
from disco_fl.partition.registry import PartitionError

aten = torch.ops.aten
AtenCapture = Callable[["ExportCapturer", fx.Node, dict[str, Any]], Any]
ATEN_CAPTURES: dict[Any, AtenCapture] = {}


def capture_aten(*packets: Any) -> Callable[[AtenCapture], AtenCapture]:
    """Register the capture of ATen ops by overload packet (``torch.ops.aten.conv2d``). The
    function receives the op's arguments by schema name (defaults filled in) and returns a
    program value name, a list of them (tuple outputs), or ``None`` (no value)."""

    def deco(fn: AtenCapture) -> AtenCapture:
        for p in packets:
            ATEN_CAPTURES[p] = fn
        return fn

    return deco


@dataclass
class _Tensor:
    """A parameter, buffer or constant of the model (lifted by ``torch.export``), not yet
    placed: its consumer decides (module slice, ``param`` split like a partner, ``const``)."""

    fqn: str
    tensor: torch.Tensor


@dataclass
class _ViewChain:
    """Views / permutes of a sharded value after which no single dim carries the owner:
    ``positions`` (shape ``(1, *current[1:])``) holds the flat index, within one sample of
    ``source``, of every element."""

    source: str
    positions: torch.Tensor


@dataclass
class _Permuted:
    """A permutation that moves dim 0 (the batch) away, as attention's
    ``qkv.reshape(B, T, 3, heads, hd).permute(2, 0, 3, 1, 4)`` does: pending until the moved
    dim is indexed (``qkv[0]``), which brings the batch back to dim 0."""

    source: str
    dims: list[int]


class _Holder(nn.Module):
    """The tensors an op slices when they are not a module's own ``weight`` / ``bias``."""

    def __init__(self, tensors: dict[str, torch.Tensor | None]) -> None:
        super().__init__()
        for name, t in tensors.items():
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            else:
                self.register_buffer(name, t)


class ExportCapturer:
    """Walks one exported graph and builds the program."""

    def __init__(
        self,
        model: nn.Module,
        ep: torch.export.ExportedProgram,
        num_nodes: int,
        capacities: Sequence[float] | None,
    ) -> None:
        self.model = model
        self.ep = ep
        self.builder = ProgramBuilder(num_nodes, capacities)
        self.num_nodes = num_nodes
        self.modules: dict[str, nn.Module] = {}
        # program value name, _Tensor, _ViewChain, _Permuted, or a list of them
        self.values: dict[fx.Node, Any] = {}
        self._placed: dict[tuple[Any, ...], str] = {}
        self._resolved: dict[int, str] = {}
        sig = ep.graph_signature
        self._lifted = {
            **{k: ("param", v) for k, v in sig.inputs_to_parameters.items()},
            **{k: ("buffer", v) for k, v in sig.inputs_to_buffers.items()},
            **{k: ("const", v) for k, v in sig.inputs_to_lifted_tensor_constants.items()},
        }
        self.node: fx.Node | None = None  # the node being captured (error messages)

    # -- naming and errors ---------------------------------------------------------------
    def where(self, node: fx.Node | None = None) -> str:
        node = node or self.node
        if node is None:
            return "model"
        op = getattr(node.target, "__name__", str(node.target))
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, cls = list(stack.values())[-1]
            cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else cls.__name__
            return f"{op} in layer {path or '(root)'!r} ({cls_name})"
        return f"{op} at {node.name!r}"

    def fail(self, reason: str) -> PartitionError:
        return PartitionError(f"{self.where()}: {reason}")

    # -- values ---------------------------------------------------------------------------
    def shape(self, node: fx.Node) -> tuple[int, ...]:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise self.fail("does not produce a single tensor")
        return tuple(int(s) for s in val.shape)

    def info(self, name: str) -> TensorInfo:
        return self.builder.infos[name]

    def add(
        self,
        kind: str,
        inputs: list[str],
        attrs: dict[str, Any] | None = None,
        module: str | None = None,
        *,
        shape: tuple[int, ...] | None = None,
        name: str | None = None,
    ) -> str:
        node = self.node
        assert node is not None
        return self.builder.emit(
            name or node.name,
            kind,
            inputs,
            attrs,
            module,
            shape if shape is not None else self.shape(node),
            self.where,
        )

    def is_tensor(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in self.values

    def value(self, arg: Any, partner: TensorInfo | None = None) -> str:
        """Program value of a tensor argument. A model tensor is split like ``partner`` (a
        sharded value it is combined with elementwise) where its dims line up with the
        channel dim, else replicated; a view chain is resolved to a ``reindex``."""
        v = self.values.get(arg) if isinstance(arg, fx.Node) else None
        if isinstance(v, str):
            return v
        if isinstance(v, _Tensor):
            return self._place(arg, v, partner)
        if isinstance(v, _ViewChain):
            return self._resolve(arg, v)
        if isinstance(v, _Permuted):
            raise self.fail(
                f"a permutation {v.dims} that moves the batch dim 0, used other than by indexing "
                "the dim it moved to the front"
            )
        raise self.fail(f"argument {arg!r} is not a tensor of the model")

    def _place(self, node: fx.Node, t: _Tensor, partner: TensorInfo | None) -> str:
        shape = tuple(int(s) for s in t.tensor.shape)
        cdim = None
        pad = 0
        if partner is not None and partner.kind == "sharded" and partner.cdim is not None:
            pad = len(partner.shape) - len(shape)
            d = partner.cdim - pad
            if pad >= 0 and 0 <= d < len(shape) and shape[d] == partner.shape[partner.cdim]:
                cdim = partner.cdim
        layout = partner.layout if cdim is not None and partner is not None else None
        key = (t.fqn, cdim, None if layout is None else layout.owners, pad)
        if key not in self._placed:
            holder = f"const:{t.fqn}"
            if holder not in self.modules:
                self.modules[holder] = _ConstHolder(t.tensor)
            name = t.fqn.replace(".", "_")
            if cdim is None:
                self._placed[key] = self.add("const", [], module=holder, shape=shape, name=name)
            else:
                assert layout is not None
                attrs = {
                    "cdim": cdim,
                    "layout": layout.to_json(),
                    "trainable": isinstance(t.tensor, nn.Parameter) and t.tensor.requires_grad,
                }
                self._placed[key] = self.add(
                    "param", [], attrs, holder, shape=(1,) * pad + shape, name=name
                )
        return self._placed[key]

    def _resolve(self, node: fx.Node, chain: _ViewChain) -> str:
        """A view chain that ends in its source's shape and only reorders (or selects) along
        the channel dim: one ``reindex``."""
        key = id(chain)
        if key in self._resolved:
            return self._resolved[key]
        src = self.info(chain.source)
        pos = chain.positions
        assert src.cdim is not None
        if tuple(pos.shape[1:]) != tuple(src.shape[1:]):
            raise self.fail(
                f"after views of {tuple(src.shape)} (now {(src.shape[0], *pos.shape[1:])}) the "
                "channels of one node lie along several dims (no single channel dim)"
            )
        coords = torch.unravel_index(pos.flatten(), tuple(src.shape[1:]))
        grid = torch.meshgrid(*[torch.arange(s) for s in src.shape[1:]], indexing="ij")
        c = src.cdim - 1
        for d, (got, want) in enumerate(zip(coords, grid, strict=True)):
            if d != c and not torch.equal(got, want.flatten()):
                raise self.fail("views that move elements across non-channel dims")
        chan = coords[c].view(pos.shape[1:]).movedim(c, -1).reshape(-1, src.shape[src.cdim])
        if not bool((chan == chan[0]).all()):
            raise self.fail("views that reorder channels differently at different positions")
        self._resolved[key] = self.add(
            "reindex",
            [chain.source],
            {"dim": src.cdim, "src": [int(i) for i in chan[0]]},
            shape=src.shape,
            name=f"{node.name}_reindex",
        )
        return self._resolved[key]

    def module_of(
        self, tensors: dict[str, Any], kind: type[nn.Module] | None = None, dense: Any = None
    ) -> str:
        """Name of the module whose attributes are exactly ``tensors`` (``{"weight": node,
        "bias": node or None}``); otherwise a holder of those tensors (``dense``: a weight to
        hold instead of ``tensors["weight"]``, e.g. a grouped conv made dense)."""
        found: dict[str, torch.Tensor | None] = {}
        prefixes: set[str | None] = set()
        for attr, arg in tensors.items():
            if arg is None:
                found[attr] = None
                continue
            v = self.values.get(arg)
            if not isinstance(v, _Tensor):
                raise self.fail(f"its {attr} is computed, not a parameter of the model")
            found[attr] = v.tensor
            prefix, _, leaf = v.fqn.rpartition(".")
            prefixes.add(prefix if leaf == attr else None)
        path = prefixes.pop() if len(prefixes) == 1 else None
        if dense is None and path is not None:
            try:
                mod = self.model.get_submodule(path)
            except AttributeError:
                mod = None
            if (
                mod is not None
                and (kind is None or isinstance(mod, kind))
                and all(getattr(mod, a, None) is t for a, t in found.items())
            ):
                self.modules[path] = mod
                return path
        if kind is not None:
            raise self.fail(f"its parameters are not those of one {kind.__name__} module")
        if dense is not None:
            found["weight"] = dense
        assert self.node is not None
        name = f"tensors:{self.node.name}"
        self.modules[name] = _Holder(found)
        return name

    # -- driver ---------------------------------------------------------------------------
    def run(self) -> Program:
        user_inputs = set(self.ep.graph_signature.user_inputs)
        if len(user_inputs) != 1:
            raise PartitionError(
                f"the exported model has {len(user_inputs)} tensor inputs; exactly one is supported"
            )
        out_name = None
        for node in self.ep.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                if node.name in user_inputs:
                    self.values[node] = self.add("input", [])
                elif node.name in self._lifted:
                    _, fqn = self._lifted[node.name]
                    self.values[node] = _Tensor(fqn, self._lifted_tensor(node.name, fqn))
                else:
                    raise self.fail("an input that is neither the model input nor a parameter")
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                out_name = self._output(node)
        if out_name is None:
            raise PartitionError("the exported graph has no output")
        return self.builder.program()

    def _output(self, node: fx.Node) -> str:
        """The ``output`` op; several output tensors (a dict, tuple or list of them) are
        flattened to ``(B, -1)`` and concatenated, their structure recorded in its attrs
        (:mod:`.outputs`)."""
        leaves = list(node.args[0])  # type: ignore[arg-type]
        if not leaves or not all(isinstance(a, fx.Node) for a in leaves):
            raise PartitionError("the model's output must be tensors (a dict, tuple or list)")
        tree = structure_of(self.ep.call_spec.out_spec)
        values = [self.value(a) for a in leaves]
        v = values[0]
        attrs: dict[str, Any] = {}
        if tree is not None:
            shapes = [self.info(u).shape for u in values]
            attrs = {"structure": tree, "leaves": [list(s[1:]) for s in shapes]}
        if len(values) > 1:
            kinds = {self.info(u).kind for u in values}
            if len(kinds) > 1:
                raise PartitionError(
                    f"the model returns tensors split over the nodes and tensors every node "
                    f"holds ({', '.join(str(a) for a in leaves)}); supported: all of one kind"
                )
            flat = [
                u
                if len(s) == 2
                else self.add(
                    "reshape",
                    [u],
                    {"shape": [math.prod(s[1:])]},
                    shape=(s[0], math.prod(s[1:])),
                    name=f"{u}_flat",
                )
                for u, s in zip(values, shapes, strict=True)
            ]
            width = sum(self.info(u).shape[1] for u in flat)
            v = self.add("cat", flat, {"dim": 1}, shape=(shapes[0][0], width), name="outputs")
        return self.add("output", [v], attrs, shape=self.info(v).shape, name="output")

    def _lifted_tensor(self, name: str, fqn: str) -> torch.Tensor:
        kind, _ = self._lifted[name]
        if kind == "param":
            return self.model.get_parameter(fqn)
        if kind == "buffer":
            return self.model.get_buffer(fqn)
        t = self.ep.constants[fqn]
        assert isinstance(t, torch.Tensor)
        return t

    def _call(self, node: fx.Node) -> None:
        if node.target is operator.getitem:
            src, i = node.args
            seq = self.values.get(src)  # type: ignore[arg-type]
            if not isinstance(seq, list):
                raise self.fail("indexing a value that is not a tuple of tensors")
            item = seq[i]  # type: ignore[index]
            if item is None:
                if node.users:
                    raise self.fail(f"output {i} of {src} is not supported")
                return
            self.values[node] = item
            return
        folded = self._fold(node)
        if folded is not None:
            self.values[node] = folded
            return
        packet = getattr(node.target, "overloadpacket", None)
        fn = ATEN_CAPTURES.get(packet)
        if fn is None:
            raise self.fail(
                f"unsupported op {node.target} (no capture rule; see capture_aten to add one)"
            )
        result = fn(self, node, _arguments(node))
        if result is not None:
            self.values[node] = result

    def _fold(self, node: fx.Node) -> _Tensor | None:
        """An op computed from model tensors alone (e.g. a relative position bias gathered
        from its table) is evaluated now: a constant of the program (not trained)."""
        inputs = node.all_input_nodes
        if not inputs or not all(isinstance(self.values.get(n), _Tensor) for n in inputs):
            return None

        def sub(a: Any) -> Any:
            return self.values[a].tensor.detach() if isinstance(a, fx.Node) else a

        args = fx.node.map_aggregate(node.args, sub)
        kwargs = fx.node.map_aggregate(node.kwargs, sub)
        with torch.no_grad():
            out = node.target(*args, **kwargs)  # type: ignore[operator]
        if not isinstance(out, torch.Tensor):
            raise self.fail("an op on model tensors that does not give one tensor")
        return _Tensor(f"folded.{node.name}", out)


def _arguments(node: fx.Node) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def capture_export(
    model: nn.Module,
    num_nodes: int,
    example_input: torch.Tensor,
    capacities: Sequence[float] | None = None,
    *,
    exported: torch.export.ExportedProgram | None = None,
) -> tuple[Program, dict[str, nn.Module]]:
    """Export ``model`` with ``torch.export`` (in eval mode) and build the program.

    ``exported`` reuses an earlier export of the same model and input shape (an export takes
    seconds for a large model). Returns the program and the modules its ops slice.
    """
    if not isinstance(example_input, torch.Tensor):
        raise PartitionError("example_input must be a tensor (batch first)")
    ep = exported if exported is not None else export_model(model, example_input)
    cap = ExportCapturer(model, ep, num_nodes, capacities)
    return cap.run(), dict(cap.modules)


def export_model(model: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode (dropout is then the identity,
    BatchNorm uses its running statistics; stochastic depth is kept as one node,
    :func:`~disco_fl.partition.ops_drop.keep_drop_path`); errors become
    :class:`PartitionError`."""
    was_training = model.training
    model.eval()
    try:
        with keep_drop_path(model):
            return torch.export.export(model, (example_input,), strict=False)
    except Exception as e:  # export raises many types; report them uniformly
        raise PartitionError(f"torch.export could not trace the model: {e}") from e
    finally:
        model.train(was_training)
