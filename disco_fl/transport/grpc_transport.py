"""The gRPC transport: every node serves ``disco.v1.Peer``; one long-lived stream per ordered pair.

Node ``k`` runs a ``grpc.aio`` server with the :class:`PeerServicer` on its ``listen`` address.
For each peer ``d`` it sends to, it keeps one channel and one ``Exchange`` stream; the stream
is opened lazily on the first frame to ``d`` (or by :meth:`GrpcTransport.connect`), after a
``Handshake`` in which both ends check the peer protocol version
(:data:`~disco_fl.wire.PROTOCOL_VERSION`: a peer speaking another one is refused with a message
saying so), the plan hash, the training round, the node indices and the household token. Each
``Exchange`` call identifies its caller in the call metadata, checked the same way; every frame
arriving on it must come from that caller, be addressed to this node and name a layer of the
program (see :func:`~disco_fl.transport.base.check_incoming`). Refused frames are answered on
the reply stream with a frame whose ``error`` says why (recorded in the sender's ``errors``).

**Threads.** All gRPC work of a transport runs on one asyncio event loop in a thread of its
own (the *I/O loop*; a select-based loop, so its timers are precise to tens of microseconds
instead of epoll's whole milliseconds). Blocking callers (joint training, tests) use
``send`` / ``recv`` from any other thread: a frame sent is handed to the loop, a frame received
is stored in the mailbox and wakes the waiting thread. A coroutine *on* the loop
(:func:`~disco_fl.runtime.run_node_async`, which ``disco-fl serve`` uses) sends and awaits
frames (:meth:`GrpcTransport.recv_async`) with no thread hand-off at all: a frame goes from
the computing code to gRPC, and from gRPC to the computing code, on the same thread.

With ``server_credentials`` / ``channel_credentials`` (see :mod:`disco_fl.security`) the
channels use TLS with client certificates (mutual TLS); otherwise they are plaintext. Every
call to the ``Peer`` service (``Handshake``, ``Exchange``, ``Health``) must carry the household
token.

Connection limits: the server holds at most ``max_connections`` connections (more are closed
as they are accepted), closes a connection that has not finished its TLS and HTTP/2 handshake
within ``handshake_timeout_s`` and one without a call for ``idle_timeout_s``, and pings its
callers (keepalive) so that connections of vanished callers are closed too; an idle or
unauthenticated connection thus holds a file descriptor for a bounded time only.

Failures: when the stream to a peer breaks (the peer died or restarted), frames from that peer
are marked as not coming, so a node waiting for one fails at once with the cause instead of
waiting for its deadline; the next frame to that peer reconnects (without waiting if the peer
is still unreachable) and, once the peer is back, everything works again. gRPC keepalive
pings detect a peer that vanished without closing its connection.

A :class:`LinkShape` makes every incoming link behave like a link of a given rate and one-way
delay (for benchmarks): frames from a peer are delivered in order, each when it would have
arrived over such a link (``framed bytes * 8 / rate`` on the link after the previous one,
plus ``rtt / 2``), counted from when it reached this node over loopback; the software time of
the hop is thus paid on top of the emulated link, as on a real one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import hmac
import logging
import math
import selectors
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio

from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.transport.base import (
    DEFAULT_MAX_PENDING_BYTES,
    MAX_SESSION_ID,
    AsyncTransport,
    TransportError,
    check_incoming,
    framed_size,
)
from disco_fl.wire import PROTOCOL_VERSION

log = logging.getLogger(__name__)

DEFAULT_MAX_FRAME_BYTES = 64 << 20
MD_TOKEN = "disco-token"  # call metadata: the household token (peer frames and inference)
_MD_PLAN, _MD_NODE, _MD_EXPECTED, _MD_PROTOCOL, _MD_ROUND = (
    "disco-plan-hash",
    "disco-node",
    "disco-expected-node",
    "disco-protocol",
    "disco-round",
)
_STOP = object()
KEEPALIVE_MS = 10_000  # ping an idle connection every 10 s; drop it if no answer in 5 s
KEEPALIVE_TIMEOUT_MS = 5_000
DEFAULT_MAX_CONNECTIONS = 128  # connections a node's server holds at once
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0  # to finish the TLS and HTTP/2 handshakes
DEFAULT_IDLE_TIMEOUT_S = 300.0  # a connection without a call for this long is closed
RETRY_S = 0.5  # a peer found unreachable is not tried again for this long
_PR_SET_TIMERSLACK = 29
T = TypeVar("T")


@dataclass(frozen=True)
class LinkShape:
    """An emulated link for every incoming peer stream.

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


class _LinkClock:
    """FIFO state of one emulated link: when it is free again, when each frame arrives."""

    def __init__(self, shape: LinkShape) -> None:
        self.shape = shape
        self.free = 0.0

    def arrival(self, message_bytes: int, now: float) -> float:
        start = max(now, self.free)
        self.free = start + framed_size(message_bytes) * 8.0 / self.shape.rate_bps
        return self.free + self.shape.rtt_s / 2.0


