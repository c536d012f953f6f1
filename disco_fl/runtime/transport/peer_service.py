"""The server side of the gRPC transport: the ``disco.v1.Peer`` service of one node.

:class:`PeerServicer` answers ``Handshake``, ``Exchange`` and ``Health`` on the node's I/O loop.
Every call must carry the household token (compared in constant time); ``Handshake`` and
``Exchange`` also check the caller's peer protocol version
(:data:`~disco_fl.core.wire.PROTOCOL_VERSION`: a caller speaking another one is refused with a
message saying so), plan hash, training round and node indices, and, with TLS on, that the
caller's certificate is that node's. ``Exchange`` callers identify themselves in the call
metadata (the ``MD_*`` names here, which the client side sends); each frame arriving on the
stream is handed to the transport, and a refused one is answered on the reply stream with a
frame whose ``error`` says why.

:func:`server_options` are the server's gRPC options, connection limits included: at most
``max_connections`` connections (more are closed as they are accepted), a TLS and HTTP/2
handshake within ``handshake_timeout_s``, no connection idle beyond ``idle_timeout_s``, and
keepalive pings to callers so that connections of vanished callers are closed too.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
import grpc.aio

from disco_fl.core.wire import PROTOCOL_VERSION
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.transport.frames import refusal

DEFAULT_MAX_FRAME_BYTES = 64 << 20
MD_TOKEN = "disco-token"  # call metadata: the household token (peer frames and inference)
MD_PLAN, MD_NODE, MD_EXPECTED, MD_PROTOCOL, MD_ROUND = (
    "disco-plan-hash",
    "disco-node",
    "disco-expected-node",
    "disco-protocol",
    "disco-round",
)
KEEPALIVE_MS = 10_000  # ping an idle connection every 10 s; drop it if no answer in 5 s
KEEPALIVE_TIMEOUT_MS = 5_000
DEFAULT_MAX_CONNECTIONS = 128  # connections a node's server holds at once
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0  # to finish the TLS and HTTP/2 handshakes
DEFAULT_IDLE_TIMEOUT_S = 300.0  # a connection without a call for this long is closed
Problem = tuple[grpc.StatusCode, str]  # why a call is refused: its status and message


def message_options(max_frame_bytes: int) -> list[tuple[str, Any]]:
    """The gRPC options both ends share: message limits (a whole frame) and latency."""
    return [
        ("grpc.max_send_message_length", max_frame_bytes),
        ("grpc.max_receive_message_length", max_frame_bytes),
        ("grpc.optimization_target", "latency"),
    ]


def server_options(
    max_frame_bytes: int, max_connections: int, handshake_timeout_s: float, idle_timeout_s: float
) -> list[tuple[str, Any]]:
    """The server's gRPC options: keepalive and the connection limits."""
    return [
        *message_options(max_frame_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        # a caller pinging more often is sent away (the default 2 strikes); the server
        # pings its callers too, so that a vanished caller's connection is closed
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
        # bounded connections: at most max_connections at once, a handshake (TLS and
        # HTTP/2) within handshake_timeout_s, no connection idle beyond idle_timeout_s
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.server_handshake_timeout_ms", max(1, round(handshake_timeout_s * 1000))),
        ("grpc.max_connection_idle_ms", max(1, round(idle_timeout_s * 1000))),
    ]


def version_name(v: int) -> str:
    """A peer's protocol version as said in errors (version 1 sent none: it reads 0)."""
    return "1 (or older; it states no version)" if v == 0 else str(v)


class PeerHost(Protocol):
    """What the servicer needs of its transport (a
    :class:`~disco_fl.runtime.transport.grpc_transport.GrpcTransport`)."""

    index: int
    num_nodes: int
    plan_hash: str
    round: int

    def _peer_connected(self, src: int) -> None: ...

    def _arrived(self, frame: peer_pb2.Frame, size: int, src: int) -> str | None: ...

    def _data_ticket(self, src: int) -> tuple[bytes, int] | None: ...

    @property
    def closed(self) -> bool: ...


class PeerServicer(peer_pb2_grpc.PeerServicer):
    """The ``disco.v1.Peer`` service of one node (runs on the node's I/O loop).

    ``household_token`` is the token every call must carry (empty: none); with ``tls`` on, a
    caller's certificate must name the node it says it is.
    """

    def __init__(self, transport: PeerHost, *, household_token: str, tls: bool) -> None:
        self.t = transport
        self._token = household_token
        self._tls = tls

    def check_token(self, token: str) -> Problem | None:
        """The household token, compared in constant time (an empty token means none)."""
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            return grpc.StatusCode.PERMISSION_DENIED, f"node {self.t.index}: wrong household token"
        return None

    def check_peer(
        self, plan_hash: str, node: int, token: str, expected: int, version: int, rnd: int
    ) -> Problem | None:
        me = self.t.index
        problem = self.check_token(token)
        if problem is not None:
            return problem
        if version != PROTOCOL_VERSION:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {me}: the caller speaks disco peer protocol {version_name(version)}, "
                f"this node speaks {PROTOCOL_VERSION}: run the same disco_fl version on every "
                f"node",
            )
        if rnd != self.t.round:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {me}: the caller is in round {rnd}, this node in round {self.t.round}",
            )
        if plan_hash != self.t.plan_hash:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {me}: plan mismatch (this node runs plan {self.t.plan_hash[:12]}, the "
                f"caller has {plan_hash[:12] or 'none'})",
            )
        if not 0 <= node < self.t.num_nodes or node == me:
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {me}: caller index {node} is not a peer in a {self.t.num_nodes}-node plan",
            )
        if expected != me:
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {me}: the caller expected node {expected}",
            )
        return None

    def check_identity(self, context: grpc.ServicerContext, node: int) -> Problem | None:
        """With TLS on, the caller's certificate must be node ``node``'s (not a client's)."""
        if not self._tls:
            return None
        from disco_fl.security.tls import node_common_name

        names = context.auth_context().get("x509_common_name", [])
        want = node_common_name(node).encode()
        if list(names) != [want]:
            got = b", ".join(names).decode(errors="replace") or "none"
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {self.t.index}: the caller's certificate ({got}) is not node {node}'s",
            )
        return None

    async def Handshake(  # type: ignore[override]
        self, request: peer_pb2.Hello, context: grpc.aio.ServicerContext
    ) -> peer_pb2.HelloReply:
        problem = self.check_peer(
            request.plan_hash,
            request.node,
            request.household_token,
            request.expected_node,
            request.protocol_version,
            request.round,
        ) or self.check_identity(context, request.node)
        if problem is not None:
            await context.abort(*problem)
        reply = peer_pb2.HelloReply(
            plan_hash=self.t.plan_hash,
            node=self.t.index,
            protocol_version=PROTOCOL_VERSION,
            round=self.t.round,
        )
        if request.data_socket:  # the caller's frames come over the socket data path
            issued = self.t._data_ticket(request.node)
            if issued is None:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {self.t.index} takes frames over gRPC only (data path 'grpc'), the "
                    f"caller wants the socket data path: run every node with the same data path",
                )
            else:
                reply.data_ticket, reply.data_port = issued
        return reply

    async def Exchange(  # type: ignore[override]
        self, request_iterator: AsyncIterator[peer_pb2.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[peer_pb2.Frame]:
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        try:
            src = int(md.get(MD_NODE, ""))
            expected = int(md.get(MD_EXPECTED, ""))
            version = int(md.get(MD_PROTOCOL, "0"))  # version 1 sent none
            rnd = int(md.get(MD_ROUND, "0"))
        except ValueError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "missing or bad node / protocol metadata"
            )
        problem = self.check_peer(
            md.get(MD_PLAN, ""), src, md.get(MD_TOKEN, ""), expected, version, rnd
        ) or self.check_identity(context, src)
        if problem is not None:
            await context.abort(*problem)
        self.t._peer_connected(src)
        async for frame in request_iterator:
            reason = self.t._arrived(frame, frame.ByteSize(), src)
            if reason is not None:
                yield refusal(frame, self.t.index, src, reason)

    async def Health(  # type: ignore[override]
        self, request: peer_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.HealthReply:
        t = self.t
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        problem = self.check_token(md.get(MD_TOKEN, ""))
        if problem is not None:
            await context.abort(*problem)
        return peer_pb2.HealthReply(
            status=peer_pb2.HealthReply.NOT_SERVING if t.closed else peer_pb2.HealthReply.SERVING,
            plan_hash=t.plan_hash,
            node=t.index,
            num_nodes=t.num_nodes,
        )
