"""The network runtime: one node executes the program, exchanging frames over a transport.

:func:`run_node` is the per-node counterpart of :func:`disco_fl.node.run_lockstep`: for every
op of the plan's program it calls the same ``spec.send`` / ``spec.compute`` (there is one
implementation of a node's math), sends each message as a frame (``layer`` = the op's index,
activations with the plan's codec, normalization statistics in fp32) and receives exactly the
frames that ``spec.traffic`` says are addressed to this node. A received message decodes to
exactly what ``codec.roundtrip`` produces in the emulation, so the requester's output equals
:func:`disco_fl.export.run_shards` bit for bit.

If the node fails (a timeout, a bad frame, an error in its own math), it sends an error frame
in place of every message it still owed its peers, so they fail at once with the cause
instead of waiting for their timeouts.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch

from disco_fl.codecs import get_codec
from disco_fl.export import ShardNode
from disco_fl.partition import Op, Program, Traffic, get_spec
from disco_fl.partition.registry import OpSpec
from disco_fl.plan import Plan
from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.transport.base import MAX_ERROR_TEXT, AsyncTransport, PeerDownError, Transport
from disco_fl.wire import CODECS, decode_tensor, encode_tensor

Frame = peer_pb2.Frame
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


class PeerError(RuntimeError):
    """A peer reported a failure, or sent a message that does not fit the plan."""


def direction_of(op: Op, coded: bool) -> int:
    """Frame direction of the forward messages of ``op``."""
    if op.kind == "input":
        return Frame.INPUT
    if op.kind == "output":
        return Frame.OUTPUT
    return Frame.FORWARD if coded else Frame.NORMS


def op_traffic(plan: Plan, op: Op) -> list[Traffic]:
    """Messages of ``op`` per sample, as the plan's accounting sees them."""

    def open_count(src: int, dst: int) -> int:
        return len(plan.open_channels(op.name, src, dst))

    return get_spec(op.kind).traffic(op, plan.program, open_count)


_TRAFFIC: weakref.WeakKeyDictionary[Any, list[list[Traffic]]] = weakref.WeakKeyDictionary()


def node_traffic(node: ShardNode) -> list[list[Traffic]]:
    """:func:`op_traffic` of every op of ``node``'s plan, computed once per node object."""
    cached = _TRAFFIC.get(node)
    if cached is None:
        cached = [op_traffic(node.plan, op) for op in node.plan.program.ops]
        _TRAFFIC[node] = cached
    return cached


@dataclass(frozen=True)
class _Step:
    """What node ``k`` does for one op, worked out once per node (not per request)."""

    layer: int
    op: Op
    spec: OpSpec
    is_input: bool
    is_output: bool
    out_to: list[int]  # peers this node sends to, ascending
    in_from: list[tuple[int, Traffic]]  # (peer, its message) this node receives, ascending
    wire_codec: str
    wire_enum: int
    direction: int
    free: tuple[str, ...]  # values no later op reads (dropped after this op: peak memory)


_SCHEDULE: weakref.WeakKeyDictionary[Any, list[_Step]] = weakref.WeakKeyDictionary()


def node_schedule(node: ShardNode) -> list[_Step]:
    """The per-op :class:`_Step` list of ``node``, computed once per node object."""
    cached = _SCHEDULE.get(node)
    if cached is not None:
        return cached
    program = node.plan.program
    k = node.index
    codec = get_codec(node.plan.codec)
    last_use = {name: i for i, op in enumerate(program.ops) for name in op.inputs}
    steps = []
    for layer, (op, traffic) in enumerate(zip(program.ops, node_traffic(node), strict=True)):
        spec = get_spec(op.kind)
        coded = spec.coded_messages
        wire_codec = codec.name if coded else "fp32"
        in_from = {t.src: t for t in traffic if t.dst == k}
        steps.append(
            _Step(
                layer=layer,
                op=op,
                spec=spec,
                is_input=op.kind == "input",
                is_output=op.kind == "output",
                out_to=sorted({t.dst for t in traffic if t.src == k}),
                in_from=sorted(in_from.items()),
                wire_codec=wire_codec,
                wire_enum=CODECS[wire_codec],
                direction=direction_of(op, coded),
                free=tuple(dict.fromkeys(n for n in op.inputs if last_use[n] == layer)),
            )
        )
    _SCHEDULE[node] = steps
    return steps


