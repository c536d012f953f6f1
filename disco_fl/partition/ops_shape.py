"""Channel-local shape ops: every node computes its own channels with no communication.

Concatenation, flatten, reductions over non-channel dims, permute / transpose, indexing and
``expand``. Dim 0 is every partitioned value's batch dim and stays first; the channel dim and
its layout follow the op. On replicated inputs they run on the whole tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

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


@register_spec
class CatSpec(OpSpec):
    kind = "cat"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        dim = op.attrs["dim"]
        if any(i.kind == "gathered" for i in ins):
            raise PartitionError(f"{op.name}: cannot read an exchanged value")
        sharded = [i for i in ins if i.kind == "sharded"]
        if not sharded:
            return TensorInfo("replicated", ctx.out_shape)
        cdim = sharded[0].cdim
        if dim == cdim:
            if len(sharded) != len(ins) or any(s.cdim != cdim for s in sharded):
                raise PartitionError(f"{op.name}: channel concat of replicated and sharded values")
            layout = layout_of(sharded[0], op.name)
            for s in sharded[1:]:
                layout = layout.concat(layout_of(s, op.name))
            return TensorInfo("sharded", ctx.out_shape, cdim, layout)
        if len(sharded) != len(ins) or any(
            s.layout != sharded[0].layout or s.cdim != cdim for s in sharded
        ):
            raise PartitionError(f"{op.name}: concat of values with different channel ownership")
        return TensorInfo("sharded", ctx.out_shape, cdim, sharded[0].layout)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        return torch.cat(list(xs), dim=op.attrs["dim"])


@register_spec
class FlattenSpec(OpSpec):
    kind = "flatten"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        s, e = op.attrs["start_dim"], op.attrs["end_dim"]
        if x.kind == "replicated":
            return TensorInfo("replicated", ctx.out_shape)
        assert x.cdim is not None
        c = x.cdim
        if s > c or e < c:
            new_c = c if s > c else c - (e - s)
            return TensorInfo("sharded", ctx.out_shape, new_c, x.layout)
        if s == c:
            n = 1
            for d in range(c + 1, e + 1):
                n *= x.shape[d]
            return TensorInfo("sharded", ctx.out_shape, c, layout_of(x, op.name).repeat_each(n))
        raise PartitionError(
            f"{op.name}: flatten of dims {s}..{e} would mix the channel dim {c} with earlier dims"
        )

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        return torch.flatten(xs[0], op.attrs["start_dim"], op.attrs["end_dim"])


@register_spec
class ReduceSpec(OpSpec):
    """``mean`` / ``sum`` / ``amax`` / ``l2`` (vector norm) over non-channel dims."""

    kind = "reduce"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        if x.kind == "replicated":
            return TensorInfo("replicated", ctx.out_shape)
        dims = op.attrs["dims"]
        assert x.cdim is not None
        if x.cdim in dims:
            raise PartitionError(
                f"{op.name}: a reduction over the channel dim mixes every node's channels"
            )
        c = x.cdim if op.attrs["keepdim"] else x.cdim - sum(1 for d in dims if d < x.cdim)
        return TensorInfo("sharded", ctx.out_shape, c, x.layout)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        a = op.attrs
        x, dims, keep = xs[0], a["dims"], a["keepdim"]
        if a["fn"] == "mean":
            return torch.mean(x, dim=dims, keepdim=keep)
        if a["fn"] == "sum":
            return torch.sum(x, dim=dims, keepdim=keep)
        if a["fn"] == "l2":  # F.normalize's norm
            return torch.linalg.vector_norm(x, 2, dim=dims, keepdim=keep)
        return torch.amax(x, dim=dims, keepdim=keep)


def _check_batch_first(op: Op, what: str) -> None:
    raise PartitionError(
        f"{op.name}: {what} would move or cut dim 0, which every partitioned value keeps as "
        "its batch (per-sample) dim"
    )


@register_spec
class PermuteSpec(OpSpec):
    """``x.permute(dims)`` / ``x.transpose(a, b)``; dim 0 stays first, the channel dim moves."""

    kind = "permute"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        dims = [int(d) for d in op.attrs["dims"]]
        if sorted(dims) != list(range(len(x.shape))):
            raise PartitionError(f"{op.name}: {dims} is not a permutation of {len(x.shape)} dims")
        if dims[0] != 0:
            _check_batch_first(op, f"permutation {dims}")
        if x.kind == "replicated":
            return TensorInfo("replicated", ctx.out_shape)
        assert x.cdim is not None
        return TensorInfo("sharded", ctx.out_shape, dims.index(x.cdim), x.layout)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        return xs[0].permute(*op.attrs["dims"])


def index_tuple(entries: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    """The Python index of an ``index`` op's entries (see :class:`IndexSpec`)."""
    out: list[Any] = []
    for e in entries:
        if e[0] == "all":
            out.append(slice(None))
        elif e[0] == "int":
            out.append(int(e[1]))
        elif e[0] == "slice":
            out.append(slice(e[1], e[2], e[3]))
        else:
            raise PartitionError(f"unknown index entry {e!r}")
    return tuple(out)


