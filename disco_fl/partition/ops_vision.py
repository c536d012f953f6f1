"""Ops of today's vision models beyond the classic CNN: grouped and transposed convolution,
resizing (nearest / bilinear), padding, pixel (un)shuffle and softmax.

- ``gconv2d``: a grouped convolution whose every group of input channels is held by one node
  is channel-local: node ``k`` convolves its own groups (``groups`` = its local group count)
  and owns their output channels. A grouped convolution whose groups straddle node slices is
  captured as the mixing ``gconv2d_mixing``: a ``conv2d`` with the block-diagonal dense
  weight, masked in training so that it stays block-diagonal.
- ``conv_transpose2d``: a mixing layer like ``conv2d`` (``groups == 1``); node slices are
  stored as ``(C_out_k, C_in, kh, kw)`` so that the gate and slicing machinery of the mixing
  layers applies unchanged.
- ``resize``, ``pad``, ``softmax`` act on non-channel dims only: channel-local.
- ``pixel_shuffle``: local when each block of ``r * r`` input channels has one owner;
  ``pixel_unshuffle`` always (each channel becomes ``r * r`` channels of the same node).
  A pixel shuffle whose blocks span nodes is allowed as the model's output only
  (``gather_pixel_shuffle``: gathered at the requester, then shuffled).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from disco_fl.core.layout import Layout
from disco_fl.partition.ops_comm import Conv2dSpec, _MixingSpec, gathered_columns
from disco_fl.partition.ops_local import DepthwiseConvSpec, _one_tensor, _same
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


def group_owners(layout: Layout, groups: int) -> list[int] | None:
    """Owner of every group of consecutive channels, or ``None`` if a group spans nodes or a
    node holds no whole group."""
    per = layout.num_channels // groups
    owners = []
    for g in range(groups):
        block = set(layout.owners[g * per : (g + 1) * per])
        if len(block) != 1:
            return None
        owners.append(block.pop())
    if set(owners) != set(range(layout.num_nodes)):
        return None
    return owners


@register_spec
class GroupedConvSpec(DepthwiseConvSpec):
    """Conv2d with ``1 < groups``, every group held by one node (``attrs["groups"]`` global);
    node ``k`` holds the rows of its output channels and convolves its own groups."""

    kind = "gconv2d"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        g = int(op.attrs["groups"])
        if x.kind == "replicated":
            return TensorInfo("replicated", ctx.out_shape)
        if x.cdim != 1:
            raise PartitionError(f"{op.name}: conv needs channels at dim 1")
        owners = group_owners(layout_of(x, op.name), g)
        if owners is None:
            raise PartitionError(
                f"{op.name}: the {g} groups are not aligned with the node slices (a group spans "
                "nodes, or a node holds no whole group)"
            )
        per_out = ctx.out_shape[1] // g
        out = tuple(o for o in owners for _ in range(per_out))
        return TensorInfo("sharded", ctx.out_shape, 1, Layout(out, ctx.num_nodes))


@register_spec
class GroupedMixingConvSpec(Conv2dSpec):
    """A grouped convolution whose groups straddle node slices: a mixing ``conv2d`` whose
    weight is the block-diagonal dense form of the grouped weight (``attrs["groups"]``). In
    training the weight is multiplied by its block mask, so the blocks off the diagonal (no
    connection in the original) get no gradient and stay zero."""

    kind = "gconv2d_mixing"
    overlaps = False  # trained with a block mask: computed whole (no per-part sums)

    def _block_mask(
        self, op: Op, node: NodeContext, w: torch.Tensor, k: int | None
    ) -> torch.Tensor | None:
        program = node.program
        g = int(op.attrs["groups"])
        out, x = program.infos[op.name], program.infos[op.inputs[0]]
        c_out, c_in = out.shape[1], x.shape[1]
        if k is None:  # whole tensors (fused emulation): global order
            rows, cols = list(range(c_out)), list(range(c_in))
        else:
            rows = list(layout_of(out, op.name).indices(k))
            cols = (
                gathered_columns(layout_of(x, op.name), k)
                if x.kind == "gathered"
                else list(range(c_in))
            )
        if w.shape[0] != len(rows) or w.shape[1] != len(cols):
            return None  # a shard without the columns of closed gates (inference only)
        row_g = torch.tensor(rows) // (c_out // g)
        col_g = torch.tensor(cols) // (c_in // g)
        mask = (row_g[:, None] == col_g[None, :]).to(w.dtype)
        return mask.view(*mask.shape, *([1] * (w.dim() - 2)))

    def _conv(self, op: Op, node: NodeContext, x: torch.Tensor, k: int | None) -> torch.Tensor:
        st, a = node.state(op), op.attrs
        w = st["weight"]
        if node.training:
            mask = self._block_mask(op, node, w, k)
            if mask is not None:
                w = w * mask
        return F.conv2d(x, w, st.get("bias"), a["stride"], a["padding"], a["dilation"])

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        return self._conv(op, node, xs[0], node.index)

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        return self._conv(op, node, xs[0], None)


@register_spec
class ConvTranspose2dSpec(_MixingSpec):
    kind = "conv_transpose2d"

    def _out_cdim(self, x: TensorInfo) -> int:
        if x.kind == "gathered" and x.cdim != 1:
            raise PartitionError("conv_transpose2d input must have channels at dim 1")
        return 1

    def dense_weight(self, op: Op, module: nn.Module) -> Any:
        w = getattr(module, "weight", None)
        return w.transpose(0, 1) if isinstance(w, torch.Tensor) else None  # (C_out, C_in, ..)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        st, a = node.state(op), op.attrs
        w = st["weight"].transpose(0, 1)  # (C_in, C_out_k, kh, kw)
        return F.conv_transpose2d(
            xs[0],
            w,
            st.get("bias"),
            a["stride"],
            a["padding"],
            a["output_padding"],
            1,
            a["dilation"],
        )


def _spatial_only(op: Op, x: TensorInfo, what: str) -> None:
    if x.kind == "sharded" and x.cdim != 1:
        raise PartitionError(f"{op.name}: {what} needs channels at dim 1")


@register_spec
class ResizeSpec(OpSpec):
    """``F.interpolate`` of the spatial dims: ``attrs`` ``mode`` (nearest, bilinear),
    ``size`` or ``scale_factor`` (one is ``None``), ``align_corners``."""

    kind = "resize"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        if op.attrs["mode"] not in ("nearest", "bilinear"):
            raise PartitionError(f"{op.name}: interpolation mode {op.attrs['mode']!r}")
        _spatial_only(op, x, "resizing")
        return _same(x, ctx.out_shape)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        a = op.attrs
        kwargs: dict[str, Any] = {"mode": a["mode"]}
        if a["mode"] != "nearest":
            kwargs["align_corners"] = bool(a.get("align_corners", False))
        if a.get("size") is not None:
            kwargs["size"] = tuple(a["size"])
        else:
            kwargs["scale_factor"] = tuple(a["scale_factor"])
        x = xs[0]
        if x.dim() > 2 and x.shape[1] == 0:  # a node without channels here (head="requester"):
            return F.interpolate(x.new_zeros((x.shape[0], 1, *x.shape[2:])), **kwargs)[:, :0]
        return F.interpolate(x, **kwargs)


@register_spec
class PadSpec(OpSpec):
    """``F.pad(x, pad, mode, value)`` of non-channel dims (``attrs["pad"]`` as for ``F.pad``)."""

    kind = "pad"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        pad = [int(p) for p in op.attrs["pad"]]
        nd = len(x.shape)
        padded = [nd - 1 - i // 2 for i, p in enumerate(pad) if p != 0]
        if 0 in padded:
            raise PartitionError(f"{op.name}: padding the batch dim")
        if x.kind == "sharded" and x.cdim in padded:
            raise PartitionError(f"{op.name}: padding the channel dim {x.cdim}")
        return _same(x, ctx.out_shape)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        a = op.attrs
        mode = a.get("mode", "constant")
        value = a.get("value") if mode == "constant" else None
        return F.pad(xs[0], [int(p) for p in a["pad"]], mode, value)


@register_spec
class PixelShuffleSpec(OpSpec):
    """``pixel_shuffle`` (``attrs["inverse"]`` False) or ``pixel_unshuffle`` by ``factor``."""

    kind = "pixel_shuffle"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        r2 = int(op.attrs["factor"]) ** 2
        if x.kind == "replicated":
            return TensorInfo("replicated", ctx.out_shape)
        _spatial_only(op, x, "pixel shuffle")
        layout = layout_of(x, op.name)
        if op.attrs.get("inverse"):
            return TensorInfo("sharded", ctx.out_shape, 1, layout.repeat_each(r2))
        blocks = [set(layout.owners[c : c + r2]) for c in range(0, layout.num_channels, r2)]
        if any(len(b) != 1 for b in blocks):
            raise PartitionError(
                f"{op.name}: a block of {r2} channels that pixel_shuffle merges spans nodes"
            )
        owners = tuple(b.pop() for b in blocks)
        return TensorInfo("sharded", ctx.out_shape, 1, Layout(owners, ctx.num_nodes))

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        r = int(op.attrs["factor"])
        return F.pixel_unshuffle(xs[0], r) if op.attrs.get("inverse") else F.pixel_shuffle(xs[0], r)


def shuffle_spans_nodes(x: TensorInfo, factor: int) -> bool:
    """Whether a pixel shuffle by ``factor`` of ``x`` merges channels of several nodes."""
    if x.kind != "sharded" or x.cdim != 1 or x.layout is None:
        return False
    owners, r2 = x.layout.owners, factor * factor
    return any(len(set(owners[c : c + r2])) > 1 for c in range(0, len(owners), r2))


@register_spec
class GatherPixelShuffleSpec(OpSpec):
    """The model's output is ``pixel_shuffle`` of a tensor whose blocks of ``r * r`` channels
    span nodes (ESPCN's last layer, sub-pixel phases held by different nodes): every other
    node sends its channels to the requester (as the ``output`` op would), which shuffles the
    whole tensor. Its value exists on the requester only, so the capture allows it only as
    the model's output (``comm_report`` counts it as output bytes)."""

    kind = "gather_pixel_shuffle"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        if x.kind != "sharded" or x.cdim != 1:
            raise PartitionError(f"{op.name}: gathers a tensor sharded along dim 1 only")
        return TensorInfo("replicated", ctx.out_shape)

    def send(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> dict[int, torch.Tensor] | None:
        r = node.program.requester
        return None if node.index == r else {r: xs[0]}

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        r = node.program.requester
        if node.index != r:
            return None
        layout = layout_of(node.program.infos[op.inputs[0]], op.name)
        full = torch.cat([xs[0] if j == r else received[j] for j in range(node.num_nodes)], 1)
        if not layout.is_contiguous():
            order = torch.cat([layout.index_tensor(j) for j in range(node.num_nodes)])
            full = full.index_select(1, torch.argsort(order))
        return F.pixel_shuffle(full, int(op.attrs["factor"]))

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        return F.pixel_shuffle(xs[0], int(op.attrs["factor"]))

    def traffic(
        self, op: Op, program: Program, open_count: Callable[[int, int], int]
    ) -> list[Traffic]:
        info = program.infos[op.inputs[0]]
        layout, r = layout_of(info, op.name), program.requester
        per = info.elements_per_channel
        return [
            Traffic(j, r, layout.count(j) * per, True, channels=layout.count(j))
            for j in range(program.num_nodes)
            if j != r
        ]


@register_spec
class SoftmaxSpec(OpSpec):
    """``softmax`` / ``log_softmax`` over a non-channel dim."""

    kind = "softmax"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        if x.kind == "sharded" and int(op.attrs["dim"]) == x.cdim:
            raise PartitionError(
                f"{op.name}: a softmax over the channel dim mixes every node's channels"
            )
        return _same(x, ctx.out_shape)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        fn = F.log_softmax if op.attrs.get("log") else F.softmax
        return fn(xs[0], int(op.attrs["dim"]))
