"""What a wait between a node's compute stretches costs the computation after it.

A node's program computes in short stretches between the frames it waits for. This diagnostic
runs one node's program of an exported plan (``disco_fl.node.drive``, in this process, one torch
thread), answering each of its receives with the message the other nodes computed (recorded
beforehand in lock step), and times the node's own computation -- the wait at each receive is
not counted -- when each receive:

- ``none``: is answered at once;
- ``sleep``: first waits ``--wait-ms`` asleep (``select`` with a timeout, as an event loop waits);
- ``poll``: first waits ``--wait-ms`` polling (``select`` with timeout 0 in a loop, as
  ``disco-fl serve --busy-poll-us`` does);
- ``spin``: first waits ``--wait-ms`` spinning on the clock (no system call).

``sleep`` slower than ``none``: a node that waits between stretches pays for it in the
computation after each wait, beyond the wait (cold caches; on a virtual machine, a virtual CPU
the host gave to others); ``poll`` and ``spin`` show how much of that busy polling, and a wait
without system calls, keep. Rounds alternate the modes; medians over all rounds.

Usage::

    python bench/latency.py --quick --keep-plans /tmp/plans --json /tmp/lat.json
    python bench/wake_penalty.py /tmp/plans/n2_b0.05_sNone --node 1 --json wake.json
"""

from __future__ import annotations

import argparse
import json
import select
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from disco_fl.emulation.export import ExportedShard, load_shard
from disco_fl.node import Executor, Recv, Send, drive
from disco_fl.partition.plan import Plan
from disco_fl.runtime.inference import node_schedule


def recorded_messages(nodes: list[ExportedShard], x: torch.Tensor) -> list[list[torch.Tensor]]:
    """Every node's received messages, in the order its program receives them (lock step)."""
    program = nodes[0].program
    runs = [
        drive(node_schedule(n), Executor(program, n, overlap=True), x, turn_after=None)
        for n in nodes
    ]
    mail: dict[tuple[int, int, int], torch.Tensor] = {}
    got: list[list[torch.Tensor]] = [[] for _ in nodes]
    want: list[Any] = [None] * len(nodes)
    running = set(range(len(nodes)))
    while running:
        for k in sorted(running):
            reply = None
            if isinstance(want[k], Recv):
                key = (want[k].step.layer, want[k].src, k)
                if key not in mail:
                    continue
                reply = mail.pop(key)
                got[k].append(reply)
            try:
                ev = runs[k].send(reply) if want[k] is not None else next(runs[k])
                while not isinstance(ev, Recv):
                    if isinstance(ev, Send):
                        mail[(ev.step.layer, k, ev.dest)] = ev.tensor
                    ev = next(runs[k])
                want[k] = ev
            except StopIteration:
                running.discard(k)
    return got


def _poll(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        select.select([], [], [], 0)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def compute_ms(node: ExportedShard, x: torch.Tensor, msgs: list[torch.Tensor], mode: str,
               wait_s: float) -> tuple[float, int]:  # fmt: skip
    """The node's computation (ms, waits excluded) and its number of receives."""
    run = drive(node_schedule(node), Executor(node.program, node, overlap=True), x, turn_after=None)
    answers = iter(msgs)
    busy = 0.0
    receives = 0
    t = time.perf_counter()
    try:
        ev = next(run)
        while True:
            if isinstance(ev, Recv):
                busy += time.perf_counter() - t
                receives += 1
                if mode == "sleep":
                    select.select([], [], [], wait_s)
                elif mode == "poll":
                    _poll(wait_s)
                elif mode == "spin":
                    _spin(wait_s)
                t = time.perf_counter()
                ev = run.send(next(answers))
            else:
                ev = next(run)
    except StopIteration:
        busy += time.perf_counter() - t
    return busy * 1e3, receives


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan_dir", type=Path, help="an exported plan (plan.json and node_*.pt)")
    ap.add_argument("--node", type=int, default=1)
    ap.add_argument("--wait-ms", type=float, default=0.3)
    ap.add_argument("--inputs", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    plan = args.plan_dir / "plan.json"
    n = Plan.load(plan).num_nodes
    nodes = [load_shard(plan, k) for k in range(n)]
    shape = nodes[0].program.infos[nodes[0].program.ops[0].name].shape
    xs = torch.randn(args.inputs, *shape[1:], generator=torch.Generator().manual_seed(0))
    node = nodes[args.node]
    modes = ("none", "sleep", "poll", "spin")
    times: dict[str, list[float]] = {m: [] for m in modes}
    receives = 0
    t_start = time.time()
    with torch.inference_mode():
        msgs = [recorded_messages(nodes, xs[i : i + 1])[args.node] for i in range(args.inputs)]
        for _ in range(args.rounds):
            for mode in modes:
                for i in range(args.inputs):
                    ms, receives = compute_ms(
                        node, xs[i : i + 1], msgs[i], mode, args.wait_ms / 1e3
                    )
                    times[mode].append(ms)
    med = {m: statistics.median(v) for m, v in times.items()}
    for m in modes:
        print(f"{m:>5}: node {args.node} computes {med[m]:.3f} ms per request "
              f"({receives} receives, {args.wait_ms:g} ms wait at each)")  # fmt: skip
    print(", ".join(f"{m} / none {med[m] / med['none']:.2f}x" for m in modes[1:]))
    if args.json:
        out = {
            "compute_ms_median": med,
            **{f"{m}_over_none": med[m] / med["none"] for m in modes[1:]},
            "receives": receives,
            "settings": vars(args) | {"plan_dir": str(args.plan_dir)},
            "wall_s": time.time() - t_start,
            "command": " ".join(["python", "bench/wake_penalty.py", *sys.argv[1:]]),
        }
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