def _precise_timers() -> None:
    """Ask Linux for 1 us of timer slack on this thread (default 50 us): its timed waits
    (the loop's ``select``) then wake within tens of microseconds of their deadline."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)


class _IoLoop:
    """An asyncio event loop running in a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        # select(): microsecond timeouts (epoll rounds every timer up to a whole millisecond)
        self.loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._ident: int | None = None
        started = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(started,), name=name, daemon=True)
        self.thread.start()
        started.wait()

    def _main(self, started: threading.Event) -> None:
        _precise_timers()
        asyncio.set_event_loop(self.loop)
        self._ident = threading.get_ident()
        started.set()
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                for task in asyncio.all_tasks(self.loop):
                    task.cancel()
                self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()

    def inside(self) -> bool:
        """Whether the calling thread is the loop's own."""
        return threading.get_ident() == self._ident

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from another thread)."""
        if self.inside():
            coro.close()
            raise RuntimeError("a blocking transport call was made on its own event loop")
        if self.loop.is_closed() or not self.thread.is_alive():
            coro.close()
            raise TransportError("the transport's event loop has stopped")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:  # (the builtin TimeoutError, since 3.11)
            if fut.done():
                raise  # the coroutine's own TimeoutError
            fut.cancel()
            why = f"the transport's event loop did not answer in {timeout} s"
            raise TimeoutError(why) from None

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop: at once on its thread, else as soon as it can."""
        if self.inside():
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)


class HandshakeError(TransportError):
    """A peer refused us, or answered as a different node or with a different plan."""


def _rpc_error(e: BaseException) -> tuple[str, str]:
    code = getattr(e, "code", None)
    details = getattr(e, "details", None)
    c = code() if callable(code) else None
    d = details() if callable(details) else str(e)
    return (c.name if isinstance(c, grpc.StatusCode) else "error"), str(d)


class _Link:
    """Node ``owner.index``'s outgoing connection to peer ``dst``: channel, stream, queue.

    Lives on the owner's I/O loop: created there, fed there (:meth:`push`), and written by its
    own task, which hands queued frames to gRPC in order.
    """

    def __init__(self, owner: GrpcTransport, dst: int, address: str, *, wait: bool) -> None:
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
        self._queue.append((frame, size))
        self.queued_bytes += size
        self._wake.set()

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
            await self._handshake(wait)
            self.call = self.stub.Exchange(metadata=o._metadata(self.dst), wait_for_ready=True)
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

    async def _handshake(self, wait: bool) -> None:
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
        )
        stub = self._stub()
        try:
            reply = await stub.Handshake(hello, timeout=o.connect_timeout, wait_for_ready=wait)
        except grpc.RpcError as e:
            code, details = _rpc_error(e)
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
                f"protocol {_version_name(reply.protocol_version)}, this node speaks "
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
            code, details = _rpc_error(e)
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


