"""What guards a node besides TLS: the household token, and the loopback check.

:func:`read_token` reads the household token, a second factor checked inside the peer protocol
(and by the inference service). :func:`is_loopback_address` says whether an address stays on
this machine, where the command line lets a node run in plaintext.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from pathlib import Path

from disco_fl.security.tls import SecurityError

log = logging.getLogger(__name__)


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
