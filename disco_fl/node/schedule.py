"""What one node does for each op of a program, worked out once: its schedule.

A :class:`Step` says, for node ``k`` and one op, whom it sends to, whom it receives from (and
what: :class:`~disco_fl.partition.Traffic`), in which frame direction and codec, and which
values no later op reads. :func:`message_problem` is the one check of a received message
against the plan. The driver (:mod:`disco_fl.node.driver`), the emulation in lock step, the
network runtime and the training step all read the same schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from disco_fl.partition import Op, Program, Traffic, get_spec, op_traffic
from disco_fl.partition.registry import OpenCount, OpSpec


def direction_of(op: Op, coded: bool) -> int:
    """Frame direction of the forward messages of ``op``."""
    # the wire's enums, imported on first use: ``import disco_fl`` (the emulation) does not
    # load protobuf
    from disco_fl.proto_gen.disco.v1.peer_pb2 import Frame

    if op.kind == "input":
        return Frame.INPUT
    if op.kind == "output":
        return Frame.OUTPUT
    return Frame.FORWARD if coded else Frame.NORMS


@dataclass(frozen=True)
class Step:
    """What node ``node`` does for one op."""

    layer: int  # the op's index in the program (a frame's ``layer``)
    node: int
    op: Op
    spec: OpSpec
    is_input: bool
    is_output: bool
    out_to: list[int]  # peers this node sends to, ascending
    in_from: list[tuple[int, Traffic]]  # (peer, its message) this node receives, ascending
    wire_codec: str  # the codec of this op's messages ("fp32" for statistics)
    wire_enum: int
    direction: int
    free: tuple[str, ...]  # values no later op reads (dropped after this op: peak memory)
    # an exchange whose every reader sums over its input channels (``spec.overlaps``): with
    # overlap on, its messages are received by the readers, after their own channels' part
    deferrable: bool = False


def schedule(program: Program, k: int, open_count: OpenCount, codec: str) -> list[Step]:
    """Node ``k``'s :class:`Step` for every op of ``program``.

    ``open_count(exchange, src, dst)`` is the number of channels an exchange sends per pair
    (a plan's hard masks: :func:`~disco_fl.partition.plan_open_count`; every channel of the
    slice: :func:`~disco_fl.partition.full_open_count`); ``codec`` the activations' codec.
    """
    from disco_fl.core.wire import codec_enum  # on first use (see direction_of)

    last_use = {name: i for i, op in enumerate(program.ops) for name in op.inputs}
    readers: dict[str, list[Op]] = {}
    for op in program.ops:
        for name in op.inputs:
            readers.setdefault(name, []).append(op)
    steps = []
    for layer, op in enumerate(program.ops):
        spec = get_spec(op.kind)
        traffic = op_traffic(program, op, open_count)
        coded = spec.coded_messages
        wire_codec = codec if coded else "fp32"
        in_from = {t.src: t for t in traffic if t.dst == k}
        steps.append(
            Step(
                layer=layer,
                node=k,
                op=op,
                spec=spec,
                is_input=op.kind == "input",
                is_output=op.kind == "output",
                out_to=sorted({t.dst for t in traffic if t.src == k}),
                in_from=sorted(in_from.items()),
                wire_codec=wire_codec,
                wire_enum=codec_enum(wire_codec),
                direction=direction_of(op, coded),
                free=tuple(dict.fromkeys(n for n in op.inputs if last_use[n] == layer)),
                deferrable=op.kind == "exchange"
                and bool(readers.get(op.name))
                and all(
                    get_spec(r.kind).overlaps and list(r.inputs) == [op.name]
                    for r in readers[op.name]
                ),
            )
        )
    return steps


def input_batch(op: Op, value: Any) -> int | None:
    """The batch size that ``op``'s output sets: its first dimension for the ``input`` op,
    ``None`` for every other op (and a 0-d input)."""
    if op.kind == "input" and isinstance(value, torch.Tensor) and value.dim():
        return int(value.shape[0])
    return None


def expected_shape(program: Program, op: Op, src: int, own: Any, channels: int) -> list[int] | None:
    """The whole shape of ``src``'s message of ``op`` where the receiver can tell it from its
    own input ``own``: an exchange sends ``channels`` channels of a tensor shaped like the
    receiver's slice, the output op the sender's slice. ``None`` for other ops."""
    if not isinstance(own, torch.Tensor):
        return None
    if op.kind == "exchange":
        cdim = program.infos[op.name].cdim
        if cdim is None:
            return None
        shape = list(own.shape)
        shape[cdim] = channels
        return shape
    if op.kind == "output":
        info = program.infos[op.inputs[0]]
        if info.layout is None or info.cdim is None:
            return None
        shape = list(own.shape)
        shape[info.cdim] = info.layout.count(src)
        return shape
    return None


def message_problem(
    program: Program,
    op: Op,
    t: torch.Tensor,
    batch: int | None,
    *,
    channels: int = 0,
    expected: Sequence[int] | None = None,
    strict: bool = False,
) -> str | None:
    """Why a decoded message of ``op`` does not have the shape the plan implies, or ``None``.

    The one message check of every driver of a node (:mod:`disco_fl.node.driver`).

    Parameters
    ----------
    program, op : Program, Op
        The plan's program and the op the message belongs to.
    t : torch.Tensor
        The decoded message.
    batch : int or None
        The step's batch size (``None``: not known yet, unchecked unless ``strict``).
    channels : int
        Channels the message must have at the channel dimension (0: unchecked). Default 0.
    expected : sequence of int, optional
        The message's whole shape, when the receiver knows it. Default None (unchecked).
    strict : bool
        Training, whose messages enter autograd: also float32, finite values, a known batch,
        and an input of exactly the plan's shape past the batch dimension (inference checks
        the input's number of dimensions only). Default False.
    """
    info = program.infos[op.name]
    shape = tuple(t.shape)
    if strict:
        if t.dtype != torch.float32:
            return f"message of type {t.dtype}, expected float32"
        if not bool(torch.isfinite(t).all()):
            return "non-finite values"
    if op.kind == "input":
        if t.dim() != len(info.shape) or (strict and shape[1:] != tuple(info.shape[1:])):
            return f"input of shape {shape}, the plan expects {info.shape}"
        return None
    rows = None if batch is None else batch * info.batch_mult  # windows merged into dim 0
    if (batch is not None or strict) and (t.dim() == 0 or t.shape[0] != rows):
        return f"message of shape {shape} for batch size {batch}" + (
            f" ({info.batch_mult} rows per sample)" if info.batch_mult != 1 else ""
        )
    cdim = info.cdim
    if channels and cdim is not None and (t.dim() != len(info.shape) or t.shape[cdim] != channels):
        return f"message of shape {shape}, expected {channels} channels at dim {cdim}"
    if expected is not None and list(shape) != list(expected):
        return f"message of shape {shape}, expected {list(expected)}"
    return None
