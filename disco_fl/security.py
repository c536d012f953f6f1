"""Mutual TLS for the peer channel, household certificates and the household token.

A household is one trust domain: one certificate authority (the *household CA*) signs a
certificate per node (valid for ``serverAuth`` and ``clientAuth``) and one per inference
client (``clientAuth``). Every node serves with its certificate and requires the caller to
present one signed by the household CA (:func:`server_credentials`); every node dials its peers
trusting only the household CA and presenting its own certificate (:func:`channel_credentials`).
The household token (:func:`read_token`) is a second factor checked inside the peer protocol.

:func:`make_household_certs` creates a household's CA and certificates with ``cryptography``
(EC P-256, ECDSA-SHA256); ``docs/security.md`` gives the equivalent ``openssl`` commands.

Example
-------
>>> certs = make_household_certs("certs", 2)                          # doctest: +SKIP
>>> tls = TLSFiles.from_dir("certs", 0)                               # doctest: +SKIP
>>> GrpcTransport(0, 2, plan_hash=h, server_credentials=server_credentials(tls),
...               channel_credentials=channel_credentials(tls))       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from disco_fl.files import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = [
    "HouseholdCerts",
    "SecurityError",
    "TLSFiles",
    "channel_credentials",
    "is_loopback_address",
    "make_household_certs",
    "read_token",
    "server_credentials",
]

CA_CERT, CA_KEY = "ca.pem", "ca.key"
_ORG = "disco-fl"


def node_common_name(k: int) -> str:
    """Subject CN of node ``k``'s certificate (peers check it with TLS on)."""
    return f"disco-node-{k}"


_CLOCK_SKEW = _dt.timedelta(minutes=5)
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NODE_NAME = re.compile(r"node[0-9]+")


class SecurityError(ValueError):
    """A certificate, key or token file is missing, unreadable, malformed or inconsistent."""