@register_spec
class IndexSpec(OpSpec):
    """Basic indexing ``x[:, 0]`` / ``x[:, 1:]`` of non-batch, non-channel dims.

    ``attrs["index"]`` has one entry per dim: ``["all"]``, ``["int", i]`` (the dim is removed)
    or ``["slice", start, stop, step]``.
    """

    kind = "index"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        entries = op.attrs["index"]
        index_tuple(entries)
        if len(entries) != len(x.shape):
            raise PartitionError(f"{op.name}: {len(entries)} index entries for {len(x.shape)} dims")
        if entries[0][0] != "all":
            _check_batch_first(op, "indexing dim 0")
        if x.kind == "replicated":
            return TensorInfo("replicated", ctx.out_shape)
        assert x.cdim is not None
        if entries[x.cdim][0] != "all":
            raise PartitionError(
                f"{op.name}: indexing the channel dim {x.cdim} (split across nodes) is not "
                "supported"
            )
        cdim = x.cdim - sum(1 for e in entries[: x.cdim] if e[0] == "int")
        return TensorInfo("sharded", ctx.out_shape, cdim, x.layout)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        return xs[0][index_tuple(op.attrs["index"])]


@register_spec
class ExpandSpec(OpSpec):
    """``x.expand(*sizes)``. ``attrs["dynamic"]`` lists ``[position, input, dim]``: size
    ``position`` is read at run time from dim ``dim`` of input ``input`` (e.g. the batch size
    of the activation a class token is concatenated with); the channel dim keeps its slice."""

    kind = "expand"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        if not ins or ins[0].kind == "gathered":
            raise PartitionError(f"{op.name}: expected a tensor that is not an exchanged value")
        x = ins[0]
        sizes = [int(s) for s in op.attrs["sizes"]]
        if len(sizes) != len(ctx.out_shape) or len(sizes) < len(x.shape):
            raise PartitionError(f"{op.name}: sizes {sizes} do not fit the output")
        for pos, i, d in op.attrs["dynamic"]:
            if not (0 <= pos < len(sizes) and 1 <= i < len(ins) and 0 <= d < len(ins[i].shape)):
                raise PartitionError(f"{op.name}: bad dynamic size {[pos, i, d]}")
        if x.kind == "replicated":
            return TensorInfo("replicated", ctx.out_shape)
        assert x.cdim is not None
        c = x.cdim + len(sizes) - len(x.shape)
        if sizes[c] not in (-1, ctx.out_shape[c]) or any(p == c for p, _, _ in op.attrs["dynamic"]):
            raise PartitionError(f"{op.name}: expanding the channel dim is not supported")
        return TensorInfo("sharded", ctx.out_shape, c, x.layout)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        x = xs[0]
        sizes = [int(s) for s in op.attrs["sizes"]]
        for pos, i, d in op.attrs["dynamic"]:
            sizes[pos] = int(xs[i].shape[d])
        info = node.program.infos[op.name]
        if info.kind == "sharded":
            assert info.cdim is not None
            sizes[info.cdim] = -1
        return x.expand(*sizes)
