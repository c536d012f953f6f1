"""``disco-fl serve``, ``disco-fl infer`` and ``disco-fl certs``."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from disco_fl.runtime.serving.client import InferenceSession
from disco_fl.runtime.serving.inputs import INPUTS_HELP, load_inputs
from disco_fl.runtime.serving.node_options import (
    add_auth_args,
    data_ssl,
    link_shape,
    node_defaults,
    plaintext_check,
    tls_client,
    tls_node,
    token,
)
from disco_fl.runtime.serving.node_server import NodeServer, ServeConfig
from disco_fl.runtime.transport.grpc_transport import LinkSchedule


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The node's :class:`ServeConfig` from ``disco-fl serve``'s options (and ``--threads``)."""
    args.node, peers = node_defaults(args.plan, args.node, args.peers)
    listen = args.listen or peers[args.node]
    exposed = plaintext_check(args, listen, peers)
    if exposed:
        _log(
            f"WARNING: --insecure: plaintext on {', '.join(exposed)}; anyone on the network "
            "can read the household token and the activations"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    server_creds, channel_creds = tls_node(args, args.node)
    return ServeConfig(
        plan=Path(args.plan),
        node=args.node,
        listen=listen,
        peers=peers,
        token=token(args),
        server_credentials=server_creds,
        channel_credentials=channel_creds,
        deadline_s=args.deadline,
        max_inflight=args.max_inflight,
        max_queued=args.max_queued,
        max_batch=args.max_batch,
        chunk_batch=args.chunk_batch,
        max_frame_bytes=int(args.max_frame_mb * (1 << 20)),
        link_shape=link_shape(args),
        max_connections=args.max_connections,
        overlap=not args.no_overlap,
        degraded_wait_s=args.degraded_wait,
        degraded_retry_s=args.degraded_retry,
        data_path=args.data_path,
        data_ssl=data_ssl(args, args.node) if args.data_path == "socket" else None,
        data_port=args.data_port,
        busy_poll_s=args.busy_poll_us / 1e6,
    )


def run_serving(
    server: Any,
    args: argparse.Namespace,
    cfg: ServeConfig,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Wait for the peers, say ``household ready`` (start a link schedule's clock there and
    call ``on_ready``), write the ready file, serve until SIGINT / SIGTERM, stop."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.wait_for_peers(args.startup_timeout, progress=_log)
        _log(f"node {args.node}: household ready")
        if isinstance(cfg.link_shape, LinkSchedule):
            cfg.link_shape.start(time.time())
        if on_ready is not None:
            on_ready()
        if args.ready_file:
            Path(args.ready_file).write_text(json.dumps({"address": server.address}))
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):  # until SIGINT / SIGTERM
                pass
    finally:
        server.stop()
        _log(f"node {args.node}: stopped")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` dumps the stacks
    cfg = serve_config(args)
    server = NodeServer(cfg)
    _log(
        f"node {cfg.node}/{server.num_nodes}: serving plan {server.plan.hash[:12]} "
        f"({server.node.param_bytes:,} shard bytes, TLS "
        f"{'on' if cfg.server_credentials else 'off'}) on {server.address}"
    )
    return run_serving(server, args, cfg)


TASK_CHOICES = ("classification", "segmentation", "super_resolution")


def infer_task(args: argparse.Namespace, meta: Any) -> str:
    """``--task``, else the plan's ``meta["task"]`` (a Flower run of a dense task writes it),
    else classification."""
    task = args.task or (meta.get("task") if isinstance(meta, dict) else None) or "classification"
    if task not in TASK_CHOICES:
        raise ValueError(f"unknown task {task!r} (plan meta or --task); known: {TASK_CHOICES}")
    return str(task)


def cmd_infer(args: argparse.Namespace) -> dict[str, Any]:
    """Classify (one line per input), or for a dense task write masks / images
    (:mod:`disco_fl.runtime.serving.outputs`)."""
    from disco_fl.runtime.serving.outputs import write_outputs

    t0 = time.perf_counter()
    if args.png_dir and args.task == "classification":
        raise ValueError("--png-dir is for dense outputs (segmentation, super_resolution)")
    with InferenceSession(
        args.address,
        token=token(args),
        channel_credentials=tls_client(args),
        timeout=args.timeout,
    ) as session:
        status = session.wait_ready(args.timeout)
        task = infer_task(args, status.get("meta", {}))
        if task == "classification" and args.png_dir:
            raise ValueError("--png-dir is for dense outputs: this plan's task is classification")
        if task != "classification" and not (args.out or args.png_dir):
            raise ValueError(f"a {task} plan: give --out FILE.npz and/or --png-dir DIR")
        inputs = load_inputs(args.inputs, status["input_shape"], status.get("meta", {}))
        n = int(inputs.x.shape[0])
        _log(f"{n} inputs -> {args.address} (plan {status['plan_hash'][:12]})")
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.perf_counter() - last[0] > 1.0 or done == total:
                last[0] = time.perf_counter()
                _log(f"  {done}/{total}")

        t1 = time.perf_counter()
        logits = session.infer_many(
            inputs.x,
            batch_size=args.batch_size,
            max_inflight=args.max_inflight,
            deadline_s=args.deadline,
            progress=progress,
        )
        dt = time.perf_counter() - t1
        missing = list(session.last_missing)
    if missing:
        _log(f"degraded: the household answered without nodes {missing}")
    if task != "classification":
        return _dense_result(args, task, logits, inputs.names, dt, t0, missing)
    if args.out:
        write_outputs(task, logits, inputs.names, args.out)
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    classes = status.get("meta", {}).get("classes")
    rows = []
    for i in range(n):
        label = classes[int(pred[i])] if classes else int(pred[i])
        rows.append({"input": inputs.names[i], "prediction": label, "p": float(conf[i])})
    for r in rows[: args.show]:
        print(f"{r['input']}: {r['prediction']} (p={r['p']:.3f})")
    if n > args.show:
        print(f"... ({n - args.show} more)")
    result: dict[str, Any] = {
        "n": n,
        "predictions": rows,
        "accuracy": None,
        **_timing(n, dt, t0, missing),
    }
    if inputs.labels is not None:
        acc = float((pred.numpy() == inputs.labels).mean())
        result["accuracy"] = acc
        print(f"accuracy {100 * acc:.2f}% on {n} labelled inputs")
    print(f"{n} inputs in {dt:.2f} s ({n / dt:.1f}/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _timing(n: int, dt: float, t0: float, missing: list[int]) -> dict[str, Any]:
    """The figures of an ``infer`` run's JSON beside its outputs."""
    return {
        "infer_s": dt,
        "images_per_s": n / dt if dt > 0 else None,
        "wall_s": time.perf_counter() - t0,
        "degraded": bool(missing),
        "missing_nodes": missing,
    }


def _dense_result(
    args: argparse.Namespace,
    task: str,
    outputs: torch.Tensor,
    names: list[str],
    dt: float,
    t0: float,
    missing: list[int],
) -> dict[str, Any]:
    """Masks / images written (``--out``, ``--png-dir``); a line per input shown."""
    from disco_fl.runtime.serving.outputs import write_outputs

    n = len(names)
    wrote = write_outputs(task, outputs, names, args.out, args.png_dir)
    masks = wrote.pop("masks", None)
    for i in range(min(n, args.show)):
        if masks is not None:
            classes = sorted(int(c) for c in masks[i].unique())
            print(f"{names[i]}: mask {tuple(masks[i].shape)}, classes {classes}")
        else:
            print(f"{names[i]}: image {tuple(outputs[i].shape)}")
    if n > args.show:
        print(f"... ({n - args.show} more)")
    for what, where in (("outputs", wrote["out"]), (f"{wrote['pngs']} PNGs", wrote["png_dir"])):
        if where:
            print(f"wrote {what} to {where}")
    print(f"{n} inputs in {dt:.2f} s ({n / dt:.1f}/s)")
    result: dict[str, Any] = {
        "n": n,
        "task": task,
        **wrote,
        **_timing(n, dt, t0, missing),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def cmd_certs(args: argparse.Namespace) -> int:
    from disco_fl.security import make_household_certs

    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
    made = make_household_certs(args.out, args.nodes, hosts=hosts, overwrite=args.overwrite)
    print(f"household CA: {made['ca_cert']} (keep {made['ca_key']} offline)")
    for k, tls in enumerate(made["nodes"]):
        print(f"  node {k}: {tls.cert}, {tls.key}")
    for name, tls in made["clients"].items():
        print(f"  client {name!r}: {tls.cert}, {tls.key}")
    print(f"valid for {', '.join(hosts)}; copy ca.pem and node<k>.* to node k only")
    return 0


def add_parsers(sub: Any) -> None:
    auth = add_auth_args

    p = sub.add_parser("serve", help="serve this node's shard of an exported plan")
    p.add_argument(
        "plan",
        help="plan.json or its folder (only node_<k>.pt is read), e.g. the node's data folder "
        "where a Flower run delivered its shard",
    )
    p.add_argument(
        "--node", type=int, default=None, help="this node's index (default: the folder's node.json)"
    )
    p.add_argument(
        "--peers",
        default=None,
        help="every node's host:port, comma-separated, by index (default: the folder's "
        "node.json, the household's peer addresses of the run)",
    )
    p.add_argument("--listen", default=None, help="address to bind (default: own --peers entry)")
    auth(p, serve=True)
    p.add_argument("--deadline", type=float, default=5.0, help="request deadline, s (default 5)")
    p.add_argument("--max-inflight", type=int, default=8, help="requests at once (default 8)")
    p.add_argument(
        "--max-queued",
        type=int,
        default=None,
        help="sessions waiting for a slot on a non-requester node; more are refused "
        "(default: --max-inflight)",
    )
    p.add_argument(
        "--max-batch", type=int, default=4096, help="largest batch accepted (default 4096)"
    )
    p.add_argument(
        "--chunk-batch",
        type=int,
        default=0,
        help="larger requests run as sessions of at most this many inputs (default 0: about "
        "1 MiB of input per chunk)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument(
        "--max-frame-mb", type=float, default=64.0, help="largest message, MiB (default 64)"
    )
    p.add_argument(
        "--startup-timeout", type=float, default=120.0, help="wait this long for peers at start"
    )
    p.add_argument(
        "--link-mbps",
        type=float,
        default=0.0,
        help="emulate the links into this node: rate (Mbit/s)",
    )
    p.add_argument(
        "--link-rtt-ms", type=float, default=0.0, help="emulated round trip (ms), half per frame"
    )
    p.add_argument(
        "--link-schedule",
        default=None,
        metavar="T:MBPS/RTT_MS,...",
        help="emulation only: a link that changes, e.g. 0:1000/0.5,30:20/4 (from T seconds "
        "after --link-epoch); replaces --link-mbps / --link-rtt-ms",
    )
    p.add_argument(
        "--link-epoch",
        type=float,
        default=None,
        help="time.time() the schedule counts from (the same on every node; default: when "
        "the household is ready)",
    )
    p.add_argument(
        "--data-path",
        choices=("socket", "grpc"),
        default="socket",
        help="how peer frames travel: a TCP connection per peer opened with a ticket from the "
        "gRPC handshake (default: half the time per hop; a second port, --data-port), or a "
        "gRPC stream per peer (one port per node); the same on every node",
    )
    p.add_argument(
        "--data-port",
        type=int,
        default=0,
        help="--data-path socket: the port of the node's data listener, on --listen's host "
        "(default 0: a free port, which the handshake tells the peers; give one to open it "
        "in a firewall)",
    )
    p.add_argument(
        "--busy-poll-us",
        type=float,
        default=0.0,
        help="while a request waits for a peer's frame, poll for up to this many microseconds "
        "before sleeping: less latency on a device that serves one node, that much CPU per "
        "wait (default 0: off)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=128,
        help="connections held at once, handshakes included; more are closed (default 128)",
    )
    p.add_argument(
        "--degraded-wait",
        type=float,
        default=None,
        metavar="S",
        help="degraded mode: leave out a peer that sends nothing for S seconds, is unreachable "
        "or fails, and answer without it (its channels closed); default: such a request fails",
    )
    p.add_argument(
        "--degraded-retry",
        type=float,
        default=10.0,
        metavar="S",
        help="degraded mode, requester: start the next sessions without a node found missing "
        "for S seconds (no wait, statistics for that set), then try it again (default 10)",
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="receive every exchanged tensor before computing the layer that reads it (by "
        "default a mixing layer computes its own channels' part while the peers' travel)",
    )
    p.add_argument("--ready-file", default=None, help="write {'address': ...} here when ready")

    p = sub.add_parser(
        "infer",
        help="classify images / .npz through a serving household, or write its masks "
        "(segmentation) / images (super-resolution)",
    )
    p.add_argument("inputs", nargs="+", help=INPUTS_HELP)
    p.add_argument("--address", required=True, help="the requester node (node 0), host:port")
    auth(p)
    p.add_argument("--client-name", default="client", help="client cert name in --tls-dir")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-inflight", type=int, default=4, help="batches in flight (default 4)")
    p.add_argument("--deadline", type=float, default=None, help="per-batch deadline, s")
    p.add_argument("--timeout", type=float, default=60.0, help="client-side bound per call, s")
    p.add_argument("--show", type=int, default=10, help="predictions to print (default 10)")
    p.add_argument("--json", default=None, help="write predictions and figures here")
    p.add_argument(
        "--task",
        default=None,
        choices=TASK_CHOICES,
        help="what the outputs mean (default: the plan's meta 'task', else classification)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE.npz",
        help="write the outputs here: arrays 'outputs', 'names' and 'masks' (segmentation: "
        "class index per pixel) or 'predictions' (classification); needed, or --png-dir, "
        "for a dense task",
    )
    p.add_argument(
        "--png-dir",
        default=None,
        metavar="DIR",
        help="dense tasks: one PNG per input here (segmentation: palette PNG of class "
        "indices; super-resolution: the image)",
    )

    p = sub.add_parser("certs", help="create a household CA and node/client certificates")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument(
        "--hosts",
        default="127.0.0.1,localhost",
        help="addresses the nodes are reached at (certificate SANs), comma-separated",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