# ---- certificate files ---------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """The PEM files one endpoint (a node or an inference client) needs for mutual TLS.

    Parameters
    ----------
    ca_cert : Path
        The household CA certificate(s): the only roots trusted for the other side.
    cert : Path
        This endpoint's certificate (optionally followed by intermediate certificates),
        signed by the household CA.
    key : Path
        The unencrypted private key of ``cert`` (gRPC cannot use an encrypted key). Keep it
        readable by its owner only (mode ``0600``).

    Notes
    -----
    Nothing is read when the object is built; :meth:`load` (called by
    :func:`server_credentials` / :func:`channel_credentials`) reads and checks the files.
    """

    ca_cert: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], node: int | str) -> TLSFiles:
        """The files of ``node`` in a directory made by :func:`make_household_certs`.

        Parameters
        ----------
        directory : str or PathLike
            Holds ``ca.pem``, ``node<k>.pem`` and ``node<k>.key`` (and client files).
        node : int or str
            A node index ``k`` (``node<k>.pem`` / ``node<k>.key``), or the base name of a
            client's files (``"client"`` for ``client.pem`` / ``client.key``).

        Returns
        -------
        TLSFiles

        Raises
        ------
        SecurityError
            If one of the three files is missing (the message names it).
        """
        d = Path(directory)
        if isinstance(node, bool) or not isinstance(node, (int, str)):
            raise TypeError(f"node must be a node index or a client name, got {node!r}")
        if isinstance(node, int):
            if node < 0:
                raise ValueError(f"node index must be >= 0, got {node}")
            base = f"node{node}"
        else:
            if not _CLIENT_NAME.fullmatch(node):
                raise ValueError(f"bad certificate name {node!r}")
            base = node
        tls = cls(ca_cert=d / CA_CERT, cert=d / f"{base}.pem", key=d / f"{base}.key")
        for p in (tls.ca_cert, tls.cert, tls.key):
            if not p.is_file():
                raise SecurityError(f"missing TLS file {p} (expected {p.name} in {d})")
        return tls

    def load(self) -> tuple[bytes, bytes, bytes]:
        """Read and check the three files; return ``(ca_pem, cert_pem, key_pem)``.

        Checks that each file parses as PEM, that ``key`` is the private key of ``cert``,
        that the key is not encrypted and that ``cert`` has not expired, so that a mistake
        is reported here by name rather than as an opaque TLS handshake failure.

        Raises
        ------
        SecurityError
            On a missing, unreadable, malformed, mismatched or expired file.
        """
        ca_pem, cert_pem, key_pem = (_read(p) for p in (self.ca_cert, self.cert, self.key))
        _parse_certs(ca_pem, self.ca_cert)
        leaf = _parse_certs(cert_pem, self.cert)[0]
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise SecurityError(
                f"{self.key} is an encrypted key; gRPC needs an unencrypted PEM key "
                "(protect it with file permissions instead)"
            ) from None
        except ValueError as e:
            raise SecurityError(f"{self.key} is not a PEM private key: {e}") from None
        if _spki(key.public_key()) != _spki(leaf.public_key()):
            raise SecurityError(f"{self.key} is not the private key of {self.cert}")
        now = _dt.datetime.now(_dt.timezone.utc)
        if leaf.not_valid_after_utc < now:
            raise SecurityError(f"{self.cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
        if leaf.not_valid_before_utc > now:
            raise SecurityError(
                f"{self.cert} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
                "UTC (check this machine's clock)"
            )
        return ca_pem, cert_pem, key_pem


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SecurityError(f"missing TLS file {path}") from None
    except OSError as e:
        raise SecurityError(f"cannot read TLS file {path}: {e.strerror or e}") from None


def _parse_certs(pem: bytes, path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise SecurityError(f"{path} is not a PEM certificate file: {e}") from None
    if not certs:
        raise SecurityError(f"{path} holds no certificate")
    return certs


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """Server credentials of a node: serve with ``tls.cert`` and require a client certificate.

    ``require_client_auth=True``: a caller without a certificate signed by the household CA
    (``tls.ca_cert``) is refused during the TLS handshake, before any RPC runs.

    Parameters
    ----------
    tls : TLSFiles
        The node's files.

    Returns
    -------
    grpc.ServerCredentials
        For ``GrpcTransport(..., server_credentials=...)``.
    """
    ca_pem, cert_pem, key_pem = tls.load()
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )


def channel_credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    """Channel credentials of a node or client: trust only the household CA, present ``tls.cert``.

    The server's certificate must be signed by ``tls.ca_cert`` and name the dialled host
    (IP address or DNS name) in its subjectAltName.

    Parameters
    ----------
    tls : TLSFiles
        The caller's files.

    Returns
    -------
    grpc.ChannelCredentials
        For ``GrpcTransport(..., channel_credentials=...)`` or ``grpc.secure_channel``.
    """
    ca_pem, cert_pem, key_pem = tls.load()
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def peer_credentials(
    tls_dir: str, name: int | str
) -> tuple[grpc.ServerCredentials | None, grpc.ChannelCredentials | None]:
    """``(server, channel)`` credentials of node or client ``name`` from ``tls_dir``.

    Parameters
    ----------
    tls_dir : str
        The household's TLS folder (see :meth:`TLSFiles.from_dir`); ``""`` means plaintext.
    name : int or str
        The node's index, or a client's name.

    Returns
    -------
    tuple
        :func:`server_credentials` and :func:`channel_credentials` of ``name``'s files, or
        ``(None, None)`` when ``tls_dir`` is empty.
    """
    if not tls_dir:
        return None, None
    tls = TLSFiles.from_dir(tls_dir, name)
    return server_credentials(tls), channel_credentials(tls)


# ---- making a household's certificates -----------------------------------------------------


class HouseholdCerts(TypedDict):
    """What :func:`make_household_certs` wrote."""

    ca_cert: Path
    ca_key: Path
    nodes: list[TLSFiles]
    clients: dict[str, TLSFiles]


def make_household_certs(
    out_dir: str | os.PathLike[str],
    num_nodes: int,
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 825,
    client_names: Sequence[str] = ("client",),
    overwrite: bool = False,
) -> HouseholdCerts:
    """Create a household CA and the certificates of its nodes and inference clients.

    Writes into ``out_dir`` (created with mode ``0700`` if missing):

    - ``ca.pem`` / ``ca.key``: a new EC P-256 household CA (``CA:TRUE, pathlen:0``). The CA
      key is only needed to issue certificates: keep it off the nodes.
    - ``node<k>.pem`` / ``node<k>.key`` for ``k < num_nodes``: extendedKeyUsage
      ``serverAuth, clientAuth``; subjectAltName = ``hosts`` (IP addresses as IPAddress
      entries, other names as DNSName entries); subject CN ``disco-node-<k>``.
    - ``<name>.pem`` / ``<name>.key`` for each of ``client_names``: extendedKeyUsage
      ``clientAuth`` (callers of the inference API); subject CN ``disco-client-<name>``.

    Keys are unencrypted PKCS#8 PEM with mode ``0600``; certificates have mode ``0644``. Each
    file is written atomically (temporary file in ``out_dir``, then ``os.replace``).

    Parameters
    ----------
    out_dir : str or PathLike
        Destination directory.
    num_nodes : int
        Number of node certificates (``>= 1``).
    hosts : sequence of str
        Every address the nodes are dialled at (each node certificate names all of them, so
        one list fits the whole household). A peer dialled at an address that is not listed
        is refused by the caller's hostname check. A comma-separated string is accepted too.
    days : int
        Validity of every certificate, from now (minus 5 minutes of clock skew).
    client_names : sequence of str
        Base names of client certificates (letters, digits, ``_.-``; not ``ca`` nor
        ``node<k>``). Empty for none.
    overwrite : bool
        Replace existing files. Without it, nothing is written if any target file exists.

    Returns
    -------
    HouseholdCerts
        ``{"ca_cert": Path, "ca_key": Path, "nodes": [TLSFiles, ...],
        "clients": {name: TLSFiles}}``.

    Raises
    ------
    SecurityError
        If a target file exists and ``overwrite`` is false.
    ValueError
        On a bad ``num_nodes``, ``days``, host or client name.
    """
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be an integer >= 1, got {days!r}")
    san = _subject_alt_names(hosts)
    clients = list(client_names)
    for name in clients:
        if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
            raise ValueError(
                f"bad client name {name!r} (letters, digits, '_', '.', '-'; at most 64)"
            )
        if name == "ca" or _NODE_NAME.fullmatch(name):
            raise ValueError(f"client name {name!r} clashes with the CA or a node's files")
    if len(set(clients)) != len(clients):
        raise ValueError(f"duplicate client names in {clients}")

    out = Path(out_dir)
    node_bases = [f"node{k}" for k in range(num_nodes)]
    targets = [out / CA_CERT, out / CA_KEY] + [
        out / f"{b}{ext}" for b in node_bases + clients for ext in (".pem", ".key")
    ]
    if not overwrite:
        existing = [p.name for p in targets if p.exists()]
        if existing:
            raise SecurityError(
                f"{out} already holds {', '.join(existing)}; refusing to overwrite "
                "(pass overwrite=True to replace them, which invalidates the old household CA)"
            )

    # build everything in memory first, then write: a failure leaves no half-made CA
    now = _dt.datetime.now(_dt.timezone.utc)
    start, end = now - _CLOCK_SKEW, now + _dt.timedelta(days=days)
    household_id = secrets.token_hex(4)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"disco household CA {household_id}")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files: dict[str, tuple[bytes, int]] = {
        CA_CERT: (_cert_pem(ca_cert), 0o644),
        CA_KEY: (_key_pem(ca_key), 0o600),
    }

    def leaf(base: str, cn: str, usages: list[x509.ObjectIdentifier], alt: bool) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, household_id))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        files[f"{base}.pem"] = (_cert_pem(cert), 0o644)
        files[f"{base}.key"] = (_key_pem(key), 0o600)

    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for k, base in enumerate(node_bases):
        leaf(base, node_common_name(k), both, alt=True)
    for name in clients:
        leaf(name, f"disco-client-{name}", [ExtendedKeyUsageOID.CLIENT_AUTH], alt=False)

    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for fname, (data, mode) in files.items():
        _write_atomic(out / fname, data, mode)
    log.info(
        "household CA %s: wrote %d node and %d client certificates to %s",
        household_id,
        num_nodes,
        len(clients),
        out,
    )
    return HouseholdCerts(
        ca_cert=out / CA_CERT,
        ca_key=out / CA_KEY,
        nodes=[TLSFiles(out / CA_CERT, out / f"{b}.pem", out / f"{b}.key") for b in node_bases],
        clients={c: TLSFiles(out / CA_CERT, out / f"{c}.pem", out / f"{c}.key") for c in clients},
    )


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(hosts, str):
        hosts = hosts.split(",")
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in hosts:
        h = str(raw).strip()
        if not h:
            raise ValueError(f"empty host name in {list(hosts)!r}")
        if h in seen:
            continue
        seen.add(h)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?", h):
                raise ValueError(f"bad host {h!r}: expected an IP address or a DNS name") from None
            names.append(x509.DNSName(h.lower()))
    if not names:
        raise ValueError("hosts must name at least one IP address or DNS name")
    return names


def _name(cn: str, household_id: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG)]
    if household_id is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, household_id))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` (the temporary file is ``0600``
    until it gets ``mode``): :func:`disco_fl.files.atomic_write_bytes`."""
    atomic_write_bytes(path, data, mode)