def _check_message(
    program: Program, op: Op, layer: int, src: int, t: torch.Tensor, tr: Traffic, batch: int | None
) -> None:
    """The decoded message must have the shape the plan implies (batch, channels)."""
    where = f"layer {layer} ({op.name}, {op.kind}) from node {src}"
    info = program.infos[op.name]
    if op.kind == "input":
        if t.dim() != len(info.shape):
            raise PeerError(f"{where}: input has {t.dim()} dims, the plan expects {info.shape}")
        return
    if batch is not None and (t.dim() == 0 or t.shape[0] != batch):
        raise PeerError(f"{where}: message of shape {tuple(t.shape)} for batch size {batch}")
    cdim = info.cdim
    if (
        tr.coded
        and tr.channels
        and cdim is not None
        and (t.dim() != len(info.shape) or t.shape[cdim] != tr.channels)
    ):
        raise PeerError(
            f"{where}: message of shape {tuple(t.shape)}, expected {tr.channels} channels "
            f"at dim {cdim}"
        )


_FLUSH = None  # yielded by _node_steps after an op that sent frames (see run_node_async)
_Want = tuple[int, int]  # (layer, src): the frame the node waits for next


def _node_steps(
    node: ShardNode,
    transport: Transport,
    x: torch.Tensor | None,
    session_id: str,
    timeout: float,
    step: int,
    max_message_bytes: int,
    /,
) -> Generator[_Want | None, Frame, torch.Tensor | None]:
    """The node's program as a generator: yields ``(layer, src)`` for every frame it needs
    (the driver sends the frame in, or throws the driver's ``TimeoutError`` /
    :class:`~disco_fl.transport.base.PeerDownError` in) and ``None`` after an op that sent
    frames; returns the output (requester) or ``None``. One implementation for the blocking
    driver (:func:`run_node`) and the event-loop driver (:func:`run_node_async`)."""
    plan: Plan = node.plan
    program = plan.program
    k = node.index
    if transport.index != k or transport.num_nodes != program.num_nodes:
        raise ValueError(
            f"transport of node {transport.index}/{transport.num_nodes} used for node "
            f"{k}/{program.num_nodes}"
        )
    if k == program.requester and not isinstance(x, torch.Tensor):
        raise ValueError(f"node {k} is the requester: it needs the input tensor")
    env: dict[str, Any] = {}
    result: Any = None
    batch: int | None = None
    layer = 0
    sent: set[int] = set()  # peers already sent this layer's message
    requester = k == program.requester
    send = transport.send
    try:
        with torch.inference_mode():
            for step_ in node_schedule(node):
                layer = step_.layer
                op = step_.op
                spec = step_.spec
                if step_.is_input:
                    xs: list[Any] = [x if requester else None]
                else:
                    xs = [env[i] for i in op.inputs]
                out_to = step_.out_to
                msgs = spec.send(op, node, xs) or {}
                if len(msgs) != len(out_to) or sorted(msgs) != out_to:
                    raise RuntimeError(
                        f"node {k} layer {layer} ({op.name}): op sends to {sorted(msgs)} but "
                        f"the plan's traffic says {out_to}"
                    )
                sent = set()
                for dest in out_to:
                    frame = Frame(
                        session_id=session_id,
                        step=step,
                        layer=layer,
                        direction=step_.direction,  # type: ignore[arg-type]
                        src=k,
                        dst=dest,
                    )
                    encode_tensor(msgs[dest], step_.wire_codec, out=frame.tensor)
                    send(frame)
                    sent.add(dest)
                if out_to:
                    yield _FLUSH
                received: dict[int, torch.Tensor] = {}
                for src, tr in step_.in_from:
                    try:
                        f = yield (layer, src)
                    except TimeoutError:
                        raise TimeoutError(
                            f"node {k}: no message from node {src} for layer {layer} "
                            f"({op.name}) within the deadline of {timeout:g} s "
                            f"(session {session_id!r})"
                        ) from None
                    except PeerDownError as e:
                        raise PeerError(
                            f"node {k}: peer {src} is unreachable (layer {layer}, {op.name}): {e}"
                        ) from None
                    if f.error:
                        raise PeerError(
                            f"node {src} failed at layer {layer} ({op.name}): {f.error}"
                        )
                    if f.direction != step_.direction or f.tensor.codec != step_.wire_enum:
                        raise PeerError(
                            f"layer {layer} ({op.name}) from node {src}: direction "
                            f"{f.direction}/codec {f.tensor.codec}, expected {step_.direction}/"
                            f"{step_.wire_enum}"
                        )
                    t = decode_tensor(f.tensor, max_bytes=max_message_bytes)
                    _check_message(program, op, layer, src, t, tr, batch)
                    received[src] = t
                value = spec.compute(op, node, xs, received)
                env[op.name] = value
                del xs, received, msgs
                for name in step_.free:  # free what no later op reads (peak memory)
                    env.pop(name, None)
                if step_.is_input and isinstance(value, torch.Tensor) and value.dim():
                    batch = int(value.shape[0])
                if step_.is_output:
                    result = value
    except BaseException as e:
        why = f"{type(e).__name__}: {e}"
        _notify_peers(plan, transport, session_id, step, layer, sent, why)
        raise
    if k != program.requester:
        return None
    if not isinstance(result, torch.Tensor):
        raise RuntimeError("program produced no output tensor")
    return result.clone()  # an ordinary tensor (not an inference-mode one) for the caller


