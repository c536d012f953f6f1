"""Views of a sharded tensor: ``reshape`` and ``reindex`` (channel gathers).

Ownership moves through a reshape the way DTensor moves a ``Shard(dim)`` placement through
``view`` (``torch/distributed/tensor/_ops/_view_ops.py``), with one difference: our channel
ownership is an arbitrary map ``channel -> node`` (a :class:`~disco_fl.core.layout.Layout`), not
an even block split, so instead of DTensor's symbolic rules (flatten / split / singleton) the
rule is computed on the example shapes:

- label every element of the input (batch row 0) with the owner of its channel, reshape the
  labels like the tensor, and look for the output dim ``d`` along which the owner varies
  while it is constant along every other dim. That ``d`` is the output's channel dim and the
  owners along it its layout. A flatten of ``(C, H)`` gives ``C`` blocks of ``H``
  (``repeat_each``), a flatten of ``(H, C)`` tiles the layout ``H`` times, a split of ``C`` into
  ``(G, C / G)`` keeps whichever factor the owner follows.
- because a reshape keeps the row-major order of elements, node ``k``'s slice of the output,
  in ascending global order, is exactly its own slice of the input reshaped: the node math is
  ``x.reshape`` with its local channel count at ``d`` (and the batch read at run time).
- when the owner varies along several output dims (e.g. a channel shuffle on 4 nodes: the view
  ``(B, C) -> (B, 2, C / 2)`` puts each node's channels in both halves) no single dim is the
  channel dim; the capture then composes the following views and permutes on element
  positions and emits one ``reindex`` (a channel permutation / selection) if the chain ends
  in the input's own shape, as a channel shuffle does.

``reindex`` also implements slicing, ``chunk`` and ``split`` of the channel dim: output channel
``j`` is input channel ``src[j]`` and keeps its owner, so every node selects from its own
channels and nothing is sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from disco_fl.core.layout import Layout
from disco_fl.partition.ops_local import _one_tensor
from disco_fl.partition.program import Op, TensorInfo
from disco_fl.partition.registry import (
    InferContext,
    NodeContext,
    OpSpec,
    PartitionError,
    layout_of,
    register_spec,
)


def owner_labels(info: TensorInfo) -> torch.Tensor:
    """``(batch_mult, *shape[1:])`` tensor: the owner node of every element of one sample."""
    assert info.cdim is not None
    owners = torch.tensor(layout_of(info, "value").owners, dtype=torch.long)
    view = [1] * len(info.shape)
    view[info.cdim] = -1
    return owners.view(view).expand(info.batch_mult, *info.shape[1:]).contiguous()


def rows_per_sample(x: TensorInfo, out: Sequence[int]) -> int:
    """``batch_mult`` of ``x.reshape(out)``: the rows of dim 0 per sample after the reshape.

    A reshape keeps the row-major order of elements, so as long as every output row lies
    within one sample, the rows stay sample-major: a window partition ``(B, nH, nW, ws, ws, C)
    -> (B * nH * nW, ws * ws, C)`` gives ``nH * nW`` rows per sample, the reverse gives 1.
    A reshape whose rows would straddle samples is a :class:`PartitionError`."""
    rem = x.shape[0] % x.batch_mult
    per_sample = x.batch_mult * math.prod(x.shape[1:])
    row = math.prod(out[1:])
    if (
        rem
        or row == 0
        or per_sample % row
        or out[0] * x.batch_mult != x.shape[0] * (per_sample // row)
    ):
        raise PartitionError(
            f"a reshape of {tuple(x.shape)} to {tuple(out)} would merge or split the batch dim "
            f"0 across samples (dim 0 holds {x.batch_mult} row(s) per sample; a reshape may "
            "only merge whole samples' spatial dims into it, e.g. a window partition)"
        )
    return per_sample // row


def resolve_dim_owner(labels: torch.Tensor) -> tuple[int, list[int]] | None:
    """The dim ``d >= 1`` along which the labels vary while constant along every other dim, and
    the labels along it; ``None`` if they vary along several dims. Constant labels (one owner)
    resolve to the first dim of size > 1 (or dim 1)."""
    nd = labels.dim()
    if nd < 2:
        return None
    if bool((labels == labels.flatten()[0]).all()):
        d = next((i for i in range(1, nd) if labels.shape[i] > 1), 1)
        return d, [int(labels.flatten()[0])] * labels.shape[d]
    for d in range(1, nd):
        rows = labels.movedim(d, -1).reshape(-1, labels.shape[d])
        if bool((rows == rows[0]).all()):
            return d, [int(v) for v in rows[0]]
    return None


def reshape_info(x: TensorInfo, out_shape: Sequence[int], num_nodes: int) -> TensorInfo:
    """Ownership of ``x.reshape(out_shape)`` (see the module docstring); dim 0 may merge or
    split rows within a sample (:func:`rows_per_sample`), never the channel dim."""
    out = tuple(int(s) for s in out_shape)
    mult = rows_per_sample(x, out)
    if x.kind == "replicated":
        return TensorInfo("replicated", out, batch_mult=mult)
    labels = owner_labels(x).reshape(mult, *out[1:])
    if mult > 1 and not bool((labels == labels[:1]).all()):
        raise PartitionError(
            f"a reshape of {tuple(x.shape)} to {out} would move the split channel dim "
            f"{x.cdim} into dim 0, the batch dim (only whole windows of every channel may be "
            "merged into it)"
        )
    found = resolve_dim_owner(labels)
    if found is None:
        raise PartitionError(
            f"after the reshape of {tuple(x.shape)} to {out} the channels of one node lie along "
            "several dims (no single channel dim)"
        )
    d, owners = found
    return TensorInfo("sharded", out, d, Layout(tuple(owners), num_nodes), mult)


@register_spec
class ReshapeSpec(OpSpec):
    """``x.reshape(B * batch_mult, *attrs["shape"])`` with the batch ``B`` read at run time
    (view, flatten, unsqueeze, squeeze, window partition and its reverse); the channel dim,
    the layout and the rows per sample follow :func:`reshape_info`."""

    kind = "reshape"
    sets_batch_mult = True

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        if list(ctx.out_shape[1:]) != [int(s) for s in op.attrs["shape"]]:
            raise PartitionError(f"{op.name}: shape {op.attrs['shape']} does not fit the output")
        return reshape_info(x, ctx.out_shape, ctx.num_nodes)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        x = xs[0]
        info = node.program.infos[op.name]
        src = node.program.infos[op.inputs[0]]
        rows = x.shape[0] // src.batch_mult * info.batch_mult  # the batch is read at run time
        sizes = [rows] + [int(s) for s in op.attrs["shape"]]
        if info.kind == "sharded":
            assert info.cdim is not None
            # this node's channel count (0 for a node without heads: fewer heads than nodes)
            sizes[info.cdim] = -1 if x.numel() else 0
        return x.reshape(sizes)


def reindex_positions(layout: Layout, src: Sequence[int], k: int) -> list[int]:
    """Positions, within node ``k``'s own input channels, of its output channels (ascending
    output order) of a ``reindex`` whose output channel ``j`` is input channel ``src[j]``."""
    local = {c: i for i, c in enumerate(layout.indices(k))}
    return [local[c] for c in src if layout.owners[c] == k]


@register_spec
class ReindexSpec(OpSpec):
    """``out.select(d, j) = x.select(d, src[j])`` along the channel dim ``d`` (``attrs["dim"]``):
    slicing, ``chunk`` / ``split`` and channel shuffles. Every output channel keeps the owner of
    its source channel, so each node selects from its own channels."""

    kind = "reindex"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        src = [int(s) for s in op.attrs["src"]]
        d = int(op.attrs["dim"])
        if len(ctx.out_shape) != len(x.shape) or not 0 < d < len(x.shape):
            raise PartitionError(f"{op.name}: bad reindex dim {d}")
        if ctx.out_shape[d] != len(src) or any(not 0 <= s < x.shape[d] for s in src):
            raise PartitionError(f"{op.name}: source channels out of range")
        if x.kind == "replicated":
            return TensorInfo("replicated", ctx.out_shape)
        if x.cdim != d:
            raise PartitionError(f"{op.name}: reindex of dim {d}, channels are at {x.cdim}")
        owners = layout_of(x, op.name).owners
        return TensorInfo(
            "sharded", ctx.out_shape, d, Layout(tuple(owners[s] for s in src), ctx.num_nodes)
        )

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        x, d = xs[0], int(op.attrs["dim"])
        info = node.program.infos[op.inputs[0]]
        if info.kind == "replicated":
            return self.compute_global(op, node, xs)
        pos = reindex_positions(layout_of(info, op.name), op.attrs["src"], node.index)
        return x.index_select(d, torch.tensor(pos, dtype=torch.long, device=x.device))

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        x = xs[0]
        src = torch.tensor([int(s) for s in op.attrs["src"]], dtype=torch.long, device=x.device)
        return x.index_select(int(op.attrs["dim"]), src)