# ---- household token -----------------------------------------------------------------------


def read_token(path: str | os.PathLike[str] | None, env: str = "DISCO_TOKEN") -> str:
    """The household token: the contents of ``path`` (stripped), else ``$env``, else ``""``.

    The token is a second factor on top of TLS: every node of the household must hold the
    same one, and a peer presenting another is refused (compared in constant time by the
    transport). An empty token means *no token*: peers are then only checked by TLS (if
    configured) and the plan hash.

    Parameters
    ----------
    path : str, PathLike or None
        A file holding the token (surrounding whitespace and the final newline are
        stripped). ``None`` reads the environment variable instead.
    env : str
        The environment variable used when ``path`` is ``None``.

    Returns
    -------
    str
        The token, or ``""`` when ``path`` is ``None`` and ``$env`` is unset or blank.

    Raises
    ------
    SecurityError
        If ``path`` is given but missing, unreadable or empty (an explicitly named token file
        that is empty is a mistake, not a request for no token), or if the token holds
        characters other than printable ASCII (it travels in gRPC metadata).
    """
    if path is not None:
        p = Path(path)
        try:
            token = p.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise SecurityError(f"missing token file {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SecurityError(f"cannot read token file {p}: {e}") from None
        if not token:
            raise SecurityError(f"token file {p} is empty")
        with contextlib.suppress(OSError):
            if os.name == "posix" and p.stat().st_mode & 0o077:
                log.warning("token file %s is readable by others; chmod 600 it", p)
        source = str(p)
    else:
        token = os.environ.get(env, "").strip()
        source = f"${env}"
    if any(not (0x20 <= ord(c) < 0x7F) for c in token):
        raise SecurityError(f"the token in {source} must be printable ASCII")
    return token


# ---- addresses -----------------------------------------------------------------------------


def is_loopback_address(address: str) -> bool:
    """Whether the gRPC address ``address`` (``host:port``, ``[v6]:port``, ``ipv4:``/``ipv6:``
    /``dns:`` forms, ``unix:``) reaches only this machine.

    Loopback: an IP in ``127.0.0.0/8`` or ``::1`` (also IPv4-mapped), the name ``localhost``,
    and Unix sockets. Everything else is not: wildcard binds (``0.0.0.0``, ``::``, an empty
    host) listen on every interface, and other names are not resolved (a name may point
    anywhere). ``disco-fl serve`` runs plaintext only on loopback addresses unless told
    ``--insecure``.
    """
    a = address.strip()
    low = a.lower()
    if low.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:", "dns:"):
        if low.startswith(scheme):
            a = a[len(scheme) :]
            break
    if a.startswith("//"):  # dns://authority/host:port
        a = a[2:].partition("/")[2]
    host = a
    with contextlib.suppress(ValueError):  # a bare IP address (IPv6 without a port)
        return _loopback_ip(ipaddress.ip_address(host))
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return False
        host = host[1:end]
    else:
        host = host.rpartition(":")[0] if ":" in host else host
    host = host.strip().lower()
    if host == "localhost":
        return True
    try:
        return _loopback_ip(ipaddress.ip_address(host))
    except ValueError:
        return False


def _loopback_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))
