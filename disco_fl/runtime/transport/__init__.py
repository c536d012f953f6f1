"""Transports: how one node's frames reach its peers (in-process for tests, gRPC for real).

Every transport delivers :class:`~disco_fl.proto_gen.disco.v1.peer_pb2.Frame` messages
between the N nodes of a household, validates every incoming frame, keeps what arrived in a
mailbox keyed by ``(session, step, layer, src, backward)`` and counts the bytes it sends.
"""

from disco_fl.runtime.transport.base import Mailbox, Transport, TransportError, frame_key
from disco_fl.runtime.transport.inprocess import InProcessHub, InProcessTransport

__all__ = [
    "InProcessHub",
    "InProcessTransport",
    "Mailbox",
    "Transport",
    "TransportError",
    "frame_key",
]
