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

The deadline (``timeout``) bounds the whole call, computation included: it is checked before
every op as well as while waiting for frames, so a call fails at most one op after it. A
failed call drops the frames of its traceback (:func:`traceback.clear_frames`), so the
activations it held are freed when the call fails, not when the garbage collector next runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
import weakref
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from disco_fl.codecs import get_codec
from disco_fl.export import ShardNode
from disco_fl.partition import Op, Program, Traffic, get_spec, op_traffic, plan_open_count
from disco_fl.partition.registry import OpSpec
from disco_fl.plan import Plan
from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.transport.base import MAX_ERROR_TEXT, AsyncTransport, PeerDownError, Transport
from disco_fl.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    codec_enum,
    decode_tensor,
    encode_tensor,
    frame_kind_problem,
)

Frame = peer_pb2.Frame


class PeerError(RuntimeError):
    """A peer reported a failure, or sent a message that does not fit the plan."""


class PeerBusyError(PeerError):
    """A peer refused the session: it has too many sessions running and queued."""


class PeerStalledError(TimeoutError):
    """Node ``node`` sent nothing within the deadline, as node ``observer`` saw it.

    Raised where a wait for a peer's frame times out (the node waited for is the one named), and
    where a peer's error frame carries ``stalled_node`` (a peer gave up waiting for that node):
    the node that stalled is named, not the healthy node that was waiting for it.
    """

    def __init__(self, message: str, *, node: int, observer: int) -> None:
        super().__init__(message)
        self.node = node
        self.observer = observer


BUSY_TAG = "[busy]"  # in a peer's error text: the peer refused the session for lack of room
YIELD_AFTER_S = 0.005  # run_node_async lets other sessions run after computing this long


def direction_of(op: Op, coded: bool) -> int:
    """Frame direction of the forward messages of ``op``."""
    if op.kind == "input":
        return Frame.INPUT
    if op.kind == "output":
        return Frame.OUTPUT
    return Frame.FORWARD if coded else Frame.NORMS


_TRAFFIC: weakref.WeakKeyDictionary[Any, list[list[Traffic]]] = weakref.WeakKeyDictionary()


def node_traffic(node: ShardNode) -> list[list[Traffic]]:
    """:func:`~disco_fl.partition.op_traffic` of every op of ``node``'s plan, computed once per
    node object."""
    cached = _TRAFFIC.get(node)
    if cached is None:
        program, open_count = node.plan.program, plan_open_count(node.plan)
        cached = [op_traffic(program, op, open_count) for op in program.ops]
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
                wire_enum=codec_enum(wire_codec),
                direction=direction_of(op, coded),
                free=tuple(dict.fromkeys(n for n in op.inputs if last_use[n] == layer)),
            )
        )
    _SCHEDULE[node] = steps
    return steps


def input_batch(op: Op, value: Any) -> int | None:
    """The batch size that ``op``'s output sets: its first dimension for the ``input`` op,
    ``None`` for every other op (and a 0-d input)."""
    if op.kind == "input" and isinstance(value, torch.Tensor) and value.dim():
        return int(value.shape[0])
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

    The one frame check of inference (:func:`run_node`) and training
    (:mod:`disco_fl.training.passes`); each caller raises its own error with the text.

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


_FLUSH = None  # yielded by _node_steps after an op that sent frames (see run_node_async)
_Want = tuple[int, int]  # (layer, src): the frame the node waits for next
_TURN: _Want = (-1, -1)  # yielded by _node_steps after every op (the driver may yield the loop)


