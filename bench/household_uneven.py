"""Uneven devices: a household of 2 where one node runs at half speed (issue 18).

N = 2 real ``disco-fl serve`` processes on 127.0.0.1 (1 torch thread each, the real gRPC
peer channel, no link emulation). One of them (``--throttled-node``, default 1, not the
requester) runs in a child cgroup of the cgroup-v1 ``cpu`` hierarchy with
``cpu.cfs_period_us`` = 100000 and ``cpu.cfs_quota_us`` = 50000 (``--quota`` 0.5): at most
half a CPU. The cgroup is created by this script and removed at the end, also on errors.

Capacities are MEASURED, not assumed: ``disco-fl probe --threads 1`` (a matmul + conv
GFLOP/s timing, :mod:`disco_fl.runtime.probe`) runs ``--probe-reps`` times as node 0's
process (unthrottled) and as the throttled node's process, the latter started inside the
throttled cgroup (a shell writes its own pid to ``cgroup.procs`` and then ``exec``s the probe,
so the process is throttled before it starts measuring), alternating; the median GFLOP/s per
node are the capacities of the proportional plan (``partition(..., capacities=...)``).

Two plans of the same model and weights: ``even`` slices and ``proportional`` slices, whose
shares make each node's shard compute proportional to its measured capacity (the *compute*
rule, :func:`disco_fl.emulation.balance.compute_shares`, as ``disco-fl train --slices
compute``: candidate partitions timed in this process, unthrottled, one thread, each node's
time fitted in its share, then partitions around the fitted shares timed and the measured best
kept). Both: hard masks from seeded random gate logits calibrated to ``--budget`` (default
0.1) of the dense exchange bytes and ``--max-sync-points``
(:func:`disco_fl.emulation.balance.random_plan`), no training: latency does not depend on the
trained values of weights or gates, only on the shapes and masks. The households are up at
once, and the requests alternate even / proportional (ABAB...) so that drift in the machine's
load hits both plans alike; the throttled node of every household shares the one cgroup (only
one household computes at a time). Latency: the requester node's own time per request (input
there -> output there, as ``bench/latency.py``'s ``latency_ms_median``); the caller's round trip
is kept too.

``--sweep 0.56,0.6,...`` (a diagnostic) adds one plan per listed share of node 0
(``partition(..., capacities=[s, 1 - s])``): where the fastest split lies on this machine,
whatever the rule. ``--channels`` (a diagnostic) adds a third plan and household: channel shares
proportional to the capacities (the *channels* rule, ``partition(..., capacities=...)`` alone,
the default of ``disco-fl train --capacities``). Under a sparse plan it overloads the fast node
(its compute grows faster than its share). The requests then go ABCABC... ``--period-us``:
the CFS period of the quota (default 100 ms).

Diagnostics: each plan's per-node compute (ms, unthrottled, in this process, 1 thread: the
shard programs without communication, :func:`disco_fl.emulation.balance.shard_compute_ms`),
the cgroup's ``cpu.stat`` (throttled periods) over the measurement, ``os.getloadavg()`` at
start and end, and the largest difference between each household's output and the shard-only
execution of its plan in this process.

Usage::

    python bench/household_uneven.py --channels --json bench/results_household_uneven.json
    python bench/household_uneven.py --model resnet --px 16 --batch 1 --reps 2 --json t.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import signal
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
from disco_fl.emulation.balance import compute_shares, random_plan, shard_compute_ms
from disco_fl.emulation.capacity import channel_shares
from disco_fl.emulation.export import load_shard, run_shards
from disco_fl.models import build_model
from disco_fl.runtime.serving import InferenceSession

CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
BAR = 1.3  # issue 18: proportional at least 1.3x faster than even
MODELS: dict[str, dict[str, Any]] = {
    # ResNet-18 widths with the small-image stem (no downsampling stem): compute-bound
    "resnet18": {"num_classes": 10, "small_input": True},
    "resnet50": {"num_classes": 10},
    "resnet": {"in_channels": 3},  # the small benchmark ResNet (widths 32/64/128): tests
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Throttle:
    """A child cgroup of the v1 ``cpu`` hierarchy with a CFS quota; removed by :meth:`close`."""

    def __init__(self, quota: float, period_us: int = PERIOD_US, root: Path = CGROUP_ROOT) -> None:
        self.path = root / f"disco_uneven_{os.getpid()}"
        self.root = root
        self.path.mkdir()
        try:
            (self.path / "cpu.cfs_period_us").write_text(str(period_us))
            (self.path / "cpu.cfs_quota_us").write_text(str(int(quota * period_us)))
        except OSError:
            self.close()
            raise

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside the cgroup from its first instruction: the shell moves itself
        into the cgroup, then ``exec``s the command (same pid)."""
        procs = shlex.quote(str(self.path / "cgroup.procs"))
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def stat(self) -> dict[str, int]:
        try:
            lines = (self.path / "cpu.stat").read_text().split("\n")
        except OSError:
            return {}
        return {k: int(v) for k, v in (ln.split() for ln in lines if ln.strip())}

    def close(self) -> None:
        """Move any process left back to the root cgroup, then remove the cgroup."""
        if not self.path.exists():
            return
        for pid in self.pids():
            with contextlib.suppress(OSError):
                (self.root / "cgroup.procs").write_text(str(pid))
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        log(f"could not remove the cgroup {self.path}")