def run_node(
    node: ShardNode,
    transport: Transport,
    x: torch.Tensor | None,
    *,
    session_id: str,
    timeout: float = 10.0,
    step: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> torch.Tensor | None:
    """Run ``node`` (a :class:`~disco_fl.export.ShardNode`) for one input over ``transport``.

    ``x`` is the model input on the requester (``plan.program.requester``) and ignored
    elsewhere. ``timeout`` is the deadline of the whole call, in seconds: every wait for a
    peer's message is bounded by what is left of it. Returns the output on the
    requester, ``None`` on the other nodes. Raises ``TimeoutError`` (a peer is silent),
    :class:`PeerError` (a peer failed or sent a message that does not fit the plan) or
    :class:`~disco_fl.wire.WireError` (a malformed message). The session's frames are
    dropped from the mailbox when the call returns; a ``session_id`` must not be reused.
    Waits block the calling thread (see :func:`run_node_async` for an event loop).
    """
    deadline = time.monotonic() + timeout
    steps = _node_steps(node, transport, x, session_id, timeout, step, max_message_bytes)
    try:
        want = next(steps)
        while True:
            if want is _FLUSH:
                want = next(steps)
                continue
            try:
                left = max(0.0, deadline - time.monotonic())
                f = transport.recv(session_id, want[0], want[1], left, step=step)
            except BaseException as e:
                want = steps.throw(e)
                continue
            want = steps.send(f)
    except StopIteration as done:
        out: torch.Tensor | None = done.value
        return out
    finally:
        transport.end_session(session_id)


async def run_node_async(
    node: ShardNode,
    transport: AsyncTransport,
    x: torch.Tensor | None,
    *,
    session_id: str,
    timeout: float = 10.0,
    step: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> torch.Tensor | None:
    """:func:`run_node` as a coroutine on the transport's event loop (same arguments, same
    result and errors): the node computes on the loop's thread and waits for frames without
    blocking it, so frames move without a thread hand-off and several sessions interleave at
    their waits. After every op that sent frames the loop runs once, so the frames go out
    while the node computes on."""
    deadline = time.monotonic() + timeout
    steps = _node_steps(node, transport, x, session_id, timeout, step, max_message_bytes)
    try:
        want = next(steps)
        while True:
            if want is _FLUSH:
                await asyncio.sleep(0)  # let the link writers hand the frames to gRPC
                want = next(steps)
                continue
            try:
                left = max(0.0, deadline - time.monotonic())
                f = await transport.recv_async(session_id, want[0], want[1], left, step=step)
            except BaseException as e:
                want = steps.throw(e)
                continue
            want = steps.send(f)
    except StopIteration as done:
        out: torch.Tensor | None = done.value
        return out
    finally:
        transport.end_session(session_id)


def _notify_peers(
    plan: Plan,
    transport: Transport,
    session_id: str,
    step: int,
    failed_at: int,
    already_sent: set[int],
    why: str,
) -> None:
    """Send an error frame for every message this node still owed (best effort): the rest of
    layer ``failed_at`` (``already_sent`` lists its peers already served) and all later ones."""
    k = transport.index
    text = f"node {k}: {why}"[:MAX_ERROR_TEXT]
    send: Callable[[Frame], None] = transport.send
    unreachable: set[int] = set()
    for layer in range(failed_at, len(plan.program.ops)):
        op = plan.program.ops[layer]
        coded = get_spec(op.kind).coded_messages
        for t in op_traffic(plan, op):
            if t.src != k or t.dst in unreachable or (layer == failed_at and t.dst in already_sent):
                continue
            frame = Frame(
                session_id=session_id,
                step=step,
                layer=layer,
                direction=direction_of(op, coded),  # type: ignore[arg-type]
                src=k,
                dst=t.dst,
                error=text,
            )
            try:
                send(frame)
            except Exception:  # the peer is gone: do not try it again for this session
                unreachable.add(t.dst)
