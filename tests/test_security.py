"""Mutual TLS on the peer channel (real gRPC on 127.0.0.1) and the certificate/token helpers.

(a) mTLS both ways with household certificates delivers a frame; refused at the TLS handshake:
(b) a caller without a client certificate, (c) a caller (or a server) with a certificate of
another household CA, (d) a plaintext caller, and a server whose certificate does not name the
dialled host; (e) file handling: missing files, overwrite refusal, key modes, mismatched keys,
tokens. The openssl commands of docs/security.md are run and their output used for (a).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from disco_fl.core.wire import decode_tensor, encode_tensor
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.transport import TransportError
from disco_fl.runtime.transport.grpc_transport import GrpcTransport
from disco_fl.security import (
    SecurityError,
    TLSFiles,
    channel_credentials,
    make_household_certs,
    read_token,
    server_credentials,
)

FWD = peer_pb2.Frame.FORWARD
CONNECT_S = 1.0  # connect timeout where the connection must be refused
OK_S = 10.0  # connect timeout where it must succeed (a loaded machine)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "security.md"

Creds = tuple[grpc.ServerCredentials | None, grpc.ChannelCredentials | None]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("household")
    make_household_certs(d, 2)
    return d


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another household: same file names and hosts, a different CA."""
    d = tmp_path_factory.mktemp("other")
    make_household_certs(d, 2)
    return d


def _mtls(directory: Path, k: int | str) -> Creds:
    tls = TLSFiles.from_dir(directory, k)
    return server_credentials(tls), channel_credentials(tls)


@pytest.fixture
def pair() -> Iterator[Callable[..., list[GrpcTransport]]]:
    """Factory of two gRPC transports (nodes 0 and 1 of plan "h") dialling each other."""
    made: list[GrpcTransport] = []

    def make(c0: Creds, c1: Creds, timeout: float = OK_S) -> list[GrpcTransport]:
        ts = []
        for k, (srv, chan) in enumerate((c0, c1)):
            t = GrpcTransport(
                k,
                2,
                plan_hash="h",
                num_layers=3,
                household_token="tok",
                connect_timeout=timeout,
                server_credentials=srv,
                channel_credentials=chan,
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
    assert all(t.closed for t in made)


def _frame() -> peer_pb2.Frame:
    frame = peer_pb2.Frame(session_id="s", layer=1, src=0, dst=1, direction=FWD)
    encode_tensor(torch.arange(6.0).reshape(2, 3), "fp32", out=frame.tensor)
    return frame


def _delivered(ts: list[GrpcTransport]) -> None:
    ts[0].send(_frame())
    got = ts[1].recv("s", 1, 0, 5.0)
    x = decode_tensor(got.tensor, max_bytes=1 << 10)
    assert torch.equal(x, torch.arange(6.0).reshape(2, 3))
    assert not ts[0].errors and not ts[1].errors, (list(ts[0].errors), list(ts[1].errors))


def _refused(ts: list[GrpcTransport]) -> None:
    """Node 0 cannot reach node 1 (bounded), and nothing arrived at node 1."""
    t0 = time.monotonic()
    with pytest.raises(TransportError):  # HandshakeError is a TransportError
        ts[0].connect()
    with pytest.raises(TransportError):
        ts[0].send(_frame())
    assert time.monotonic() - t0 < 2 * CONNECT_S + 3.0
    assert ts[1].mailbox.pending == 0


def _raw_health(
    address: str, chan: grpc.ChannelCredentials | None, timeout: float = CONNECT_S
) -> grpc.StatusCode:
    """The status of one Health call on a fresh channel with the household token (OK, or why
    it failed)."""
    ch = grpc.secure_channel(address, chan) if chan else grpc.insecure_channel(address)
    with ch:
        try:
            peer_pb2_grpc.PeerStub(ch).Health(
                peer_pb2.HealthRequest(), metadata=[("disco-token", "tok")], timeout=timeout
            )
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


# ---- (a) mutual TLS delivers -----------------------------------------------------------------


def test_mtls_delivers_a_frame(pair: Callable[..., list[GrpcTransport]], certs: Path) -> None:
    ts = pair(_mtls(certs, 0), _mtls(certs, 1))
    _delivered(ts)
    assert ts[0].health(1, timeout=OK_S).node == 1
    # an inference client's certificate is accepted at the TLS level too
    assert _raw_health(ts[1].address, _mtls(certs, "client")[1], OK_S) == grpc.StatusCode.OK


# ---- (b), (c), (d): refused at the handshake ---------------------------------------------------


def test_client_without_certificate_is_refused(
    pair: Callable[..., list[GrpcTransport]], certs: Path
) -> None:
    ca = (certs / "ca.pem").read_bytes()
    no_cert = grpc.ssl_channel_credentials(root_certificates=ca)  # trusts the CA, shows nothing
    srv0, _ = _mtls(certs, 0)
    ts = pair((srv0, no_cert), _mtls(certs, 1), CONNECT_S)
    _refused(ts)
    # the same plan hash and token: only the missing client certificate can be the reason
    assert _raw_health(ts[1].address, no_cert) == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_is_refused(
    pair: Callable[..., list[GrpcTransport]], certs: Path, other_certs: Path
) -> None:
    # node 0 trusts our CA (so node 1's server certificate verifies) but presents a
    # certificate signed by another household's CA: node 1 refuses it
    foreign = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(other_certs / "node0.key").read_bytes(),
        certificate_chain=(other_certs / "node0.pem").read_bytes(),
    )
    ts = pair((_mtls(certs, 0)[0], foreign), _mtls(certs, 1), CONNECT_S)
    _refused(ts)
    assert _raw_health(ts[1].address, foreign) == grpc.StatusCode.UNAVAILABLE


