"""Channel-local ops: every node computes its own channels with no communication.

Activations, dropout, pooling, BatchNorm, depthwise convolution, residual add / multiply,
constants and trained tensor attributes. On replicated inputs they run on the whole tensor
(each node computes the same thing). The shape ops (concat, flatten, reductions, permute,
indexing, expand) are in :mod:`disco_fl.partition.ops_shape`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from disco_fl.core.layout import Layout
from disco_fl.partition.program import Op, Program, TensorInfo
from disco_fl.partition.registry import (
    InferContext,
    NodeContext,
    OpSpec,
    PartitionError,
    layout_of,
    register_spec,
)

ACTIVATIONS: dict[str, Any] = {
    "relu": lambda x, a: F.relu(x),
    "relu6": lambda x, a: F.relu6(x),
    "gelu": lambda x, a: F.gelu(x, approximate=a.get("approximate", "none")),
    "silu": lambda x, a: F.silu(x),
    "sigmoid": lambda x, a: torch.sigmoid(x),
    "tanh": lambda x, a: torch.tanh(x),
    "hardswish": lambda x, a: F.hardswish(x),
    "hardsigmoid": lambda x, a: F.hardsigmoid(x),
    "leaky_relu": lambda x, a: F.leaky_relu(x, a.get("negative_slope", 0.01)),
    "elu": lambda x, a: F.elu(x, a.get("alpha", 1.0)),
    "hardtanh": lambda x, a: F.hardtanh(x, a.get("min_val", -1.0), a.get("max_val", 1.0)),
    "identity": lambda x, a: x,
    "clamp": lambda x, a: torch.clamp(x, a.get("min"), a.get("max")),
    "exp": lambda x, a: torch.exp(x),
}


def _same(x: TensorInfo, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(x.kind, shape, x.cdim, x.layout)


def _slice_param(t: torch.Tensor, program: Program, op: Op, k: int) -> torch.Tensor:
    """Node ``k``'s entries of a per-channel parameter (whole tensor on replicated input)."""
    x = program.infos[op.inputs[0]]
    if x.kind == "replicated":
        return t.detach().clone()
    return t.detach().index_select(0, layout_of(x, op.name).index_tensor(k)).clone()


def _one_tensor(op: Op, ins: Sequence[TensorInfo]) -> TensorInfo:
    if len(ins) != 1:
        raise PartitionError(f"{op.name}: expected one tensor input")
    if ins[0].kind == "gathered":
        raise PartitionError(f"{op.name}: cannot read an exchanged value")
    return ins[0]


@register_spec
class ActSpec(OpSpec):
    kind = "act"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        if op.attrs["fn"] not in ACTIVATIONS:
            raise PartitionError(f"{op.name}: unknown activation {op.attrs['fn']!r}")
        return _same(_one_tensor(op, ins), ctx.out_shape)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        return ACTIVATIONS[op.attrs["fn"]](xs[0], op.attrs)


@register_spec
class DropoutSpec(OpSpec):
    kind = "dropout"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        return _same(_one_tensor(op, ins), ctx.out_shape)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        if op.attrs.get("feature"):  # whole channels (Dropout2d), drawn by each node for its own
            return torch.feature_dropout(xs[0], op.attrs["p"], node.training)
        return F.dropout(xs[0], op.attrs["p"], node.training)


@register_spec
class PoolSpec(OpSpec):
    kind = "pool"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        if x.kind == "sharded" and x.cdim != 1:
            raise PartitionError(f"{op.name}: 2d pooling needs channels at dim 1")
        return _same(x, ctx.out_shape)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        a, x = op.attrs, xs[0]
        t = a["type"]
        if t == "max":
            return F.max_pool2d(
                x, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"]
            )
        if t == "avg":
            return F.avg_pool2d(
                x,
                a["kernel_size"],
                a["stride"],
                a["padding"],
                a["ceil_mode"],
                a["count_include_pad"],
            )
        if t == "adaptive_avg":
            return F.adaptive_avg_pool2d(x, a["output_size"])
        if t == "adaptive_max":
            return F.adaptive_max_pool2d(x, a["output_size"])
        raise PartitionError(f"{op.name}: unknown pooling {t!r}")


