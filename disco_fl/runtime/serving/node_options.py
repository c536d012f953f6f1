"""A node's command-line options, resolved: its identity on the peer channel (household token,
TLS material, the plaintext rule), its index and peers (``node.json``), its link emulation.

Shared by ``disco-fl serve`` (:mod:`~disco_fl.runtime.serving.commands`) and the link commands
(:mod:`~disco_fl.runtime.serving.link_commands`).
"""

from __future__ import annotations

import argparse
import json
import ssl
from pathlib import Path

import grpc

from disco_fl.runtime.transport.grpc_transport import LinkSchedule, LinkShape


def token(args: argparse.Namespace) -> str:
    """The household token (``--token-file``, else ``$DISCO_TOKEN``, else none)."""
    from disco_fl.security import read_token

    return read_token(args.token_file)


def tls_node(
    args: argparse.Namespace, node: int
) -> tuple[grpc.ServerCredentials | None, grpc.ChannelCredentials | None]:
    """Node ``node``'s gRPC server and channel credentials from ``--tls-dir`` (none: plaintext)."""
    from disco_fl.security import peer_credentials

    return peer_credentials(args.tls_dir, node)


def data_ssl(args: argparse.Namespace, node: int) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    """Node ``node``'s TLS contexts for the socket data path from ``--tls-dir`` (or none)."""
    from disco_fl.security import TLSFiles, data_ssl_contexts

    return data_ssl_contexts(TLSFiles.from_dir(args.tls_dir, node)) if args.tls_dir else None


def tls_client(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """An inference client's channel credentials (``--client-name`` in ``--tls-dir``)."""
    from disco_fl.security import peer_credentials

    return peer_credentials(args.tls_dir, str(args.client_name))[1]


def plaintext_check(args: argparse.Namespace, listen: str, peers: list[str]) -> list[str]:
    """Refuse plaintext beyond loopback unless ``--insecure``; returns the exposed addresses.

    Flower's convention, TLS unless ``--insecure`` is given, with one exception kept for tests
    and the local demo: a household whose addresses are all loopback may run plaintext.
    """
    from disco_fl.security import is_loopback_address

    if args.insecure and args.tls_dir:
        raise ValueError("--insecure and --tls-dir exclude each other: give one of them")
    if args.tls_dir:
        return []
    exposed = [a for a in dict.fromkeys([listen, *peers]) if not is_loopback_address(a)]
    if exposed and not args.insecure:
        raise ValueError(
            f"refusing to serve in plaintext on non-loopback address(es) {', '.join(exposed)}: "
            "the household token and the activations would cross the network unencrypted. "
            "Create certificates with `disco-fl certs --nodes N --hosts IP1,IP2,... --out "
            "certs` and give --tls-dir certs (mutual TLS), or give --insecure to accept "
            "plaintext (a trusted test network only)"
        )
    return exposed


NODE_FILE = "node.json"  # written by a Flower run's delivery (disco_fl.fl.delivery)


def node_defaults(plan: str | Path, node: int | None, peers: str | None) -> tuple[int, list[str]]:
    """``--node`` and ``--peers``, the missing ones from ``node.json`` next to the plan (a
    node's data folder after a Flower run delivered its shard: its index and the household's
    peer addresses)."""
    if node is None or peers is None:
        folder = Path(plan) if Path(plan).is_dir() else Path(plan).parent
        path = folder / NODE_FILE
        try:
            saved = json.loads(path.read_text())
            saved_node, saved_peers = int(saved["node"]), [str(p) for p in saved["peers"]]
        except FileNotFoundError:
            raise ValueError(
                f"give --node and --peers: {folder} holds no {NODE_FILE} (a node's data folder "
                "gets one when a Flower run delivers its shard)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        node = saved_node if node is None else node
        peer_list = saved_peers if peers is None else [a.strip() for a in peers.split(",")]
    else:
        peer_list = [a.strip() for a in peers.split(",")]
    if not 0 <= node < len(peer_list):
        raise ValueError(f"--node {node} is not an index into --peers ({len(peer_list)} given)")
    return node, peer_list


def add_auth_args(p: argparse.ArgumentParser, serve: bool = False) -> None:
    p.add_argument(
        "--token-file",
        default=None,
        help="file holding the household token (default: $DISCO_TOKEN, else none)",
    )
    tls_help = (
        "folder from `disco-fl certs` (ca.pem, node<k>.pem/.key, client.pem/.key): mutual TLS"
    )
    if serve:
        tls_help += "; without it, plaintext is refused beyond loopback unless --insecure"
    p.add_argument("--tls-dir", default=None, help=tls_help)
    if serve:
        p.add_argument(
            "--insecure",
            action="store_true",
            help="allow plaintext on non-loopback addresses (a trusted test network only; "
            "loopback-only households run plaintext without it)",
        )


def link_shape(args: argparse.Namespace) -> LinkShape | LinkSchedule | None:
    """The emulated link of ``--link-schedule`` or ``--link-mbps`` / ``--link-rtt-ms`` (or none)."""
    schedule = getattr(args, "link_schedule", None)
    if schedule:
        return LinkSchedule.parse(schedule, args.link_epoch)
    return LinkShape(args.link_mbps * 1e6, args.link_rtt_ms / 1e3) if args.link_mbps else None
