"""Mutual TLS credentials: a node's or client's PEM files, checked, as gRPC credentials.

A household is one trust domain: one certificate authority (the *household CA*) signs a
certificate per node (valid for ``serverAuth`` and ``clientAuth``) and one per inference
client (``clientAuth``). Every node serves with its certificate and requires the caller to
present one signed by the household CA (:func:`server_credentials`); every node dials its peers
trusting only the household CA and presenting its own certificate (:func:`channel_credentials`).
:class:`TLSFiles` names the three files of one endpoint and checks them before gRPC sees them
(a mistake is reported by name, not as an opaque handshake failure); :func:`peer_credentials`
is the command line's shortcut from a TLS folder to both credentials.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

CA_CERT, CA_KEY = "ca.pem", "ca.key"
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a client's file base name


def node_common_name(k: int) -> str:
    """Subject CN of node ``k``'s certificate (peers check it with TLS on)."""
    return f"disco-node-{k}"


class SecurityError(ValueError):
    """A certificate, key or token file is missing, unreadable, malformed or inconsistent."""


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
            if not CLIENT_NAME.fullmatch(node):
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


def data_ssl_contexts(tls: TLSFiles) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """``(server, client)`` TLS contexts of a node for the socket data path
    (:mod:`~disco_fl.runtime.transport.socket_path`), with the same files and rules as its
    gRPC credentials: serve with ``tls.cert`` and require a client certificate signed by the
    household CA; dial trusting only the household CA, checking the peer's certificate names
    the dialled host, and presenting ``tls.cert``. TLS 1.2 at least.

    Parameters
    ----------
    tls : TLSFiles
        The node's files (checked by :meth:`TLSFiles.load` first).

    Returns
    -------
    tuple of ssl.SSLContext
        For ``GrpcTransport(..., data_path="socket", data_ssl=...)``.
    """
    ca_pem, _, _ = tls.load()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=ca_pem.decode())
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    server.verify_mode = ssl.CERT_REQUIRED
    return server, client


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
