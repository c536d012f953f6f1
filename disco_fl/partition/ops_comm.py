"""Ops that move data between nodes or read other nodes' channels.

- ``input``: the requesting node holds the model input and sends it to every other node.
- ``exchange``: after a sharded tensor is produced, every node sends the channels its gates
  leave open to each peer; each node then assembles ``[own channels, from peer 0, ...]``.
- ``conv2d`` / ``linear``: *mixing* layers; node ``k`` computes its slice of output channels
  from its assembled input (or from the replicated input, with no exchange).
- ``output``: every node sends its slice of the output to the requesting node.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from disco_fl.core.layout import CHANNEL_ALIGN, Layout, split_sizes
from disco_fl.partition.program import Op, Program, TensorInfo
from disco_fl.partition.registry import (
    InferContext,
    NodeContext,
    OpSpec,
    PartitionError,
    Traffic,
    layout_of,
    register_spec,
)


def _cdim(info: TensorInfo, op: Op) -> int:
    if info.cdim is None:
        raise PartitionError(f"{op.name}: value has no channel dimension")
    return info.cdim


def _channel_shape(x: torch.Tensor, cdim: int) -> list[int]:
    shape = [1] * x.dim()
    shape[cdim] = -1
    return shape


def gathered_columns(
    layout: Layout, k: int, open_channels: Callable[[int], Sequence[int]] | None = None
) -> list[int]:
    """Global channel order of node ``k``'s assembled input: own channels, then each peer's
    (all of them, or only ``open_channels(peer)``), peers ascending."""
    cols = list(layout.indices(k))
    for j in range(layout.num_nodes):
        if j != k:
            cols.extend(layout.indices(j) if open_channels is None else open_channels(j))
    return cols


@register_spec
class InputSpec(OpSpec):
    kind = "input"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        return TensorInfo("replicated", ctx.out_shape)

    def send(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> dict[int, torch.Tensor] | None:
        if node.index != node.program.requester:
            return None
        return {d: xs[0] for d in range(node.num_nodes) if d != node.index}

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        if node.index == node.program.requester:
            return xs[0]
        return received[node.program.requester]

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        return xs[0]

    def traffic(
        self, op: Op, program: Program, open_count: Callable[[int, int], int]
    ) -> list[Traffic]:
        per = 1
        for s in program.infos[op.name].shape[1:]:
            per *= s
        r = program.requester
        return [Traffic(r, d, per, True) for d in range(program.num_nodes) if d != r]


@register_spec
class ExchangeSpec(OpSpec):
    kind = "exchange"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        (x,) = ins
        if x.kind != "sharded":
            raise PartitionError(f"{op.name}: only sharded values are exchanged")
        return TensorInfo("gathered", x.shape, x.cdim, x.layout)

    def send(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> dict[int, torch.Tensor] | None:
        x: torch.Tensor = xs[0]  # (B, C_k, ...) this node's channels
        cdim = _cdim(node.program.infos[op.name], op)
        out: dict[int, torch.Tensor] = {}
        for dest in range(node.num_nodes):
            if dest == node.index:
                continue
            sel = node.send_selection(op, dest)
            if sel is None:
                continue
            index, scale = sel
            msg = x if index is None else x.index_select(cdim, index)
            if scale is not None:
                msg = msg * scale.view(_channel_shape(msg, cdim))
            out[dest] = msg
        return out

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        cdim = _cdim(node.program.infos[op.name], op)
        parts = [xs[0]] + [received[j] for j in node.sources(op)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=cdim)

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        return xs[0]  # the gates act on the readers' weight columns (see the emulation)

    def traffic(
        self, op: Op, program: Program, open_count: Callable[[int, int], int]
    ) -> list[Traffic]:
        info = program.infos[op.name]
        per = info.elements_per_channel
        out = []
        for j in range(program.num_nodes):
            for k in range(program.num_nodes):
                if j != k and (n := open_count(j, k)) > 0:
                    out.append(Traffic(j, k, n * per, True, channels=n, rows=info.batch_mult))
        return out


def _conv2d(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: Mapping[str, Any]
) -> torch.Tensor:
    """``F.conv2d`` with the op's stride / padding / dilation, also for a node that holds no
    output channel (a head owned by the requester: ``w`` of shape ``(0, C_in, kh, kw)``,
    which ``F.conv2d`` refuses): an empty ``(B, 0, H', W')``, still on ``x``'s graph."""
    if w.shape[0] == 0:
        one = x.new_zeros((1, *w.shape[1:]))
        return F.conv2d(x, one, None, a["stride"], a["padding"], a["dilation"])[:, :0]
    return F.conv2d(x, w, bias, a["stride"], a["padding"], a["dilation"])


ACCUMULATE_SLICES = 8  # batch slices of an in-place accumulation (inference)


