"""The gRPC transport: every node serves ``disco.v1.Peer``; one long-lived stream per ordered pair.

:class:`GrpcTransport` ties these parts together, each in a module of its own:

- the server side, :mod:`~disco_fl.runtime.transport.peer_service`: node ``k`` runs a ``grpc.aio``
  server with the :class:`~disco_fl.runtime.transport.peer_service.PeerServicer` on its ``listen``
  address; it checks every caller (household token, protocol version, plan hash, round, node
  indices, certificate) and bounds its connections;
- the client side, :mod:`~disco_fl.runtime.transport.peer_links`: for each peer ``d`` it sends to,
  one channel and one ``Exchange`` stream, opened lazily on the first frame to ``d`` (or by
  :meth:`GrpcTransport.connect`) after a ``Handshake``;
- benchmarks' link emulation, :mod:`~disco_fl.runtime.transport.link_emulation` (a
  :class:`LinkShape` applied to every incoming link);
- the event-loop plumbing, :mod:`~disco_fl.runtime.transport.io_loop`;
- with ``data_path="socket"``, :mod:`~disco_fl.runtime.transport.socket_path`: the handshake
  stays on gRPC, and each link's frames go over one TCP connection of their own (a length
  prefix and a serialized frame each) instead of an ``Exchange`` stream; the node listens for
  such connections on a second port, given out with one-time tickets by its handshake.

Every frame arriving must come from its stream's caller, be addressed to this node and name a layer
of the program (see :func:`~disco_fl.runtime.transport.base.check_incoming`). Refused frames are
answered on the reply stream with a frame whose ``error`` says why (recorded in the sender's
``errors``).

**Threads.** All gRPC work of a transport runs on one asyncio event loop in a thread of its
own (the *I/O loop*). Blocking callers (joint training, tests) use ``send`` / ``recv`` from any
other thread: a frame sent is handed to the loop, a frame received is stored in the mailbox and
wakes the waiting thread. A coroutine *on* the loop
(:func:`~disco_fl.runtime.inference.run_node_async`,
which ``disco-fl serve`` uses) sends and awaits frames (:meth:`GrpcTransport.recv_async`) with
no thread hand-off at all: a frame goes from the computing code to gRPC, and from gRPC to the
computing code, on the same thread.

With ``server_credentials`` / ``channel_credentials`` (see :mod:`disco_fl.security`) the
channels use TLS with client certificates (mutual TLS); otherwise they are plaintext. Every
call to the ``Peer`` service (``Handshake``, ``Exchange``, ``Health``) must carry the household
token.

Failures: when the stream to a peer breaks (the peer died or restarted), frames from that peer
are marked as not coming, so a node waiting for one fails at once with the cause instead of
waiting for its deadline; the next frame to that peer reconnects (without waiting if the peer
is still unreachable) and, once the peer is back, everything works again. gRPC keepalive
pings detect a peer that vanished without closing its connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from disco_fl.core.wire import PROTOCOL_VERSION
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.transport.base import (
    DEFAULT_MAX_PENDING_BYTES,
    AsyncTransport,
    TransportError,
    check_incoming,
)
from disco_fl.runtime.transport.io_loop import IoLoop, set_done
from disco_fl.runtime.transport.link_emulation import (
    STAMP_BYTES,
    LinkEmulation,
    LinkSchedule,
    LinkShape,
)
from disco_fl.runtime.transport.peer_links import HandshakeError, Link, channel_options
from disco_fl.runtime.transport.peer_service import (
    DEFAULT_HANDSHAKE_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_FRAME_BYTES,
    MD_EXPECTED,
    MD_NODE,
    MD_PLAN,
    MD_PROTOCOL,
    MD_ROUND,
    MD_TOKEN,
    PeerServicer,
    server_options,
)
from disco_fl.runtime.transport.socket_path import (
    DATA_PATHS,
    DataServer,
    Tickets,
    socket_framed_size,
)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT_S",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_FRAME_BYTES",
    "MD_TOKEN",
    "GrpcTransport",
    "HandshakeError",
    "LinkSchedule",
    "LinkShape",
    "PeerServicer",
]

log = logging.getLogger(__name__)

RETRY_S = 0.5  # a peer found unreachable is not tried again for this long
T = TypeVar("T")


class GrpcTransport(AsyncTransport):
    """Node ``index``'s gRPC endpoint (server) and its links to the peers (clients).

    ``listen`` is the address to serve on (port 0 picks a free port; see :attr:`address`).
    ``peers`` (or :meth:`set_peers`) lists every node's address, indexed by node.
    ``max_frame_bytes`` bounds a serialized frame both ways (gRPC message limits).
    ``max_queued_bytes`` bounds the frames queued for one peer and not yet taken by gRPC (a
    stalled peer's flow control holds them back): beyond it, ``send`` raises.
    ``services`` add more (``grpc.aio``) servicers to the server; they run on :attr:`loop`.
    ``max_connections``, ``handshake_timeout_s`` and ``idle_timeout_s`` bound the server's
    connections (see :mod:`~disco_fl.runtime.transport.peer_service`).
    ``training_round`` (default 0: none) is the Flower server round the node trains in: the
    handshake refuses a peer of another round (as it refuses another plan or another
    protocol version, :data:`~disco_fl.core.wire.PROTOCOL_VERSION`).
    ``data_path`` is how this node's frames travel: ``"grpc"`` (default: an ``Exchange``
    stream per peer) or ``"socket"`` (a TCP connection per peer, opened with a ticket from
    the gRPC handshake, see :mod:`~disco_fl.runtime.transport.socket_path`); a ``"socket"``
    node also accepts its peers' data connections, a ``"grpc"`` node refuses to hand out
    tickets. With TLS, the socket path needs ``data_ssl``: the ``(server, client)``
    :class:`ssl.SSLContext` pair of the same node files
    (:func:`~disco_fl.security.tls.data_ssl_contexts`); ``data_listen_port``: the data
    listener's port on ``listen``'s host (default 0: a free one). ``busy_poll_s``: while a
    ``recv_async`` waits, the loop polls for up to that long before it sleeps
    (:mod:`~disco_fl.runtime.transport.io_loop`; default 0: never).
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
        max_queued_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        server_credentials: grpc.ServerCredentials | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        services: Sequence[Callable[[grpc.aio.Server], None]] = (),
        max_extra_rpcs: int = 16,
        link_shape: LinkShape | LinkSchedule | None = None,
        training_round: int = 0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        data_path: str = "grpc",
        data_ssl: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
        data_listen_port: int = 0,
        busy_poll_s: float = 0.0,
    ) -> None:
        super().__init__(
            index, num_nodes, num_layers=num_layers, max_pending_bytes=max_pending_bytes
        )
        if not plan_hash:
            raise ValueError("plan_hash is required")
        if max_frame_bytes <= 0:
            raise ValueError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        for name, v in (
            ("handshake_timeout_s", handshake_timeout_s),
            ("idle_timeout_s", idle_timeout_s),
        ):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {v}")
        if training_round < 0:
            raise ValueError(f"training_round must be >= 0, got {training_round}")
        if data_path not in DATA_PATHS:
            raise ValueError(f"data_path must be one of {DATA_PATHS}, got {data_path!r}")
        if data_path == "socket" and (server_credentials is None) != (data_ssl is None):
            raise ValueError(
                "the socket data path uses TLS exactly when the peer service does: give "
                "data_ssl (disco_fl.security.data_ssl_contexts) with the TLS credentials"
            )
        self.data_path = data_path
        self._data_ssl = data_ssl if data_path == "socket" else None
        self._tickets = Tickets(handshake_timeout_s)
        self._data_server: DataServer | None = None
        self._data_listen_port = data_listen_port
        self._max_connections = max_connections
        self._handshake_timeout_s = handshake_timeout_s
        if data_path == "socket":
            self.framing = socket_framed_size
        self.plan_hash = plan_hash
        self.round = int(training_round)  # peers must be in the same round (0: none)
        self.max_frame_bytes = max_frame_bytes
        self.connect_timeout = connect_timeout
        self.max_queued_bytes = max_queued_bytes
        self._token = household_token
        self._channel_credentials = channel_credentials
        self.link_shape = link_shape
        # emulating links: stamp each frame with the time it is written (Frame.sent_at_ns), so
        # that the receiver's emulated link can start then
        self.stamps = link_shape is not None
        self._tls = server_credentials is not None
        self._channel_options = channel_options(max_frame_bytes)
        self._server_options = server_options(
            max_frame_bytes, max_connections, handshake_timeout_s, idle_timeout_s
        )
        self._links: dict[int, Link] = {}
        self._closing_links: set[asyncio.Task[None]] = set()
        # after a failed reconnection, sends to that peer fail at once for RETRY_S seconds
        self._unreachable: dict[int, tuple[float, str]] = {}
        self._addresses: list[str] | None = None
        self._waiting = 0  # recv_async calls waiting for a frame (the loop polls meanwhile)
        self._io = IoLoop(f"disco-io-{index}", busy_poll_s)
        self._io.selector.polling = lambda: self._waiting > 0
        self.loop = self._io.loop
        self._emulation = (
            LinkEmulation(link_shape, num_nodes, self.framing, self._io, self._store)
            if link_shape is not None
            else None
        )
        try:
            self.port = self._io.run(
                self._start(listen, server_credentials, services, max_extra_rpcs), timeout=60
            )
        except BaseException:
            self._io.stop(2.0)
            raise
        self.address = f"{listen.rsplit(':', 1)[0]}:{self.port}"
        if peers is not None:
            self.set_peers(peers)

    async def _start(
        self,
        listen: str,
        server_credentials: grpc.ServerCredentials | None,
        services: Sequence[Callable[[grpc.aio.Server], None]],
        max_extra_rpcs: int,
    ) -> int:
        # N-1 long-lived incoming streams (and their replacements after a peer restarts),
        # handshakes, health checks and the extra services' calls
        max_rpcs = 2 * self.num_nodes + 8 + max_extra_rpcs
        self._server = grpc.aio.server(
            options=[*self._server_options, ("grpc.max_concurrent_streams", max_rpcs)],
            maximum_concurrent_rpcs=max_rpcs,
        )
        peer_pb2_grpc.add_PeerServicer_to_server(
            PeerServicer(self, household_token=self._token, tls=self._tls), self._server
        )
        for add in services:
            add(self._server)
        try:
            if server_credentials is not None:
                port = self._server.add_secure_port(listen, server_credentials)
            else:
                port = self._server.add_insecure_port(listen)
        except RuntimeError as e:
            raise TransportError(f"node {self.index}: cannot listen on {listen}: {e}") from e
        if port == 0:
            raise TransportError(f"node {self.index}: cannot listen on {listen}")
        if self.data_path == "socket":
            self._data_server = DataServer(
                self, self._tickets, ssl_context=self._data_ssl[0] if self._data_ssl else None,
                max_frame_bytes=self.max_frame_bytes, max_connections=self._max_connections,
                handshake_timeout_s=self._handshake_timeout_s,
            )  # fmt: skip
            try:
                await self._data_server.start(listen.rsplit(":", 1)[0], self._data_listen_port)
            except OSError as e:
                raise TransportError(
                    f"node {self.index}: cannot listen for data connections: {e}"
                ) from e
        await self._server.start()
        return int(port)

    @property
    def data_port(self) -> int | None:
        """The port of this node's data listener (``data_path="socket"``), else ``None``."""
        return self._data_server.port if self._data_server is not None else None

    def _data_ticket(self, src: int) -> tuple[bytes, int] | None:
        """A one-time ticket for peer ``src``'s data connection and the port to present it
        at (on the loop, after its handshake passed); ``None`` without the socket path."""
        if self._data_server is None:
            return None
        return self._tickets.issue(src), self._data_server.port

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
                self._io.run(self._ready_link(d, wait=True), timeout=self.connect_timeout + 10)

    async def _ready_link(self, dst: int, wait: bool) -> Link:
        link = self._link(dst, wait)
        await asyncio.shield(link.ready)
        return link

    async def reconnect(self, dst: int, timeout: float) -> bool:
        """On the loop: whether the link to ``dst`` is up, or comes up within ``timeout``
        seconds (a new handshake when it broke); ``False`` while the peer is unreachable.
        Degraded mode's retry of a node found missing."""
        try:
            await asyncio.wait_for(self._ready_link(dst, wait=False), timeout)
        except (TransportError, asyncio.TimeoutError):
            return False
        return True

    def _peer_connected(self, src: int) -> None:
        """A peer opened a stream to us (again): its frames can come."""
        self.mailbox.mark_up(src)

    def _link(self, dst: int, wait: bool = True) -> Link:
        """The link to ``dst`` (on the loop): the live one, or a new one (handshake started)."""
        if self.closed:
            raise TransportError(f"node {self.index}: transport is closed")
        link = self._links.get(dst)
        if link is not None and link.failed is not None:
            # the stream broke: replace it now, without waiting for a peer that is gone
            del self._links[dst]
            closing = self.loop.create_task(link.close(timeout=0.5))
            self._closing_links.add(closing)  # keep a reference until it is done
            closing.add_done_callback(self._closing_links.discard)
            link = None
            wait = False
        if link is None:
            if self._addresses is None:
                raise TransportError(f"node {self.index}: peer addresses are not set")
            if not wait:
                since, why = self._unreachable.get(dst, (-math.inf, ""))
                if time.monotonic() - since < RETRY_S:
                    raise TransportError(why)
            link = Link(self, dst, self._addresses[dst], wait=wait)
            self._links[dst] = link
        return link

    def _link_up(self, dst: int) -> None:
        self._unreachable.pop(dst, None)
        self.mailbox.mark_up(dst)

    def _link_down(self, dst: int, why: str, handshake: bool) -> None:
        if handshake:
            self._unreachable[dst] = (time.monotonic(), why)
        self.errors.append(why)
        log.warning("%s", why)
        self.mailbox.mark_down(dst, why)

    def health(self, dst: int, timeout: float = 5.0) -> peer_pb2.HealthReply:
        """Ask peer ``dst`` whether it is serving (raises ``grpc.RpcError`` if unreachable)."""

        async def ask() -> peer_pb2.HealthReply:
            link = await self._ready_link(dst, wait=True)
            reply: peer_pb2.HealthReply = await link._stub().Health(
                peer_pb2.HealthRequest(), metadata=self._metadata(dst), timeout=timeout
            )
            return reply

        return self._io.run(ask(), timeout=timeout + self.connect_timeout + 5)

    def _metadata(self, dst: int) -> list[tuple[str, str]]:
        return [
            (MD_PLAN, self.plan_hash),
            (MD_NODE, str(self.index)),
            (MD_EXPECTED, str(dst)),
            (MD_TOKEN, self._token),
            (MD_PROTOCOL, str(PROTOCOL_VERSION)),
            (MD_ROUND, str(self.round)),
        ]

    # ---- transport -----------------------------------------------------------------------
    def _transmit(self, frame: peer_pb2.Frame, size: int) -> None:
        if size + (STAMP_BYTES if self.stamps else 0) > self.max_frame_bytes:
            raise TransportError(
                f"node {self.index}: frame of {size} bytes for layer {frame.layer} exceeds "
                f"max_frame_bytes={self.max_frame_bytes}"
            )
        dst = int(frame.dst)
        if self._io.inside():
            self._link(dst, wait=False).push(frame, size)
            return
        # from another thread: make sure the link is up (only the first frame waits), then
        # hand the frame to the loop; frames from one thread keep their order
        link = self._links.get(dst)
        if link is None or link.failed is not None or not link.ready.done():
            link = self._io.run(self._ready_link(dst, wait=False), self.connect_timeout + 10)
        if link.failed is not None:
            raise TransportError(link.failed)
        if link.queued_bytes + size > self.max_queued_bytes:
            raise TransportError(
                f"node {self.index}: send queue to peer {dst} holds {link.queued_bytes} "
                f"bytes; frame of {size} bytes refused"
            )
        self.loop.call_soon_threadsafe(link.push_later, frame, size)

    def unflushed(self) -> bool:
        """Whether a link holds frames its task has not handed on yet (always after a send on
        gRPC streams; on the socket data path only when a connection's buffer was full)."""
        return any(link.queued for link in self._links.values())

    def _arrived(self, frame: peer_pb2.Frame, size: int, src: int) -> str | None:
        """A frame came in from ``src`` (on the loop): check it now; with a link shape, store
        it when the emulated link delivers it
        (:class:`~disco_fl.runtime.transport.link_emulation.LinkEmulation`)."""
        entered = time.monotonic()
        if frame.sent_at_ns:
            size -= STAMP_BYTES  # emulation metadata, not counted as the frame's bytes
        if self._emulation is None:
            return self._accept(frame, size, expected_src=src)
        reason = check_incoming(frame, self.index, self.num_nodes, self.num_layers, src)
        if reason is not None:
            return self._accept(frame, size, expected_src=src)  # refused, logged, counted
        return self._emulation.arrived(frame, size, src, entered)

    def _store(self, frame: peer_pb2.Frame, size: int, src: int) -> str | None:
        """Store a frame already checked (the emulated link delivers it)."""
        return self._accept(frame, size, expected_src=src, checked=True)

    async def recv_async(
        self,
        session_id: str,
        layer: int,
        src: int,
        timeout: float,
        *,
        step: int = 0,
        backward: bool = False,
        sub_channel: int = peer_pb2.Frame.SUB_CHANNEL_DATA,
    ) -> peer_pb2.Frame:
        """:meth:`recv` for a coroutine on :attr:`loop` (waits without blocking the loop)."""
        key = self._want(session_id, layer, src, timeout, step, backward, sub_channel)
        deadline = time.monotonic() + timeout
        while True:
            woken: asyncio.Future[None] = self.loop.create_future()

            def wake(f: asyncio.Future[None] = woken) -> None:
                self._io.call_soon(set_done, f)

            unwatch = self.mailbox.watch(key, wake)  # before looking: no change is missed
            try:
                frame = self.mailbox.take(key)
                if frame is not None:
                    return frame
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._no_frame(key, timeout)
                # woken by the mailbox or by this timer (no wait_for: one loop turn less)
                timer = self.loop.call_later(left, set_done, woken)
                self._waiting += 1
                try:
                    await woken
                finally:
                    self._waiting -= 1
                    timer.cancel()
            finally:
                unwatch()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on this transport's event loop and wait for it (another thread)."""
        return self._io.run(coro, timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Flush and end the outgoing streams, then stop the server (bounded by ``timeout``)."""
        if self.closed:
            return
        super().close()

        async def shut() -> None:
            links = list(self._links.values())
            self._links.clear()
            await asyncio.gather(*(link.close(timeout) for link in links))
            if self._data_server is not None:
                await self._data_server.stop(timeout)
            await self._server.stop(grace=timeout)

        try:
            self._io.run(shut(), timeout=2 * timeout + 5)
        except Exception as e:  # closing is best effort
            log.warning("node %d: closing the transport: %s", self.index, e)
        self._io.stop(timeout + 1.0)
