"""Where the time of one batch-1 request goes: a timeline across the caller and two nodes.

A diagnostic for ``bench/latency.py``. Starts two ``disco-fl serve`` processes for an exported
2-node plan (as ``bench/latency.py`` does, same link emulation), each wrapped by this script
so that it records timestamps (``time.monotonic``: one clock for all processes of a machine,
and the clock of the transport's event loop) when, on the node's asyncio I/O loop:

- the ``Infer`` handler (a coroutine) starts and ends, ``run_node_async`` starts and ends;
- a frame is handed to ``Transport.send`` (and when that returns: the frame is only queued
  for the link's writer task, which hands it to gRPC when the loop next runs);
- a frame reaches the receiving node over loopback (``GrpcTransport._arrived``, called by the
  ``Exchange`` handler), and when the emulated link is due to deliver it (the time the link
  shape computes: RTT/2 + framed bytes / rate after the link is free);
- the emulated link delivers the frame into the mailbox (``Transport._accept``, run by a
  ``loop.call_at`` timer; at once without a link shape);
- a session starts on node 1 (``NodeServer._start_session``, from ``_accept`` of the INPUT
  frame) and a ``recv_async`` call starts and returns.

Every event carries its frame's layer and session id, so each request's events are picked by
session. The caller times its own calls. Prints the median of every stage of the requests
(node 0 is the requester). The lettered stages follow the critical path -- the call, the
input hop, node 1's timeline (its compute and, at each exchange, the wait for node 0's
frame), the output hop and the reply -- and add up to the caller's total for every request;
indented rows break a stage down or show the other node's side. A hop is split into
``send -> arrived`` (the software hop: the link's writer task, gRPC, loopback, the receiver's
gRPC) and ``arrived -> delivered`` (the emulated link: RTT/2 + bytes/rate, plus how late the
loop's timer fires).

``--op-times``: each node also times its ``Executor.compute`` calls (the ops; the own-channel
part an overlapped op computes while its peers' channels travel is not among them), and this
script times the same calls of each node's program run alone in this process over recorded
messages (``bench/wake_penalty.py``'s lock step, back to back, no waits): per node, the sum of
the per-op medians in the household and alone, and the ops slowed most.

Usage::

    python bench/latency.py --quick --keep-plans /tmp/plans --json out.json
    python bench/latency_timeline.py /tmp/plans/n2_b0.05_s1 --link-mbps 1000 --link-rtt-ms 0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Event = tuple[str, int, float, str]  # (what, layer, time.monotonic(), session id or "")
OP_TIMES_ENV = "DISCO_TIMELINE_OP_TIMES"  # set for the wrapped nodes by --op-times


def _time_ops(store: dict[str, list[float]]) -> None:
    """Time every ``Executor.compute`` call of this process into ``store`` (op -> ms list)."""
    import disco_fl.node.driver as drv

    compute = drv.Executor.compute

    def timed(self: Any, st: Any, xs: Any, received: Any) -> Any:
        t = time.perf_counter()
        try:
            return compute(self, st, xs, received)
        finally:
            store.setdefault(st.op.name, []).append((time.perf_counter() - t) * 1e3)

    setattr(drv.Executor, "compute", timed)  # noqa: B010 - a patch


def _ops_alone(plan: Path, xs: Any, rounds: int = 10) -> list[dict[str, float]]:
    """Per node, the median ms of each op when its program runs alone over recorded messages."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import wake_penalty

    from disco_fl.emulation.export import load_shard

    torch.set_num_threads(1)
    nodes = [load_shard(plan / "plan.json", k) for k in range(2)]
    store: dict[str, list[float]] = {}
    with torch.inference_mode():
        msgs = [wake_penalty.recorded_messages(nodes, xs[i : i + 1]) for i in range(len(xs))]
        _time_ops(store)
        out = []
        for k in range(2):
            store.clear()
            for _ in range(rounds):
                for i in range(len(xs)):
                    wake_penalty.compute_ms(nodes[k], xs[i : i + 1], msgs[i][k], "none", 0.0)
            out.append({op: statistics.median(v) for op, v in store.items()})
    return out


