"""The socket data path: a node's frames to one peer over one TCP connection, beside gRPC.

gRPC stays the control channel: the ``Handshake`` checks the caller (household token, protocol
version, plan hash, round, node indices, certificate) as it always does. A caller that asks for
the socket data path (``Hello.data_socket``) gets, in the reply, a one-time *ticket* (32 bytes
from :mod:`secrets`) and the port of the answering node's data listener (:class:`DataServer`).
It then opens one TCP connection there (TLS with the node certificates when the peer service
uses TLS: the household CA pinned on both sides, the caller's certificate checked against the
node it claims to be), sends the ticket, and from then on its frames (:class:`SocketStream`).

On the connection every message is a 4-byte big-endian length followed by a serialized
``disco.v1.Frame``; a length above ``max_frame_bytes`` is refused before the body is read. The
receiving node handles a frame exactly as one from an ``Exchange`` stream (the same checks, the
same mailbox, the same link emulation) and answers a refused one on the same connection, framed
the same way. A connection that closes is a peer gone, like a broken stream.

Why: per hop, Python gRPC costs several hundred microseconds more than a plain socket on the
same loop (``bench/hop_latency.py``), and a plan with a dozen sync points pays it a dozen times.

Bounds: at most ``max_connections`` connections at once; a connection must present a valid
ticket within ``handshake_timeout_s`` (TLS handshake included) or it is closed; tickets expire
after ``handshake_timeout_s`` and are valid once; TCP keepalive drops a vanished peer's
connection as gRPC keepalive does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from typing import Protocol

from google.protobuf.message import DecodeError

from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.transport.frames import TransportError, refusal

log = logging.getLogger(__name__)

TICKET_BYTES = 32
LENGTH = struct.Struct(">I")  # the length prefix of every message on a data connection
MAX_TICKETS = 1024  # tickets issued and not yet used, at most
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 1  # as gRPC keepalive
DATA_PATHS = ("grpc", "socket")


def socket_framed_size(message_bytes: int) -> int:
    """Bytes a serialized frame of ``message_bytes`` occupies on a data connection (TLS and
    TCP/IP not included): the frame and its length prefix."""
    return message_bytes + LENGTH.size


def _keepalive(sock: socket.socket | None) -> None:
    """Probe an idle connection so that a peer that vanished without closing it is noticed."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def _reset(conn: socket.socket) -> None:
    """Close ``conn`` with a TCP reset (the caller sees "connection reset", not a clean end)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _write(out: asyncio.StreamWriter | asyncio.WriteTransport, frame: peer_pb2.Frame) -> None:
    data = frame.SerializeToString()
    out.writelines((LENGTH.pack(len(data)), data))


async def _read(reader: asyncio.StreamReader, max_bytes: int) -> tuple[peer_pb2.Frame, int] | None:
    """The next frame and its serialized size; ``None`` at a clean end of the connection.

    Raises :class:`TransportError` for a length above ``max_bytes`` (before reading the body),
    a connection cut inside a message, or bytes that are not a frame."""
    try:
        head = await reader.readexactly(LENGTH.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise TransportError("connection closed inside a length prefix") from None
    (size,) = LENGTH.unpack(head)
    if size > max_bytes:
        raise TransportError(f"frame of {size} bytes exceeds max_frame_bytes={max_bytes}")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise TransportError(f"connection closed inside a frame of {size} bytes") from None
    frame = peer_pb2.Frame()
    try:
        frame.ParseFromString(body)
    except DecodeError as e:
        raise TransportError(f"bytes that are not a disco.v1.Frame: {e}") from None
    return frame, size


class Tickets:
    """One-time tickets of the socket data path: issued by a checked handshake, each valid once
    and for ``ttl_s`` seconds, bound to the caller's node index."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._open: dict[bytes, tuple[int, float]] = {}  # ticket -> (node, expiry)

    def issue(self, node: int) -> bytes:
        now = time.monotonic()
        self._open = {t: v for t, v in self._open.items() if v[1] > now}
        while len(self._open) >= MAX_TICKETS:  # the oldest go first
            self._open.pop(next(iter(self._open)))
        ticket = secrets.token_bytes(TICKET_BYTES)
        self._open[ticket] = (node, now + self.ttl_s)
        return ticket

    def redeem(self, ticket: bytes) -> int | None:
        """The node a valid ticket was issued to (the ticket is used up), else ``None``."""
        match = next((t for t in self._open if hmac.compare_digest(t, ticket)), None)
        if match is None:
            return None
        node, expiry = self._open.pop(match)
        return node if expiry > time.monotonic() else None


