"""GroupNorm and LayerNorm with statistics computed exactly across nodes.

A normalization group may span channels held by several nodes. Each node computes, per group
and sample (and per token for LayerNorm), the count, mean and sum of squared deviations of its
own channels, sends ``(mean, M2)`` to every peer that holds channels of the same group (fp32,
counted as communication), and combines all parts with Chan et al.'s parallel formula. The
result equals the single-process statistics up to float rounding. Groups held by one node
need no message.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from disco_fl.core.layout import Layout
from disco_fl.partition.ops_local import _one_tensor, _same, _slice_param
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


def _groups_of(layout: Layout, num_groups: int, k: int) -> list[int]:
    per = layout.num_channels // num_groups
    return [c // per for c in layout.indices(k)]


def shared_groups(layout: Layout, num_groups: int, a: int, b: int) -> list[int]:
    """Groups in which both nodes ``a`` and ``b`` hold channels, ascending."""
    return sorted(set(_groups_of(layout, num_groups, a)) & set(_groups_of(layout, num_groups, b)))


class _NormSpec(OpSpec):
    """``reduce_positions``: GroupNorm reduces over all non-channel dims; LayerNorm keeps them."""

    reduce_positions: bool
    coded_messages = False  # statistics travel in fp32 whatever the codec

    def _groups(self, op: Op, layout: Layout) -> int:
        return int(op.attrs.get("num_groups", 1))

    def init_state(
        self, op: Op, module: nn.Module | None, program: Program, k: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        w = getattr(module, "weight", None)
        b = getattr(module, "bias", None)
        params = {}
        if w is not None:
            params["weight"] = _slice_param(w, program, op, k)
        if b is not None:
            params["bias"] = _slice_param(b, program, op, k)
        return params, {}

    def _local(
        self, op: Op, node: NodeContext, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Local moments: ``xt (B, P, R, C_k)``, group id per local channel, counts ``(G,)``,
        ``mean, m2 (B, P, G)`` and R."""
        info = node.program.infos[op.inputs[0]]
        layout = layout_of(info, op.name)
        g = self._groups(op, layout)
        cdim = info.cdim
        assert cdim is not None
        xt = x.movedim(cdim, -1)  # (B, ..., C_k)
        b, ck = xt.shape[0], xt.shape[-1]
        # GroupNorm: (B, 1, positions, C_k); LayerNorm: (B, positions, 1, C_k)
        xt = xt.reshape(b, 1, -1, ck) if self.reduce_positions else xt.reshape(b, -1, 1, ck)
        r = xt.shape[2]
        gid = torch.tensor(_groups_of(layout, g, node.index), dtype=torch.long)
        onehot = torch.zeros(ck, g, dtype=x.dtype)
        onehot[torch.arange(ck), gid] = 1.0
        counts = onehot.sum(0) * r  # (G,)
        safe = counts.clamp(min=1.0)
        mean = (xt.sum(2) @ onehot) / safe  # (B, P, G)
        dev = xt - mean.index_select(-1, gid).unsqueeze(2)
        m2 = (dev * dev).sum(2) @ onehot  # (B, P, G)
        return xt, gid, counts, mean, m2, r

    def send(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> dict[int, torch.Tensor] | None:
        info = node.program.infos[op.inputs[0]]
        if info.kind != "sharded":
            return None
        layout = layout_of(info, op.name)
        g = self._groups(op, layout)
        _, _, _, mean, m2, _ = self._local(op, node, xs[0])
        out = {}
        for dest in range(node.num_nodes):
            if dest == node.index:
                continue
            shared = shared_groups(layout, g, node.index, dest)
            if shared:
                idx = torch.tensor(shared, dtype=torch.long)
                out[dest] = torch.stack([mean.index_select(-1, idx), m2.index_select(-1, idx)], -1)
        return out  # dest -> (B, P, G_shared, 2)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        info = node.program.infos[op.inputs[0]]
        st = node.state(op)
        eps = op.attrs["eps"]
        if info.kind == "replicated":
            return self._whole(op, xs[0], st)
        layout = layout_of(info, op.name)
        g = self._groups(op, layout)
        x = xs[0]
        xt, gid, n_a, mean, m2, r = self._local(op, node, x)
        for j in sorted(received):
            shared = shared_groups(layout, g, node.index, j)
            idx = torch.tensor(shared, dtype=torch.long)
            msg = received[j]  # (B, P, G_shared, 2)
            n_b = torch.zeros(g, dtype=x.dtype)
            peer = torch.tensor(_groups_of(layout, g, j), dtype=torch.long)
            n_b.index_add_(0, peer, torch.full((len(peer),), float(r), dtype=x.dtype))
            mean_b = torch.zeros_like(mean).index_copy(-1, idx, msg[..., 0])
            m2_b = torch.zeros_like(m2).index_copy(-1, idx, msg[..., 1])
            mask = torch.zeros(g, dtype=x.dtype).index_fill(0, idx, 1.0)
            n_b = n_b * mask
            n = n_a + n_b
            safe = n.clamp(min=1.0)
            delta = mean_b - mean
            mean = mean + delta * (n_b / safe)
            m2 = m2 + m2_b + delta * delta * (n_a * n_b / safe)
            n_a = n
        var = m2 / n_a.clamp(min=1.0)
        mu = mean.index_select(-1, gid).unsqueeze(2)  # (B, P, 1, C_k)
        sd = torch.sqrt(var.index_select(-1, gid).unsqueeze(2) + eps)
        y = ((xt - mu) / sd).reshape(x.movedim(info.cdim, -1).shape)  # type: ignore[arg-type]
        if "weight" in st:
            y = y * st["weight"]
        if "bias" in st:
            y = y + st["bias"]
        return y.movedim(-1, info.cdim)  # type: ignore[arg-type]

    @abstractmethod
    def _whole(self, op: Op, x: torch.Tensor, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The normalization on the whole tensor (replicated input, fused emulation)."""

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        return self._whole(op, xs[0], node.state(op))

    def traffic(
        self, op: Op, program: Program, open_count: Callable[[int, int], int]
    ) -> list[Traffic]:
        info = program.infos[op.inputs[0]]
        if info.kind != "sharded":
            return []
        layout = layout_of(info, op.name)
        g = self._groups(op, layout)
        positions = 1
        if not self.reduce_positions:
            positions = info.elements_per_channel
        out = []
        for a in range(program.num_nodes):
            for b in range(program.num_nodes):
                if a != b and (s := shared_groups(layout, g, a, b)):
                    out.append(Traffic(a, b, 2 * len(s) * positions, False))
        return out


@register_spec
class GroupNormSpec(_NormSpec):
    kind = "group_norm"
    reduce_positions = True

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        if x.kind == "sharded" and x.cdim != 1:
            raise PartitionError(f"{op.name}: GroupNorm needs channels at dim 1")
        return _same(x, ctx.out_shape)

    def _whole(self, op: Op, x: torch.Tensor, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.group_norm(
            x, op.attrs["num_groups"], st.get("weight"), st.get("bias"), op.attrs["eps"]
        )


@register_spec
class LayerNormSpec(_NormSpec):
    """LayerNorm over the channel (last) dimension only: one group, statistics per position."""

    kind = "layer_norm"
    reduce_positions = False

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        x = _one_tensor(op, ins)
        if x.kind == "sharded" and x.cdim != len(x.shape) - 1:
            raise PartitionError(
                f"{op.name}: LayerNorm is supported over the channel (last) dimension only"
            )
        return _same(x, ctx.out_shape)

    def _whole(self, op: Op, x: torch.Tensor, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        shape = tuple(op.attrs.get("normalized_shape", [x.shape[-1]]))
        return torch.nn.functional.layer_norm(
            x, shape, st.get("weight"), st.get("bias"), op.attrs["eps"]
        )
