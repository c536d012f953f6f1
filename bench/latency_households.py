"""The same plan in several fresh households: does a household keep a state of its own?

A diagnostic for ``bench/latency.py``, each of whose rows starts one household and samples
whatever state it settles in once. This script starts ``--households`` households one after
the other for an exported plan (``bench/latency.py``'s ``Household``: ``disco-fl serve``
processes on loopback, one torch thread each, the same link emulation and options), sends
``--requests`` single-image requests to each after 5 warm-ups, and prints per household node
0's median time (``InferReply.server_ms``, the column the bars are read on), its 10th and 90th
percentiles and the medians of its four quarters. Households whose medians differ by more than
each one's own 10-90 spread hold different states.

Found with it (session 13, BENCHMARKS.md "A bias in the link emulation"): at d6f8838 one of
six households of the dense TP plan at 1 Gbit/s answered in 8.90 ms and five in 11.49-13.26 ms,
each steady within itself; the fast one's node had learnt a delivery-timer lateness from a
timer that ran late and delivered frames early. After the fix (02e2262) eight households
answered in 11.71-11.97 ms.

Usage::

    python bench/latency.py --quick --keep-plans /tmp/plans --json out.json
    python bench/latency_households.py /tmp/plans/n2_dense --households 6 --requests 80
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import Household  # noqa: E402 - bench/ is a folder of scripts

from disco_fl.partition.plan import Plan  # noqa: E402
from disco_fl.runtime.serving import InferenceSession  # noqa: E402


def household_times(
    plan: Path, n: int, link: tuple[float, float], extra: list[str], requests: int
) -> list[float]:
    """Node 0's time (ms) of ``requests`` single-image requests to one fresh household."""
    program = Plan.load(plan / "plan.json").program
    torch.manual_seed(0)
    x = torch.randn(64, *program.infos[program.ops[0].name].shape[1:])  # values do not matter
    with tempfile.TemporaryDirectory() as work:
        hh = Household(plan, n, link, Path(work), extra=extra)
        try:
            with InferenceSession(hh.addrs[0], timeout=60) as s:
                for i in range(5):  # warm-up: connections, allocator, first-call overheads
                    s.infer(x[i : i + 1])
                out = []
                for i in range(requests):
                    s.infer(x[i % len(x) : i % len(x) + 1])
                    out.append(float(s.last_server_ms or 0.0))
                return out
        finally:
            hh.stop()


def summary(times: list[float]) -> dict[str, Any]:
    p10, p90 = np.percentile(times, [10, 90])
    return {
        "median_ms": statistics.median(times),
        "p10_ms": float(p10),
        "p90_ms": float(p90),
        "quarters_ms": [float(np.median(q)) for q in np.array_split(np.asarray(times), 4)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", help="an exported plan directory")
    ap.add_argument("--households", type=int, default=6)
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--link-mbps", type=float, default=1000.0)
    ap.add_argument("--link-rtt-ms", type=float, default=0.5)
    ap.add_argument("--data-path", default="socket", choices=["grpc", "socket"])
    ap.add_argument("--busy-poll-us", type=float, default=1000.0, help="disco-fl serve's")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.households < 1 or args.requests < 4:
        ap.error("--households must be >= 1 and --requests >= 4")
    plan = Path(args.plan)
    n = Plan.load(plan / "plan.json").num_nodes
    extra = ["--data-path", args.data_path, "--busy-poll-us", str(args.busy_poll_us)]
    link = (args.link_mbps, args.link_rtt_ms)
    rows = []
    for h in range(args.households):
        r = summary(household_times(plan, n, link, extra, args.requests))
        rows.append(r)
        print(
            f"household {h}: median {r['median_ms']:.2f} ms, p10 {r['p10_ms']:.2f}, "
            f"p90 {r['p90_ms']:.2f}, quarters " + " ".join(f"{q:.2f}" for q in r["quarters_ms"]),
            flush=True,
        )
    medians = [r["median_ms"] for r in rows]
    print(f"medians over households: {min(medians):.2f}-{max(medians):.2f} ms")
    if args.json:
        out = {
            "plan": str(plan),
            "num_nodes": n,
            "link_mbps": args.link_mbps,
            "link_rtt_ms": args.link_rtt_ms,
            "data_path": args.data_path,
            "busy_poll_us": args.busy_poll_us,
            "requests": args.requests,
            "households": rows,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