def _accumulate(
    partial: torch.Tensor, part: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``partial + fn(part)``, where ``fn`` maps samples to samples (a mixing layer's product
    with a block of its weight columns). Without gradients (inference) it is added in place,
    a slice of the batch at a time, so that an overlapped mixing layer holds one output-sized
    tensor, not three (the partial sum, the part's product, their sum): the same peak memory
    as without overlap (``bench/train.py``, distributed inference)."""
    if part.dim() < 2 or (
        torch.is_grad_enabled() and (partial.requires_grad or part.requires_grad)
    ):
        return partial + fn(part)
    step = -(-part.shape[0] // ACCUMULATE_SLICES)
    for i in range(0, part.shape[0], max(step, 1)):
        partial[i : i + step].add_(fn(part[i : i + step]))
    return partial


class _MixingSpec(OpSpec):
    """Common part of conv2d / linear: node ``k`` owns a contiguous slice of output channels."""

    mixing = True

    @abstractmethod
    def _out_cdim(self, x: TensorInfo) -> int:
        """Channel dim of the output (validates the input's)."""

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        (x,) = ins
        if x.kind == "sharded":
            raise PartitionError(f"{op.name}: mixing layer input must go through an exchange")
        cdim = self._out_cdim(x)
        if "layout" in op.attrs:  # chosen by the capture (e.g. whole attention heads per node)
            layout = Layout.from_json(op.attrs["layout"], ctx.num_nodes)
            if layout.num_channels != ctx.out_shape[cdim]:
                raise PartitionError(f"{op.name}: layout of {layout.num_channels} channels")
            return TensorInfo("sharded", ctx.out_shape, cdim, layout)
        sizes = split_sizes(
            ctx.out_shape[cdim],
            ctx.num_nodes,
            ctx.capacities,
            what=f"layer {op.module!r}",
            align=CHANNEL_ALIGN,
        )
        return TensorInfo("sharded", ctx.out_shape, cdim, Layout.contiguous(sizes))

    def dense_weight(self, op: Op, module: nn.Module) -> Any:
        """The module's weight as ``(C_out, C_in, ...)``; node slices cut rows and columns."""
        return module.weight

    def init_state(
        self, op: Op, module: nn.Module | None, program: Program, k: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if module is None:
            raise PartitionError(f"{op.name}: no module")
        rows = layout_of(program.infos[op.name], op.name).index_tensor(k)
        x = program.infos[op.inputs[0]]
        weight, bias = self.dense_weight(op, module), module.bias
        if not isinstance(weight, torch.Tensor):
            raise PartitionError(f"{op.name}: module has no weight")
        w = weight.detach()  # (C_out, C_in, ...)
        w = w.index_select(0, rows)
        if x.kind == "gathered":
            cols = torch.tensor(gathered_columns(layout_of(x, op.name), k), dtype=torch.long)
            w = w.index_select(1, cols)
        params = {"weight": w.clone()}
        if isinstance(bias, torch.Tensor):
            params["bias"] = bias.detach().index_select(0, rows).clone()
        return params, {}


@register_spec
class Conv2dSpec(_MixingSpec):
    kind = "conv2d"

    def _out_cdim(self, x: TensorInfo) -> int:
        if x.kind == "gathered" and x.cdim != 1:
            raise PartitionError("conv2d input must have channels at dim 1")
        return 1

    overlaps = True  # a sum over input channels

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        st = node.state(op)
        return _conv2d(xs[0], st["weight"], st.get("bias"), op.attrs)  # (B, C_out_k, H', W')

    def compute_own(self, op: Op, node: NodeContext, own: torch.Tensor) -> torch.Tensor:
        st = node.state(op)
        return _conv2d(own, st["weight"][:, : own.shape[1]], st.get("bias"), op.attrs)

    def add_received(
        self, op: Op, node: NodeContext, partial: torch.Tensor, part: torch.Tensor, offset: int
    ) -> torch.Tensor:
        w = node.state(op)["weight"][:, offset : offset + part.shape[1]]
        return _accumulate(partial, part, lambda p: _conv2d(p, w, None, op.attrs))


@register_spec
class LinearSpec(_MixingSpec):
    kind = "linear"

    def _out_cdim(self, x: TensorInfo) -> int:
        last = len(x.shape) - 1
        if x.kind == "gathered" and x.cdim != last:
            raise PartitionError("linear input must have its features in the last dimension")
        return last

    overlaps = True  # a sum over input features

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        st = node.state(op)
        return F.linear(xs[0], st["weight"], st.get("bias"))  # (..., F_out_k)

    def compute_own(self, op: Op, node: NodeContext, own: torch.Tensor) -> torch.Tensor:
        st = node.state(op)
        return F.linear(own, st["weight"][:, : own.shape[-1]], st.get("bias"))

    def add_received(
        self, op: Op, node: NodeContext, partial: torch.Tensor, part: torch.Tensor, offset: int
    ) -> torch.Tensor:
        w = node.state(op)["weight"][:, offset : offset + part.shape[-1]]
        return _accumulate(partial, part, lambda p: F.linear(p, w))


@register_spec
class OutputSpec(OpSpec):
    kind = "output"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        (x,) = ins
        if x.kind == "gathered":
            raise PartitionError("output must not be an exchanged value")
        return TensorInfo("replicated", x.shape, x.cdim, x.layout)

    def send(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> dict[int, torch.Tensor] | None:
        r = node.program.requester
        if node.program.infos[op.inputs[0]].kind != "sharded" or node.index == r:
            return None
        return {r: xs[0]}

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        r = node.program.requester
        info = node.program.infos[op.inputs[0]]
        if info.kind != "sharded":
            return xs[0]
        if node.index != r:
            return None
        layout = layout_of(info, op.name)
        cdim = _cdim(info, op)
        parts = [xs[0] if j == r else received[j] for j in range(node.num_nodes)]
        full = torch.cat(parts, dim=cdim)
        if not layout.is_contiguous():
            order = torch.cat([layout.index_tensor(j) for j in range(node.num_nodes)])
            full = full.index_select(cdim, torch.argsort(order))
        return full

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        return xs[0]

    def traffic(
        self, op: Op, program: Program, open_count: Callable[[int, int], int]
    ) -> list[Traffic]:
        info = program.infos[op.inputs[0]]
        if info.kind != "sharded":
            return []
        layout = layout_of(info, op.name)
        r = program.requester
        per = info.elements_per_channel
        return [
            Traffic(j, r, layout.count(j) * per, True, layout.count(j), info.batch_mult)
            for j in range(program.num_nodes)
            if j != r
        ]
