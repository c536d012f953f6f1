"""Page faults under the tensors: glibc's default heap vs :func:`disco_fl.core.heap.tune_heap`.

Model: ResNet-18 widths with the small-image stem (``resnet18(num_classes=10,
small_input=True)``, random weights), requests of ``--batch`` images of 3 x ``--px`` x ``--px``,
N = 2 with hard masks from seeded random gate logits at budget 0.01 and 2 sync points (as
``bench/household_uneven.py``). Two measurements, each per run or request, from the kernel's
counters (``getrusage`` / ``/proc/<pid>/task/*/stat``: minor faults, user and system CPU time;
counts, not wall times, so a busy machine moves them little):

1. ``in_process``: both shard programs in one process (``run_shards``, one thread), ``--runs``
   runs after two warm-ups, in a fresh process with glibc's defaults and in one with
   ``tune_heap()``;
2. ``serving``: two ``disco-fl serve`` processes, the requests 0.1 s apart (back to back) and
   1.0 s apart (longer than the idle trim's 0.5 s: the node gives memory back between
   requests unless it is what a lone request needs); per node, the faults and CPU time of its
   threads per request. Twice: ``tuned`` (as every ``disco-fl`` command is) and ``default``
   (the nodes started with ``MALLOC_ARENA_MAX=16``, glibc's own default on 2 cores, in their
   environment, so ``tune_heap`` leaves glibc as it is: the serving before the tuning).

Usage::

    python bench/heap_faults.py --json bench/results_heap_faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from disco_fl.cli.demo import free_ports
from disco_fl.core.heap import tune_heap
from disco_fl.emulation.balance import random_plan
from disco_fl.emulation.export import load_shard, run_shards
from disco_fl.models import build_model
from disco_fl.runtime.serving import InferenceSession

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def export(work: Path, batch: int, px: int) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, small_input=True).eval()
    x = torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(1))
    pm, _ = random_plan(model, 2, x, None, 0.01, 2, seed=2)
    pm.export(work / "plan")
    torch.save(x, work / "x.pt")
    return work / "plan"


def in_process(work: Path, runs: int, tuned: bool) -> dict[str, Any]:
    """Child process: ``runs`` runs of both shard programs, per-run counters."""
    if tuned:
        tune_heap()
    torch.set_num_threads(1)
    nodes = [load_shard(work / "plan" / "plan.json", k) for k in (0, 1)]
    x = torch.load(work / "x.pt")
    for _ in range(2):
        run_shards(nodes, x)
    rows = []
    for _ in range(runs):
        a = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        run_shards(nodes, x)
        wall = time.perf_counter() - t0
        b = resource.getrusage(resource.RUSAGE_SELF)
        rows.append(
            {
                "minor_faults": b.ru_minflt - a.ru_minflt,
                "user_ms": 1e3 * (b.ru_utime - a.ru_utime),
                "sys_ms": 1e3 * (b.ru_stime - a.ru_stime),
                "wall_ms": 1e3 * wall,
            }
        )
    return {"tuned": tuned, "runs": rows, "median": _median(rows)}


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _counters(pid: int) -> tuple[int, float, float]:
    """Minor faults, user s, system s of all threads of ``pid``."""
    tick = os.sysconf("SC_CLK_TCK")
    f = (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]).split()
    return int(f[7]), int(f[11]) / tick, int(f[12]) / tick


def serving(work: Path, requests: int, gap: float, heap: str) -> dict[str, Any]:
    env = dict(ENV, MALLOC_ARENA_MAX=str(8 * (os.cpu_count() or 1))) if heap == "default" else ENV
    ports = free_ports(2)
    addrs = ",".join(f"127.0.0.1:{p}" for p in ports)
    procs = []
    for k in (0, 1):
        ready = work / f"ready{k}_{gap}_{heap}"
        cmd = [sys.executable, "-m", "disco_fl.cli.main", "serve", str(work / "plan"),
               "--node", str(k), "--peers", addrs, "--threads", "1", "--deadline", "300",
               "--chunk-batch", "4096", "--ready-file", str(ready)]  # fmt: skip
        out = subprocess.DEVNULL
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 180
        while not all((work / f"ready{k}_{gap}_{heap}").exists() for k in (0, 1)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("the serving nodes did not start")
            time.sleep(0.1)
        x = torch.load(work / "x.pt")
        rows: list[list[dict[str, float]]] = [[], []]
        server_ms: list[float] = []
        with InferenceSession(f"127.0.0.1:{ports[0]}", timeout=300) as s:
            for _ in range(2):
                s.infer(x)
            for _ in range(requests):
                time.sleep(gap)
                before = [_counters(p.pid) for p in procs]
                s.infer(x)
                server_ms.append(float(s.last_server_ms or 0.0))
                after = [_counters(p.pid) for p in procs]
                for k in (0, 1):
                    rows[k].append(
                        {
                            "minor_faults": after[k][0] - before[k][0],
                            "user_ms": 1e3 * (after[k][1] - before[k][1]),
                            "sys_ms": 1e3 * (after[k][2] - before[k][2]),
                        }
                    )
        return {
            "heap": heap,
            "gap_s": gap,
            "server_ms_median": statistics.median(server_ms),
            "nodes": [{"median": _median(r), "requests": r} for r in rows],
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--px", type=int, default=112)
    ap.add_argument("--runs", type=int, default=5, help="in-process runs per heap setting")
    ap.add_argument("--requests", type=int, default=6, help="requests per gap")
    ap.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one in-process measurement, in a fresh process
        measured = in_process(Path(args.work), args.runs, args.child == "tuned")
        Path(args.json).write_text(json.dumps(measured))
        return 0
    out: dict[str, Any] = {
        "command": " ".join(["python", "bench/heap_faults.py", *(argv or sys.argv[1:])]),
        "loadavg_start": list(os.getloadavg()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export(work, args.batch, args.px)
        out["in_process"] = {}
        for mode in ("default", "tuned"):
            res = work / f"{mode}.json"
            subprocess.run(
                [sys.executable, __file__, "--child", mode, "--work", str(work),
                 "--runs", str(args.runs), "--json", str(res)],
                env=ENV, check=True,
            )  # fmt: skip
            out["in_process"][mode] = json.loads(res.read_text())
            print(mode, out["in_process"][mode]["median"], flush=True)
        out["serving"] = []
        for heap in ("default", "tuned"):
            for gap in (0.1, 1.0):
                r = serving(work, args.requests, gap, heap)
                out["serving"].append(r)
                print(f"{heap}, gap {gap} s:", [n["median"] for n in r["nodes"]], flush=True)
    out["loadavg_end"] = list(os.getloadavg())
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