def _node_steps(
    node: ShardNode,
    transport: Transport,
    x: torch.Tensor | None,
    session_id: str,
    timeout: float,
    step: int,
    max_message_bytes: int,
    deadline: float,
    /,
) -> Generator[_Want | None, Frame, torch.Tensor | None]:
    """The node's program as a generator: yields ``(layer, src)`` for every frame it needs
    (the driver sends the frame in, or throws the driver's ``TimeoutError`` /
    :class:`~disco_fl.transport.base.PeerDownError` in), ``None`` after an op that sent
    frames and ``_TURN`` after every op; returns the output (requester) or ``None``. Raises
    ``TimeoutError`` before an op when ``time.monotonic()`` is past ``deadline``. One
    implementation for the blocking driver (:func:`run_node`) and the event-loop driver
    (:func:`run_node_async`)."""
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
                if time.monotonic() > deadline:  # computation counts against the deadline
                    raise TimeoutError(
                        f"node {k}: the deadline ({timeout:.3g} s from the session's start) "
                        f"passed while computing, before layer {layer} ({op.name}) "
                        f"(session {session_id!r})"
                    )
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
                        raise PeerStalledError(
                            f"node {src} stalled: node {k} got no message from node {src} for "
                            f"layer {layer} ({op.name}) within the deadline of {timeout:g} s "
                            f"(session {session_id!r})",
                            node=src,
                            observer=k,
                        ) from None
                    except PeerDownError as e:
                        raise PeerError(
                            f"node {k}: peer {src} is unreachable (layer {layer}, {op.name}): {e}"
                        ) from None
                    stalled = f.stalled_node if f.HasField("stalled_node") else None
                    if f.error and stalled is not None and stalled < program.num_nodes:
                        s = int(stalled)  # the peer gave up waiting for node s
                        raise PeerStalledError(
                            f"node {s} stalled (reported by node {src}, layer {layer}): {f.error}",
                            node=s,
                            observer=src,
                        )
                    if f.error:
                        error = PeerBusyError if BUSY_TAG in f.error else PeerError
                        raise error(f"node {src} failed at layer {layer} ({op.name}): {f.error}")
                    problem = frame_kind_problem(f, step_.direction, step_.wire_enum)
                    if problem:
                        raise PeerError(f"layer {layer} ({op.name}) from node {src}: {problem}")
                    t = decode_tensor(f.tensor, max_bytes=max_message_bytes)
                    problem = message_problem(
                        program, op, t, batch, channels=tr.channels if tr.coded else 0
                    )
                    if problem:
                        raise PeerError(
                            f"layer {layer} ({op.name}, {op.kind}) from node {src}: {problem}"
                        )
                    received[src] = t
                value = spec.compute(op, node, xs, received)
                env[op.name] = value
                del xs, received, msgs
                for name in step_.free:  # free what no later op reads (peak memory)
                    env.pop(name, None)
                if step_.is_input and (b := input_batch(op, value)) is not None:
                    batch = b
                if step_.is_output:
                    result = value
                yield _TURN
    except BaseException as e:
        why = f"{type(e).__name__}: {e}"
        stalled = e.node if isinstance(e, PeerStalledError) else None
        _notify_peers(plan, transport, session_id, step, layer, sent, why, stalled)
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
    steps = _node_steps(node, transport, x, session_id, timeout, step, max_message_bytes, deadline)
    try:
        want = next(steps)
        while True:
            if want is _FLUSH or want is _TURN:
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
    except BaseException as e:
        _drop_frames(e)
        raise
    finally:
        steps.close()
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
    while the node computes on; after an op that ends ``YIELD_AFTER_S`` or more of
    computation without such a turn, too, so that a large request cannot hold the loop (and
    the other sessions' frames and deadlines) for longer than one op."""
    deadline = time.monotonic() + timeout
    steps = _node_steps(node, transport, x, session_id, timeout, step, max_message_bytes, deadline)
    clock = time.perf_counter
    turned = clock()  # when this session last let the loop run
    try:
        want = next(steps)
        while True:
            if want is _TURN:
                if clock() - turned >= YIELD_AFTER_S:
                    await asyncio.sleep(0)  # other sessions' frames, requests and timers
                    turned = clock()
                want = next(steps)
                continue
            if want is _FLUSH:
                await asyncio.sleep(0)  # let the link writers hand the frames to gRPC
                turned = clock()
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
    except BaseException as e:
        _drop_frames(e)
        raise
    finally:
        steps.close()
        transport.end_session(session_id)


def _drop_frames(error: BaseException) -> None:
    """Clear the local variables of the finished frames in ``error``'s tracebacks (and its
    causes' and contexts'): the node program's generator frame holds the request's
    activations, and whoever keeps the exception (a gRPC call's state, a log record, a
    reference cycle waiting for the garbage collector) would otherwise keep them too."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # frames still running are left alone
        todo.extend(c for c in (e.__cause__, e.__context__) if c is not None)


def refuse_session(
    node: ShardNode, transport: Transport, session_id: str, step: int, why: str
) -> None:
    """Fail a session that this node will not run (best effort): one error frame to each
    peer, at the first layer at which that peer waits for a message from this node, so every
    node of the session fails at once with ``why`` (a node blocked earlier waits for a peer
    that fails there and tells it). ``why`` holding :data:`BUSY_TAG` makes the requester
    raise :class:`PeerBusyError`."""
    k = transport.index
    text = f"node {k}: {why}"[:MAX_ERROR_TEXT]
    todo = set(range(node.plan.num_nodes)) - {k}
    for st in node_schedule(node):
        for dst in st.out_to:
            if dst not in todo:
                continue
            todo.discard(dst)
            frame = Frame(
                session_id=session_id,
                step=step,
                layer=st.layer,
                direction=st.direction,  # type: ignore[arg-type]
                src=k,
                dst=dst,
                error=text,
            )
            with contextlib.suppress(Exception):  # the peer is gone: nothing waits there
                transport.send(frame)
        if not todo:
            break


def _notify_peers(
    plan: Plan,
    transport: Transport,
    session_id: str,
    step: int,
    failed_at: int,
    already_sent: set[int],
    why: str,
    stalled: int | None = None,
) -> None:
    """Send an error frame for every message this node still owed (best effort): the rest of
    layer ``failed_at`` (``already_sent`` lists its peers already served) and all later ones.
    ``stalled``: the node that stalled (the frames carry it as ``stalled_node``)."""
    k = transport.index
    text = f"node {k}: {why}"[:MAX_ERROR_TEXT]
    send: Callable[[Frame], None] = transport.send
    unreachable: set[int] = set()
    open_count = plan_open_count(plan)
    for layer in range(failed_at, len(plan.program.ops)):
        op = plan.program.ops[layer]
        coded = get_spec(op.kind).coded_messages
        for t in op_traffic(plan.program, op, open_count):
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
            if stalled is not None:
                frame.stalled_node = stalled
            try:
                send(frame)
            except Exception:  # the peer is gone: do not try it again for this session
                unreachable.add(t.dst)
