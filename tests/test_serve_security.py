"""Hardening of a serving node (issue 13, item 8), with real gRPC servers on 127.0.0.1.

(a) ``Peer.Health`` answers only callers with the household token (and, with TLS on, a
household certificate); (b) in a 3-process household where node 2 stalls, the caller's error
names node 2 (reported by node 1, which was waiting for it), not node 1; (c) idle connections
(no TLS/HTTP/2 handshake, or a handshake and nothing after it) are capped and closed within the
configured bounds, and the node keeps serving; (d) ``disco-fl serve`` refuses plaintext on a
non-loopback address unless ``--insecure`` is given (no traffic is ever sent to a non-loopback
address: 0.0.0.0 is only bound, and dialled through 127.0.0.1).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

import disco_fl
from disco_fl.cli.demo import free_ports
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.serving import InferenceError, InferenceSession
from disco_fl.runtime.transport.grpc_transport import GrpcTransport
from disco_fl.security import (
    TLSFiles,
    channel_credentials,
    is_loopback_address,
    make_household_certs,
    server_credentials,
)
from tests.test_serve import MEAN, STD, Household
from tests.zoo import ZOO

OK_S = 10.0  # bound on a call that must succeed (a loaded machine)
DEADLINE_S = 2.0  # the serving deadline of the stall test
TOKEN = "tok"
# an HTTP/2 client preface and an empty SETTINGS frame: the handshake, then nothing
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


@pytest.fixture
def transports() -> Iterator[Callable[..., list[GrpcTransport]]]:
    """Factory of two gRPC transports (nodes 0 and 1 of plan "h", token "tok")."""
    made: list[GrpcTransport] = []

    def make(creds: list[tuple[object, object]] | None = None, **kw: object) -> list[GrpcTransport]:
        ts = []
        for k in range(2):
            srv, chan = creds[k] if creds else (None, None)
            t = GrpcTransport(
                k,
                2,
                plan_hash="h",
                num_layers=3,
                household_token=TOKEN,
                connect_timeout=OK_S,
                server_credentials=srv,  # type: ignore[arg-type]
                channel_credentials=chan,  # type: ignore[arg-type]
                **kw,  # type: ignore[arg-type]
            )
            made.append(t)
            ts.append(t)
        for t in ts:
            t.set_peers([u.address for u in ts])
        return ts

    yield make
    closers = [threading.Thread(target=t.close, args=(1.0,), daemon=True) for t in made]
    for c in closers:
        c.start()
    for c in closers:
        c.join(5.0)


def _health(
    address: str,
    token: str | None,
    chan: grpc.ChannelCredentials | None = None,
    timeout: float = OK_S,
) -> tuple[grpc.StatusCode, peer_pb2.HealthReply | None]:
    """One Health call on a fresh channel: its status and reply."""
    md = None if token is None else [("disco-token", token)]
    ch = grpc.secure_channel(address, chan) if chan else grpc.insecure_channel(address)
    with ch:
        try:
            reply = peer_pb2_grpc.PeerStub(ch).Health(
                peer_pb2.HealthRequest(), metadata=md, timeout=timeout
            )
        except grpc.RpcError as e:
            return e.code(), None  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, reply


# ---- (a) Health behind the token ------------------------------------------------------------


def test_health_requires_the_household_token(
    transports: Callable[..., list[GrpcTransport]],
) -> None:
    ts = transports()
    for token in (None, "", "guess", TOKEN + "x"):
        code, reply = _health(ts[1].address, token)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (token, code)
        assert reply is None  # nothing about the plan leaks
    code, reply = _health(ts[1].address, TOKEN)
    assert code == grpc.StatusCode.OK and reply is not None
    assert reply.node == 1 and reply.plan_hash == "h" and reply.status == reply.SERVING
    assert ts[0].health(1, timeout=OK_S).node == 1  # the transport's own probe sends it


def test_health_with_mtls_needs_certificate_and_token(
    transports: Callable[..., list[GrpcTransport]], tmp_path: Path
) -> None:
    make_household_certs(tmp_path, 2)
    creds = []
    for k in range(2):
        tls = TLSFiles.from_dir(tmp_path, k)
        creds.append((server_credentials(tls), channel_credentials(tls)))
    ts = transports(creds)
    client = channel_credentials(TLSFiles.from_dir(tmp_path, "client"))
    assert _health(ts[1].address, None, client)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert _health(ts[1].address, "guess", client)[0] == grpc.StatusCode.PERMISSION_DENIED
    code, reply = _health(ts[1].address, TOKEN, client)
    assert code == grpc.StatusCode.OK and reply is not None and reply.node == 1
    # the right token without a household certificate: refused in the TLS handshake
    ca_only = grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes())
    assert _health(ts[1].address, TOKEN, ca_only, 1.0)[0] == grpc.StatusCode.UNAVAILABLE
    assert ts[0].health(1, timeout=OK_S).node == 1


# ---- (b) the error names the node that stalled ---------------------------------------------


def _export_without_2_to_0(out: Path) -> torch.Tensor:
    """A 3-node plan where node 2 sends node 0 nothing but its output slice: node 0 waits for
    node 1, and node 1 for node 2, at every exchange (so a stalled node 2 holds node 1 up, and
    node 0 sees only node 1's silence)."""
    build, shape = ZOO["resnet_narrow"]
    torch.manual_seed(3)
    model = build().eval()
    x = torch.randn(*shape)
    pm = disco_fl.partition(model, 3, x).eval()
    for _, src, dst, gates in pm.gate_items():
        closed = (src, dst) == (2, 0)
        gates.set_mask(
            dst, torch.zeros(gates.num_channels) if closed else torch.ones(gates.num_channels)
        )
    pm.export(out, codec="fp32", meta={"input": {"mean": [MEAN], "std": [STD]}})
    return x


def test_stall_is_named_by_the_node_that_observed_it(tmp_path: Path) -> None:
    x = _export_without_2_to_0(tmp_path / "plan")
    work = tmp_path / "hh"
    work.mkdir()
    hh = Household(tmp_path / "plan", 3, work, ["--deadline", str(DEADLINE_S)])
    try:
        with InferenceSession(hh.addrs[0], timeout=30) as s:
            s.infer(x)  # the household works
            p = hh.procs[2]
            assert p is not None
            p.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(InferenceError) as info:
                    s.infer(x)
                took = time.monotonic() - t0
            finally:
                p.send_signal(signal.SIGCONT)
        msg = info.value.message
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, msg
        assert "node 2 stalled" in msg, msg
        assert "node 1 stalled" not in msg, msg
        assert took <= DEADLINE_S + 1.5, (took, msg)
        # the household answers again once node 2 runs
        deadline = time.monotonic() + 20
        while True:
            try:
                with InferenceSession(hh.addrs[0], timeout=10) as s:
                    s.infer(x)
                break
            except InferenceError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        hh.stop()


# ---- (c) idle connections are capped and closed --------------------------------------------


def _server_sockets(port: int) -> int:
    """Sockets of this process whose local port is ``port`` (the server's accepted ones)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            local_port = int(f[1].rsplit(":", 1)[1], 16)
            state = f[3]
            if local_port == port and state != "0A" and f[9] in inodes:  # 0A: the listener
                n += 1
    return n


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        while True:
            if s.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _wait_closed(socks: list[socket.socket], within: float) -> float:
    t0 = time.monotonic()
    while not all(_closed_by_peer(s) for s in socks):
        assert time.monotonic() - t0 < within, (
            f"{sum(not _closed_by_peer(s) for s in socks)} of {len(socks)} idle connections "
            f"still open after {within} s"
        )
        time.sleep(0.05)
    return time.monotonic() - t0


def test_idle_connections_are_capped_and_closed(
    transports: Callable[..., list[GrpcTransport]],
) -> None:
    cap, handshake_s, idle_s = 6, 1.0, 1.5
    ts = transports(max_connections=cap, handshake_timeout_s=handshake_s, idle_timeout_s=idle_s)
    ts[0].connect()  # node 0's link to node 1 holds one of node 1's connections
    port = ts[1].port
    base = _server_sockets(port)
    assert base >= 1
    socks = []
    try:
        for _ in range(40):  # connect and say nothing
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setblocking(False)
            socks.append(s)
        time.sleep(0.3)
        # beyond the cap, connections are closed at once: node 1 never holds more than `cap`
        assert _server_sockets(port) <= cap, _server_sockets(port)
        assert sum(_closed_by_peer(s) for s in socks) >= 40 - cap
        # the rest are closed once the handshake timeout passes
        _wait_closed(socks, handshake_s + 3.0)
        assert _server_sockets(port) == base
        for s in socks:
            s.close()
        socks = []
        # connections that complete the HTTP/2 handshake and then idle: closed after idle_s
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(H2_PREFACE)
            s.setblocking(False)
            socks.append(s)
        t0 = time.monotonic()
        _wait_closed(socks, idle_s + 3.0)
        assert time.monotonic() - t0 >= idle_s - 0.5  # idle, not refused
        assert _server_sockets(port) == base
    finally:
        for s in socks:
            s.close()
    # the node kept serving throughout: its peer stream delivers, Health answers
    f = peer_pb2.Frame(session_id="s", layer=1, src=0, dst=1, direction=peer_pb2.Frame.FORWARD)
    f.tensor.dtype = peer_pb2.Tensor.DTYPE_FLOAT32
    f.tensor.codec = peer_pb2.Tensor.CODEC_FP32
    f.tensor.shape.extend([1, 1])
    f.tensor.data = b"\0" * 4
    ts[0].send(f)
    assert ts[1].recv("s", 1, 0, OK_S).layer == 1
    assert _health(ts[1].address, TOKEN)[0] == grpc.StatusCode.OK
    assert not ts[0].errors, list(ts[0].errors)


# ---- (d) plaintext only on loopback unless --insecure --------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:7000", True),
        ("127.3.2.1:7000", True),
        ("localhost:7000", True),
        ("LOCALHOST:1", True),
        ("[::1]:7000", True),
        ("ipv4:127.0.0.1:7000", True),
        ("unix:/tmp/disco.sock", True),
        ("0.0.0.0:7000", False),
        ("[::]:7000", False),
        (":7000", False),
        ("192.168.1.10:7000", False),
        ("[fe80::1]:7000", False),
        ("node1.local:7000", False),
        ("127.0.0.1.example.com:7000", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback_address(address) is loopback


def _serve_cmd(plan: Path, node: int, peers: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "disco_fl.cli.main",
        "serve",
        str(plan),
        "--node",
        str(node),
        "--peers",
        peers,
        "--threads",
        "1",
        *extra,
    ]


def test_plaintext_check_covers_listen_and_peers() -> None:
    from disco_fl.runtime.serving.node_options import plaintext_check

    loop = ["127.0.0.1:1", "localhost:2", "[::1]:3"]
    lan = ["192.0.2.10:1", "127.0.0.1:2", "192.0.2.12:3"]

    def args(insecure: bool = False, tls_dir: str | None = None) -> argparse.Namespace:
        return argparse.Namespace(insecure=insecure, tls_dir=tls_dir)

    assert plaintext_check(args(), loop[1], loop) == []
    with pytest.raises(ValueError, match=r"0\.0\.0\.0:7.*disco-fl certs.*--tls-dir.*--insecure"):
        plaintext_check(args(), "0.0.0.0:7", loop)
    # peers dialled on the network would carry the token in plaintext too
    with pytest.raises(ValueError, match=r"192\.0\.2\.10:1, 192\.0\.2\.12:3.*--insecure"):
        plaintext_check(args(), "127.0.0.1:2", lan)
    assert plaintext_check(args(insecure=True), "127.0.0.1:2", lan) == [lan[0], lan[2]]
    assert plaintext_check(args(tls_dir="certs"), "0.0.0.0:7", lan) == []
    with pytest.raises(ValueError, match="--insecure and --tls-dir"):
        plaintext_check(args(insecure=True, tls_dir="certs"), "0.0.0.0:7", lan)


def test_serve_refuses_plaintext_on_a_non_loopback_address(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    x = _export_without_2_to_0(plan)  # any exported plan will do (3 nodes)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p0, p1, p2 = free_ports(3)
    peers = f"127.0.0.1:{p0},127.0.0.1:{p1},127.0.0.1:{p2}"
    # binding every interface without TLS: refused at once (no peer is up; a node that started
    # would give up on its peers only after --startup-timeout)
    t0 = time.monotonic()
    r = subprocess.run(
        _serve_cmd(plan, 0, peers, "--listen", f"0.0.0.0:{p0}", "--startup-timeout", "20"),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    for text in ("plaintext", "0.0.0.0", "--insecure", "--tls-dir", "disco-fl certs"):
        assert text in r.stderr, (text, r.stderr)
    assert "serving plan" not in r.stderr  # refused before it listened
    assert time.monotonic() - t0 < 20
    r = subprocess.run(
        _serve_cmd(plan, 0, peers, "--insecure", "--tls-dir", str(tmp_path / "certs")),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2 and "--insecure and --tls-dir" in r.stderr, r.stderr
    # with --insecure, node 0 binds 0.0.0.0 and serves (we dial it only through 127.0.0.1);
    # nodes 1 and 2 bind loopback and need no flag
    work = tmp_path / "hh"
    work.mkdir()
    procs = []
    try:
        for k, extra in enumerate((["--insecure", "--listen", f"0.0.0.0:{p0}"], [], [])):
            ready = work / f"ready{k}"
            cmd = _serve_cmd(plan, k, peers, "--startup-timeout", "60", "--ready-file", str(ready))
            with open(work / f"node{k}.log", "wb") as log:
                procs.append(
                    subprocess.Popen([*cmd, *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
                )
        deadline = time.monotonic() + 120
        while not all((work / f"ready{k}").exists() for k in range(3)):
            for k, p in enumerate(procs):
                assert p.poll() is None, (work / f"node{k}.log").read_text()
            assert time.monotonic() < deadline, "the household did not start"
            time.sleep(0.1)
        log0 = (work / "node0.log").read_text()
        assert "--insecure: plaintext on 0.0.0.0" in log0, log0
        with InferenceSession(f"127.0.0.1:{p0}", timeout=30) as s:
            out = s.infer(x)
        assert out.shape == (x.shape[0], 10)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
