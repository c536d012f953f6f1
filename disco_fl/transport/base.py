"""The transport interface, the mailbox of received frames, and incoming-frame validation.

A :class:`Transport` belongs to one node ``index`` of an ``num_nodes`` household. ``send``
hands a frame to the peer ``frame.dst``; frames from peers are validated on arrival
(:func:`check_incoming`) and kept in a :class:`Mailbox` until ``recv`` takes them. A frame is
identified by ``(session_id, step, layer, src, backward, sub_channel)`` (:func:`frame_key`): at
most one frame per key may be pending; a duplicate is rejected. A waiter may wait for the
first of several keys (:meth:`Transport.recv_first`): a training step waits for its frame and
for every peer's abort at once, so an abort wakes it the moment it arrives.

Sessions: a node that serves requests (``on_session``) opens a session only for an INPUT
frame from the session's requester at the program's input layer (``session_origin``); an INPUT
frame from any other node, or at any other layer, is refused (the protocol has none).

Counters (for checking the plan's accounting against the wire): payload bytes sent per
``(dst, layer)`` (``len(data) + len(scales)`` of the tensor), serialized frame bytes sent and
received, frames sent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.wire import WireError, check_control, frame_payload_bytes, validate_tensor

log = logging.getLogger(__name__)

Frame = peer_pb2.Frame
FrameKey = tuple[str, int, int, int, bool, int]  # session, step, layer, src, backward, sub-channel

DEFAULT_MAX_PENDING_BYTES = 1 << 30
MAX_SESSION_ID = 256
MAX_TENSOR_BYTES = 1 << 31  # transports bound whole frames more tightly (max_frame_bytes)
MAX_ERROR_TEXT = 4096
_DIRECTIONS = frozenset(
    {Frame.FORWARD, Frame.BACKWARD, Frame.INPUT, Frame.OUTPUT, Frame.NORMS, Frame.CONTROL}
)
_SUB_CHANNELS = frozenset(Frame.SubChannel.values())


class TransportError(RuntimeError):
    """The transport cannot do what was asked (closed, peer unreachable, frame refused)."""


class PeerDownError(TransportError):
    """The connection to a peer broke; frames from it will not come (until it reconnects).
    ``peer``: that peer, where the raiser knows it."""

    peer: int | None = None


GRPC_MESSAGE_PREFIX = 5  # gRPC length-prefixed message: 1 flag byte + 4 length bytes
HTTP2_FRAME_HEADER = 9  # every HTTP/2 DATA frame
HTTP2_MAX_FRAME = 16384  # default SETTINGS_MAX_FRAME_SIZE


def framed_size(message_bytes: int) -> int:
    """Bytes a serialized message of ``message_bytes`` occupies in HTTP/2 DATA frames.

    The gRPC message prefix and one HTTP/2 frame header per 16 KiB; TCP/IP, TLS and
    HTTP/2 control frames (headers, window updates, pings) are not included.
    """
    body = message_bytes + GRPC_MESSAGE_PREFIX
    return body + HTTP2_FRAME_HEADER * max(1, -(-body // HTTP2_MAX_FRAME))


def frame_key(frame: peer_pb2.Frame) -> FrameKey:
    return (
        frame.session_id,
        int(frame.step),
        int(frame.layer),
        int(frame.src),
        frame.direction == Frame.BACKWARD,
        int(frame.sub_channel),
    )


def check_incoming(
    frame: Any,
    index: int,
    num_nodes: int,
    num_layers: int | None,
    expected_src: int | None = None,
) -> str | None:
    """Why a frame arriving at node ``index`` must be rejected, or ``None`` if it is fine.

    Checks addressing (``dst`` is this node, ``src`` a peer, and the stream's authenticated
    peer when given), the layer range, the direction and sub-channel, the sizes of the text
    fields, and the body: exactly one of an error, a tensor (enums, dimensions, and shape x
    codec == the byte length of data and scales) or, with direction CONTROL, a control message
    (:func:`~disco_fl.wire.check_control`: a known body, its required fields, node indices in
    range, no duplicate channels).
    """
    if not isinstance(frame, peer_pb2.Frame):
        return f"expected a disco.v1.Frame, got {type(frame).__name__}"
    if frame.dst != index:
        return f"frame addressed to node {frame.dst} arrived at node {index}"
    if not 0 <= frame.src < num_nodes or frame.src == index:
        return f"frame source {frame.src} is not a peer of node {index} ({num_nodes} nodes)"
    if expected_src is not None and frame.src != expected_src:
        return f"frame claims source {frame.src} on the stream of node {expected_src}"
    if num_layers is not None and frame.layer >= num_layers:
        return f"layer {frame.layer} out of range (the program has {num_layers} ops)"
    if frame.direction not in _DIRECTIONS:
        return f"unknown frame direction {frame.direction}"
    if frame.sub_channel not in _SUB_CHANNELS:
        return f"unknown frame sub-channel {frame.sub_channel}"
    if len(frame.session_id) > MAX_SESSION_ID:
        return f"session id longer than {MAX_SESSION_ID} characters"
    if len(frame.error) > MAX_ERROR_TEXT:
        return f"error text longer than {MAX_ERROR_TEXT} characters"
    control = frame.HasField("control")
    if control and (frame.error or frame.HasField("tensor")):
        return "control frame also carries a tensor or an error"
    if control != (frame.direction == Frame.CONTROL):
        return (
            f"control message in a frame of direction {Frame.Direction.Name(frame.direction)}"
            if control
            else "CONTROL frame without a control message"
        )
    if control:
        why = check_control(frame.control, num_nodes=num_nodes)
        return None if why is None else f"bad control frame: {why}"
    if not frame.error:
        if not frame.HasField("tensor"):
            return "frame carries neither a tensor nor an error"
        try:  # shape x codec == byte length, scales, dims, enums: before it is stored
            validate_tensor(frame.tensor, max_bytes=MAX_TENSOR_BYTES)
        except WireError as e:
            return str(e)
    return None


class Mailbox:
    """Frames received and not yet taken, keyed by :func:`frame_key`; bounded in bytes.

    Sessions ended with :meth:`end_session` stay remembered (the last ``max_closed_sessions``):
    late frames for them are dropped and ``get`` on them fails at once.
    """

    def __init__(
        self,
        *,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_closed_sessions: int = 1024,
    ) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._frames: dict[FrameKey, tuple[peer_pb2.Frame, int, float]] = {}
        self._bytes = 0
        self._max_bytes = max_pending_bytes
        self._closed_sessions: OrderedDict[str, None] = OrderedDict()
        self._max_closed = max_closed_sessions
        self._closed = False
        self._down: dict[int, str] = {}  # peer -> why its frames will not come
        self._watchers: dict[FrameKey, list[Callable[[], None]]] = {}  # see watch()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._frames)

    @property
    def pending_bytes(self) -> int:
        with self._cond:
            return self._bytes

    def put(self, frame: peer_pb2.Frame, size: int) -> str | None:
        """Store ``frame`` (``size`` serialized bytes); return why it was refused, or None.

        Frames of an ended session are dropped without complaint (they are late, not bad)."""
        key = frame_key(frame)
        with self._cond:
            if self._closed:
                return "the receiving transport is closed"
            if key[0] in self._closed_sessions:
                # a late frame of a finished or failed session: harmless, dropped quietly
                log.debug("dropped a late frame of ended session %r: %s", key[0], key)
                return None
            if key in self._frames:
                return (
                    f"duplicate frame for session {key[0]!r} layer {key[2]} from {key[3]}"
                    f"{'' if not key[5] else ' (' + Frame.SubChannel.Name(key[5]) + ')'}"
                )
            if self._bytes + size > self._max_bytes:
                return (
                    f"mailbox full ({self._bytes} bytes pending, limit {self._max_bytes}); "
                    f"frame of {size} bytes refused"
                )
            self._frames[key] = (frame, size, time.monotonic())
            self._bytes += size
            self._cond.notify_all()
            self._wake((key,))
        return None

    def ended(self, session_id: str) -> bool:
        """Whether ``session_id`` has ended on this node (its late frames are dropped)."""
        with self._cond:
            return session_id in self._closed_sessions

    def mark_down(self, src: int, reason: str) -> None:
        """Frames from ``src`` will not come: waiting and later ``get`` calls for it fail."""
        with self._cond:
            self._down[src] = reason
            self._cond.notify_all()
            self._wake([k for k in self._watchers if k[3] == src])

    def mark_up(self, src: int) -> None:
        with self._cond:
            self._down.pop(src, None)

    def take(self, key: FrameKey) -> peer_pb2.Frame | None:
        """Take the frame ``key`` if it is here (never waits); ``None`` if it is not.

        Raises :class:`PeerDownError` when the sender is marked down and its frame is not here,
        :class:`TransportError` when the mailbox is closed or the session has ended.
        """
        with self._cond:
            if self._closed:
                raise TransportError("transport closed while waiting for a frame")
            if key[0] in self._closed_sessions:
                raise TransportError(f"session {key[0]!r} has ended on this node")
            item = self._frames.pop(key, None)
            if item is not None:
                self._bytes -= item[1]
                return item[0]
            down = self._down.get(key[3])
            if down is not None:
                raise PeerDownError(down)
            return None

    def get(self, key: FrameKey, timeout: float) -> peer_pb2.Frame | None:
        """Take the frame ``key``, waiting at most ``timeout`` seconds (``None`` if none came).

        Raises :class:`PeerDownError` when the sender is marked down and its frame is not here.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                frame = self.take(key)  # the condition's lock is re-entrant
                if frame is not None:
                    return frame
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def get_first(
        self, keys: list[FrameKey], timeout: float
    ) -> tuple[FrameKey, peer_pb2.Frame] | None:
        """Take the first frame to arrive among ``keys`` (the earlier key first when several
        are here), waiting at most ``timeout`` seconds (``None`` if none came). A frame that
        arrives wakes the waiter at once (no polling).

        Raises :class:`PeerDownError` (its ``peer`` set) when the sender of one of the keys is
        marked down and that key's frame is not here.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for key in keys:
                    try:
                        frame = self.take(key)
                    except PeerDownError as e:
                        e.peer = key[3]
                        raise
                    if frame is not None:
                        return key, frame
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def watch(self, key: FrameKey, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake()`` (from the thread that stores it) when something may have changed
        for ``key``: its frame arrived, its sender went down, its session ended or the mailbox
        closed. For waiters that cannot block (an event loop); returns the un-watch function.
        """
        with self._cond:
            self._watchers.setdefault(key, []).append(wake)

        def unwatch() -> None:
            with self._cond:
                ws = self._watchers.get(key)
                if ws is not None:
                    with contextlib.suppress(ValueError):
                        ws.remove(wake)
                    if not ws:
                        del self._watchers[key]

        return unwatch

    def _wake(self, keys: Iterable[FrameKey] | None = None) -> None:
        """Wake the watchers of ``keys`` (all watchers if ``None``); caller holds the lock."""
        if not self._watchers:
            return
        if keys is None:
            keys = list(self._watchers)
        for key in keys:
            for wake in self._watchers.get(key, ()):
                wake()

    def expire(self, max_age: float, keep: set[str]) -> int:
        """End every session not in ``keep`` holding a frame older than ``max_age`` seconds
        (frames of sessions that never started here); returns how many were ended."""
        limit = time.monotonic() - max_age
        with self._cond:
            stale = {k[0] for k, v in self._frames.items() if v[2] < limit and k[0] not in keep}
        for sid in stale:
            self.end_session(sid)
        return len(stale)

    def end_session(self, session_id: str) -> int:
        """Forget the session's pending frames (returns how many) and drop its late frames."""
        with self._cond:
            gone = [k for k in self._frames if k[0] == session_id]
            for k in gone:
                self._bytes -= self._frames.pop(k)[1]
            self._closed_sessions[session_id] = None
            self._closed_sessions.move_to_end(session_id)
            while len(self._closed_sessions) > self._max_closed:
                self._closed_sessions.popitem(last=False)
            self._cond.notify_all()
            self._wake([k for k in self._watchers if k[0] == session_id])
            return len(gone)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._frames.clear()
            self._bytes = 0
            self._cond.notify_all()
            self._wake()


