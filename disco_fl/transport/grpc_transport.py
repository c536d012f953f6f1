"""The gRPC transport: every node serves ``disco.v1.Peer``; one long-lived stream per peer pair.

Node ``k`` runs a ``grpc.server`` with the :class:`PeerServicer` on its ``listen`` address.
For each peer ``d`` it sends to, it keeps one channel and one ``Exchange`` stream fed from a
bounded queue; the stream is opened lazily on the first frame to ``d`` (or by
:meth:`GrpcTransport.connect`), after a ``Handshake`` in which both ends check the plan hash,
the node indices and the household token. Each ``Exchange`` call identifies its caller in the
call metadata, checked the same way; every frame arriving on it must come from that caller,
be addressed to this node and name a layer of the program (see
:func:`~disco_fl.transport.base.check_incoming`). Refused frames are answered on the reply
stream with a frame whose ``error`` says why (recorded in the sender's ``errors``).

With ``server_credentials`` / ``channel_credentials`` (see :mod:`disco_fl.security`) the
channels use TLS with client certificates (mutual TLS); otherwise they are plaintext.

Failures: when the stream to a peer breaks (the peer died or restarted), frames from that peer
are marked as not coming, so a node waiting for one fails at once with the cause instead of
waiting for its deadline; the next frame to that peer reconnects (without waiting if the peer
is still unreachable) and, once the peer is back, everything works again. gRPC keepalive
pings detect a peer that vanished without closing its connection.

A :class:`LinkShape` makes each outgoing link behave like a link of a given rate and
one-way delay (for benchmarks): frames leave in order, each taking ``framed bytes * 8 /
rate`` on the link, and are handed to gRPC when they would arrive.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.transport.base import (
    DEFAULT_MAX_PENDING_BYTES,
    MAX_SESSION_ID,
    Transport,
    TransportError,
    framed_size,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_FRAME_BYTES = 64 << 20
_MD_PLAN, _MD_NODE, _MD_EXPECTED, _MD_TOKEN = (
    "disco-plan-hash",
    "disco-node",
    "disco-expected-node",
    "disco-token",
)
_STOP = object()
KEEPALIVE_MS = 10_000  # ping an idle connection every 10 s; drop it if no answer in 5 s
KEEPALIVE_TIMEOUT_MS = 5_000
RETRY_S = 0.5  # a peer found unreachable is not tried again for this long


@dataclass(frozen=True)
class LinkShape:
    """An emulated link for every outgoing peer stream.

    Parameters
    ----------
    rate_bps : float
        Link rate in bits per second (e.g. ``100e6``); ``math.inf`` for no limit.
    rtt_s : float, default 0
        Round-trip time in seconds; each frame is delayed by ``rtt_s / 2`` (one way).
    """

    rate_bps: float
    rtt_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.rate_bps > 0:
            raise ValueError(f"rate_bps must be positive, got {self.rate_bps}")
        if not (math.isfinite(self.rtt_s) and self.rtt_s >= 0):
            raise ValueError(f"rtt_s must be a finite number >= 0, got {self.rtt_s}")


class _Pacer:
    """FIFO link state: when the link is free again; sleeps until each frame would arrive.

    (Busy-waiting the last ~0.15 ms instead of ``time.sleep``'s ~0.1 ms overshoot was tried:
    on a 2-core machine the spinning thread took the CPU the receiving node's gRPC threads
    needed, and the request latency did not change; see BENCHMARKS.md.)
    """

    def __init__(self, shape: LinkShape) -> None:
        self.shape = shape
        self.free = 0.0

    def pace(self, message_bytes: int) -> None:
        now = time.monotonic()
        start = max(now, self.free)
        self.free = start + framed_size(message_bytes) * 8.0 / self.shape.rate_bps
        arrive = self.free + self.shape.rtt_s / 2.0
        if arrive > now:
            time.sleep(arrive - now)


class HandshakeError(TransportError):
    """A peer refused us, or answered as a different node or with a different plan."""


class _Link:
    """Node ``owner.index``'s outgoing connection to peer ``dst``: channel, stream, queue."""

    def __init__(self, owner: GrpcTransport, dst: int, address: str, *, wait: bool = True) -> None:
        self.owner = owner
        self.dst = dst
        self.address = address
        self.failed: str | None = None
        self._closing = False
        self._pacer = _Pacer(owner.link_shape) if owner.link_shape is not None else None
        opts = owner._channel_options
        creds = owner._channel_credentials
        self.channel = (
            grpc.secure_channel(address, creds, options=opts)
            if creds is not None
            else grpc.insecure_channel(address, options=opts)
        )
        try:
            self.stub = peer_pb2_grpc.PeerStub(self.channel)
            self._handshake(wait)
            self.queue: queue.Queue[Any] = queue.Queue(maxsize=owner.send_queue_frames)
            self.call = self.stub.Exchange(
                self._requests(), metadata=owner._metadata(dst), wait_for_ready=True
            )
            self.reader = threading.Thread(
                target=self._read, name=f"disco-link-{owner.index}->{dst}", daemon=True
            )
            self.reader.start()
        except BaseException:
            self.channel.close()
            raise

    def _probe(self) -> None:
        """Reconnecting: fail at once if nothing listens at the peer's address (gRPC would
        otherwise hold the handshake until its timeout)."""
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit():
            return  # not host:port (e.g. a unix socket): let gRPC decide
        try:
            socket.create_connection(
                (host.strip("[]"), int(port)), timeout=self.owner.connect_timeout
            ).close()
        except OSError as e:
            raise HandshakeError(
                f"node {self.owner.index}: peer {self.dst} at {self.address} is unreachable: {e}"
            ) from None

    def _handshake(self, wait: bool) -> None:
        o = self.owner
        if not wait:
            self._probe()
        hello = peer_pb2.Hello(
            plan_hash=o.plan_hash,
            node=o.index,
            household_token=o._token,
            expected_node=self.dst,
        )
        try:
            reply = self.stub.Handshake(hello, timeout=o.connect_timeout, wait_for_ready=wait)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                hint = (
                    " (or refused our TLS certificate)"
                    if o._channel_credentials is not None
                    else ""
                )
                raise HandshakeError(
                    f"node {o.index}: peer {self.dst} at {self.address} did not answer within "
                    f"{o.connect_timeout:g} s{hint}"
                ) from None
            raise HandshakeError(
                f"node {o.index}: peer {self.dst} at {self.address} refused the handshake "
                f"({code.name if code else 'error'}): {details}"
            ) from None
        if reply.node != self.dst or reply.plan_hash != o.plan_hash:
            raise HandshakeError(
                f"node {o.index}: {self.address} answered as node {reply.node} with plan "
                f"{reply.plan_hash[:12]!r}; expected node {self.dst} with plan "
                f"{o.plan_hash[:12]!r}"
            )

    def _requests(self) -> Iterator[peer_pb2.Frame]:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            frame, size = item
            if self._pacer is not None:
                self._pacer.pace(size)
            yield frame

    def _read(self) -> None:
        try:
            for reply in self.call:
                msg = (
                    f"node {self.dst} refused a frame from {self.owner.index} "
                    f"(session {reply.session_id!r}, layer {reply.layer}): {reply.error}"
                )
                self.owner.errors.append(msg)
                log.warning(msg)
        except grpc.RpcError as e:
            if not self._closing:
                code = e.code() if isinstance(e, grpc.Call) else None
                details = e.details() if isinstance(e, grpc.Call) else str(e)
                self.failed = (
                    f"node {self.owner.index}: stream to peer {self.dst} at {self.address} "
                    f"broke ({code.name if code else 'error'}): {details}"
                )
                self.owner.errors.append(self.failed)
                log.warning(self.failed)
        if not self._closing and self.failed is None:
            self.failed = f"node {self.owner.index}: peer {self.dst} closed the stream"
        if not self._closing and self.failed is not None:
            self.owner.mailbox.mark_down(self.dst, self.failed)

    def put(self, frame: peer_pb2.Frame, size: int, timeout: float) -> None:
        if self.failed is not None:
            raise TransportError(self.failed)
        try:
            self.queue.put((frame, size), timeout=timeout)
        except queue.Full:
            raise TransportError(
                f"node {self.owner.index}: send queue to peer {self.dst} stayed full for "
                f"{timeout:g} s"
            ) from None

    def close(self, timeout: float) -> None:
        """Flush queued frames and end the stream; cancel it if that takes over ``timeout``."""
        self._closing = True
        with contextlib.suppress(queue.Full):
            self.queue.put(_STOP, timeout=timeout)
        self.reader.join(timeout)
        if self.reader.is_alive():
            self.call.cancel()
            self.reader.join(timeout)
        self.channel.close()


