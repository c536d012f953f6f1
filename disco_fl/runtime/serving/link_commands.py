"""The link commands: ``disco-fl probe --peers`` (the link part of the probe command) and
``disco-fl serve --ladder`` (serving a plan ladder, choosing a plan for the measured link).

The node's identity on the peer channel (household token, TLS certificate, the plaintext rule)
and its link emulation are ``disco-fl serve``'s (:mod:`disco_fl.runtime.serving.node_options`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from disco_fl.partition.plan import Plan
from disco_fl.runtime.probe import measure_links
from disco_fl.runtime.serving.commands import _log, run_serving, serve_config
from disco_fl.runtime.serving.ladder_server import LadderServer, PlanServers, ladder_configs
from disco_fl.runtime.serving.link_plans import DEFAULT_MARGIN, PlanLadder
from disco_fl.runtime.serving.node_options import (
    add_auth_args,
    data_ssl,
    link_shape,
    node_defaults,
    plaintext_check,
    tls_node,
    token,
)
from disco_fl.runtime.transport.link_probe import DEFAULT_PAYLOAD_BYTES, LinkProbe


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
    add_auth_args(p, serve=True)
    p.add_argument("--link-mbps", type=float, default=0.0, help="emulate the links (Mbit/s)")
    p.add_argument("--link-rtt-ms", type=float, default=0.0, help="emulated round trip (ms)")
    p.add_argument(
        "--link-bytes", type=int, default=256 << 10, help="bandwidth probe payload (256 KiB)"
    )
    p.add_argument("--link-timeout", type=float, default=5.0, help="bound on each echo, s")
    p.add_argument(
        "--data-path",
        choices=("socket", "grpc"),
        default="socket",
        help="the household's data path, as its nodes serve it (disco-fl serve --data-path; "
        "default socket)",
    )


def link_probes(args: argparse.Namespace) -> list[LinkProbe]:
    """``disco-fl probe --peers``: :func:`~disco_fl.runtime.probe.measure_links` with the
    node's identity (token, TLS) and link emulation, as ``disco-fl serve`` would have them."""
    if not args.plan:
        raise ValueError("--peers needs --plan: the probe speaks the household's peer channel")
    node, peers = node_defaults(args.plan, args.node, args.peers)
    listen = args.listen or peers[node]
    plaintext_check(args, listen, peers)
    server_creds, channel_creds = tls_node(args, node)
    return measure_links(
        args.plan,
        node,
        peers,
        listen=listen,
        token=token(args),
        server_credentials=server_creds,
        channel_credentials=channel_creds,
        link_shape=link_shape(args),
        data_path=args.data_path,
        data_ssl=data_ssl(args, node) if args.data_path == "socket" else None,
        payload_bytes=args.link_bytes,
        timeout=args.link_timeout,
    )


def add_ladder_args(p: argparse.ArgumentParser) -> None:
    """``disco-fl serve``'s plan-ladder options (``--ladder`` turns it on)."""
    p.add_argument(
        "--ladder",
        default=None,
        metavar="PLAN,...",
        help="more plans of the same model (folders), served on the ports after the node's "
        "(plan i on port + i); the requester picks one per request for the measured link",
    )
    p.add_argument(
        "--latency-target-ms",
        type=float,
        default=None,
        help="with --ladder (requester): the latency a request should meet",
    )
    p.add_argument(
        "--probe-interval",
        type=float,
        default=5.0,
        help="with --ladder: seconds between link probes, in [0.2, 3600] (default 5)",
    )
    p.add_argument(
        "--ladder-margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"with --ladder: hysteresis margin, relative (default {DEFAULT_MARGIN})",
    )
    p.add_argument(
        "--ladder-accuracy",
        default=None,
        metavar="A,...",
        help="with --ladder: accuracy per plan, the positional plan first (default: each "
        "plan's meta 'accuracy')",
    )
    p.add_argument(
        "--ladder-compute-ms",
        default=None,
        metavar="MS,...",
        help="with --ladder: compute time per plan (default: measured at start)",
    )
    p.add_argument(
        "--ladder-input-dtype",
        choices=["float32", "uint8"],
        default="float32",
        help="with --ladder: what the requests' input travels as in the predictions: float32 "
        "(default; over-counts the input hop of pixel requests) or uint8 (image pixels, as "
        "`disco-fl infer` and InferenceSession send them for plans with an image "
        "normalization)",
    )
    p.add_argument(
        "--link-probe-bytes",
        type=int,
        default=DEFAULT_PAYLOAD_BYTES,
        help="with --ladder: bandwidth probe payload (default 256 KiB)",
    )


def _floats(text: str | None, n: int, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{name}: comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise ValueError(f"{name}: {n} values (one per plan), got {len(vals)}")
    return vals


def cmd_serve_ladder(args: argparse.Namespace) -> int:
    """``disco-fl serve PLAN --ladder PLAN2,...``: one NodeServer per plan; on the requester
    a :class:`~disco_fl.runtime.serving.ladder_server.LadderServer` (see there)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("grpc", "asyncio"):
        logging.getLogger(name).setLevel(logging.WARNING)
    base = serve_config(args)
    paths = [Path(args.plan), *(Path(p.strip()) for p in args.ladder.split(",") if p.strip())]
    configs = ladder_configs(base, paths)
    requester = Plan.load(configs[0].plan).program.requester
    if base.node != requester:
        group = PlanServers(configs)
        _log(f"node {base.node}: serving a ladder of {len(paths)} plans from {group.address}")
        return run_serving(group, args, base)
    if args.latency_target_ms is None:
        raise ValueError("--ladder on the requester needs --latency-target-ms")
    compute = _floats(args.ladder_compute_ms, len(paths), "--ladder-compute-ms")
    ladder = PlanLadder(
        [c.plan for c in configs],
        accuracies=_floats(args.ladder_accuracy, len(paths), "--ladder-accuracy"),
        compute_ms=compute,
        input_dtype=args.ladder_input_dtype,
    )
    server = LadderServer(
        configs,
        ladder,
        target_ms=args.latency_target_ms,
        probe_interval_s=args.probe_interval,
        margin=args.ladder_margin,
        measure=compute is None,
        probe_kwargs={"payload_bytes": args.link_probe_bytes},
    )
    _log(f"node {base.node}: serving a ladder of {len(paths)} plans from {server.address}")

    def ready() -> None:
        c = server.start()
        _log(f"plan in use {c.plan.name}: predicted {c.predicted_ms:.2f} ms on {c.link.describe()}")

    return run_serving(server, args, base, ready)