def test_server_certificate_from_another_ca_is_refused(
    pair: Callable[..., list[GrpcTransport]], certs: Path, other_certs: Path
) -> None:
    # node 1 belongs to another household: node 0 (trusting only its own CA) refuses it
    ts = pair(_mtls(certs, 0), _mtls(other_certs, 1), CONNECT_S)
    _refused(ts)


def test_plaintext_client_is_refused(pair: Callable[..., list[GrpcTransport]], certs: Path) -> None:
    ts = pair((_mtls(certs, 0)[0], None), _mtls(certs, 1), CONNECT_S)
    _refused(ts)
    assert _raw_health(ts[1].address, None) == grpc.StatusCode.UNAVAILABLE


def test_server_certificate_must_name_the_dialled_host(
    pair: Callable[..., list[GrpcTransport]], tmp_path: Path
) -> None:
    make_household_certs(tmp_path, 2, hosts=("10.255.255.1", "disco-node.example"))
    # dialled at 127.0.0.1, which these certificates do not name
    ts = pair(_mtls(tmp_path, 0), _mtls(tmp_path, 1), CONNECT_S)
    _refused(ts)


# ---- (e) files ----------------------------------------------------------------------------------


def test_generated_files_and_modes(tmp_path: Path) -> None:
    out = tmp_path / "c"
    made = make_household_certs(out, 3, client_names=("client", "phone"))
    names = {"ca", "node0", "node1", "node2", "client", "phone"}
    assert {p.name for p in out.iterdir()} == {f"{n}{e}" for n in names for e in (".pem", ".key")}
    for p in out.iterdir():
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o600 if p.suffix == ".key" else 0o644), (p.name, oct(mode))
    assert made["ca_cert"] == out / "ca.pem" and made["ca_key"] == out / "ca.key"
    assert made["nodes"][2] == TLSFiles(out / "ca.pem", out / "node2.pem", out / "node2.key")
    assert made["nodes"][1] == TLSFiles.from_dir(out, 1)
    assert made["clients"]["phone"] == TLSFiles.from_dir(out, "phone")
    ca_pem, cert_pem, key_pem = made["nodes"][0].load()
    assert b"BEGIN CERTIFICATE" in ca_pem and b"BEGIN PRIVATE KEY" in key_pem


def test_missing_file_is_named(tmp_path: Path) -> None:
    make_household_certs(tmp_path, 2)
    (tmp_path / "node1.key").unlink()
    with pytest.raises(SecurityError, match=r"node1\.key"):
        TLSFiles.from_dir(tmp_path, 1)
    with pytest.raises(SecurityError, match=r"node5\.pem"):
        TLSFiles.from_dir(tmp_path, 5)
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(SecurityError, match=r"ca\.pem"):
        TLSFiles.from_dir(tmp_path, 0)
    assert issubclass(SecurityError, ValueError)


