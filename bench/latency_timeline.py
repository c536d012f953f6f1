"""Where the time of one batch-1 request goes: a timeline across the caller and two nodes.

A diagnostic for ``bench/latency.py``. Starts two ``disco-fl serve`` processes for an exported
2-node plan (as ``bench/latency.py`` does, same link emulation), each wrapped by this script
so that it records timestamps (``time.monotonic``: one clock for all processes of a machine)
when: the ``Infer`` call starts and ends, ``run_node`` starts and ends, a frame is handed to
``Transport.send`` (and when that returns), a frame leaves the link shaper (handed to gRPC),
a frame is accepted by the receiver, a ``recv`` call starts and returns. The caller times its
own calls. Prints the median of every stage of the requests (node 0 is the requester; the
stages follow the critical path: call, input hop, node 1's compute, each exchange, output
hop, reply).

Usage::

    python bench/latency.py --quick --keep-plans /tmp/plans --json out.json
    python bench/latency_timeline.py /tmp/plans/n2_b0.05_s1 --link-mbps 1000 --link-rtt-ms 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

Event = tuple[str, int, float]  # (what, layer, time.monotonic())


def _serve_wrapped(out: str, argv: list[str]) -> None:
    """Run ``disco-fl serve`` with timestamping patches; write the events to ``out``."""
    import disco_fl.serving.node_server as ns
    import disco_fl.transport.base as base
    import disco_fl.transport.grpc_transport as gt
    from disco_fl.cli import main

    ev: list[Event] = []
    mono = time.monotonic

    def wrap(cls: Any, name: str, before: str, after: str | None, layer_arg: int | None) -> None:
        orig = getattr(cls, name)

        def f(*a: Any, **k: Any) -> Any:
            layer = -1 if layer_arg is None else int(getattr(a[layer_arg], "layer", a[layer_arg]))
            ev.append((before, layer, mono()))
            r = orig(*a, **k)
            if after:
                ev.append((after, layer, mono()))
            return r

        setattr(cls, name, f)

    wrap(base.Transport, "send", "send", "send_ret", 1)
    wrap(base.Transport, "_accept", "accept", None, 1)
    wrap(base.Transport, "recv", "recv_call", "recv_ret", 2)
    wrap(gt._Pacer, "pace", "pace_call", "paced", None)
    wrap(ns.InferenceServicer, "Infer", "infer_start", "infer_end", None)
    wrap(ns.NodeServer, "_start_session", "start_session", None, None)
    orig_run = ns.run_node

    def run_node(*a: Any, **k: Any) -> Any:
        ev.append(("run_start", -1, mono()))
        try:
            return orig_run(*a, **k)
        finally:
            ev.append(("run_end", -1, mono()))

    ns.run_node = run_node  # type: ignore[assignment]
    signal.signal(signal.SIGUSR2, lambda *_: Path(out).write_text(json.dumps(ev)))
    sys.argv = ["disco-fl", *argv]
    main()


def _analyze(client: list[tuple[float, float]], nodes: list[list[Event]]) -> dict[str, float]:
    rows: dict[str, list[float]] = {}

    def add(key: str, v: float) -> None:
        rows.setdefault(key, []).append(v * 1e3)

    for cs, ce in client:
        ev = [[e for e in evs if cs <= e[2] <= ce] for evs in nodes]

        def first(
            k: int, what: str, layer: int | None = None, after: float = 0.0, ev: Any = ev
        ) -> float:
            for w, lay, t in ev[k]:
                if w == what and (layer is None or lay == layer) and t >= after:
                    return t
            raise LookupError(what)

        try:
            sends1 = sorted({lay for w, lay, _ in ev[1] if w == "send"})
            out_layer, exchanges = sends1[-1], sends1[:-1]
            i0, r0 = first(0, "infer_start"), first(0, "run_start")
            s_in = first(0, "send", 0)
            p_in = first(0, "paced", None, s_in)
            a_in, r1 = first(1, "accept", 0), first(1, "run_start")
            add("a. caller -> node 0 Infer handler", i0 - cs)
            add("b. Infer handler -> run_node (decode, checks)", r0 - i0)
            add("c. node 0: input encoded + handed to the transport", s_in - r0)
            add(
                "d. input: send -> leaves the link shaper (emulated: RTT/2 + bytes/rate)",
                p_in - s_in,
            )
            add("e. input: shaper -> accepted by node 1 (gRPC hop)", a_in - p_in)
            add("f. node 1: accepted -> run_node starts (session start)", r1 - a_in)
            t = r1
            for lay in exchanges:
                s0, s1 = first(0, "send", lay), first(1, "send", lay)
                add(f"g. node 1: compute up to exchange layer {lay}", s1 - t)
                add(f"g. node 0: compute up to exchange layer {lay} (from its run start)", s0 - r0)
                add(f"h. layer {lay}: node 0 send -> node 1 accept", first(1, "accept", lay) - s0)
                add(f"h. layer {lay}: node 1 send -> node 0 accept", first(0, "accept", lay) - s1)
                t = first(1, "recv_ret", lay)
                add(
                    f"h. layer {lay}: node 1 waits for node 0's message",
                    t - first(1, "recv_call", lay),
                )
            s_out = first(1, "send", out_layer)
            p_out = first(1, "paced", None, s_out)
            a_out = first(0, "accept", out_layer)
            rr = first(0, "recv_ret", out_layer)
            e0, ie = first(0, "run_end"), first(0, "infer_end")
            add("i. node 1: compute after the last exchange", s_out - t)
            add("j. output: send -> leaves the link shaper", p_out - s_out)
            add("k. output: shaper -> accepted by node 0 (gRPC hop)", a_out - p_out)
            add("l. node 0: accepted -> its recv returns", rr - a_out)
            add("m. node 0: output assembled -> run_node returns -> Infer returns", ie - rr)
            add("n. Infer returns -> caller has the reply", ce - ie)
            add("node 1: run_node total", first(1, "run_end") - r1)
            add("node 0: run_node total", e0 - r0)
            add("total (caller)", ce - cs)
            for k in range(2):
                for w, lay, t_s in ev[k]:
                    if w == "send":
                        add(f"node {k}: Transport.send call", first(k, "send_ret", lay, t_s) - t_s)
        except LookupError:
            continue
    return {k: statistics.median(v) for k, v in rows.items()}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-wrapped":
        _serve_wrapped(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", help="an exported 2-node plan directory")
    ap.add_argument("--link-mbps", type=float, default=1000.0)
    ap.add_argument("--link-rtt-ms", type=float, default=0.5)
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from disco_fl.demo import free_ports
    from disco_fl.plan import Plan
    from disco_fl.serving import InferenceSession

    torch.manual_seed(0)
    program = Plan.load(Path(args.plan) / "plan.json").program
    x = torch.randn(64, *program.infos[program.ops[0].name].shape[1:])  # values do not matter
    work = Path(tempfile.mkdtemp())
    addrs = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for k in range(2):
        cmd = [
            sys.executable,
            __file__,
            "--serve-wrapped",
            str(work / f"events{k}.json"),
            "serve",
            args.plan,
            "--node",
            str(k),
            "--peers",
            ",".join(addrs),
            "--threads",
            "1",
            "--deadline",
            "60",
            "--link-mbps",
            str(args.link_mbps),
            "--link-rtt-ms",
            str(args.link_rtt_ms),
            "--ready-file",
            str(work / f"ready{k}"),
        ]
        with open(work / f"node{k}.log", "ab") as log:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        deadline = time.monotonic() + 120
        for k in range(2):
            while not (work / f"ready{k}").exists():
                if procs[k].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"node {k} did not start: {work / f'node{k}.log'}")
                time.sleep(0.1)
        client: list[tuple[float, float]] = []
        with InferenceSession(addrs[0], timeout=120) as s:
            for i in range(10):
                s.infer(x[i : i + 1])
            for i in range(args.requests):
                t0 = time.monotonic()
                s.infer(x[i % 64 : i % 64 + 1])
                client.append((t0, time.monotonic()))
        for p in procs:
            p.send_signal(signal.SIGUSR2)
        for k in range(2):
            while not (work / f"events{k}.json").exists():
                time.sleep(0.05)
        time.sleep(0.2)
        nodes = [json.loads((work / f"events{k}.json").read_text()) for k in range(2)]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    stages = _analyze(client, nodes)
    for stage, ms in stages.items():
        print(f"{stage:78s} {ms:7.3f} ms")
    if args.json:
        out = {"plan": args.plan, "link_mbps": args.link_mbps, "link_rtt_ms": args.link_rtt_ms}
        Path(args.json).write_text(json.dumps({**out, "median_ms": stages}, indent=1))


if __name__ == "__main__":
    main()
