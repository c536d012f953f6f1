"""Payload bytes of a training step predicted from the program and the open channels."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from disco_fl.core.codecs import get_codec
from disco_fl.core.gates import PairGates, prob_open
from disco_fl.partition import Program, get_spec, op_traffic


@dataclass
class StepBytes:
    """Predicted payload bytes of one step, summed over the household (or for one sender)."""

    forward: int = 0
    backward: int = 0
    # node k -> (forward bytes k sends, backward bytes k sends)
    per_sender: dict[int, tuple[int, int]] = field(default_factory=dict)


def predict_step_bytes(
    program: Program,
    open_count: Callable[[str, int, int], int],
    batch: int,
    *,
    codec: str = "fp32",
    owner: int | None = None,
    selection_frames: bool = False,
    dropped: Collection[int] = (),
) -> StepBytes:
    """Payload bytes of one training step, from the program and the open channels.

    Parameters
    ----------
    program : Program
        The partitioned program.
    open_count : callable
        ``open_count(exchange, src, dst)``: channels sent (hard masks: the plan's open
        channels; stochastic gates: the non-zero samples of that step).
    batch : int
        Batch size.
    codec : str
        Codec of forward activations; default ``"fp32"``. Statistics and gradients are fp32.
    owner : int, optional
        The step's batch owner; default ``program.requester``.
    selection_frames : bool
        Stochastic gates: add the selection frames (a typed ``ChannelSelection`` per
        exchange and pair, independent of the batch; its indices are varints, so this counts
        each at the size of the sender's largest index: exact when every index of the slice
        encodes to the same size, e.g. slices of at most 128 channels, an upper bound
        otherwise). Default False.
    dropped : collection of int
        Nodes that sit the step out (node dropout, :mod:`disco_fl.runtime.training.dropout`):
        no message goes to or comes from them, forward or backward. Default none.

    Returns
    -------
    StepBytes
        Forward bytes (input, activations, statistics, outputs, selections) and backward
        bytes (one fp32 gradient per received element of every message but the input).
    """
    if owner is not None:
        program = dataclasses.replace(program, requester=owner)
    c = get_codec(codec)
    out = StepBytes()
    for op in program.ops:
        coded = get_spec(op.kind).coded_messages
        for t in op_traffic(program, op, open_count):
            if t.src in dropped or t.dst in dropped:
                continue
            f = (c.message_bytes(t.elements, t.rows) if coded else 4 * t.elements) * batch
            b = 0 if op.kind == "input" else 4 * t.elements * batch
            if selection_frames and op.kind == "exchange":
                layout = program.infos[op.name].layout
                width = layout.count(t.src) if layout is not None else t.channels
                f += selection_bytes(t.channels, width)
            fw, bw = out.per_sender.get(t.src, (0, 0))
            out.per_sender[t.src] = (fw + f, bw)
            fw, bw = out.per_sender.get(t.dst, (0, 0))  # gradients flow back from the receiver
            out.per_sender[t.dst] = (fw, bw + b)
            out.forward += f
            out.backward += b
    return out


def gate_penalty(program: Program, gates: nn.ModuleDict, weight: float) -> torch.Tensor | None:
    """``weight`` times this node's part of the household's expected exchange fraction (the
    stochastic gates' budget term): the expected open channels of its ``gates`` (one
    :class:`PairGates` per exchange, towards each destination), weighted by elements per
    channel, over the dense exchange elements of the whole household. Differentiable in the
    gate logits; ``None`` for a program without exchanges."""
    den = 0.0
    num = torch.zeros(())
    for e in program.exchanges:
        layout = program.infos[e.name].layout
        assert layout is not None
        per = program.infos[e.name].elements_per_channel
        den += sum(layout.count(j) * (program.num_nodes - 1) * per for j in range(layout.num_nodes))
        g = gates[e.name]
        assert isinstance(g, PairGates)
        for d in g.dests:
            num = num + prob_open(g.log_alpha[str(d)]).sum() * per
    return weight * num / den if den else None


def selection_bytes(channels: int, width: int) -> int:
    """Serialized ``Control{selection}`` of ``channels`` indices of a slice of ``width``
    channels, each counted at the varint size of ``width - 1`` (see ``selection_frames``)."""
    if channels == 0:
        return 2  # the body's tag and zero length
    packed = channels * _varint_size(max(width - 1, 0))
    inner = 1 + _varint_size(packed) + packed  # ChannelSelection: field 1, packed
    return 1 + _varint_size(inner) + inner  # Control: field 3 (selection)


def _varint_size(v: int) -> int:
    return max(1, (v.bit_length() + 6) // 7)
