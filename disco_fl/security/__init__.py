"""Mutual TLS for the peer channel, household certificates and the household token.

A household is one trust domain: one certificate authority (the *household CA*) signs a
certificate per node and per inference client; every node serves and dials with its own
certificate and trusts only the household CA. The household token (:func:`read_token`) is a
second factor checked inside the peer protocol. The package's modules:

- :mod:`~disco_fl.security.tls`: an endpoint's PEM files (:class:`TLSFiles`), checked, as gRPC
  credentials (:func:`server_credentials`, :func:`channel_credentials`,
  :func:`peer_credentials`), and as TLS contexts for the socket data path
  (:func:`data_ssl_contexts`);
- :mod:`~disco_fl.security.certs`: making a household's certificates
  (:func:`make_household_certs`, EC P-256, ECDSA-SHA256; ``docs/security.md`` gives the
  equivalent ``openssl`` commands);
- :mod:`~disco_fl.security.access`: the household token (:func:`read_token`) and the loopback
  check (:func:`is_loopback_address`).

Example
-------
>>> certs = make_household_certs("certs", 2)                          # doctest: +SKIP
>>> tls = TLSFiles.from_dir("certs", 0)                               # doctest: +SKIP
>>> GrpcTransport(0, 2, plan_hash=h, server_credentials=server_credentials(tls),
...               channel_credentials=channel_credentials(tls))       # doctest: +SKIP
"""

from disco_fl.security.access import is_loopback_address, read_token
from disco_fl.security.certs import HouseholdCerts, make_household_certs
from disco_fl.security.tls import (
    CA_CERT,
    CA_KEY,
    SecurityError,
    TLSFiles,
    channel_credentials,
    data_ssl_contexts,
    node_common_name,
    peer_credentials,
    server_credentials,
)

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "HouseholdCerts",
    "SecurityError",
    "TLSFiles",
    "channel_credentials",
    "data_ssl_contexts",
    "is_loopback_address",
    "make_household_certs",
    "node_common_name",
    "peer_credentials",
    "read_token",
    "server_credentials",
]
