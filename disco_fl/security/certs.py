"""Making a household's certificates: its CA, one certificate per node and per client.

:func:`make_household_certs` creates them with ``cryptography`` (EC P-256, ECDSA-SHA256) and
writes them atomically (keys ``0600``); ``docs/security.md`` gives the equivalent ``openssl``
commands. ``disco-fl certs`` calls it.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from disco_fl.core.files import atomic_write_bytes
from disco_fl.security.tls import (
    CA_CERT,
    CA_KEY,
    CLIENT_NAME,
    SecurityError,
    TLSFiles,
    node_common_name,
)

log = logging.getLogger(__name__)

_ORG = "disco-fl"
_CLOCK_SKEW = _dt.timedelta(minutes=5)
_NODE_NAME = re.compile(r"node[0-9]+")


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
        if not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
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
    until it gets ``mode``): :func:`disco_fl.core.files.atomic_write_bytes`."""
    atomic_write_bytes(path, data, mode)