@register_spec
class BatchNormSpec(OpSpec):
    kind = "batch_norm"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        if x.kind == "sharded" and x.cdim != 1:
            raise PartitionError(f"{op.name}: BatchNorm needs channels at dim 1")
        return _same(x, ctx.out_shape)

    def init_state(
        self, op: Op, module: nn.Module | None, program: Program, k: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        params: dict[str, torch.Tensor] = {}
        bufs: dict[str, torch.Tensor] = {}
        if module.affine:
            params = {"weight": _slice_param(module.weight, program, op, k)}
            params["bias"] = _slice_param(module.bias, program, op, k)
        if module.track_running_stats:
            assert module.running_mean is not None and module.running_var is not None
            bufs = {
                "running_mean": _slice_param(module.running_mean, program, op, k),
                "running_var": _slice_param(module.running_var, program, op, k),
            }
        return params, bufs

    def buffer_names(self, op: Op) -> frozenset[str]:
        return frozenset({"running_mean", "running_var"})

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        st = node.state(op)
        rm, rv = st.get("running_mean"), st.get("running_var")
        use_batch = node.training or rm is None
        return F.batch_norm(
            xs[0],
            rm,
            rv,
            st.get("weight"),
            st.get("bias"),
            use_batch,
            op.attrs["momentum"],
            op.attrs["eps"],
        )


@register_spec
class DepthwiseConvSpec(OpSpec):
    """Conv2d with ``groups == in_channels``: output channel ``o`` reads input ``o // m``."""

    kind = "dwconv2d"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        if x.kind == "replicated":
            return TensorInfo("replicated", ctx.out_shape)
        if x.cdim != 1:
            raise PartitionError(f"{op.name}: conv needs channels at dim 1")
        m = op.attrs["multiplier"]
        owners = tuple(o for o in layout_of(x, op.name).owners for _ in range(m))
        return TensorInfo("sharded", ctx.out_shape, 1, Layout(owners, ctx.num_nodes))

    def init_state(
        self, op: Op, module: nn.Module | None, program: Program, k: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if not isinstance(weight, torch.Tensor):
            raise PartitionError(f"{op.name}: module has no weight")
        out = program.infos[op.name]
        rows = None if out.kind == "replicated" else layout_of(out, op.name).index_tensor(k)

        def cut(t: torch.Tensor) -> torch.Tensor:
            return (t.detach() if rows is None else t.detach().index_select(0, rows)).clone()

        params = {"weight": cut(weight)}
        if isinstance(bias, torch.Tensor):
            params["bias"] = cut(bias)
        return params, {}

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        st, a, x = node.state(op), op.attrs, xs[0]
        w = st["weight"]  # (C_out_k, C_in / groups, kh, kw)
        groups = x.shape[1] // w.shape[1]  # this node's groups (its channels if depthwise)
        return F.conv2d(x, w, st.get("bias"), a["stride"], a["padding"], a["dilation"], groups)


@register_spec
class IdentitySpec(OpSpec):
    kind = "identity"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        return _same(_one_tensor(op, ins), ctx.out_shape)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        return xs[0]


BINARY: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
}


@register_spec
class BinarySpec(OpSpec):
    """Elementwise ``a OP b``: two tensors (same ownership, or one broadcast) or tensor/scalar."""

    kind = "binary"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        if op.attrs["fn"] not in BINARY:
            raise PartitionError(f"{op.name}: unknown elementwise op {op.attrs['fn']!r}")
        if any(i.kind == "gathered" for i in ins):
            raise PartitionError(f"{op.name}: cannot read an exchanged value")
        sharded = [i for i in ins if i.kind == "sharded"]
        if not sharded:
            return TensorInfo("replicated", ctx.out_shape)
        first = sharded[0]
        for s in sharded[1:]:
            if s.layout != first.layout or s.cdim != first.cdim:
                raise PartitionError(
                    f"{op.name}: operands have different channel ownership; re-sharding is not "
                    "supported (give both branches the same channel count and split)"
                )
        assert first.cdim is not None
        nd = len(ctx.out_shape)
        for r in ins:
            if r.kind == "replicated":
                off = nd - len(r.shape)
                c = first.cdim - off
                size = r.shape[c] if 0 <= c < len(r.shape) else 1
                if size not in (1, ctx.out_shape[first.cdim]):
                    raise PartitionError(f"{op.name}: cannot broadcast a replicated operand")
        return TensorInfo("sharded", ctx.out_shape, first.cdim, first.layout)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        return self._apply(op, node, xs, slice_replicated=True)

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        return self._apply(op, node, xs, slice_replicated=False)

    def _apply(self, op: Op, node: NodeContext, xs: Sequence[Any], slice_replicated: bool) -> Any:
        out = node.program.infos[op.name]
        vals: list[Any] = list(xs)
        if out.kind == "sharded" and slice_replicated:
            assert out.cdim is not None and out.layout is not None
            for i, name in enumerate(op.inputs):
                info = node.program.infos[name]
                if info.kind == "replicated":
                    c = out.cdim - (len(out.shape) - len(info.shape))
                    if 0 <= c < len(info.shape) and info.shape[c] == out.layout.num_channels:
                        vals[i] = vals[i].index_select(c, out.layout.index_tensor(node.index))
        if "scalar" in op.attrs:
            s = op.attrs["scalar"]
            vals = [s, vals[0]] if op.attrs.get("scalar_first") else [vals[0], s]
        return BINARY[op.attrs["fn"]](vals[0], vals[1])


@register_spec
class ConstSpec(OpSpec):
    """A tensor attribute of the model (``get_attr``), replicated on every node (not trained)."""

    kind = "const"

    def init_state(
        self, op: Op, module: nn.Module | None, program: Program, k: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        value = getattr(module, "value", None)
        if not isinstance(value, torch.Tensor):
            raise PartitionError(f"{op.name}: constant op without a tensor value")
        return {}, {"value": value.detach().clone()}

    def buffer_names(self, op: Op) -> frozenset[str]:
        return frozenset({"value"})

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        return TensorInfo("replicated", ctx.out_shape)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        return node.state(op)["value"]


@register_spec
class ParamSpec(OpSpec):
    """A tensor attribute of the model (e.g. a class token or positional embedding) split along
    its channel dim ``attrs["cdim"]`` like the activation it is combined with
    (``attrs["layout"]``): node ``k`` holds (and trains, if ``attrs["trainable"]``) its slice.
    The slice is stored channel-first (``value`` of shape ``(C_k, ...)``)."""

    kind = "param"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        if ins:
            raise PartitionError(f"{op.name}: a parameter op has no inputs")
        cdim = int(op.attrs["cdim"])
        if not 0 <= cdim < len(ctx.out_shape):
            raise PartitionError(f"{op.name}: channel dim {cdim} out of range")
        layout = Layout.from_json(op.attrs["layout"], ctx.num_nodes)
        if layout.num_channels != ctx.out_shape[cdim]:
            raise PartitionError(
                f"{op.name}: layout of {layout.num_channels} channels for a dim of "
                f"{ctx.out_shape[cdim]}"
            )
        return TensorInfo("sharded", ctx.out_shape, cdim, layout)

    def init_state(
        self, op: Op, module: nn.Module | None, program: Program, k: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        value = getattr(module, "value", None)
        if not isinstance(value, torch.Tensor):
            raise PartitionError(f"{op.name}: parameter op without a tensor value")
        info = program.infos[op.name]
        t = value.detach().reshape(info.shape).movedim(int(op.attrs["cdim"]), 0)
        t = t.index_select(0, layout_of(info, op.name).index_tensor(k)).clone()
        return ({"value": t}, {}) if op.attrs.get("trainable", True) else ({}, {"value": t})

    def buffer_names(self, op: Op) -> frozenset[str]:
        return frozenset() if op.attrs.get("trainable", True) else frozenset({"value"})

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        return node.state(op)["value"].movedim(0, int(op.attrs["cdim"]))