class PeerServicer(peer_pb2_grpc.PeerServicer):
    """The ``disco.v1.Peer`` service of one node (runs on the node's I/O loop)."""

    def __init__(self, transport: GrpcTransport) -> None:
        self.t = transport

    async def Handshake(  # type: ignore[override]
        self, request: peer_pb2.Hello, context: grpc.aio.ServicerContext
    ) -> peer_pb2.HelloReply:
        problem = self.t._check_peer(
            request.plan_hash,
            request.node,
            request.household_token,
            request.expected_node,
            request.protocol_version,
            request.round,
        ) or self.t._check_identity(context, request.node)
        if problem is not None:
            await context.abort(*problem)
        return peer_pb2.HelloReply(
            plan_hash=self.t.plan_hash,
            node=self.t.index,
            protocol_version=PROTOCOL_VERSION,
            round=self.t.round,
        )

    async def Exchange(  # type: ignore[override]
        self, request_iterator: AsyncIterator[peer_pb2.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[peer_pb2.Frame]:
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        try:
            src = int(md.get(_MD_NODE, ""))
            expected = int(md.get(_MD_EXPECTED, ""))
            version = int(md.get(_MD_PROTOCOL, "0"))  # version 1 sent none
            rnd = int(md.get(_MD_ROUND, "0"))
        except ValueError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "missing or bad node / protocol metadata"
            )
        problem = self.t._check_peer(
            md.get(_MD_PLAN, ""), src, md.get(MD_TOKEN, ""), expected, version, rnd
        ) or self.t._check_identity(context, src)
        if problem is not None:
            await context.abort(*problem)
        self.t._peer_connected(src)
        async for frame in request_iterator:
            reason = self.t._arrived(frame, frame.ByteSize(), src)
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

    async def Health(  # type: ignore[override]
        self, request: peer_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.HealthReply:
        t = self.t
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        problem = t._check_token(md.get(MD_TOKEN, ""))
        if problem is not None:
            await context.abort(*problem)
        return peer_pb2.HealthReply(
            status=peer_pb2.HealthReply.NOT_SERVING if t.closed else peer_pb2.HealthReply.SERVING,
            plan_hash=t.plan_hash,
            node=t.index,
            num_nodes=t.num_nodes,
        )


class GrpcTransport(AsyncTransport):
    """Node ``index``'s gRPC endpoint (server) and its links to the peers (clients).

    ``listen`` is the address to serve on (port 0 picks a free port; see :attr:`address`).
    ``peers`` (or :meth:`set_peers`) lists every node's address, indexed by node.
    ``max_frame_bytes`` bounds a serialized frame both ways (gRPC message limits).
    ``max_queued_bytes`` bounds the frames queued for one peer and not yet taken by gRPC (a
    stalled peer's flow control holds them back): beyond it, ``send`` raises.
    ``services`` add more (``grpc.aio``) servicers to the server; they run on :attr:`loop`.
    ``max_connections``, ``handshake_timeout_s`` and ``idle_timeout_s`` bound the server's
    connections (see the module's docstring).
    ``training_round`` (default 0: none) is the Flower server round the node trains in: the
    handshake refuses a peer of another round (as it refuses another plan or another
    protocol version, :data:`~disco_fl.wire.PROTOCOL_VERSION`).
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
        link_shape: LinkShape | None = None,
        training_round: int = 0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
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
        self.plan_hash = plan_hash
        self.round = int(training_round)  # peers must be in the same round (0: none)
        self.max_frame_bytes = max_frame_bytes
        self.connect_timeout = connect_timeout
        self.max_queued_bytes = max_queued_bytes
        self._token = household_token
        self._channel_credentials = channel_credentials
        self.link_shape = link_shape
        self._clocks = (
            [_LinkClock(link_shape) for _ in range(num_nodes)] if link_shape is not None else []
        )
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
        self._server_options = [
            *opts,
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
        self._links: dict[int, _Link] = {}
        self._closing_links: set[asyncio.Task[None]] = set()
        # after a failed reconnection, sends to that peer fail at once for RETRY_S seconds
        self._unreachable: dict[int, tuple[float, str]] = {}
        self._addresses: list[str] | None = None
        self._io = _IoLoop(f"disco-io-{index}")
        self.loop = self._io.loop
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
        peer_pb2_grpc.add_PeerServicer_to_server(PeerServicer(self), self._server)
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
        await self._server.start()
        return int(port)

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

    async def _ready_link(self, dst: int, wait: bool) -> _Link:
        link = self._link(dst, wait)
        await asyncio.shield(link.ready)
        return link

    def _peer_connected(self, src: int) -> None:
        """A peer opened a stream to us (again): its frames can come."""
        self.mailbox.mark_up(src)

    def _link(self, dst: int, wait: bool = True) -> _Link:
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
            link = _Link(self, dst, self._addresses[dst], wait=wait)
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
            (_MD_PLAN, self.plan_hash),
            (_MD_NODE, str(self.index)),
            (_MD_EXPECTED, str(dst)),
            (MD_TOKEN, self._token),
            (_MD_PROTOCOL, str(PROTOCOL_VERSION)),
            (_MD_ROUND, str(self.round)),
        ]

    def _check_token(self, token: str) -> tuple[grpc.StatusCode, str] | None:
        """The household token, compared in constant time (an empty token means none)."""
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            return grpc.StatusCode.PERMISSION_DENIED, f"node {self.index}: wrong household token"
        return None

    def _check_peer(
        self, plan_hash: str, node: int, token: str, expected: int, version: int, rnd: int
    ) -> tuple[grpc.StatusCode, str] | None:
        me = self.index
        problem = self._check_token(token)
        if problem is not None:
            return problem
        if version != PROTOCOL_VERSION:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {me}: the caller speaks disco peer protocol {_version_name(version)}, "
                f"this node speaks {PROTOCOL_VERSION}: run the same disco_fl version on every "
                f"node",
            )
        if rnd != self.round:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {me}: the caller is in round {rnd}, this node in round {self.round}",
            )
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

    def _arrived(self, frame: peer_pb2.Frame, size: int, src: int) -> str | None:
        """A frame came in on ``src``'s stream (on the loop): check it now; with a link
        shape, store it when the emulated link delivers it."""
        if not self._clocks:
            return self._accept(frame, size, expected_src=src)
        reason = check_incoming(frame, self.index, self.num_nodes, self.num_layers, src)
        if reason is not None:
            return self._accept(frame, size, expected_src=src)  # refused, logged, counted
        at = self._clocks[src].arrival(size, time.monotonic())
        self.loop.call_at(at, self._accept, frame, size, src)  # loop.time() is monotonic
        return None

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
                self._io.call_soon(_set_done, f)

            unwatch = self.mailbox.watch(key, wake)  # before looking: no change is missed
            try:
                frame = self.mailbox.take(key)
                if frame is not None:
                    return frame
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._no_frame(key, timeout)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken, left)
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
            await self._server.stop(grace=timeout)

        try:
            self._io.run(shut(), timeout=2 * timeout + 5)
        except Exception as e:  # closing is best effort
            log.warning("node %d: closing the transport: %s", self.index, e)
        self._io.stop(timeout + 1.0)


def _version_name(v: int) -> str:
    """A peer's protocol version as said in errors (version 1 sent none: it reads 0)."""
    return "1 (or older; it states no version)" if v == 0 else str(v)


def _set_done(f: asyncio.Future[None]) -> None:
    if not f.done():
        f.set_result(None)