def cgroup_problem(root: Path = CGROUP_ROOT) -> str | None:
    """Why a CPU quota cannot be set here, or None."""
    if not (root / "cpu.cfs_quota_us").exists():
        return f"{root} is not a cgroup-v1 cpu hierarchy"
    if not os.access(root, os.W_OK) and os.geteuid() != 0:
        return f"{root} is not writable (not root)"
    probe = root / f"disco_uneven_check_{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        return f"cannot create a child cgroup under {root}: {e}"
    return None


def run_probe(seconds: float, throttle: Throttle | None, out: Path) -> dict[str, Any]:
    """``disco-fl probe --threads 1`` in its own process (inside ``throttle`` if given)."""
    cmd = [
        sys.executable,
        "-m",
        "disco_fl.cli.main",
        "probe",
        "--threads",
        "1",
        "--seconds",
        str(seconds),
        "--json",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        throttle.wrap(cmd) if throttle else cmd, check=True, env=env, capture_output=True
    )
    compute: dict[str, Any] = json.loads(out.read_text())["compute"]
    return compute


def export_plan(
    model: torch.nn.Module,
    x: torch.Tensor,
    capacities: list[float] | None,
    *,
    budget: float,
    seed: int,
    out: Path,
    max_sync_points: int | None = None,
) -> dict[str, Any]:
    """Partition (even or by ``capacities``), random gate logits calibrated to ``budget``
    (:func:`disco_fl.emulation.balance.random_plan`), export."""
    pm, fraction = random_plan(model, 2, x, capacities, budget, max_sync_points, seed=seed)
    pm.export(out)
    rep = pm.comm_report()
    return {
        "dir": out,
        "fraction": fraction,
        "channel_shares": channel_shares(pm.program),
        "bytes_per_sample": rep.bytes_per_sample,
        "sync_points": rep.sync_points,
        "requester": pm.program.requester,
    }