def test_overwrite_is_refused_unless_asked(tmp_path: Path) -> None:
    make_household_certs(tmp_path, 2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SecurityError, match=r"refusing to overwrite.*overwrite=True"):
        make_household_certs(tmp_path, 3)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written
    make_household_certs(tmp_path, 2, overwrite=True)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after.keys() == before.keys() and after["ca.pem"] != before["ca.pem"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bad_files_are_reported_by_name(tmp_path: Path) -> None:
    make_household_certs(tmp_path, 2)
    mixed = TLSFiles(tmp_path / "ca.pem", tmp_path / "node0.pem", tmp_path / "node1.key")
    with pytest.raises(SecurityError, match=r"node1\.key is not the private key of .*node0"):
        server_credentials(mixed)
    (tmp_path / "node1.pem").write_text("not a certificate\n")
    with pytest.raises(SecurityError, match=r"node1\.pem"):
        channel_credentials(TLSFiles.from_dir(tmp_path, 1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_nodes": 0}, "num_nodes"),
        ({"days": 0}, "days"),
        ({"hosts": ()}, "at least one"),
        ({"hosts": ("ok", "bad host")}, "bad host"),
        ({"client_names": ("node3",)}, "clashes"),
        ({"client_names": ("../x",)}, "bad client name"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    args = {"num_nodes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_household_certs(tmp_path, **args)
    assert not list(tmp_path.iterdir())


def test_read_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISCO_TOKEN", raising=False)
    assert read_token(None) == ""  # no token
    monkeypatch.setenv("DISCO_TOKEN", "  from-env \n")
    assert read_token(None) == "from-env"
    monkeypatch.setenv("OTHER", "x")
    assert read_token(None, env="OTHER") == "x"
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    os.chmod(f, 0o600)
    assert read_token(f) == "s3cret"  # the file wins over the environment
    with pytest.raises(SecurityError, match="missing token file"):
        read_token(tmp_path / "nope")
    f.write_text("\n")
    with pytest.raises(SecurityError, match="empty"):
        read_token(str(f))
    f.write_text("caf\u00e9")
    with pytest.raises(SecurityError, match="printable ASCII"):
        read_token(f)


# ---- the openssl commands of docs/security.md ------------------------------------------------


def _openssl_verify(ca: Path, purpose: str, cert: Path) -> bool:
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), "-purpose", purpose, str(cert)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return r.returncode == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_commands_of_the_docs(
    pair: Callable[..., list[GrpcTransport]], tmp_path: Path, certs: Path
) -> None:
    text = DOCS.read_text()
    m = re.search(r"<!-- openssl-begin -->\s*```sh\n(.*?)```\s*<!-- openssl-end -->", text, re.S)
    assert m, "docs/security.md lost its openssl block"
    script = re.sub(r"(?m)^N=\S+", "N=2", m.group(1))
    script = re.sub(r'(?m)^SAN="[^"]*"', 'SAN="IP:127.0.0.1,DNS:localhost"', script)
    assert "N=2" in script and 'SAN="IP:127.0.0.1' in script
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "certs"
    assert {p.name for p in out.iterdir()} == {
        f"{n}{e}" for n in ("ca", "node0", "node1", "client") for e in (".pem", ".key")
    }
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in out.glob("*.key"))
    ts = pair(_mtls(out, 0), _mtls(out, 1))
    _delivered(ts)
    assert _raw_health(ts[1].address, _mtls(out, "client")[1], OK_S) == grpc.StatusCode.OK
    # openssl and our helper agree on what each certificate is for
    for d in (out, certs):
        ca = d / "ca.pem"
        assert _openssl_verify(ca, "sslserver", d / "node0.pem")
        assert _openssl_verify(ca, "sslclient", d / "node1.pem")
        assert _openssl_verify(ca, "sslclient", d / "client.pem")
        assert not _openssl_verify(ca, "sslserver", d / "client.pem")
