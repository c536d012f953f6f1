"""The transport interface: what every transport of one node does (:class:`Transport`).

A :class:`Transport` belongs to one node ``index`` of an ``num_nodes`` household. ``send`` hands a
frame to the peer ``frame.dst``; frames from peers are validated on arrival
(:func:`~disco_fl.runtime.transport.frames.check_incoming`) and kept in a
:class:`~disco_fl.runtime.transport.mailbox.Mailbox` until ``recv`` takes them. A frame is
identified by ``(session_id, step, layer, src, backward, sub_channel)``
(:func:`~disco_fl.runtime.transport.frames.frame_key`): at most one frame per key may be pending; a
duplicate is rejected. A waiter may wait for the first of several keys
(:meth:`Transport.recv_first`): a training step waits for its frame and for every peer's abort at
once, so an abort wakes it the moment it arrives.

Sessions: a node that serves requests (``on_session``) opens a session only for an INPUT
frame from the session's requester at the program's input layer (``session_origin``); an INPUT
frame from any other node, or at any other layer, is refused (the protocol has none).

Link probes: a PROBE frame is answered at once by a PROBE_ACK of the same session id and
layer, sent back on this node's own stream to the prober (see
:mod:`~disco_fl.runtime.transport.link_probe`); neither is stored here nor counted as payload.

Counters (for checking the plan's accounting against the wire): payload bytes sent per
``(dst, layer)`` (``len(data) + len(scales)`` of the tensor), serialized frame bytes sent and
received, frames sent.

The frame checks and keys live in :mod:`~disco_fl.runtime.transport.frames`, the mailbox in
:mod:`~disco_fl.runtime.transport.mailbox`; both are re-exported here.
"""

from __future__ import annotations

import logging
import math
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

from disco_fl.core.wire import frame_payload_bytes
from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.transport.frames import (
    MAX_ERROR_TEXT,
    MAX_SESSION_ID,
    MAX_TENSOR_BYTES,
    Frame,
    FrameKey,
    PeerDownError,
    TransportError,
    check_incoming,
    frame_key,
    framed_size,
)
from disco_fl.runtime.transport.mailbox import DEFAULT_MAX_PENDING_BYTES, Mailbox

__all__ = [
    "DEFAULT_MAX_PENDING_BYTES",
    "MAX_ERROR_TEXT",
    "MAX_SESSION_ID",
    "MAX_TENSOR_BYTES",
    "AsyncTransport",
    "Frame",
    "FrameKey",
    "Mailbox",
    "PeerDownError",
    "Transport",
    "TransportError",
    "check_incoming",
    "frame_key",
    "framed_size",
]

log = logging.getLogger(__name__)

# the answer to a link probe: one fp32 zero
PROBE_ACK_TENSOR = peer_pb2.Tensor(
    dtype=peer_pb2.Tensor.DTYPE_FLOAT32, shape=[1], codec=peer_pb2.Tensor.CODEC_FP32, data=bytes(4)
)


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
        self.framing: Callable[[int], int] = framed_size  # bytes of a frame on the connection
        self._closed = False
        # (requester, input layer): the only source and layer of INPUT frames; when set,
        # other INPUT frames are refused and the requester's may open sessions (on_session)
        self.session_origin: tuple[int, int] | None = None
        # called with (session_id, step, batch, missing nodes) when the requester's INPUT
        # frame starts a new session here (only with session_origin set)
        self.on_session: Callable[[str, int, int, tuple[int, ...]], None] | None = None

    # ---- sending -------------------------------------------------------------------------
    def send(self, frame: peer_pb2.Frame) -> None:
        """Send ``frame`` to ``frame.dst`` (``frame.src`` must be this node)."""
        if self._closed:
            raise TransportError(f"node {self.index}: transport is closed")
        if frame.src != self.index:
            raise ValueError(f"node {self.index} cannot send a frame with src={frame.src}")
        if not 0 <= frame.dst < self.num_nodes or frame.dst == self.index:
            raise ValueError(f"node {self.index}: bad destination {frame.dst}")
        probe = frame.direction in (Frame.PROBE, Frame.PROBE_ACK)
        payload = 0 if probe else frame_payload_bytes(frame)  # the plan's bytes only
        wire = frame.ByteSize()
        self._transmit(frame, wire)
        with self._stats:
            key = (int(frame.dst), int(frame.layer))
            if not probe:
                self._payload_sent[key] = self._payload_sent.get(key, 0) + payload
            self._wire_sent += wire
            self._framed_sent += self.framing(wire)
            self._frames_sent += 1

    @abstractmethod
    def _transmit(self, frame: peer_pb2.Frame, size: int) -> None:
        """Hand the frame (``size`` serialized bytes) to the peer (may return before it is
        delivered)."""

    # ---- receiving -----------------------------------------------------------------------
    def _accept(
        self,
        frame: peer_pb2.Frame,
        size: int,
        expected_src: int | None = None,
        *,
        checked: bool = False,
    ) -> str | None:
        """Validate and store a frame that arrived; return why it was refused, or None.
        ``checked``: :func:`check_incoming` already passed it (with ``expected_src``)."""
        reason = (
            None
            if checked
            else check_incoming(frame, self.index, self.num_nodes, self.num_layers, expected_src)
        )
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
        if reason is None and frame.direction == Frame.PROBE:
            reason = None if frame.error else self._answer_probe(frame)
            if reason is None:
                with self._stats:
                    self._wire_received += size
                return None
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
            batch = int(shape[0]) if shape else 0
            on_session(frame.session_id, int(frame.step), batch, tuple(frame.missing_nodes))
        return None

    def _answer_probe(self, frame: peer_pb2.Frame) -> str | None:
        """Answer a link probe that has arrived (its PROBE_ACK goes on our own stream to the
        sender, so it crosses the same path, and link shape, as our activations do)."""
        ack = Frame(
            session_id=frame.session_id,
            layer=frame.layer,
            direction=Frame.PROBE_ACK,
            src=self.index,
            dst=frame.src,
            tensor=PROBE_ACK_TENSOR,
        )
        try:
            self.send(ack)
        except (TransportError, ValueError) as e:
            return f"cannot answer the link probe: {e}"
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
        """Estimated bytes on the connection for what was sent: with HTTP/2 framing
        (:func:`framed_size`), or with the socket data path's length prefixes."""
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

    def unflushed(self) -> bool:
        """Whether frames sent on the loop wait for it to run before they leave (a writer task
        hands them on): a coroutine that sent frames lets it run once. ``True`` unless the
        transport knows better."""
        return True