_Tag = Callable[[tuple[Any, ...], dict[str, Any]], tuple[int, str]]  # args -> (layer, session)


def _frame_tag(a: tuple[Any, ...], k: dict[str, Any]) -> tuple[int, str]:
    """(layer, session) of a method's first argument after ``self``: a frame."""
    frame = a[1] if len(a) > 1 else k["frame"]
    return int(frame.layer), str(frame.session_id)


def _recv_tag(a: tuple[Any, ...], k: dict[str, Any]) -> tuple[int, str]:
    """(layer, session) of ``recv_async(self, session_id, layer, src, timeout)``."""
    sid = a[1] if len(a) > 1 else k["session_id"]
    layer = a[2] if len(a) > 2 else k["layer"]
    return int(layer), str(sid)


def _session_tag(a: tuple[Any, ...], k: dict[str, Any]) -> tuple[int, str]:
    """(-1, session) of ``_start_session(self, session_id, step)``."""
    return -1, str(a[1] if len(a) > 1 else k["session_id"])


def _run_tag(a: tuple[Any, ...], k: dict[str, Any]) -> tuple[int, str]:
    """(-1, session) of ``run_node_async(node, transport, x, *, session_id=...)``."""
    return -1, str(k.get("session_id", ""))


def _no_tag(a: tuple[Any, ...], k: dict[str, Any]) -> tuple[int, str]:
    return -1, ""


def _serve_wrapped(out: str, argv: list[str]) -> None:
    """Run ``disco-fl serve`` with timestamping patches; write the events to ``out``."""
    import disco_fl.runtime.serving.node_server as ns
    import disco_fl.runtime.transport.base as base
    import disco_fl.runtime.transport.grpc_transport as gt
    import disco_fl.runtime.transport.link_emulation as le
    from disco_fl.cli.main import main

    ev: list[Event] = []
    mono = time.monotonic

    def wrap(obj: Any, name: str, before: str, after: str | None, tag: _Tag) -> None:
        orig = getattr(obj, name)

        def f(*a: Any, **k: Any) -> Any:
            layer, sid = tag(a, k)
            ev.append((before, layer, mono(), sid))
            r = orig(*a, **k)
            if after:
                ev.append((after, layer, mono(), sid))
            return r

        setattr(obj, name, f)

    def wrap_async(obj: Any, name: str, before: str, after: str, tag: _Tag) -> None:
        orig = getattr(obj, name)

        async def f(*a: Any, **k: Any) -> Any:
            layer, sid = tag(a, k)
            ev.append((before, layer, mono(), sid))
            try:
                return await orig(*a, **k)
            finally:
                ev.append((after, layer, mono(), sid))

        setattr(obj, name, f)

    # when the emulated link is due to deliver the frame that just arrived (its link clock)
    due: list[float] = []
    orig_arrival = le.LinkClock.arrival

    def arrival(self: Any, message_bytes: int, now: float, sent: float | None = None) -> float:
        at = orig_arrival(self, message_bytes, now, sent)
        due.append(at)
        return at

    orig_arrived = gt.GrpcTransport._arrived

    def arrived(self: Any, frame: Any, size: int, src: int) -> str | None:
        layer, sid = int(frame.layer), str(frame.session_id)
        ev.append(("arrived", layer, mono(), sid))
        due.clear()
        r = orig_arrived(self, frame, size, src)
        if due:
            ev.append(("due", layer, due[-1], sid))
        return r

    setattr(le.LinkClock, "arrival", arrival)  # noqa: B010 - a patch; mypy: no method-assign
    setattr(gt.GrpcTransport, "_arrived", arrived)  # noqa: B010
    wrap(base.Transport, "send", "send", "send_ret", _frame_tag)
    wrap(base.Transport, "_accept", "accept", None, _frame_tag)
    wrap(ns.NodeServer, "_start_session", "start_session", None, _session_tag)
    wrap_async(gt.GrpcTransport, "recv_async", "recv_call", "recv_ret", _recv_tag)
    wrap_async(ns.InferenceServicer, "Infer", "infer_start", "infer_end", _no_tag)
    wrap_async(ns, "run_node_async", "run_start", "run_end", _run_tag)

    def dump(*_: Any) -> None:
        from disco_fl.core.files import atomic_write_bytes

        atomic_write_bytes(out, json.dumps(list(ev)).encode())  # never half a file

    op_ms: dict[str, list[float]] = {}
    if os.environ.get(OP_TIMES_ENV):
        _time_ops(op_ms)

    def dump_all(*_: Any) -> None:
        if op_ms:
            from disco_fl.core.files import atomic_write_bytes

            medians = {op: statistics.median(v) for op, v in op_ms.items()}
            atomic_write_bytes(out + ".ops", json.dumps(medians).encode())
        dump()

    signal.signal(signal.SIGUSR2, dump_all)
    sys.argv = ["disco-fl", *argv]
    main()


