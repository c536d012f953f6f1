"""The socket data path (frames over a TCP connection beside gRPC): what only it has.

The runtime checks run on both data paths elsewhere: runtime == emulation, bytes == plan,
overlap, a peer that dies, link emulation (``tests/test_runtime_local.py``'s ``grpc_household``)
and a killed, restarted or stalled serving node and garbage input (``tests/test_serve.py``'s
``failing``). Here, with real transports on 127.0.0.1 and raw sockets playing the caller:
(a) tickets: needed, valid once, issued only by a checked handshake; (b) bounds: a silent
connection is closed after the handshake timeout, connections are capped, a length above
``max_frame_bytes`` is refused before its body is read, bytes that are not a frame end the
connection, a frame claiming another source is refused; (c) mixed data paths are refused at
the handshake; (d) mutual TLS: a household delivers frames, a caller without a certificate or
with another node's certificate is refused.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from disco_fl.cli.demo import free_ports
from disco_fl.core.wire import PROTOCOL_VERSION, decode_tensor, encode_tensor
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.transport.frames import TransportError
from disco_fl.runtime.transport.grpc_transport import GrpcTransport, HandshakeError
from disco_fl.runtime.transport.socket_path import TICKET_BYTES, socket_framed_size
from disco_fl.security import (
    TLSFiles,
    channel_credentials,
    data_ssl_contexts,
    make_household_certs,
    server_credentials,
)

FWD = peer_pb2.Frame.FORWARD
LENGTH = struct.Struct(">I")
PLAN = "p" * 64
WAIT_S = 5.0  # bound on every raw socket read


@pytest.fixture
def household() -> Iterator[Callable[..., list[GrpcTransport]]]:
    """Factory of N transports (data path "socket" unless given) dialling each other
    (``per_node``: more keyword arguments for each node)."""
    made: list[GrpcTransport] = []

    def make(
        n: int, per_node: list[dict[str, Any]] | None = None, **kw: Any
    ) -> list[GrpcTransport]:
        kw.setdefault("data_path", "socket")
        kw.setdefault("household_token", "tok")
        ts = []
        for k in range(n):
            more = per_node[k] if per_node else {}
            ts.append(GrpcTransport(k, n, plan_hash=PLAN, num_layers=4, **kw, **more))
            made.append(ts[-1])
        for t in ts:
            t.set_peers([u.address for u in ts])
        return ts

    yield make
    closers = [threading.Thread(target=t.close, args=(1.0,), daemon=True) for t in made]
    for c in closers:
        c.start()
    for c in closers:
        c.join(10.0)
    assert all(t.closed for t in made)


def _frame(src: int, dst: int, layer: int = 1, session: str = "s") -> peer_pb2.Frame:
    f = peer_pb2.Frame(session_id=session, layer=layer, src=src, dst=dst, direction=FWD)
    encode_tensor(torch.arange(6.0).reshape(2, 3), "fp32", out=f.tensor)
    return f


def _ticket(t: GrpcTransport, node: int, n: int, token: str = "tok") -> tuple[bytes, int]:
    """A ticket from ``t``'s handshake, asked for as node ``node`` (plaintext)."""
    hello = peer_pb2.Hello(
        plan_hash=PLAN,
        node=node,
        household_token=token,
        expected_node=t.index,
        protocol_version=PROTOCOL_VERSION,
        data_socket=True,
    )
    with grpc.insecure_channel(t.address) as ch:
        reply = peer_pb2_grpc.PeerStub(ch).Handshake(hello, timeout=WAIT_S)
    assert len(reply.data_ticket) == TICKET_BYTES and reply.data_port == t.data_port
    return reply.data_ticket, reply.data_port


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    s.settimeout(WAIT_S)
    return s


def _send(s: socket.socket, frame: peer_pb2.Frame) -> None:
    data = frame.SerializeToString()
    s.sendall(LENGTH.pack(len(data)) + data)


def _read_reply(s: socket.socket) -> peer_pb2.Frame | None:
    """The next reply frame on a raw data connection; ``None`` when the node closed it."""
    head = _read_exactly(s, LENGTH.size)
    if head is None:
        return None
    body = _read_exactly(s, LENGTH.unpack(head)[0])
    assert body is not None, "connection closed inside a reply"
    return peer_pb2.Frame.FromString(body)


