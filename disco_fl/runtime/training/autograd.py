"""Lean-memory autograd of the training step.

An exchange's output is not stored assembled: :class:`Gathered` keeps this node's channels
and the compact messages received, :class:`GatherFn` assembles them for each consumer (and
splits the gradient back), and the saved-tensor hooks (:func:`gather_pack`, :func:`unpack`)
store an assembled input that a backward needs as references to those parts, rebuilt when the
backward runs. :class:`Sent` keeps of a sent message only what its returning gradient needs.

The training step's memory (without DP): a node keeps only what its backward needs. An exchanged
tensor is not stored assembled: its consumers rebuild ``[own channels, received channels]`` on the
fly (:class:`~disco_fl.runtime.training.autograd.GatherFn`) and a saved-tensor hook stores it as
references to the node's own activation and the compact received messages (no zero-padded copies, no
second copy of the own channels); runs of local ops whose value has a single consumer that exchanges
nothing share one autograd graph, so intermediate outputs that no backward reads (e.g. a BatchNorm
output followed by a ReLU) are freed; values are dropped after their last reader; a sent message is
kept only as the autograd edge its gradient flows into (not its values). The math and the order of
every sum are those of the per-op graphs (bit-identical shards after Adam steps in our checks:
ResNet, hard and stochastic gates, and the zoo's mixed "user" net). With hard masks,
``NodeTrainer(..., compact=True)`` also drops the weight columns of closed channels from what is
trained (weights, gradients, optimizer state) and from the assembled inputs (``[own channels, open
channels received]``, no zero padding); the closed columns are kept aside, unchanged, for the
full-width shard (:meth:`~disco_fl.runtime.training.NodeTrainer.full_state_dict`; see
:mod:`disco_fl.runtime.training.compact`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import GradientEdge


@dataclass(frozen=True)
class Sent:
    """A message sent: its shape and dtype (to check the gradient coming back) and, if it
    needs one, the edge its gradient flows into. The message's values are not kept (no
    backward reads them)."""

    shape: torch.Size
    dtype: torch.dtype
    edge: GradientEdge | None


class Gathered:
    """An exchange's output in lean mode: this node's channels and the compact messages
    received, assembled (``build``) only when a consumer runs, and the gradients of both parts
    summed over the consumers (consumers in reverse program order, as the per-op graphs do)."""

    def __init__(
        self,
        own: torch.Tensor,
        recv: dict[int, torch.Tensor],
        build: Callable[[torch.Tensor, dict[int, torch.Tensor]], torch.Tensor],
        cdim: int,
        counts: list[int],
        index: int,
        sel: dict[int, torch.Tensor],
        compact: bool = False,
    ) -> None:
        self.own = own
        self.recv = recv
        self.srcs = sorted(recv)
        self.build = build
        self.cdim = cdim
        self.counts = counts  # channels of every node's slice
        self.index = index
        self.sel = sel
        self.compact = compact  # assembled from the messages as they are (no zero padding)
        self.g_own: torch.Tensor | None = None
        self.g_recv: dict[int, torch.Tensor] = {}

    def materialize(self) -> torch.Tensor:
        with torch.no_grad():
            return self.build(self.own, self.recv)

    def add_grads(self, own: torch.Tensor | None, recv: Mapping[int, torch.Tensor]) -> None:
        if own is not None:
            self.g_own = own if self.g_own is None else self.g_own + own
        for j, g in recv.items():
            prev = self.g_recv.get(j)
            self.g_recv[j] = g if prev is None else prev + g


# consumers that never extend a producer's graph: exchanges (their backward is split in two
# parts), and ``cat``, whose backward hands its inputs strided views, which would change the
# producer's backward kernels (and their rounding) against the per-op graphs' contiguous
# gradients
NO_CHAIN = frozenset({"exchange", "cat"})


class GatherFn(torch.autograd.Function):
    """``[own, zero-padded messages of every peer]`` along the channel dim (compact trainer:
    ``[own, message of every peer that sends]``); saves nothing."""

    @staticmethod
    def forward(ctx: Any, v: Gathered, own: torch.Tensor, *recv: torch.Tensor) -> torch.Tensor:
        ctx.v = v
        return v.build(own, dict(zip(v.srcs, recv, strict=True)))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        v: Gathered = ctx.v
        own = g.narrow(v.cdim, 0, v.counts[v.index])
        off = v.counts[v.index]
        out: dict[int, torch.Tensor] = {}
        for j in range(len(v.counts)):  # own first, then the peers ascending (the assembly)
            if j == v.index:
                continue
            if v.compact:
                if j in v.recv:
                    width = v.recv[j].shape[v.cdim]
                    out[j] = g.narrow(v.cdim, off, width)
                    off += width
                continue
            if j in v.recv:
                out[j] = g.narrow(v.cdim, off, v.counts[j]).index_select(v.cdim, v.sel[j])
            off += v.counts[j]
        return (None, own, *(out[j] for j in v.srcs))


class PackedGather:
    """A saved assembled input, kept as its parts (see :class:`Gathered`)."""

    def __init__(self, v: Gathered) -> None:
        self.v = v


def gather_pack(built: list[tuple[torch.Tensor, Gathered]]) -> Callable[[torch.Tensor], Any]:
    """Saved-tensor pack hook storing an assembled input (``built``) by reference to its
    parts; :func:`unpack` rebuilds it, identical, when the backward needs it. ``built`` is
    cleared by the caller after the op (the hook stays referenced by the graph)."""

    def pack(t: torch.Tensor) -> Any:
        for gv, v in built:
            if (
                t.data_ptr() == gv.data_ptr()
                and t.shape == gv.shape
                and t.stride() == gv.stride()
                and t.dtype == gv.dtype
            ):
                return PackedGather(v)
        return t

    return pack


def unpack(p: Any) -> torch.Tensor:
    return p.v.materialize() if isinstance(p, PackedGather) else p  # type: ignore[no-any-return]