SUM_KEY = "sum of the lettered (critical-path) stages"
TOTAL_KEY = "total (caller)"


def _request_rows(
    cs: float, ce: float, server_ms: float, nodes: list[list[Event]]
) -> list[tuple[str, float, bool]]:
    """One request's stages: ``(name, seconds, on the critical path)``; raises ``LookupError``
    when an event of the critical path is missing."""
    rows: list[tuple[str, float, bool]] = []
    window = [e for e in nodes[0] if cs <= e[2] <= ce]
    sid = next(e[3] for e in window if e[0] == "run_start")  # StopIteration: not found
    ev = [[e for e in evs if e[3] == sid] for evs in nodes]

    def at(k: int, what: str, layer: int | None = None, after: float = -math.inf) -> float | None:
        for w, lay, t, _ in ev[k]:
            if w == what and (layer is None or lay == layer) and t >= after:
                return t
        return None

    def must(k: int, what: str, layer: int | None = None, after: float = -math.inf) -> float:
        t = at(k, what, layer, after)
        if t is None:
            raise LookupError(f"node {k}: {what} (layer {layer})")
        return t

    def stage(name: str, a: float, b: float) -> None:
        rows.append((name, b - a, True))

    def info(name: str, a: float | None, b: float | None, indent: str = "    ") -> None:
        if a is not None and b is not None:
            rows.append((indent + name, b - a, False))

    def hop_info(what: str, k: int, layer: int, arrived: float | None) -> None:
        """The emulated link's part of a hop into node ``k``, split."""
        d = at(k, "due", layer)
        info(f"{what}: arrived -> due (emulated: RTT/2 + bytes/rate)", arrived, d)
        info(f"{what}: due -> delivered (timer lateness)", d, at(k, "accept", layer))

    i0 = next(e[2] for e in window if e[0] == "infer_start")
    ie = next(e[2] for e in window if e[0] == "infer_end")
    r0, e0 = must(0, "run_start"), must(0, "run_end")
    r1 = must(1, "run_start")
    sends1 = sorted({lay for w, lay, _, _ in ev[1] if w == "send"})
    out_layer = sends1[-1]
    s_in = must(0, "send", 0)
    arr_in, acc_in = must(1, "arrived", 0), must(1, "accept", 0)
    stage("a. caller -> node 0 Infer handler starts", cs, i0)
    stage("b. node 0: Infer handler -> run_node_async starts (decode, checks)", i0, r0)
    stage("c. node 0: input encoded + handed to Transport.send", r0, s_in)
    stage("d. input: send -> arrived at node 1 over loopback (software hop)", s_in, arr_in)
    stage(
        "e. input: arrived -> delivered by the emulated link (RTT/2 + bytes/rate + timer lateness)",
        arr_in,
        acc_in,
    )
    hop_info("input", 1, 0, arr_in)
    stage("f. node 1: delivered -> run_node_async starts (session start)", acc_in, r1)
    ss = at(1, "start_session")
    info("node 1: delivered -> _start_session called", acc_in, ss)
    info("node 1: _start_session -> run_node_async starts (task scheduled)", ss, r1)
    # node 1's timeline: compute, and at every layer it receives (after the input) its wait
    t = r1
    prev0: float | None = at(0, "send_ret", 0)  # where node 0's own compute resumes
    layers1 = sorted(
        {lay for w, lay, _, _ in ev[1] if w in ("send", "recv_ret") and 0 < lay < out_layer}
    )
    for lay in layers1:
        s1, rc1, rr1 = at(1, "send", lay), at(1, "recv_call", lay), at(1, "recv_ret", lay)
        mark = s1 if s1 is not None else rc1
        if mark is None:
            raise LookupError(f"node 1: layer {lay}")
        what = "send" if s1 is not None else "recv call"
        stage(f"g. node 1: compute up to layer {lay} (its {what})", t, mark)
        if rr1 is not None:
            stage(f"h. layer {lay}: node 1 {what} -> has node 0's frame (recv returns)", mark, rr1)
            t = rr1
        else:
            t = mark
        s0 = at(0, "send", lay)
        info(f"layer {lay}: node 0 compute up to its send (from its previous step)", prev0, s0)
        arr1 = at(1, "arrived", lay, s0 if s0 is not None else -math.inf)
        info(f"layer {lay}: node 0 send -> arrived at node 1 (software hop)", s0, arr1)
        info(
            f"layer {lay}: arrived at node 1 -> delivered (emulated link)",
            arr1,
            at(1, "accept", lay),
        )
        hop_info(f"layer {lay} at node 1", 1, lay, arr1)
        info(f"layer {lay}: node 1 recv call -> returns (its wait for node 0)", rc1, rr1)
        arr0 = at(0, "arrived", lay)
        info(f"layer {lay}: node 1 send -> arrived at node 0 (software hop)", s1, arr0)
        info(
            f"layer {lay}: arrived at node 0 -> delivered (emulated link)",
            arr0,
            at(0, "accept", lay),
        )
        hop_info(f"layer {lay} at node 0", 0, lay, arr0)
        rc0, rr0 = at(0, "recv_call", lay), at(0, "recv_ret", lay)
        info(f"layer {lay}: node 0 recv call -> returns (its wait for node 1)", rc0, rr0)
        prev0 = rr0 if rr0 is not None else (s0 if s0 is not None else prev0)
    s_out = must(1, "send", out_layer)
    arr_out, acc_out = must(0, "arrived", out_layer), must(0, "accept", out_layer)
    rr_out = must(0, "recv_ret", out_layer)
    stage("i. node 1: compute after its last wait (up to its output send)", t, s_out)
    stage("j. output: send -> arrived at node 0 over loopback (software hop)", s_out, arr_out)
    stage(
        "k. output: arrived -> delivered by the emulated link (RTT/2 + bytes/rate + timer "
        "lateness)",
        arr_out,
        acc_out,
    )
    hop_info("output", 0, out_layer, arr_out)
    stage("l. node 0: delivered -> its recv returns", acc_out, rr_out)
    rc_out = at(0, "recv_call", out_layer)
    info(
        "node 0: compute after its last exchange (up to its recv call for the output)",
        prev0,
        rc_out,
    )
    info("node 0: recv call for the output -> returns", rc_out, rr_out)
    stage("m. node 0: output received -> run_node_async returns -> Infer returns", rr_out, ie)
    info("node 0: output received -> run_node_async returns", rr_out, e0)
    info("node 0: run_node_async returns -> Infer returns (reply encoded)", e0, ie)
    stage("n. Infer returns -> caller has the reply", ie, ce)
    info("node 1: run_node_async total", r1, at(1, "run_end"), indent="")
    info("node 0: run_node_async total", r0, e0, indent="")
    rows.append(("node 0: infer_async as it reports (server_ms)", server_ms / 1e3, False))
    for k in range(2):
        for w, lay, t_s, _ in ev[k]:
            ret = at(k, "send_ret", lay, t_s) if w == "send" else None
            if ret is not None:
                rows.append((f"node {k}: Transport.send call", ret - t_s, False))
    return rows