def _read_exactly(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _closed_by_peer(s: socket.socket) -> bool:
    """Whether the node closed the connection (EOF or reset) within ``WAIT_S``."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


# ---- (a) tickets ---------------------------------------------------------------------------


def test_a_ticket_opens_one_connection_once(
    household: Callable[..., list[GrpcTransport]],
) -> None:
    ts = household(2)
    ticket, port = _ticket(ts[1], 0, 2)
    with _connect(port) as s:
        s.sendall(ticket)
        _send(s, _frame(0, 1))
        got = ts[1].recv("s", 1, 0, WAIT_S)
        assert torch.equal(
            decode_tensor(got.tensor, max_bytes=1 << 10), torch.arange(6.0).reshape(2, 3)
        )
    for bad in (ticket, bytes(TICKET_BYTES), ticket[:-1] + bytes([ticket[-1] ^ 1])):
        with _connect(port) as s:  # used, all zeros, one bit off: closed, nothing stored
            s.sendall(bad)
            _send(s, _frame(0, 1, session="replay"))
            assert _closed_by_peer(s)
    with pytest.raises(TimeoutError):
        ts[1].recv("replay", 1, 0, 0.3)
    assert ts[1].mailbox.pending == 0


def test_tickets_come_only_from_a_checked_handshake(
    household: Callable[..., list[GrpcTransport]],
) -> None:
    ts = household(2)
    with pytest.raises(grpc.RpcError) as info:
        _ticket(ts[1], 0, 2, token="wrong")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ---- (b) bounds ----------------------------------------------------------------------------


def test_a_silent_connection_is_closed_after_the_handshake_timeout(
    household: Callable[..., list[GrpcTransport]],
) -> None:
    ts = household(2, handshake_timeout_s=0.5)
    assert ts[1].data_port is not None
    t0 = time.monotonic()
    with _connect(ts[1].data_port) as s:
        assert _closed_by_peer(s)
    assert 0.4 <= time.monotonic() - t0 < 4.0


def test_the_data_listener_listens_on_the_port_given(
    household: Callable[..., list[GrpcTransport]],
) -> None:
    ports = free_ports(2)
    ts = household(2, per_node=[{"data_listen_port": p} for p in ports])
    assert [t.data_port for t in ts] == ports
    ts[0].send(_frame(0, 1))  # node 1's handshake hands out that port; the frame comes over it
    assert ts[1].recv("s", 1, 0, WAIT_S).src == 0
    with pytest.raises(TransportError, match="cannot listen for data connections"):
        household(1, per_node=[{"data_listen_port": ports[1]}])  # taken: a clear error


def test_connections_are_capped(household: Callable[..., list[GrpcTransport]]) -> None:
    ts = household(2, max_connections=2)
    port = ts[1].data_port
    assert port is not None
    held = [_connect(port), _connect(port)]
    try:
        time.sleep(0.2)  # both accepted and waiting for their tickets
        t0 = time.monotonic()
        try:
            third = _connect(port)
        except ConnectionResetError:  # reset before this thread's connect() returned (CI load)
            pass
        else:
            with third:
                assert _closed_by_peer(third)
        assert time.monotonic() - t0 < 2.0  # at once, not after the handshake timeout
    finally:
        for s in held:
            s.close()


def test_a_connection_accepted_as_the_node_stops_ends_at_once(
    household: Callable[..., list[GrpcTransport]],
) -> None:
    # the window of the old asyncio server: accepted, its handler not started yet, node stops
    ts = household(2)
    server = ts[1]._data_server
    assert server is not None and ts[1].data_port is not None
    with _connect(ts[1].data_port) as s:

        async def accept_then_stop() -> int:
            server._accept()  # take it now (unless the loop took it already) ...
            taken = len(server._conns)
            await server.stop(1.0)  # ... and stop before its handler runs
            return taken

        assert ts[1].run(accept_then_stop()) == 1
        t0 = time.monotonic()
        assert _closed_by_peer(s)
        assert time.monotonic() - t0 < 1.0
    assert not server._conns


def test_an_oversized_frame_is_refused_before_its_body(
    household: Callable[..., list[GrpcTransport]],
) -> None:
    ts = household(2, max_frame_bytes=1 << 16)
    ticket, port = _ticket(ts[1], 0, 2)
    with _connect(port) as s:
        s.sendall(ticket + LENGTH.pack((1 << 16) + 1))  # a length, and no body at all
        reply = _read_reply(s)
        assert reply is not None and "exceeds max_frame_bytes=65536" in reply.error
        assert _closed_by_peer(s)
    assert ts[1].mailbox.pending == 0


def test_bytes_that_are_not_a_frame_end_the_connection(
    household: Callable[..., list[GrpcTransport]],
) -> None:
    ts = household(2)
    ticket, port = _ticket(ts[1], 0, 2)
    with _connect(port) as s:
        s.sendall(ticket + LENGTH.pack(5) + b"\xff" * 5)
        reply = _read_reply(s)
        assert reply is not None and "not a disco.v1.Frame" in reply.error
        assert _closed_by_peer(s)
    ts[0].send(_frame(0, 1, session="after"))  # the node itself goes on
    ts[1].recv("after", 1, 0, WAIT_S)


def test_frames_are_checked_as_on_a_stream(
    household: Callable[..., list[GrpcTransport]],
) -> None:
    ts = household(3)
    ticket, port = _ticket(ts[1], 0, 3)
    with _connect(port) as s:
        s.sendall(ticket)
        _send(s, _frame(2, 1, session="spoof"))  # node 0's connection, claiming node 2
        reply = _read_reply(s)
        assert reply is not None and "claims source 2 on the stream of node 0" in reply.error
        _send(s, _frame(0, 1, layer=9, session="late"))  # a layer outside the program
        reply = _read_reply(s)
        assert reply is not None and "layer 9 out of range" in reply.error
        _send(s, _frame(0, 1, session="good"))  # the connection still serves
        ts[1].recv("good", 1, 0, WAIT_S)
    assert ts[1].mailbox.pending == 0


def test_a_peer_refusal_reaches_the_sender_and_bytes_are_counted(
    household: Callable[..., list[GrpcTransport]],
) -> None:
    ts = household(2)
    frame = _frame(0, 1, layer=3)
    ts[0].send(frame)
    ts[0].send(frame)  # a duplicate of a pending frame: refused by node 1, the refusal comes back
    deadline = time.monotonic() + WAIT_S
    while not ts[0].errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any("duplicate" in e for e in ts[0].errors), list(ts[0].errors)
    ts[1].recv("s", 3, 0, WAIT_S)
    assert ts[0].wire_bytes_sent == 2 * frame.ByteSize()
    assert ts[1].wire_bytes_received == frame.ByteSize()  # the refused one is not counted
    assert ts[0].framed_bytes_sent == 2 * socket_framed_size(frame.ByteSize())
    assert socket_framed_size(frame.ByteSize()) == frame.ByteSize() + 4


# ---- (c) one data path per household -------------------------------------------------------


def test_a_socket_caller_is_refused_by_a_grpc_node(
    household: Callable[..., list[GrpcTransport]],
) -> None:
    sock = household(2)
    grpc_only = household(2, data_path="grpc")
    sock[0].set_peers([sock[0].address, grpc_only[1].address])
    with pytest.raises(HandshakeError, match="gRPC only.*same data path"):
        sock[0].connect()
    assert grpc_only[1].data_port is None


def test_an_unreachable_data_port_fails_the_handshake_saying_what_to_do(
    household: Callable[..., list[GrpcTransport]],
) -> None:
    """The peer's handshake passes but nothing listens on the data port it gave (a firewall):
    the caller fails at once with the port and what fixes it, not at its first frame."""
    ts = household(2, connect_timeout=2.0)
    server = ts[1]._data_server
    assert server is not None
    ts[1].run(server.stop(1.0))  # its gRPC port still answers; its data port no longer
    t0 = time.monotonic()
    with pytest.raises(HandshakeError, match=f"port {ts[1].data_port}.*--data-port"):
        ts[0].connect()
    assert time.monotonic() - t0 < 10.0


def test_bad_data_path_options_are_refused() -> None:
    with pytest.raises(ValueError, match="data_path must be one of"):
        GrpcTransport(0, 2, plan_hash=PLAN, data_path="udp")


# ---- (d) mutual TLS ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("household")
    make_household_certs(d, 3)
    return d


def _tls(certs: Path, k: int) -> dict[str, Any]:
    files = TLSFiles.from_dir(certs, k)
    return {
        "server_credentials": server_credentials(files),
        "channel_credentials": channel_credentials(files),
        "data_ssl": data_ssl_contexts(files),
    }


def _tls_household(certs: Path, n: int, made: list[GrpcTransport]) -> list[GrpcTransport]:
    ts = [
        GrpcTransport(
            k, n, plan_hash=PLAN, num_layers=4, household_token="tok", data_path="socket",
            **_tls(certs, k),
        )
        for k in range(n)
    ]  # fmt: skip
    made.extend(ts)
    for t in ts:
        t.set_peers([u.address for u in ts])
    return ts


@pytest.fixture
def tls_made() -> Iterator[list[GrpcTransport]]:
    made: list[GrpcTransport] = []
    yield made
    for t in made:
        t.close(1.0)


def test_tls_household_delivers_frames(certs: Path, tls_made: list[GrpcTransport]) -> None:
    ts = _tls_household(certs, 2, tls_made)
    for src, dst in ((0, 1), (1, 0)):
        ts[src].send(_frame(src, dst))
        ts[dst].recv("s", 1, src, WAIT_S)
    assert not ts[0].errors and not ts[1].errors


def test_tls_needs_the_data_contexts(certs: Path) -> None:
    opts = _tls(certs, 0)
    del opts["data_ssl"]
    with pytest.raises(ValueError, match="data_ssl"):
        GrpcTransport(0, 2, plan_hash=PLAN, data_path="socket", **opts)


def _raw_tls(port: int, certs: Path, node: int | None) -> ssl.SSLSocket:
    """A TLS connection to a data listener, presenting node ``node``'s certificate (or none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(certs / "ca.pem"))
    if node is not None:
        ctx.load_cert_chain(str(certs / f"node{node}.pem"), str(certs / f"node{node}.key"))
    s = ctx.wrap_socket(_connect(port), server_hostname="127.0.0.1")
    s.settimeout(WAIT_S)
    return s


def _tls_ticket(t: GrpcTransport, certs: Path, node: int) -> bytes:
    """A ticket from ``t``'s handshake over mutual TLS, as node ``node``."""
    hello = peer_pb2.Hello(
        plan_hash=PLAN,
        node=node,
        household_token="tok",
        expected_node=t.index,
        protocol_version=PROTOCOL_VERSION,
        data_socket=True,
    )
    creds = channel_credentials(TLSFiles.from_dir(certs, node))
    with grpc.secure_channel(t.address, creds) as ch:
        reply = peer_pb2_grpc.PeerStub(ch).Handshake(hello, timeout=WAIT_S)
    return bytes(reply.data_ticket)


def test_tls_refuses_a_caller_without_the_ticket_holders_certificate(
    certs: Path, tls_made: list[GrpcTransport]
) -> None:
    ts = _tls_household(certs, 3, tls_made)
    port = ts[1].data_port
    assert port is not None
    server, client = data_ssl_contexts(TLSFiles.from_dir(certs, 1))
    assert server.verify_mode == ssl.CERT_REQUIRED  # a client certificate, of the household CA
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    # no client certificate, with a valid ticket: refused, nothing stored
    try:
        with _raw_tls(port, certs, None) as s:
            s.sendall(_tls_ticket(ts[1], certs, 0))
            _send(s, _frame(0, 1, session="anonymous"))
            refused = _closed_by_peer(s)
    except (ssl.SSLError, OSError):  # TLS 1.3: the server's alert comes at the first read
        refused = True
    assert refused
    # node 0's ticket on node 2's certificate: closed, nothing stored
    ticket = _tls_ticket(ts[1], certs, 0)
    with _raw_tls(port, certs, 2) as s:
        s.sendall(ticket)
        _send(s, _frame(0, 1, session="stolen"))
        assert _closed_by_peer(s)
    # the same kind of ticket on node 0's own certificate works
    with _raw_tls(port, certs, 0) as s:
        s.sendall(_tls_ticket(ts[1], certs, 0))
        _send(s, _frame(0, 1, session="own"))
        ts[1].recv("own", 1, 0, WAIT_S)
    for session in ("stolen", "anonymous"):
        with pytest.raises(TimeoutError):
            ts[1].recv(session, 1, 0, 0.3)


def test_a_data_port_is_the_socket_paths_and_moves_up_with_a_ladder() -> None:
    from dataclasses import replace

    from disco_fl.runtime.serving.ladder_server import ladder_configs
    from disco_fl.runtime.serving.serve_config import ServeConfig

    peers = ["127.0.0.1:7000", "127.0.0.1:7100"]
    base = ServeConfig(
        plan=Path("p0"), node=0, listen=peers[0], peers=peers, data_path="socket", data_port=7200
    )
    plans = [Path("p0"), Path("p1")]
    assert [c.data_port for c in ladder_configs(base, plans)] == [7200, 7201]  # as gRPC's + i
    assert [c.data_port for c in ladder_configs(replace(base, data_port=0), plans)] == [0, 0]
    with pytest.raises(ValueError, match="socket data path"):
        ServeConfig(plan=Path("p"), node=0, data_path="grpc", data_port=7200)  # no data port
    assert ServeConfig(plan=Path("p"), node=0).data_path == "socket"  # the default
    with pytest.raises(ValueError, match="data_port must be in"):
        ServeConfig(plan=Path("p"), node=0, data_path="socket", data_port=70000)
