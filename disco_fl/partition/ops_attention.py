"""Transformer encoder blocks partitioned by heads.

Ownership (node ``k`` of ``N``):

- the residual stream ``(B, T, D)`` is split along D like any linear output (contiguous slices
  of the embedding features, ``split_sizes(D, N, capacities)``);
- attention heads: node ``k`` owns a contiguous slice of the heads, ``split_sizes(H, N,
  capacities)`` heads each. Heads not divisible by N are split *unevenly* (e.g. 5 heads on 2
  nodes: 3 + 2), exactly like channels; fewer heads than nodes is a :class:`PartitionError`.
- the MLP's hidden units: an ordinary linear layer's output slice.

The ``attention`` op is a *mixing* op: it reads the exchanged (gathered) input of the block,
with one gate per input feature and ordered node pair (the exchange + linear machinery), and
holds node ``k``'s rows of the input projection: the q, k and v rows of its heads, in that
order (``weight`` of shape ``(3 * h_k * head_dim, C_in_gathered)``, columns in the gathered
order of :func:`~disco_fl.partition.ops_comm.gathered_columns`). It runs attention for its heads
locally and outputs their concatenation ``(B, T, h_k * head_dim)``, sharded by heads. The output
projection (``out_proj`` / ``proj``) is then an ordinary exchange + ``linear``; LayerNorm uses
the exact cross-node statistics of :mod:`disco_fl.partition.ops_norm`.

The fx capture rules that emit these ops are in :mod:`disco_fl.partition.capture_attention`.

Seq-first tensors (``batch_first=False``): the program's dim 0 is the token dim there, so the
communication accounting's "per sample" means "per dim-0 row" for such a model (the totals are
the same).

Dropout inside attention (on the attention weights) is exact in eval mode (none). In training
mode each node draws its own dropout masks for its heads, so the partitioned model samples a
different (equally distributed) dropout pattern than the original.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from disco_fl.core.layout import Layout, split_sizes
from disco_fl.partition.ops_comm import gathered_columns
from disco_fl.partition.program import Op, Program, TensorInfo
from disco_fl.partition.registry import (
    InferContext,
    NodeContext,
    OpSpec,
    PartitionError,
    layout_of,
    register_spec,
)


def attend(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    heads: int,
    head_dim: int,
    *,
    scale: float | None = None,
    dropout: float = 0.0,
    seq_first: bool = False,
) -> torch.Tensor:
    """Multi-head self-attention of ``heads`` heads without the output projection.

    ``weight`` ``(3 * heads * head_dim, C)`` holds the q rows of the heads, then their k rows,
    then their v rows. ``x`` is ``(B, T, C)`` (``(T, B, C)`` if ``seq_first``); the result is
    ``(B, T, heads * head_dim)`` (resp. ``(T, B, ...)``), heads concatenated in order.
    """
    if seq_first:
        x = x.transpose(0, 1)  # (B, T, C)
    b, t, _ = x.shape
    qkv = F.linear(x, weight, bias)  # (B, T, 3 * h * hd)
    qkv = qkv.reshape(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, T, hd)
    q, k, v = qkv.unbind(0)  # (B, h, T, hd)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)  # (B, h, T, hd)
    o = o.transpose(1, 2).reshape(b, t, heads * head_dim)  # (B, T, h * hd)
    return o.transpose(0, 1) if seq_first else o


def _fetch(module: nn.Module | None, path: str | None) -> torch.Tensor | None:
    if module is None or path is None:
        return None
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


@register_spec
class AttentionSpec(OpSpec):
    """Self-attention of this node's heads (input projection included, output projection not).

    ``attrs``: ``num_heads``, ``head_dim``, ``seq_first``, ``scale`` (``None``: ``head_dim **
    -0.5``), ``dropout`` (on the attention weights, training only), ``weight`` / ``bias``
    (attribute paths of the in-projection in the original module, ``bias`` may be ``None``).
    """

    kind = "attention"
    mixing = True

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        if len(ins) != 1:
            raise PartitionError(f"{op.name}: expected one tensor input")
        (x,) = ins
        if x.kind == "sharded":
            raise PartitionError(f"{op.name}: mixing layer input must go through an exchange")
        nd = len(x.shape)
        if nd != 3:
            raise PartitionError(f"{op.name}: attention needs a 3-d (B, T, D) input, got {x.shape}")
        if x.kind == "gathered" and x.cdim != nd - 1:
            raise PartitionError(f"{op.name}: attention input must have its features last")
        heads, hd = int(op.attrs["num_heads"]), int(op.attrs["head_dim"])
        if heads < 1 or hd < 1 or ctx.out_shape[-1] != heads * hd:
            raise PartitionError(
                f"{op.name}: {heads} heads of {hd} do not give {ctx.out_shape[-1]} features"
            )
        if heads < ctx.num_nodes:
            raise PartitionError(
                f"attention {op.module!r} has {heads} heads, fewer than num_nodes="
                f"{ctx.num_nodes}: every node must own at least one head"
            )
        split = split_sizes(
            heads, ctx.num_nodes, ctx.capacities, what=f"attention {op.module!r} ({heads} heads)"
        )
        return TensorInfo(
            "sharded", ctx.out_shape, nd - 1, Layout.contiguous([h * hd for h in split])
        )

    def check_layout(self, op: Op, info: TensorInfo) -> None:
        hd = int(op.attrs["head_dim"])
        layout = layout_of(info, op.name)
        if not layout.is_contiguous() or any(layout.count(k) % hd for k in range(layout.num_nodes)):
            raise PartitionError(f"{op.name}: node slices must be whole heads of {hd} features")

    def _rows(self, op: Op, program: Program, k: int) -> torch.Tensor:
        layout = layout_of(program.infos[op.name], op.name)
        own = layout.index_tensor(k)
        d = layout.num_channels
        return torch.cat([own, own + d, own + 2 * d])  # q, k, v rows of node k's heads

    def init_state(
        self, op: Op, module: nn.Module | None, program: Program, k: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        weight = _fetch(module, op.attrs["weight"])
        if weight is None:
            raise PartitionError(f"{op.name}: module has no {op.attrs['weight']!r}")
        rows = self._rows(op, program, k)
        w = weight.detach().index_select(0, rows)  # (3 * h_k * hd, C_in)
        x = program.infos[op.inputs[0]]
        if x.kind == "gathered":
            cols = torch.tensor(gathered_columns(layout_of(x, op.name), k), dtype=torch.long)
            w = w.index_select(1, cols)
        params = {"weight": w.clone()}
        bias = _fetch(module, op.attrs.get("bias"))
        if bias is not None:
            params["bias"] = bias.detach().index_select(0, rows).clone()
        return params, {}

    def _run(
        self, op: Op, node: NodeContext, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> torch.Tensor:
        a = op.attrs
        hd = int(a["head_dim"])
        if w.shape[0] % (3 * hd):
            raise PartitionError(f"{op.name}: in-projection of {w.shape[0]} rows")
        return attend(
            x,
            w,
            b,
            w.shape[0] // (3 * hd),
            hd,
            scale=a.get("scale"),
            dropout=float(a.get("dropout", 0.0)) if node.training else 0.0,
            seq_first=bool(a.get("seq_first", False)),
        )

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        st = node.state(op)
        return self._run(op, node, xs[0], st["weight"], st.get("bias"))

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        """Assembled parameters are node-major (``[q_0; k_0; v_0; q_1; ...]``): regroup them
        into ``[q; k; v]`` (heads in order) and attend with every head at once."""
        st = node.state(op)
        layout = layout_of(node.program.infos[op.name], op.name)
        counts = [layout.count(k) for k in range(layout.num_nodes)]

        def regroup(t: torch.Tensor) -> torch.Tensor:
            pieces = torch.split(t, [3 * c for c in counts], 0)
            parts = list(zip(pieces, counts, strict=True))
            return torch.cat([p[i * c : (i + 1) * c] for i in range(3) for p, c in parts], 0)

        b = st.get("bias")
        return self._run(op, node, xs[0], regroup(st["weight"]), None if b is None else regroup(b))
