"""The network runtime: one node executes the program, exchanging frames over a transport.

:func:`run_node` runs the node's program with the one driver (:func:`disco_fl.node.drive`,
as the emulation's :func:`disco_fl.node.run_lockstep` and the training step do) and moves its
messages as frames: each message the driver sends becomes a frame (``layer`` = the op's
index, activations with the plan's codec, normalization statistics in fp32), and it receives
exactly the frames that the node's schedule says are addressed to this node. A received
message decodes to exactly what ``codec.roundtrip`` produces in the emulation, so the
requester's output equals :func:`disco_fl.emulation.export.run_shards` bit for bit. uint8 pixels
go to the peers as they are; every node normalizes them (:func:`disco_fl.core.pixels.model_input`).

If the node fails (a timeout, a bad frame, an error in its own math), it sends an error frame
in place of every message it still owed its peers: they fail at once with the cause.

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
from collections.abc import Callable, Generator
from typing import Any

import torch

from disco_fl.core.codecs import PIXELS
from disco_fl.core.pixels import PIXEL_DTYPE, model_input
from disco_fl.core.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    decode_tensor,
    encode_tensor,
    frame_kind_problem,
)
from disco_fl.emulation.export import ExportedShard
from disco_fl.node import (
    FLUSH,
    MISSING,
    Executor,
    MessageError,
    Recv,
    Send,
    Step,
    drive,
    schedule,
)
from disco_fl.partition import plan_open_count
from disco_fl.partition.plan import Plan
from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.transport.base import MAX_ERROR_TEXT, AsyncTransport, PeerDownError, Transport

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


_SCHEDULE: weakref.WeakKeyDictionary[Any, list[Step]] = weakref.WeakKeyDictionary()


def node_schedule(node: ExportedShard) -> list[Step]:
    """``node``'s :func:`~disco_fl.node.schedule` under its plan's hard masks, computed once
    per node object (not per request)."""
    cached = _SCHEDULE.get(node)
    if cached is None:
        plan = node.plan
        cached = schedule(plan.program, node.index, plan_open_count(plan), plan.codec)
        _SCHEDULE[node] = cached
    return cached


_Want = tuple[int, int, float]  # (layer, src, until): the frame the node waits for next, and
# until when (time.monotonic()) it waits
_FLUSH = None  # yielded by _node_steps after an op that sent frames (see run_node_async)
_TURN: _Want = (-1, -1, 0.0)  # yielded by _node_steps after every op (the loop may run)


def _node_steps(
    node: ExportedShard,
    transport: Transport,
    x: torch.Tensor | None,
    session_id: str,
    timeout: float,
    step: int,
    max_message_bytes: int,
    deadline: float,
    overlap: bool,
    degraded_wait: float | None,
    missing: set[int],
    turn_after: float | None,
    /,
) -> Generator[_Want | None, Frame, torch.Tensor | None]:
    """The node's program (:func:`~disco_fl.node.drive`) with its messages as frames: yields
    ``(layer, src, until)`` for every frame it needs (the caller sends the frame in, or throws
    the caller's ``TimeoutError`` / :class:`~disco_fl.runtime.transport.base.PeerDownError`
    in), ``None`` after an op that sent frames and ``_TURN`` where ``drive`` yields ``TURN``
    (``turn_after``); returns the output (requester) or ``None``. One implementation for the
    blocking driver (:func:`run_node`) and the event-loop driver (:func:`run_node_async`).

    Degraded mode (``degraded_wait`` seconds, not ``None``): a peer that sends nothing within
    that long, is unreachable or reports a failure joins ``missing``; its messages are
    replaced as the executor says (zeros for its channels, its statistics left out) and
    nothing more is sent to or awaited from it in this session. The nodes already in
    ``missing`` when the session starts are missing from its first layer: the requester
    names them in its INPUT frames, and the node normalizes with its BatchNorm statistics for
    that set when its shard has them (:meth:`~disco_fl.emulation.export.ExportedShard.context`),
    as :func:`~disco_fl.emulation.export.run_shards` does with ``missing``."""
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
    input_shape = program.infos[program.ops[0].name].shape
    pixels = x if isinstance(x, torch.Tensor) and x.dtype == PIXEL_DTYPE else None
    if pixels is not None and k == program.requester:  # sent as they are; each node normalizes
        x = model_input(pixels, input_shape, plan.meta)
    layer = 0
    sent: set[int] = set()  # peers already sent this layer's message
    send = transport.send
    what = f" (session {session_id!r}, deadline {timeout:.3g} s from its start)"
    start_missing = sorted(missing)  # known at the start: named in the INPUT frames
    program_steps = drive(
        node_schedule(node),
        Executor(program, node.context(start_missing) if start_missing else node, overlap=overlap),
        x,
        deadline=deadline,
        what=what,
        turn_after=turn_after,
    )

    def advance(value: Any) -> Any:
        # inference mode only while the driver computes, never across a yield: sessions of
        # run_node_async interleave on one thread, and one session's exit from the mode
        # must not leave another computing on inference tensors outside it
        with torch.inference_mode():
            return program_steps.send(value)

    try:
        event = advance(None)
        while True:
            if isinstance(event, Send):
                st = event.step
                if st.layer != layer:
                    layer, sent = st.layer, set()
                frame = Frame(
                    session_id=session_id,
                    step=step,
                    layer=st.layer,
                    direction=st.direction,  # type: ignore[arg-type]
                    src=k,
                    dst=event.dest,
                )
                if event.dest not in missing:
                    if st.is_input and start_missing:
                        frame.missing_nodes.extend(start_missing)
                    raw = pixels if st.is_input else None  # the request's pixels as they are
                    if raw is None:
                        encode_tensor(event.tensor, st.wire_codec, out=frame.tensor)
                    else:
                        encode_tensor(raw, PIXELS.name, out=frame.tensor)
                    try:
                        send(frame)
                    except Exception:
                        if degraded_wait is None:
                            raise
                        missing.add(event.dest)  # gone: its channels count as closed
                sent.add(event.dest)
                event = advance(None)
            elif isinstance(event, Recv):
                st, src = event.step, event.src
                if st.layer != layer:
                    layer, sent = st.layer, set()
                f = None
                if src not in missing:
                    until = deadline
                    if degraded_wait is not None:
                        until = min(deadline, time.monotonic() + degraded_wait)
                    f = yield from _receive(
                        st, src, program.num_nodes, session_id, timeout, until,
                        degraded_wait is not None,
                    )  # fmt: skip
                if f is None:  # a missing node (degraded mode)
                    missing.add(src)
                    try:
                        event = advance(MISSING)
                    except MessageError as e:
                        raise PeerError(str(e)) from None
                    continue
                problem = frame_kind_problem(f, st.direction, st.wire_enum, pixels=st.is_input)
                if problem:
                    raise PeerError(f"layer {st.layer} ({st.op.name}) from node {src}: {problem}")
                t = decode_tensor(f.tensor, max_bytes=max_message_bytes, pixels=st.is_input)
                if t.dtype == PIXEL_DTYPE:  # the requester's pixels: normalized as it did
                    t = model_input(t, input_shape, plan.meta)
                try:
                    event = advance(t)
                except MessageError as e:
                    raise PeerError(str(e)) from None
                del t, f
            else:
                yield _FLUSH if event == FLUSH else _TURN
                event = advance(None)
    except StopIteration as done:
        result = done.value
    except BaseException as e:
        why = f"{type(e).__name__}: {e}"
        stalled = e.node if isinstance(e, PeerStalledError) else None
        _notify_peers(node, transport, session_id, step, layer, sent, why, stalled)
        raise
    finally:
        program_steps.close()
    if k != program.requester:
        return None
    if not isinstance(result, torch.Tensor):
        raise RuntimeError("program produced no output tensor")
    return result.clone()  # an ordinary tensor (not an inference-mode one) for the caller


def _receive(
    st: Step,
    src: int,
    num_nodes: int,
    session_id: str,
    timeout: float,
    until: float,
    degraded: bool,
) -> Generator[_Want, Frame, Frame | None]:
    """Wait for ``src``'s frame of ``st`` (the caller sends it in); a peer's error frame, a
    timeout or a dead peer become the errors that name the failed node, or, ``degraded``,
    ``None`` (the peer is missing; a peer too busy to take the session still fails it)."""
    layer, op, k = st.layer, st.op, st.node
    try:
        f = yield (layer, src, until)
    except TimeoutError:
        if degraded:
            return None
        raise PeerStalledError(
            f"node {src} stalled: node {k} got no message from node {src} for "
            f"layer {layer} ({op.name}) within the deadline of {timeout:g} s "
            f"(session {session_id!r})",
            node=src,
            observer=k,
        ) from None
    except PeerDownError as e:
        if degraded:
            return None
        raise PeerError(
            f"node {k}: peer {src} is unreachable (layer {layer}, {op.name}): {e}"
        ) from None
    if degraded and f.error and BUSY_TAG not in f.error:
        return None
    stalled = f.stalled_node if f.HasField("stalled_node") else None
    if f.error and stalled is not None and stalled < num_nodes:
        raise PeerStalledError(
            f"node {int(stalled)} stalled (reported by node {src}, layer {layer}): {f.error}",
            node=int(stalled),
            observer=src,
        )
    if f.error:
        error = PeerBusyError if BUSY_TAG in f.error else PeerError
        raise error(f"node {src} failed at layer {layer} ({op.name}): {f.error}")
    return f


def run_node(
    node: ExportedShard,
    transport: Transport,
    x: torch.Tensor | None,
    *,
    session_id: str,
    timeout: float = 10.0,
    step: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    overlap: bool = True,
    degraded_wait: float | None = None,
    missing: set[int] | None = None,
) -> torch.Tensor | None:
    """Run ``node`` (a :class:`~disco_fl.emulation.export.ExportedShard`) for one input over
    ``transport``.

    ``x`` is the model input on the requester (``plan.program.requester``) and ignored
    elsewhere. ``timeout`` is the deadline of the whole call, in seconds: every wait for a
    peer's message is bounded by what is left of it. Returns the output on the
    requester, ``None`` on the other nodes. Raises ``TimeoutError`` (a peer is silent),
    :class:`PeerError` (a peer failed or sent a message that does not fit the plan) or
    :class:`~disco_fl.core.wire.WireError` (a malformed message). The session's frames are
    dropped from the mailbox when the call returns; a ``session_id`` must not be reused.
    Waits block the calling thread (see :func:`run_node_async` for an event loop).

    ``overlap``: mixing layers compute their own channels' part while the peers' travel
    (:func:`~disco_fl.node.drive`). ``degraded_wait``: degraded mode, a household that
    survives a missing device: a peer that sends nothing for that many seconds, is
    unreachable or fails is treated as missing for the rest of the session (its channels
    closed, its statistics left out) instead of failing the call; the nodes found missing are
    added to ``missing``.
    """
    deadline = time.monotonic() + timeout
    steps = _node_steps(
        node, transport, x, session_id, timeout, step, max_message_bytes, deadline, overlap,
        degraded_wait, missing if missing is not None else set(), None,
    )  # fmt: skip
    try:
        want = next(steps)
        while True:
            if want is _FLUSH or want is _TURN:
                want = next(steps)
                continue
            try:
                left = max(0.0, want[2] - time.monotonic())
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
    node: ExportedShard,
    transport: AsyncTransport,
    x: torch.Tensor | None,
    *,
    session_id: str,
    timeout: float = 10.0,
    step: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    overlap: bool = True,
    degraded_wait: float | None = None,
    missing: set[int] | None = None,
) -> torch.Tensor | None:
    """:func:`run_node` as a coroutine on the transport's event loop (same arguments, same
    result and errors): the node computes on the loop's thread and waits for frames without
    blocking it, so frames move without a thread hand-off and several sessions interleave at
    their waits. After an op that sent frames held for a writer task (``unflushed()``: gRPC
    streams, not the socket path) the loop runs once, so they go out while the node computes
    on; after an op ending ``YIELD_AFTER_S`` or more after the previous such turn, too, so a
    large request holds the loop (other sessions' frames, deadlines) for one op at most."""
    deadline = time.monotonic() + timeout
    steps = _node_steps(
        node, transport, x, session_id, timeout, step, max_message_bytes, deadline, overlap,
        degraded_wait, missing if missing is not None else set(), YIELD_AFTER_S,
    )  # fmt: skip
    try:
        want = next(steps)
        while True:
            if want is _TURN or (want is _FLUSH and transport.unflushed()):
                # other sessions' frames, requests and timers; or the link writers hand the
                # frames on (not when every frame was written at once)
                await asyncio.sleep(0)
                want = next(steps)
                continue
            if want is _FLUSH:
                want = next(steps)
                continue
            try:
                left = max(0.0, want[2] - time.monotonic())
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
    node: ExportedShard, transport: Transport, session_id: str, step: int, why: str
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
    node: ExportedShard,
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
    for st in node_schedule(node)[failed_at:]:
        for dst in st.out_to:
            if dst in unreachable or (st.layer == failed_at and dst in already_sent):
                continue
            frame = Frame(
                session_id=session_id,
                step=step,
                layer=st.layer,
                direction=st.direction,  # type: ignore[arg-type]
                src=k,
                dst=dst,
                error=text,
            )
            if stalled is not None:
                frame.stalled_node = stalled
            try:
                send(frame)
            except Exception:  # the peer is gone: do not try it again for this session
                unreachable.add(dst)