class Transport(ABC):
    """One node's connection to its peers. Thread-safe; subclasses implement ``_transmit``."""

    def __init__(
        self,
        index: int,
        num_nodes: int,
        *,
        num_layers: int | None = None,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        if num_nodes < 1 or not 0 <= index < num_nodes:
            raise ValueError(f"node index {index} out of range for {num_nodes} nodes")
        if num_layers is not None and num_layers < 0:
            raise ValueError(f"num_layers must be non-negative, got {num_layers}")
        self.index = index
        self.num_nodes = num_nodes
        self.num_layers = num_layers
        self.mailbox = Mailbox(max_pending_bytes=max_pending_bytes)
        self.errors: deque[str] = deque(maxlen=256)  # frames refused here or by peers
        self._stats = threading.Lock()
        self._payload_sent: dict[tuple[int, int], int] = {}
        self._framed_sent = 0
        self._wire_sent = 0
        self._wire_received = 0
        self._frames_sent = 0
        self._closed = False
        # (requester, input layer): the only source and layer of INPUT frames; when set,
        # other INPUT frames are refused and the requester's may open sessions (on_session)
        self.session_origin: tuple[int, int] | None = None
        # called with (session_id, step, batch) when the requester's INPUT frame starts a new
        # session here (only with session_origin set)
        self.on_session: Callable[[str, int, int], None] | None = None

    # ---- sending -------------------------------------------------------------------------
    def send(self, frame: peer_pb2.Frame) -> None:
        """Send ``frame`` to ``frame.dst`` (``frame.src`` must be this node)."""
        if self._closed:
            raise TransportError(f"node {self.index}: transport is closed")
        if frame.src != self.index:
            raise ValueError(f"node {self.index} cannot send a frame with src={frame.src}")
        if not 0 <= frame.dst < self.num_nodes or frame.dst == self.index:
            raise ValueError(f"node {self.index}: bad destination {frame.dst}")
        payload = frame_payload_bytes(frame)
        wire = frame.ByteSize()
        self._transmit(frame, wire)
        with self._stats:
            key = (int(frame.dst), int(frame.layer))
            self._payload_sent[key] = self._payload_sent.get(key, 0) + payload
            self._wire_sent += wire
            self._framed_sent += framed_size(wire)
            self._frames_sent += 1

    @abstractmethod
    def _transmit(self, frame: peer_pb2.Frame, size: int) -> None:
        """Hand the frame (``size`` serialized bytes) to the peer (may return before it is
        delivered)."""

    # ---- receiving -----------------------------------------------------------------------
    def _accept(
        self, frame: peer_pb2.Frame, size: int, expected_src: int | None = None
    ) -> str | None:
        """Validate and store a frame that arrived; return why it was refused, or None."""
        reason = check_incoming(frame, self.index, self.num_nodes, self.num_layers, expected_src)
        origin = self.session_origin
        if (
            reason is None
            and origin is not None
            and frame.direction == Frame.INPUT
            and (frame.src, frame.layer) != origin
        ):
            reason = (
                f"INPUT frame from node {frame.src} at layer {frame.layer}: only node "
                f"{origin[0]} sends the input, at layer {origin[1]}"
            )
        new_session = (
            reason is None
            and origin is not None
            and frame.direction == Frame.INPUT
            and not frame.error
            and self.on_session is not None
            and not self.mailbox.ended(frame.session_id)
        )
        if reason is None:
            reason = self.mailbox.put(frame, size)
        if reason is not None:
            msg = f"node {self.index} refused a frame from {getattr(frame, 'src', '?')}: {reason}"
            self.errors.append(msg)
            if not self._closed:  # frames still arriving while shutting down are expected
                log.warning(msg)
            return reason
        with self._stats:
            self._wire_received += size
        on_session = self.on_session
        if new_session and on_session is not None:
            shape = frame.tensor.shape
            on_session(frame.session_id, int(frame.step), int(shape[0]) if shape else 0)
        return None

    def recv(
        self,
        session_id: str,
        layer: int,
        src: int,
        timeout: float,
        *,
        step: int = 0,
        backward: bool = False,
        sub_channel: int = Frame.SUB_CHANNEL_DATA,
    ) -> peer_pb2.Frame:
        """The frame of ``(session_id, step, layer)`` from ``src``, waiting at most ``timeout`` s.

        Raises :class:`TimeoutError` naming the peer and the layer when it does not come.
        """
        key = self._want(session_id, layer, src, timeout, step, backward, sub_channel)
        frame = self.mailbox.get(key, float(timeout))
        if frame is None:
            raise self._no_frame(key, timeout)
        return frame

    def recv_first(
        self, keys: list[FrameKey], timeout: float
    ) -> tuple[FrameKey, peer_pb2.Frame] | None:
        """The first frame to arrive among ``keys`` (see :func:`frame_key`), waiting at most
        ``timeout`` seconds; ``None`` if none came. Woken by the frame itself (no polling).
        Raises :class:`PeerDownError` (``peer`` set) when a key's sender is down."""
        for key in keys:
            self._want(key[0], key[2], key[3], timeout, key[1], key[4], key[5])
        return self.mailbox.get_first(keys, float(timeout))

    def _want(
        self,
        session_id: str,
        layer: int,
        src: int,
        timeout: float,
        step: int,
        backward: bool,
        sub_channel: int = Frame.SUB_CHANNEL_DATA,
    ) -> FrameKey:
        """The mailbox key of a ``recv`` (its arguments checked)."""
        if not 0 <= src < self.num_nodes or src == self.index:
            raise ValueError(f"node {self.index}: {src} is not a peer")
        if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout < 0:
            raise ValueError(f"timeout must be a finite number of seconds >= 0, got {timeout!r}")
        return (session_id, step, layer, src, backward, int(sub_channel))

    def _no_frame(self, key: FrameKey, timeout: float) -> TimeoutError:
        session_id, step, layer, src, backward, _ = key
        what = "gradient" if backward else "frame"
        return TimeoutError(
            f"node {self.index}: no {what} from node {src} for layer {layer} "
            f"(session {session_id!r}, step {step}) within {timeout:g} s"
        )

    def end_session(self, session_id: str) -> None:
        """Drop the session's pending and late frames (call when a session is over)."""
        n = self.mailbox.end_session(session_id)
        if n:
            log.debug("node %d: dropped %d pending frames of session %r", self.index, n, session_id)

    # ---- lifecycle and counters ----------------------------------------------------------
    def close(self) -> None:
        """Release everything; waiting ``recv`` calls fail. Idempotent."""
        self._closed = True
        self.mailbox.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def payload_bytes_sent(self) -> dict[tuple[int, int], int]:
        """Payload bytes sent, per ``(dst, layer)``."""
        with self._stats:
            return dict(self._payload_sent)

    @property
    def wire_bytes_sent(self) -> int:
        """Serialized frame bytes sent (protobuf encoding, without HTTP/2 or TLS framing)."""
        with self._stats:
            return self._wire_sent

    @property
    def wire_bytes_received(self) -> int:
        with self._stats:
            return self._wire_received

    @property
    def framed_bytes_sent(self) -> int:
        """Estimated bytes on the HTTP/2 connection for what was sent (:func:`framed_size`)."""
        with self._stats:
            return self._framed_sent

    @property
    def frames_sent(self) -> int:
        with self._stats:
            return self._frames_sent

    def reset_counters(self) -> None:
        with self._stats:
            self._payload_sent.clear()
            self._wire_sent = self._wire_received = self._frames_sent = 0
            self._framed_sent = 0


class AsyncTransport(Transport):
    """A transport whose frames arrive on an asyncio event loop, where a coroutine can also
    wait for them (:meth:`recv_async`) without blocking the loop."""

    @abstractmethod
    async def recv_async(
        self,
        session_id: str,
        layer: int,
        src: int,
        timeout: float,
        *,
        step: int = 0,
        backward: bool = False,
        sub_channel: int = Frame.SUB_CHANNEL_DATA,
    ) -> peer_pb2.Frame:
        """:meth:`Transport.recv` for a coroutine on this transport's event loop."""