class PeerServicer(peer_pb2_grpc.PeerServicer):
    """The ``disco.v1.Peer`` service of one node."""

    def __init__(self, transport: GrpcTransport) -> None:
        self.t = transport

    def Handshake(self, request: peer_pb2.Hello, context: grpc.ServicerContext) -> Any:
        problem = self.t._check_peer(
            request.plan_hash, request.node, request.household_token, request.expected_node
        ) or self.t._check_identity(context, request.node)
        if problem is not None:
            context.abort(*problem)
        return peer_pb2.HelloReply(plan_hash=self.t.plan_hash, node=self.t.index)

    def Exchange(
        self, request_iterator: Iterator[peer_pb2.Frame], context: grpc.ServicerContext
    ) -> Iterator[peer_pb2.Frame]:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        try:
            src = int(md.get(_MD_NODE, ""))
            expected = int(md.get(_MD_EXPECTED, ""))
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing or bad node metadata")
        problem = self.t._check_peer(
            md.get(_MD_PLAN, ""), src, md.get(_MD_TOKEN, ""), expected
        ) or self.t._check_identity(context, src)
        if problem is not None:
            context.abort(*problem)
        self.t._peer_connected(src)
        for frame in request_iterator:
            reason = self.t._accept(frame, frame.ByteSize(), expected_src=src)
            if reason is not None:
                yield peer_pb2.Frame(
                    session_id=frame.session_id[:MAX_SESSION_ID],
                    step=frame.step,
                    layer=frame.layer,
                    direction=frame.direction,
                    src=self.t.index,
                    dst=src,
                    error=reason,
                )

    def Health(self, request: peer_pb2.HealthRequest, context: grpc.ServicerContext) -> Any:
        t = self.t
        return peer_pb2.HealthReply(
            status=peer_pb2.HealthReply.NOT_SERVING if t.closed else peer_pb2.HealthReply.SERVING,
            plan_hash=t.plan_hash,
            node=t.index,
            num_nodes=t.num_nodes,
        )