def _analyze(
    client: list[tuple[float, float, float]], nodes: list[list[Event]]
) -> tuple[dict[str, float], int]:
    """Median ms of every stage over the requests whose critical path was found whole."""
    rows: dict[str, list[float]] = {}
    critical: list[str] = []
    done = 0
    for cs, ce, server_ms in client:
        try:
            one = _request_rows(cs, ce, server_ms, nodes)
        except (LookupError, StopIteration):
            continue
        done += 1
        for name, v, crit in one:
            if not math.isnan(v):
                rows.setdefault(name, []).append(v * 1e3)
            if crit and name not in critical:
                critical.append(name)
        rows.setdefault(TOTAL_KEY, []).append((ce - cs) * 1e3)
    if not done:
        raise RuntimeError(f"no request's critical path was found ({len(client)} requests)")
    med = {k: statistics.median(v) for k, v in rows.items() if k != TOTAL_KEY}
    med[SUM_KEY] = sum(med[k] for k in critical)
    med[TOTAL_KEY] = statistics.median(rows[TOTAL_KEY])
    return med, done


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
    ap.add_argument(
        "--data-path", default="socket", choices=["socket", "grpc"], help="disco-fl serve's"
    )
    ap.add_argument("--busy-poll-us", type=float, default=0.0, help="disco-fl serve's")
    ap.add_argument(
        "--op-times", action="store_true", help="time the ops in the household and alone"
    )
    args = ap.parse_args()
    import torch

    from disco_fl.cli.demo import free_ports
    from disco_fl.partition.plan import Plan
    from disco_fl.runtime.serving import InferenceSession

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
            "--data-path",
            args.data_path,
            "--busy-poll-us",
            str(args.busy_poll_us),
        ]
        with open(work / f"node{k}.log", "ab") as log:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if args.op_times:
                env[OP_TIMES_ENV] = "1"
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        deadline = time.monotonic() + 120
        for k in range(2):
            while not (work / f"ready{k}").exists():
                if procs[k].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"node {k} did not start: {work / f'node{k}.log'}")
                time.sleep(0.1)
        client: list[tuple[float, float, float]] = []  # (start, end, server_ms)
        with InferenceSession(addrs[0], timeout=120) as s:
            for i in range(10):
                s.infer(x[i : i + 1])
            for i in range(args.requests):
                t0 = time.monotonic()
                s.infer(x[i % 64 : i % 64 + 1])
                client.append((t0, time.monotonic(), float(s.last_server_ms or 0.0)))
        for p in procs:
            p.send_signal(signal.SIGUSR2)
        for k in range(2):
            while not (work / f"events{k}.json").exists():
                time.sleep(0.05)
        time.sleep(0.2)
        nodes = [json.loads((work / f"events{k}.json").read_text()) for k in range(2)]
        household_ops = []
        for k in range(2 if args.op_times else 0):
            ops_file = work / f"events{k}.json.ops"
            while not ops_file.exists() and time.monotonic() < deadline + 60:
                time.sleep(0.05)
            household_ops.append(json.loads(ops_file.read_text()))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    stages, done = _analyze(client, nodes)
    print(f"median over {done} of {len(client)} requests (node 0 = requester):")
    width = max(map(len, stages))
    for stage, ms in stages.items():
        print(f"{stage:{width}s} {ms:8.3f} ms")
    op_times = None
    if args.op_times:
        alone = _ops_alone(Path(args.plan), x[:20])
        op_times = {"household_ms": household_ops, "alone_ms": alone}
        for k in range(2):
            hh, al = household_ops[k], alone[k]
            print(
                f"node {k}: Executor.compute per request (sum of per-op medians): household "
                f"{sum(hh.values()):.3f} ms, alone {sum(al.values()):.3f} ms "
                f"({sum(hh.values()) / sum(al.values()):.2f}x)"
            )
            slowed = sorted(hh, key=lambda op: hh[op] - al.get(op, 0.0), reverse=True)[:6]
            print("    slowed most: " + ", ".join(
                f"{op} {al.get(op, 0.0):.3f} -> {hh[op]:.3f} ms" for op in slowed
            ))  # fmt: skip
    if args.json:
        out = {"plan": args.plan, "link_mbps": args.link_mbps, "link_rtt_ms": args.link_rtt_ms}
        out["op_times"] = op_times
        out["data_path"] = args.data_path
        out["busy_poll_us"] = args.busy_poll_us
        out["requests_analyzed"] = done
        Path(args.json).write_text(json.dumps({**out, "median_ms": stages}, indent=1))


if __name__ == "__main__":
    main()
