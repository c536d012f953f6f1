"""The client side of the gRPC transport: one outgoing link per peer, and link emulation.

A :class:`Link` is node ``k``'s connection to the peer ``d`` it sends to: one channel and one
long-lived ``Exchange`` stream (or, with the socket data path, one data connection:
:class:`~disco_fl.runtime.transport.socket_path.SocketStream`), opened after a ``Handshake`` in
which both ends check the peer protocol version (:data:`~disco_fl.core.wire.PROTOCOL_VERSION`),
the plan hash, the training round, the node indices and the household token. The link lives on
its transport's I/O loop: frames are queued there (bounded by ``max_queued_bytes``) and written
in order by the link's own task; error replies from the peer are recorded in the transport's
``errors``. When the stream breaks, the link reports it to its transport (which marks the peer's
frames as not coming and reconnects on the next frame); reconnecting, it first probes the peer's
address so that a peer that is gone fails at once.

:func:`channel_options` are the channels' gRPC options (keepalive, quick reconnection).
The link emulation of benchmarks is :mod:`~disco_fl.runtime.transport.link_emulation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from typing import Any, Protocol

import grpc
import grpc.aio

from disco_fl.core.wire import PROTOCOL_VERSION
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.transport.frames import TransportError
from disco_fl.runtime.transport.peer_service import (
    KEEPALIVE_MS,
    KEEPALIVE_TIMEOUT_MS,
    message_options,
    version_name,
)
from disco_fl.runtime.transport.socket_path import SocketStream

log = logging.getLogger(__name__)

_STOP = object()


def channel_options(max_frame_bytes: int) -> list[tuple[str, Any]]:
    """The channels' gRPC options: keepalive, and a restarted peer found again quickly."""
    return [
        *message_options(max_frame_bytes),
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


class LinkOwner(Protocol):
    """What a link needs of its transport (a
    :class:`~disco_fl.runtime.transport.grpc_transport.GrpcTransport`)."""

    index: int
    plan_hash: str
    round: int
    connect_timeout: float
    max_queued_bytes: int
    max_frame_bytes: int
    data_path: str
    stamps: bool  # stamp each frame with the time it is written (Frame.sent_at_ns)
    errors: deque[str]
    _token: str
    _channel_options: list[tuple[str, Any]]
    _channel_credentials: grpc.ChannelCredentials | None
    _data_ssl: tuple[ssl.SSLContext, ssl.SSLContext] | None

    def _metadata(self, dst: int) -> list[tuple[str, str]]: ...

    def _link_up(self, dst: int) -> None: ...

    def _link_down(self, dst: int, why: str, handshake: bool) -> None: ...


class HandshakeError(TransportError):
    """A peer refused us, or answered as a different node or with a different plan."""


def rpc_error(e: BaseException) -> tuple[str, str]:
    code = getattr(e, "code", None)
    details = getattr(e, "details", None)
    c = code() if callable(code) else None
    d = details() if callable(details) else str(e)
    return (c.name if isinstance(c, grpc.StatusCode) else "error"), str(d)


class Link:
    """Node ``owner.index``'s outgoing connection to peer ``dst``: channel, stream, queue.

    Lives on the owner's I/O loop: created there, fed there (:meth:`push`), and written by its
    own task, which hands queued frames to gRPC in order.
    """

    def __init__(self, owner: LinkOwner, dst: int, address: str, *, wait: bool) -> None:
        self.owner = owner
        self.dst = dst
        self.address = address
        self.failed: str | None = None
        self._closing = False
        self._queue: deque[Any] = deque()
        self.queued_bytes = 0
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        # a failed handshake is reported through `failed` / the mailbox when nobody awaits it
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.channel: grpc.aio.Channel | None = None
        self.stub: peer_pb2_grpc.PeerStub | None = None
        self.call: Any = None
        self.task = loop.create_task(self._run(wait), name=f"disco-link-{owner.index}->{dst}")

    # ---- frames --------------------------------------------------------------------------
    def push(self, frame: peer_pb2.Frame, size: int) -> None:
        """Queue a frame (on the loop); raises if the link failed or its queue is full."""
        if self.failed is not None:
            raise TransportError(self.failed)
        if self.queued_bytes + size > self.owner.max_queued_bytes:
            raise TransportError(
                f"node {self.owner.index}: send queue to peer {self.dst} holds "
                f"{self.queued_bytes} bytes; frame of {size} bytes refused"
            )
        call = self.call
        if not self._queue and isinstance(call, SocketStream):
            if self.owner.stamps:
                frame.sent_at_ns = time.monotonic_ns()
            if call.write_now(frame):
                return  # written at once: nothing queued before it, the connection has room
        self._queue.append((frame, size))
        self.queued_bytes += size
        self._wake.set()

    @property
    def queued(self) -> bool:
        """Frames wait in the queue for the link's task."""
        return bool(self._queue)

    def push_later(self, frame: peer_pb2.Frame, size: int) -> None:
        """:meth:`push` for a frame handed over from another thread (errors are logged)."""
        try:
            self.push(frame, size)
        except TransportError as e:
            self.owner.errors.append(str(e))
            log.warning("%s", e)

    # ---- the link's task -----------------------------------------------------------------
    async def _run(self, wait: bool) -> None:
        o = self.owner
        try:
            opts = o._channel_options
            creds = o._channel_credentials
            self.channel = (
                grpc.aio.secure_channel(self.address, creds, options=opts)
                if creds is not None
                else grpc.aio.insecure_channel(self.address, options=opts)
            )
            self.stub = peer_pb2_grpc.PeerStub(self.channel)
            reply = await self._handshake(wait)
            if o.data_path == "socket":
                self.call = await self._open_socket(reply)
            else:
                # not wait_for_ready: the handshake just found the peer; if it goes before the
                # stream reaches it, the stream fails now (a waiting one would wait for ever)
                self.call = self.stub.Exchange(metadata=o._metadata(self.dst), wait_for_ready=False)
        except Exception as e:
            why = str(e) if isinstance(e, TransportError) else f"{type(e).__name__}: {e}"
            self._fail(why, handshake=not wait)  # a lazy reconnection: retry later
            if not self.ready.done():
                self.ready.set_exception(
                    e if isinstance(e, TransportError) else HandshakeError(why)
                )
            return
        self.ready.set_result(None)
        o._link_up(self.dst)
        reader = asyncio.get_running_loop().create_task(self._read())
        try:
            while True:
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                item = self._queue.popleft()
                if item is _STOP:
                    with contextlib.suppress(Exception):
                        await self.call.done_writing()
                    break
                frame, size = item
                self.queued_bytes -= size
                if self.owner.stamps:
                    frame.sent_at_ns = time.monotonic_ns()
                await self.call.write(frame)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._broke(e)
        await reader

    def _stub(self) -> peer_pb2_grpc.PeerStub:
        if self.stub is None:
            raise TransportError(f"node {self.owner.index}: link to peer {self.dst} is not open")
        return self.stub

    async def _probe(self) -> None:
        """Reconnecting: fail at once if nothing listens at the peer's address (gRPC would
        otherwise hold the handshake until its timeout)."""
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit():
            return  # not host:port (e.g. a unix socket): let gRPC decide
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), self.owner.connect_timeout
            )
            writer.close()
        except (OSError, asyncio.TimeoutError) as e:
            raise HandshakeError(
                f"node {self.owner.index}: peer {self.dst} at {self.address} is unreachable: "
                f"{e or type(e).__name__}"
            ) from None

    async def _open_socket(self, reply: peer_pb2.HelloReply) -> SocketStream:
        """The data connection to the peer, with the ticket its handshake gave us."""
        o = self.owner
        if not reply.data_ticket or not 0 < reply.data_port < 65536:
            raise HandshakeError(
                f"node {o.index}: peer {self.dst} at {self.address} gave no data-path ticket"
            )
        try:
            return await SocketStream.open(
                self.address,
                reply.data_port,
                reply.data_ticket,
                ssl_context=o._data_ssl[1] if o._data_ssl else None,
                timeout=o.connect_timeout,
                max_frame_bytes=o.max_frame_bytes,
            )
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            raise HandshakeError(
                f"node {o.index}: cannot open the data connection to peer {self.dst} at "
                f"port {reply.data_port}: {e or type(e).__name__} (is that port open to this "
                "node? `disco-fl serve --data-port` fixes it; `--data-path grpc` on every node "
                "needs none)"
            ) from None

    async def _handshake(self, wait: bool) -> peer_pb2.HelloReply:
        o = self.owner
        if not wait:
            await self._probe()
        hello = peer_pb2.Hello(
            plan_hash=o.plan_hash,
            node=o.index,
            household_token=o._token,
            expected_node=self.dst,
            protocol_version=PROTOCOL_VERSION,
            round=o.round,
            data_socket=o.data_path == "socket",
        )
        stub = self._stub()
        try:
            reply = await stub.Handshake(hello, timeout=o.connect_timeout, wait_for_ready=wait)
        except grpc.RpcError as e:
            code, details = rpc_error(e)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED.name:
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
                f"({code}): {details}"
            ) from None
        if reply.protocol_version != PROTOCOL_VERSION:
            raise HandshakeError(
                f"node {o.index}: peer {self.dst} at {self.address} speaks disco peer "
                f"protocol {version_name(reply.protocol_version)}, this node speaks "
                f"{PROTOCOL_VERSION}: run the same disco_fl version on every node"
            )
        if reply.round != o.round:
            raise HandshakeError(
                f"node {o.index}: peer {self.dst} at {self.address} is in round {reply.round}, "
                f"this node in round {o.round}"
            )
        if reply.node != self.dst or reply.plan_hash != o.plan_hash:
            raise HandshakeError(
                f"node {o.index}: {self.address} answered as node {reply.node} with plan "
                f"{reply.plan_hash[:12]!r}; expected node {self.dst} with plan "
                f"{o.plan_hash[:12]!r}"
            )
        return reply

    async def _read(self) -> None:
        """Error replies from the peer; the end of the stream (a broken peer)."""
        try:
            async for reply in self.call:
                msg = (
                    f"node {self.dst} refused a frame from {self.owner.index} "
                    f"(session {reply.session_id!r}, layer {reply.layer}): {reply.error}"
                )
                self.owner.errors.append(msg)
                log.warning(msg)
        except asyncio.CancelledError:
            if not self._closing:
                raise
        except Exception as e:
            self._broke(e)
        if not self._closing and self.failed is None:
            self._fail(f"node {self.owner.index}: peer {self.dst} closed the stream")
        self._wake.set()  # the writer notices a failed link when it wakes

    def _broke(self, e: Exception) -> None:
        """The stream failed while writing or reading (unless we are closing it)."""
        if not self._closing:
            code, details = rpc_error(e)
            self._fail(
                f"node {self.owner.index}: stream to peer {self.dst} at {self.address} "
                f"broke ({code}): {details}"
            )

    def _fail(self, why: str, handshake: bool = False) -> None:
        if self.failed is not None or self._closing:
            return
        self.failed = why
        self._queue.clear()
        self.queued_bytes = 0
        self.owner._link_down(self.dst, why, handshake)

    async def close(self, timeout: float) -> None:
        """Flush queued frames and end the stream; cancel it if that takes over ``timeout``."""
        self._closing = True
        self._queue.append(_STOP)
        self._wake.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        if not self.task.done():
            if self.call is not None:
                self.call.cancel()
            self.task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self.task, timeout)
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.close()