class DataHost(Protocol):
    """What the data server needs of its transport (a
    :class:`~disco_fl.runtime.transport.grpc_transport.GrpcTransport`)."""

    index: int

    def _peer_connected(self, src: int) -> None: ...

    def _arrived(self, frame: peer_pb2.Frame, size: int, src: int) -> str | None: ...


class _Incoming(asyncio.Protocol):
    """One accepted data connection, read in the loop's callbacks: its ticket, then each frame
    handed to the node as soon as its last byte is here (no task to wake per frame)."""

    def __init__(self, server: DataServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.closed: asyncio.Future[None] = loop.create_future()
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._src: int | None = None  # the ticket holder, once admitted
        self._buf = bytearray()
        self._no_ticket: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        _keepalive(transport.get_extra_info("socket"))
        self._no_ticket = self._loop.call_later(self.server.handshake_timeout_s, self._timed_out)

    def _timed_out(self) -> None:
        log.warning("node %d: a data connection sent no ticket", self.server.host.index)
        self._end()

    def _end(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._no_ticket is not None:
            self._no_ticket.cancel()
        if not self.closed.done():
            self.closed.set_result(None)

    # a caller that does not read its refusals: stop reading its frames until it does
    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._buf += data
        try:
            if self._src is None:
                if len(self._buf) < TICKET_BYTES:
                    return
                if self._no_ticket is not None:
                    self._no_ticket.cancel()
                ticket = bytes(self._buf[:TICKET_BYTES])
                del self._buf[:TICKET_BYTES]
                self._src = self.server._admit(self._transport, ticket)
                if self._src is None:
                    self._end()
                    return
            self._frames(self._src)
        except Exception as e:  # a bug must not leave the connection half-read
            log.warning("node %d: data connection ended: %s", self.server.host.index, e)
            self._end()

    def _frames(self, src: int) -> None:
        """Hand over every complete frame in the buffer; refuse and end on a bad one."""
        assert self._transport is not None
        me, host, buf = self.server.host.index, self.server.host, self._buf
        used = 0
        try:
            while len(buf) - used >= LENGTH.size:
                (size,) = LENGTH.unpack_from(buf, used)
                if size > self.server.max_frame_bytes:
                    raise TransportError(
                        f"frame of {size} bytes exceeds max_frame_bytes="
                        f"{self.server.max_frame_bytes}"
                    )
                end = used + LENGTH.size + size
                if len(buf) < end:
                    break
                frame = peer_pb2.Frame()
                with memoryview(buf) as view, view[used + LENGTH.size : end] as body:
                    try:
                        frame.ParseFromString(body)
                    except DecodeError as e:
                        raise TransportError(f"bytes that are not a disco.v1.Frame: {e}") from None
                used = end
                reason = host._arrived(frame, size, src)
                if reason is not None:
                    _write(self._transport, refusal(frame, me, src, reason))
        except TransportError as e:
            log.warning("node %d: data connection from node %d: %s", me, src, e)
            _write(self._transport, refusal(peer_pb2.Frame(), me, src, str(e)))
            used = len(buf)
            self._end()
        finally:
            del buf[:used]


class DataServer:
    """A node's data listener (on its I/O loop): connections that present a ticket, then frames.

    ``ssl_context``: a server context requiring a client certificate signed by the household CA
    (:func:`~disco_fl.security.tls.data_ssl_contexts`), or ``None`` for plaintext.
    """

    def __init__(
        self,
        host: DataHost,
        tickets: Tickets,
        *,
        ssl_context: ssl.SSLContext | None,
        max_frame_bytes: int,
        max_connections: int,
        handshake_timeout_s: float,
    ) -> None:
        self.host = host
        self.tickets = tickets
        self.ssl_context = ssl_context
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()  # every accepted socket, until it is closed
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.Transport] = set()
        self._stopped = False
        self.port = 0

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on ``host`` at ``port`` (0: a free one); return the port.

        Connections are accepted here, not by :func:`asyncio.start_server`: each accepted socket
        is ours from the moment ``accept`` returns it, so :meth:`stop` can end every one of them
        (an asyncio server drops a connection accepted just before it closes, leaving the peer
        waiting on a socket nobody reads)."""
        if not 0 <= port < 65536:
            raise ValueError(f"data port must be in [0, 65535], got {port}")
        loop = asyncio.get_running_loop()
        family, kind, proto, _, addr = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(addr)
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        loop.add_reader(listener.fileno(), self._accept)
        return self.port

    def _accept(self) -> None:
        """The listener is readable: take the waiting connections (on the loop)."""
        if self._listener is None:
            return
        for _ in range(64):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors: the node goes on
                log.warning("node %d: accepting a data connection: %s", self.host.index, e)
                return
            if self._stopped or len(self._conns) >= self.max_connections:
                _reset(conn)  # over the cap (or stopping): the caller sees a reset
                continue
            conn.setblocking(False)
            self._conns.add(conn)
            task = asyncio.get_running_loop().create_task(self._connection(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connection(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        incoming = _Incoming(self, loop)
        transport: asyncio.Transport | None = None
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: incoming,
                conn,
                ssl=self.ssl_context,
                ssl_handshake_timeout=self.handshake_timeout_s if self.ssl_context else None,
            )
            self._transports.add(transport)
            await incoming.closed
        except asyncio.CancelledError:
            pass
        except Exception as e:  # a bad connection ends (e.g. its TLS handshake); the node goes on
            log.warning("node %d: data connection ended: %s", self.host.index, e)
        finally:
            if transport is not None:
                self._transports.discard(transport)
                transport.close()
            conn.close()  # a no-op when its transport closed it
            self._conns.discard(conn)

    def _admit(self, transport: asyncio.BaseTransport, ticket: bytes) -> int | None:
        """The node a data connection's ticket was issued to, if the ticket is valid and (with
        TLS) the caller's certificate is that node's, as on the gRPC side; else ``None``."""
        me = self.host.index
        src = self.tickets.redeem(ticket)
        if src is None:
            log.warning("node %d: a data connection presented an unknown or used ticket", me)
            return None
        if self.ssl_context is not None:
            from disco_fl.security.tls import node_common_name

            cert = transport.get_extra_info("peercert") or {}
            names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
            if names != [node_common_name(src)]:
                log.warning(
                    "node %d: data connection refused: the caller's certificate (%s) is not "
                    "node %d's",
                    me,
                    ", ".join(names) or "none",
                    src,
                )
                return None
        self.host._peer_connected(src)
        return src

    async def stop(self, timeout: float) -> None:
        """Stop listening and end every connection now: each peer sees its connection end at
        once, whatever state its handler is in."""
        self._stopped = True
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # the peer reads the end now
        for transport in list(self._transports):
            transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        for conn in list(self._conns):  # a handler cancelled before it started
            conn.close()
        self._conns.clear()


class SocketStream:
    """A node's data connection to one peer (client side), used like a gRPC ``Exchange`` call:
    :meth:`write` a frame, iterate the replies (refused frames), :meth:`done_writing`,
    :meth:`cancel`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame_bytes: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max = max_frame_bytes

    @classmethod
    async def open(
        cls,
        address: str,
        port: int,
        ticket: bytes,
        *,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
        max_frame_bytes: int,
    ) -> SocketStream:
        """Connect to a peer's data listener (its host from ``address``, ``host:port`` of its
        peer service) and present the ticket."""
        host = address.rpartition(":")[0].strip("[]") or address
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                ssl=ssl_context,
                server_hostname=host if ssl_context is not None else None,
                limit=1 << 20,
            ),
            timeout,
        )
        _keepalive(writer.get_extra_info("socket"))
        writer.write(ticket)
        await writer.drain()
        return cls(reader, writer, max_frame_bytes)

    async def write(self, frame: peer_pb2.Frame) -> None:
        if self._writer.is_closing():
            raise TransportError("data connection closed")
        _write(self._writer, frame)
        await self._writer.drain()  # waits only while the peer is slower than we write

    def write_now(self, frame: peer_pb2.Frame) -> bool:
        """Write ``frame`` without waiting, if the connection's send buffer has room (below
        its high-water mark); ``False`` (nothing written) if not, or if it is closing."""
        transport = self._writer.transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() >= transport.get_write_buffer_limits()[1]:
            return False
        _write(self._writer, frame)
        return True

    async def done_writing(self) -> None:
        """Flush what was written and close the connection (the replies end with it)."""
        with contextlib.suppress(Exception):
            await self._writer.drain()
        self._writer.close()

    def __aiter__(self) -> AsyncIterator[peer_pb2.Frame]:
        return self._replies()

    async def _replies(self) -> AsyncIterator[peer_pb2.Frame]:
        while True:
            got = await _read(self._reader, self._max)
            if got is None:
                return
            yield got[0]

    def cancel(self) -> None:
        self._writer.close()
