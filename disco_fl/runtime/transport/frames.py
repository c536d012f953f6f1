"""Frames on the peer channel: their keys, their sizes on the wire, and incoming-frame checks.

A frame (:class:`~disco_fl.proto_gen.disco.v1.peer_pb2.Frame`) is identified by
``(session_id, step, layer, src, backward, sub_channel)`` (:func:`frame_key`).
:func:`check_incoming` says why a frame arriving at a node must be refused (addressing, layer,
direction, sub-channel, text sizes, and a body that is exactly one of an error, a well-formed
tensor or a control message); every transport calls it before a frame is stored.
:func:`framed_size` estimates the bytes a message occupies in HTTP/2 DATA frames. The errors
of a transport (:class:`TransportError`, :class:`PeerDownError`) are defined here too.
"""

from __future__ import annotations

from typing import Any

from disco_fl.core.wire import WireError, check_control, validate_tensor
from disco_fl.proto_gen.disco.v1 import peer_pb2

Frame = peer_pb2.Frame
FrameKey = tuple[str, int, int, int, bool, int]  # session, step, layer, src, backward, sub-channel

MAX_SESSION_ID = 256
MAX_TENSOR_BYTES = 1 << 31  # transports bound whole frames more tightly (max_frame_bytes)
MAX_ERROR_TEXT = 4096
MAX_PROBE_BYTES = 1 << 20  # payload of a PROBE frame (link probe)
MAX_PROBE_ACK_BYTES = 64  # payload of a PROBE_ACK frame
_DIRECTIONS = frozenset(
    {
        Frame.FORWARD,
        Frame.BACKWARD,
        Frame.INPUT,
        Frame.OUTPUT,
        Frame.NORMS,
        Frame.CONTROL,
        Frame.PROBE,
        Frame.PROBE_ACK,
    }
)
_PROBE_LIMITS = {Frame.PROBE: MAX_PROBE_BYTES, Frame.PROBE_ACK: MAX_PROBE_ACK_BYTES}
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


def refusal(frame: peer_pb2.Frame, me: int, src: int, reason: str) -> peer_pb2.Frame:
    """The answer to a refused frame (on the stream or connection it came on)."""
    return peer_pb2.Frame(
        session_id=frame.session_id[:MAX_SESSION_ID],
        step=frame.step,
        layer=frame.layer,
        direction=frame.direction,
        src=me,
        dst=src,
        error=reason,
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
    fields, ``missing_nodes`` (INPUT frames only; distinct peers other than the sender), and
    the body: exactly one of an error, a tensor (enums, dimensions, and shape x codec == the
    byte length of data and scales; uint8 image pixels in INPUT frames only; a link probe's at
    most ``MAX_PROBE_BYTES``, its answer's ``MAX_PROBE_ACK_BYTES``) or, with direction
    CONTROL, a control message (:func:`~disco_fl.core.wire.check_control`: a known body, its
    required fields, node indices in range, no duplicate channels).
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
    if frame.missing_nodes:
        gone = list(frame.missing_nodes)
        if frame.direction != Frame.INPUT:
            return "missing_nodes outside an INPUT frame"
        if len(set(gone)) != len(gone) or any(
            not 0 <= k < num_nodes or k in (index, frame.src) for k in gone
        ):
            return f"missing_nodes {gone}: not distinct nodes other than {frame.src} and {index}"
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
            validate_tensor(
                frame.tensor,
                max_bytes=_PROBE_LIMITS.get(frame.direction, MAX_TENSOR_BYTES),
                pixels=frame.direction == Frame.INPUT,  # uint8 pixels: the model input only
            )
        except WireError as e:
            return str(e)
    return None
