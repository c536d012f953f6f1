"""Ops of windowed attention (Swin, MaxViT, timm): batched ``matmul`` of per-head tensors,
``sdpa`` (``F.scaled_dot_product_attention`` of per-head q, k, v) and ``roll`` (the shift of
shifted windows). Both are channel-local: the heads (or channels) of
a node stay on it and nothing is sent.

- ``matmul``: ``a @ b`` of two tensors split along the same leading dim (the heads, e.g.
  ``(B * nW, heads, T, hd) @ (B * nW, heads, hd, T)``) with the same ownership; the
  contraction runs over the last two dims, which are whole on every node, so node ``k``
  multiplies its own heads. A replicated operand that has the split dim is sliced like the
  other. Contracting over the split dim would mix nodes (a :class:`PartitionError`).
- ``roll``: ``torch.roll`` along spatial dims (never dim 0, never the channel dim).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from disco_fl.partition.ops_local import _one_tensor
from disco_fl.partition.program import Op, TensorInfo
from disco_fl.partition.registry import (
    InferContext,
    NodeContext,
    OpSpec,
    PartitionError,
    register_spec,
)


@register_spec
class MatmulSpec(OpSpec):
    """``torch.matmul(a, b)`` of two tensors of at least 3 dims split along the same batch-like
    dim (not one of the last two)."""

    kind = "matmul"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        if len(ins) != 2 or any(i.kind == "gathered" for i in ins):
            raise PartitionError(f"{op.name}: expected two tensors that are not exchanged values")
        nd = len(ctx.out_shape)
        if any(len(i.shape) != nd for i in ins) or nd < 3:
            raise PartitionError(
                f"{op.name}: matmul of {[i.shape for i in ins]}: both operands need the same "
                "number (>= 3) of dims"
            )
        sharded = [i for i in ins if i.kind == "sharded"]
        if not sharded:
            return TensorInfo("replicated", ctx.out_shape)
        first = sharded[0]
        assert first.cdim is not None
        if first.cdim >= nd - 2:
            raise PartitionError(
                f"{op.name}: matmul over the split dim {first.cdim} (its last two dims) would "
                "mix every node's channels; only a split batch-like dim (heads) is local"
            )
        for s in sharded[1:]:
            if s.cdim != first.cdim or s.layout != first.layout:
                raise PartitionError(f"{op.name}: operands split differently")
        for r in ins:
            if r.kind == "replicated" and r.shape[first.cdim] not in (1, first.shape[first.cdim]):
                raise PartitionError(f"{op.name}: cannot broadcast a replicated operand")
        return TensorInfo("sharded", ctx.out_shape, first.cdim, first.layout)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        out = node.program.infos[op.name]
        vals = list(xs)
        if out.kind == "sharded":
            assert out.cdim is not None and out.layout is not None
            for i, name in enumerate(op.inputs):
                info = node.program.infos[name]
                if info.kind == "replicated" and info.shape[out.cdim] == out.layout.num_channels:
                    idx = out.layout.index_tensor(node.index).to(vals[i].device)
                    vals[i] = vals[i].index_select(out.cdim, idx)
        return torch.matmul(vals[0], vals[1])

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        return torch.matmul(xs[0], xs[1])


@register_spec
class SdpaSpec(MatmulSpec):
    """``F.scaled_dot_product_attention(q, k, v[, mask])`` (no dropout) of tensors split
    along the same heads dim (not one of the last two): each node attends with its own heads;
    a replicated mask with that dim is sliced like them."""

    kind = "sdpa"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        if len(ins) not in (3, 4) or any(i.kind == "gathered" for i in ins):
            raise PartitionError(f"{op.name}: expected q, k, v (and a mask), not exchanged")
        nd = len(ctx.out_shape)
        if any(len(i.shape) != nd for i in ins[:3]) or nd < 3:
            raise PartitionError(f"{op.name}: q, k, v need the same number (>= 3) of dims")
        sharded = [i for i in ins if i.kind == "sharded"]
        if not sharded:
            return TensorInfo("replicated", ctx.out_shape)
        first = sharded[0]
        assert first.cdim is not None
        if first.cdim >= nd - 2 or any(i.kind != "sharded" for i in ins[:3]):
            raise PartitionError(
                f"{op.name}: attention with q, k, v split along dim {first.cdim}: only q, k "
                "and v all split along a heads dim (not one of the last two) are local"
            )
        for s in sharded[1:]:
            if s.cdim != first.cdim or s.layout != first.layout:
                raise PartitionError(f"{op.name}: operands split differently")
        if len(ins) == 4 and ins[3].kind == "replicated":
            m, off = ins[3], nd - len(ins[3].shape)
            c = first.cdim - off
            if 0 <= c < len(m.shape) and m.shape[c] not in (1, first.shape[first.cdim]):
                raise PartitionError(f"{op.name}: cannot broadcast the mask")
        return TensorInfo("sharded", ctx.out_shape, first.cdim, first.layout)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        out = node.program.infos[op.name]
        vals = list(xs)
        if out.kind == "sharded" and len(vals) == 4:
            assert out.cdim is not None and out.layout is not None
            m = node.program.infos[op.inputs[3]]
            c = out.cdim - (len(out.shape) - len(m.shape))
            if m.kind == "replicated" and 0 <= c < len(m.shape) and m.shape[c] > 1:
                idx = out.layout.index_tensor(node.index).to(vals[3].device)
                vals[3] = vals[3].index_select(c, idx)
        return self._attend(op, vals)

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        return self._attend(op, list(xs))

    @staticmethod
    def _attend(op: Op, vals: list[Any]) -> Any:
        mask = vals[3] if len(vals) == 4 else None
        return F.scaled_dot_product_attention(
            vals[0],
            vals[1],
            vals[2],
            attn_mask=mask,
            is_causal=bool(op.attrs.get("is_causal")),
            scale=op.attrs.get("scale"),
        )


@register_spec
class RollSpec(OpSpec):
    """``torch.roll(x, shifts, dims)`` along dims other than the batch and the channel dim."""

    kind = "roll"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        dims = [int(d) for d in op.attrs["dims"]]
        if len(dims) != len(op.attrs["shifts"]) or not dims:
            raise PartitionError(f"{op.name}: roll needs one shift per dim")
        if any(not 0 < d < len(x.shape) for d in dims):
            raise PartitionError(f"{op.name}: roll of dims {dims} (dim 0 is the batch)")
        if x.kind == "sharded" and x.cdim in dims:
            raise PartitionError(f"{op.name}: roll of the split channel dim {x.cdim}")
        return TensorInfo(x.kind, ctx.out_shape, x.cdim, x.layout)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        shifts = [int(s) for s in op.attrs["shifts"]]
        return torch.roll(xs[0], shifts, [int(d) for d in op.attrs["dims"]])