class Household:
    """2 ``disco-fl serve`` processes on loopback; node ``throttled`` inside ``throttle``."""

    def __init__(
        self,
        plan_dir: Path,
        work: Path,
        name: str,
        batch: int,
        throttle: Throttle | None,
        throttled: int,
        ports: list[int],
    ) -> None:
        self.addrs = [f"127.0.0.1:{p}" for p in ports]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ready = [work / f"{name}_ready{k}" for k in range(2)]
        self.logs = [work / f"{name}_node{k}.log" for k in range(2)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for k in range(2):
            cmd = [
                sys.executable,
                "-m",
                "disco_fl.cli.main",
                "serve",
                str(plan_dir),
                "--node",
                str(k),
                "--peers",
                ",".join(self.addrs),
                "--threads",
                "1",
                "--deadline",
                "120",
                "--chunk-batch",
                str(batch),  # one session per request, whatever its size
                "--ready-file",
                str(self.ready[k]),
            ]
            if throttle is not None and k == throttled:
                cmd = throttle.wrap(cmd)
            with open(self.logs[k], "ab") as out:
                self.procs.append(
                    subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
                )

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        for k in range(2):
            while not self.ready[k].exists():
                if self.procs[k].poll() is not None or time.monotonic() > deadline:
                    tails = [
                        f"--- node {j} ---\n{f.read_text()[-1500:] if f.exists() else ''}"
                        for j, f in enumerate(self.logs)
                    ]
                    raise RuntimeError(f"node {k} did not start:\n" + "\n".join(tails))
                time.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| slices | capacities | channel shares | latency ms (median) | caller ms (median) "
        "| node compute ms, unthrottled (diag.) |\n|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['slices']} | {' : '.join(f'{c:.2f}' for c in r['capacities'])} "
        f"| {' / '.join(f'{s:.3f}' for s in r['channel_shares'])} "
        f"| {r['latency_ms_median']:.1f} | {r['latency_rpc_ms_median']:.1f} "
        f"| {' / '.join(f'{v:.1f}' for v in r['node_compute_ms'])} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", required=True, help="write the rows and settings here")
    ap.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    ap.add_argument("--px", type=int, default=112, help="image side (3 channels)")
    ap.add_argument("--batch", type=int, default=8, help="images per request")
    ap.add_argument("--reps", type=int, default=20, help="timed requests per plan")
    ap.add_argument("--warmup", type=int, default=3, help="untimed requests per plan")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument(
        "--max-sync-points", type=int, default=None, help="the plans' sync-point limit (none)"
    )
    ap.add_argument("--quota", type=float, default=0.5, help="CPU quota of the throttled node")
    ap.add_argument(
        "--period-us", type=int, default=PERIOD_US, help="the CFS period of the quota (us)"
    )
    ap.add_argument("--throttled-node", type=int, default=1, choices=[0, 1])
    ap.add_argument("--probe-seconds", type=float, default=2.0)
    ap.add_argument("--probe-reps", type=int, default=3, help="probes per node (median)")
    ap.add_argument("--compute-reps", type=int, default=3, help="diagnostic compute timings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--channels",
        action="store_true",
        help="diagnostic third plan: channel shares proportional to the capacities (the "
        "channels rule, partition(..., capacities=...) alone)",
    )
    ap.add_argument(
        "--sweep",
        default="",
        help="diagnostic plans at fixed shares of node 0, comma-separated (e.g. 0.56,0.6,0.64): "
        "where the best split lies on this machine, whatever the rule",
    )
    args = ap.parse_args(argv)
    sweep = [float(v) for v in args.sweep.split(",") if v.strip()]
    if any(not 0.0 < v < 1.0 for v in sweep):
        ap.error("--sweep shares must be in (0, 1)")
    tune_heap()  # as the disco-fl processes it compares with (disco_fl.core.heap)
    if not 0.0 < args.quota <= 1.0:
        ap.error("--quota must be in (0, 1]")
    t_start = time.time()
    load_start = os.getloadavg()
    torch.set_num_threads(1)
    tk = args.throttled_node
    skipped = cgroup_problem()
    throttle: Throttle | None = None
    result: dict[str, Any] = {
        "command": " ".join(["python", "bench/household_uneven.py", *(argv or sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "loadavg_start": list(load_start),
        "cgroup": None,
        "cgroup_skipped": skipped,
    }
    households: list[Household] = []
    try:
        if skipped is None:
            throttle = Throttle(args.quota, args.period_us)
            result["cgroup"] = {
                "path": str(throttle.path),
                "cpu.cfs_period_us": args.period_us,
                "cpu.cfs_quota_us": int(args.quota * args.period_us),
            }
            log(f"throttled node {tk}: {throttle.path}, quota {args.quota} of one CPU")
        else:
            log(f"NO THROTTLE (cgroup part skipped): {skipped}")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            # 1. capacities, measured: each node's probe in its own process, alternating
            probes: list[list[dict[str, Any]]] = [[], []]
            for i in range(args.probe_reps):
                for k in range(2):
                    th = throttle if k == tk else None
                    probes[k].append(run_probe(args.probe_seconds, th, work / f"p{k}_{i}.json"))
            caps = [statistics.median(p["gflops"] for p in probes[k]) for k in range(2)]
            result["probe"] = {
                "how": "disco-fl probe --threads 1 --seconds "
                f"{args.probe_seconds}, {args.probe_reps} runs per node alternating, median "
                f"GFLOP/s; node {tk}'s probe process ran inside the throttled cgroup"
                + ("" if throttle else " (skipped: no cgroup)"),
                "gflops": [[p["gflops"] for p in probes[k]] for k in range(2)],
                "capacities": caps,
            }
            log(f"measured capacities (GFLOP/s): {caps[0]:.2f} : {caps[1]:.2f}")
            # 2. the two plans of one model
            torch.manual_seed(args.seed)
            model = build_model(args.model, **MODELS[args.model]).eval()
            gen = torch.Generator().manual_seed(args.seed + 1)
            x = torch.randn(args.batch, 3, args.px, args.px, generator=gen)
            mk = functools.partial(
                export_plan,
                model,
                x,
                budget=args.budget,
                seed=args.seed + 2,
                max_sync_points=args.max_sync_points,
            )
            shares, trials = compute_shares(
                model,
                2,
                x,
                caps,
                args.budget,
                args.max_sync_points,
                reps=args.compute_reps,
                seed=args.seed + 2,
                log=log,
            )
            result["compute_shares_samples"] = trials
            plans = {
                "even": mk(None, out=work / "even"),
                "proportional": mk(list(shares), out=work / "proportional"),
            }
            plans["even"]["capacities"] = [1.0, 1.0]
            plans["proportional"]["capacities"] = caps
            if args.channels:
                plans["proportional_channels"] = mk(caps, out=work / "channels")
                plans["proportional_channels"]["capacities"] = caps
            for v in sweep:
                plans[f"share_{v:g}"] = mk([v, 1.0 - v], out=work / f"share_{v:g}")
                plans[f"share_{v:g}"]["capacities"] = [v, 1.0 - v]
            for name, p in plans.items():
                nodes = [load_shard(p["dir"] / "plan.json", k) for k in (0, 1)]
                p["node_compute_ms"] = shard_compute_ms(nodes, x, args.compute_reps)
                log(
                    f"{name}: shares {p['channel_shares']}, {p['fraction']:.3f} of dense bytes, "
                    f"node compute (unthrottled) {p['node_compute_ms']}"
                )
            # 3. the households up at once, requests alternating
            ports = free_ports(2 * len(plans))  # one call: no port handed out twice
            for i, (name, p) in enumerate(plans.items()):
                hh = Household(
                    p["dir"], work, name, args.batch, throttle, tk, ports[2 * i : 2 * i + 2]
                )
                households.append(hh)
            for hh in households:
                hh.wait_ready()
            sessions = {
                name: InferenceSession(hh.addrs[plans[name]["requester"]], timeout=300)
                for name, hh in zip(plans, households, strict=True)
            }
            diffs: dict[str, float] = {}
            for name, s in sessions.items():
                ref = run_shards(
                    [load_shard(plans[name]["dir"] / "plan.json", k) for k in (0, 1)], x
                )
                for _ in range(args.warmup):
                    y = s.infer(x)
                diffs[name] = float((y - ref).abs().max())
            times: dict[str, list[float]] = {name: [] for name in plans}
            rpc: dict[str, list[float]] = {name: [] for name in plans}
            stat_before = throttle.stat() if throttle else {}
            for _ in range(args.reps):
                for name, s in sessions.items():  # ABAB...
                    t0 = time.perf_counter()
                    s.infer(x)
                    rpc[name].append((time.perf_counter() - t0) * 1e3)
                    times[name].append(float(s.last_server_ms or 0.0))
            stat_after = throttle.stat() if throttle else {}
            for s in sessions.values():
                s.close()
    finally:
        for hh in households:
            hh.stop()
        if throttle is not None:
            throttle.close()
            result["cgroup"]["removed"] = not throttle.path.exists()
    rows = []
    for name, p in plans.items():
        rows.append(
            {
                "slices": name,
                "capacities": p["capacities"],
                "channel_shares": p["channel_shares"],
                "latency_ms_median": statistics.median(times[name]),
                "latency_ms_all": times[name],
                "latency_rpc_ms_median": statistics.median(rpc[name]),
                "latency_rpc_ms_all": rpc[name],
                "throttled_node": tk,
                "quota": args.quota if throttle else None,
                "model": args.model,
                "input": [args.batch, 3, args.px, args.px],
                "budget": args.budget,
                "bytes_fraction_of_dense": p["fraction"],
                "bytes_per_sample": p["bytes_per_sample"],
                "sync_points": p["sync_points"],
                "node_compute_ms": p["node_compute_ms"],
                "max_abs_diff_vs_shards": diffs[name],
            }
        )
    ratio = rows[0]["latency_ms_median"] / rows[1]["latency_ms_median"]
    if throttle is not None:
        result["cgroup"]["cpu_stat_during_requests"] = {
            k: stat_after.get(k, 0) - v for k, v in stat_before.items()
        }
    result.update(
        rows=rows,
        ratio_even_over_proportional=ratio,
        **(
            {
                "ratio_even_over_proportional_channels": rows[0]["latency_ms_median"]
                / rows[2]["latency_ms_median"]
            }
            if args.channels
            else {}
        ),
        ratio_even_over={
            r["slices"]: rows[0]["latency_ms_median"] / r["latency_ms_median"] for r in rows[1:]
        },
        bar={"proportional_speedup_at_least": BAR, "met": ratio >= BAR},
        loadavg_end=list(os.getloadavg()),
        wall_s=time.time() - t_start,
    )
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown_table(rows))
    print(
        f"even / proportional = {ratio:.2f}x (bar {BAR}x: {'met' if ratio >= BAR else 'NOT met'})"
        f"; loadavg {load_start[0]:.2f} -> {result['loadavg_end'][0]:.2f}"
        + ("" if throttle else f"; NO THROTTLE: {skipped}")
    )
    for name, r in result["ratio_even_over"].items():
        if name != "proportional":
            print(f"even / {name} (diagnostic) = {r:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