class GrpcTransport(Transport):
    """Node ``index``'s gRPC endpoint (server) and its links to the peers (clients).

    ``listen`` is the address to serve on (port 0 picks a free port; see :attr:`address`).
    ``peers`` (or :meth:`set_peers`) lists every node's address, indexed by node.
    ``max_frame_bytes`` bounds a serialized frame both ways (gRPC message limits).
    """

    def __init__(
        self,
        index: int,
        num_nodes: int,
        *,
        plan_hash: str,
        listen: str = "127.0.0.1:0",
        peers: Sequence[str] | None = None,
        household_token: str = "",
        num_layers: int | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        connect_timeout: float = 10.0,
        send_timeout: float = 30.0,
        send_queue_frames: int = 256,
        server_credentials: grpc.ServerCredentials | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        services: Sequence[Callable[[grpc.Server], None]] = (),
        max_extra_rpcs: int = 16,
        link_shape: LinkShape | None = None,
    ) -> None:
        super().__init__(
            index, num_nodes, num_layers=num_layers, max_pending_bytes=max_pending_bytes
        )
        if not plan_hash:
            raise ValueError("plan_hash is required")
        if max_frame_bytes <= 0:
            raise ValueError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        self.plan_hash = plan_hash
        self.max_frame_bytes = max_frame_bytes
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.send_queue_frames = send_queue_frames
        self._token = household_token
        self._channel_credentials = channel_credentials
        self.link_shape = link_shape
        self._tls = server_credentials is not None
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_frame_bytes),
            ("grpc.max_receive_message_length", max_frame_bytes),
            ("grpc.optimization_target", "latency"),
        ]
        self._channel_options = [
            *opts,
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # a restarted peer is found again quickly (no shared, backed-off subchannel)
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        server_opts = [
            *opts,
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ]
        self._links: dict[int, _Link] = {}
        # after a failed reconnection, sends to that peer fail at once for RETRY_S seconds
        self._unreachable: dict[int, tuple[float, str]] = {}
        self._link_locks = [threading.Lock() for _ in range(num_nodes)]
        self._addresses: list[str] | None = None
        # N-1 long-lived incoming streams (and their replacements after a peer restarts),
        # handshakes, health checks and the extra services' calls
        workers = 2 * num_nodes + 8 + max_extra_rpcs
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"disco-peer-{index}"),
            options=server_opts,
            maximum_concurrent_rpcs=workers - 1,
        )
        peer_pb2_grpc.add_PeerServicer_to_server(PeerServicer(self), self._server)
        for add in services:
            add(self._server)
        try:
            if server_credentials is not None:
                port = self._server.add_secure_port(listen, server_credentials)
            else:
                port = self._server.add_insecure_port(listen)
        except RuntimeError as e:
            raise TransportError(f"node {index}: cannot listen on {listen}: {e}") from e
        if port == 0:
            raise TransportError(f"node {index}: cannot listen on {listen}")
        self.port = port
        self.address = f"{listen.rsplit(':', 1)[0]}:{port}"
        self._server.start()
        if peers is not None:
            self.set_peers(peers)

    # ---- peers ---------------------------------------------------------------------------
    def set_peers(self, addresses: Sequence[str]) -> None:
        """Every node's address, indexed by node (this node's own entry is not used)."""
        if len(addresses) != self.num_nodes:
            raise ValueError(f"expected {self.num_nodes} addresses, got {len(addresses)}")
        self._addresses = [str(a) for a in addresses]

    def connect(self, peers: Sequence[int] | None = None) -> None:
        """Handshake with every peer now (otherwise done on the first frame to each).

        Waits up to ``connect_timeout`` for each peer that is not listening yet.
        """
        for d in range(self.num_nodes) if peers is None else peers:
            if d != self.index:
                self._link(d, wait=True)

    def _peer_connected(self, src: int) -> None:
        """A peer opened a stream to us (again): its frames can come."""
        self.mailbox.mark_up(src)

    def _link(self, dst: int, wait: bool = True) -> _Link:
        with self._link_locks[dst]:
            if self.closed:
                raise TransportError(f"node {self.index}: transport is closed")
            link = self._links.get(dst)
            if link is not None and link.failed is not None:
                # the stream broke: replace it now, without waiting for a peer that is gone
                del self._links[dst]
                link.close(timeout=0.5)
                link = None
                wait = False
            if link is None:
                if self._addresses is None:
                    raise TransportError(f"node {self.index}: peer addresses are not set")
                if not wait:
                    since, why = self._unreachable.get(dst, (-math.inf, ""))
                    if time.monotonic() - since < RETRY_S:
                        raise TransportError(why)
                try:
                    link = _Link(self, dst, self._addresses[dst], wait=wait)
                except TransportError as e:
                    if not wait:
                        self._unreachable[dst] = (time.monotonic(), str(e))
                    raise
                self._unreachable.pop(dst, None)
                self._links[dst] = link
                self.mailbox.mark_up(dst)
            return link

    def health(self, dst: int, timeout: float = 5.0) -> peer_pb2.HealthReply:
        """Ask peer ``dst`` whether it is serving (raises ``grpc.RpcError`` if unreachable)."""
        reply: peer_pb2.HealthReply = self._link(dst).stub.Health(
            peer_pb2.HealthRequest(), timeout=timeout
        )
        return reply

    def _metadata(self, dst: int) -> list[tuple[str, str]]:
        return [
            (_MD_PLAN, self.plan_hash),
            (_MD_NODE, str(self.index)),
            (_MD_EXPECTED, str(dst)),
            (_MD_TOKEN, self._token),
        ]

    def _check_peer(
        self, plan_hash: str, node: int, token: str, expected: int
    ) -> tuple[grpc.StatusCode, str] | None:
        me = self.index
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            return grpc.StatusCode.PERMISSION_DENIED, f"node {me}: wrong household token"
        if plan_hash != self.plan_hash:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {me}: plan mismatch (this node runs plan {self.plan_hash[:12]}, the "
                f"caller has {plan_hash[:12] or 'none'})",
            )
        if not 0 <= node < self.num_nodes or node == me:
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {me}: caller index {node} is not a peer in a {self.num_nodes}-node plan",
            )
        if expected != me:
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {me}: the caller expected node {expected}",
            )
        return None

    def _check_identity(
        self, context: grpc.ServicerContext, node: int
    ) -> tuple[grpc.StatusCode, str] | None:
        """With TLS on, the caller's certificate must be node ``node``'s (not a client's)."""
        if not self._tls:
            return None
        from disco_fl.security import node_common_name

        names = context.auth_context().get("x509_common_name", [])
        want = node_common_name(node).encode()
        if list(names) != [want]:
            got = b", ".join(names).decode(errors="replace") or "none"
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {self.index}: the caller's certificate ({got}) is not node {node}'s",
            )
        return None

    # ---- transport -----------------------------------------------------------------------
    def _transmit(self, frame: peer_pb2.Frame, size: int) -> None:
        if size > self.max_frame_bytes:
            raise TransportError(
                f"node {self.index}: frame of {size} bytes for layer {frame.layer} exceeds "
                f"max_frame_bytes={self.max_frame_bytes}"
            )
        self._link(frame.dst, wait=False).put(frame, size, self.send_timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Flush and end the outgoing streams, then stop the server (bounded by ``timeout``)."""
        if self.closed:
            return
        super().close()
        for d in range(self.num_nodes):
            with self._link_locks[d]:
                link = self._links.pop(d, None)
            if link is not None:
                link.close(timeout)
        self._server.stop(grace=timeout).wait(timeout + 1.0)
