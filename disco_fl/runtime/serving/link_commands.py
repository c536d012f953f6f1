"""``disco-fl probe --peers``: the link part of the probe command (its options and the call).

The node's identity on the peer channel (household token, TLS certificate, the plaintext rule)
and its link emulation are ``disco-fl serve``'s (:mod:`disco_fl.runtime.serving.commands`).
"""

from __future__ import annotations

import argparse

from disco_fl.runtime.probe import measure_links
from disco_fl.runtime.serving.commands import (
    _auth_args,
    _link_shape,
    _plaintext_check,
    _tls_node,
    _token,
    node_defaults,
)
from disco_fl.runtime.transport.link_probe import LinkProbe


def add_link_probe_args(p: argparse.ArgumentParser) -> None:
    """``disco-fl probe``'s link options (``--peers`` turns the link probe on)."""
    p.add_argument(
        "--peers",
        default=None,
        help="every node's host:port by index: also measure round trip and bandwidth to each "
        "peer over the peer channel (the peers must be serving --plan)",
    )
    p.add_argument("--plan", default=None, help="the household's plan (folder or plan.json)")
    p.add_argument("--node", type=int, default=None, help="this node's index (or node.json)")
    p.add_argument("--listen", default=None, help="address to bind (default: own --peers entry)")
    _auth_args(p, serve=True)
    p.add_argument("--link-mbps", type=float, default=0.0, help="emulate the links (Mbit/s)")
    p.add_argument("--link-rtt-ms", type=float, default=0.0, help="emulated round trip (ms)")
    p.add_argument(
        "--link-bytes", type=int, default=256 << 10, help="bandwidth probe payload (256 KiB)"
    )
    p.add_argument("--link-timeout", type=float, default=5.0, help="bound on each echo, s")


def link_probes(args: argparse.Namespace) -> list[LinkProbe]:
    """``disco-fl probe --peers``: :func:`~disco_fl.runtime.probe.measure_links` with the
    node's identity (token, TLS) and link emulation, as ``disco-fl serve`` would have them."""
    if not args.plan:
        raise ValueError("--peers needs --plan: the probe speaks the household's peer channel")
    node, peers = node_defaults(args.plan, args.node, args.peers)
    listen = args.listen or peers[node]
    _plaintext_check(args, listen, peers)
    server_creds, channel_creds = _tls_node(args, node)
    return measure_links(
        args.plan,
        node,
        peers,
        listen=listen,
        token=_token(args),
        server_credentials=server_creds,
        channel_credentials=channel_creds,
        link_shape=_link_shape(args),
        payload_bytes=args.link_bytes,
        timeout=args.link_timeout,
    )
