"""Latency and throughput of collaborative inference over emulated home links.

Model: the core benchmark's ``resnet`` (widths 32/64/128) on 28x28 MNIST images, trained dense
briefly on the 4000-image training split (latency does not depend on accuracy; the accuracy
of such plans is ``bench/comm_accuracy.py``'s subject). Modes:

- ``single``: one process running the whole model (torch, 1 thread);
- ``dense_tp``: dense tensor parallelism, i.e. the partitioned model with every gate open,
  over this runtime (N ``disco-fl serve`` processes, 1 torch thread each);
- ``disco``: plans trained to budgets 0.2, 0.1 and 0.05 (short gate training + calibration).

Links: every ordered pair of nodes gets its own emulated link (``--link-mbps``,
``--link-rtt-ms`` of ``disco-fl serve``:
:class:`disco_fl.runtime.transport.grpc_transport.LinkShape`):
frames leave in order, each occupying the link for ``framed bytes * 8 / rate``, and are
delivered half a round trip later. This shaper lives in the transport because this machine's
kernel has no ``netem``; it counts each data path's framing (the socket path's 4-byte length
prefix; on gRPC streams the gRPC message prefix and HTTP/2 frame headers), not TCP/IP headers.
The caller talks to node 0 over plain loopback (it sits on node 0's device). The nodes' frames
go on ``disco-fl serve``'s default data path, the socket one (``--data-path``: ``grpc`` for
gRPC streams, both for a comparison in one run; until session 13 the default was ``grpc``).

Per mode, link and N: the median latency of single-image requests, throughput with batches of
32 and 2 in flight, payload bytes (tensor data) and wire bytes (serialized frames + gRPC/HTTP/2
framing) per sample, counted by the nodes, and the analytic floor
``compute / N + bytes of the busiest link / rate + (sync points + 2) x one-way latency``,
where compute is ``single``'s median latency (measured at the start and again at the end of
the run; the faster of the two, the conservative one), and the ``+ 2`` are the input hop to
the peers and the output hop back (links are full duplex and independent, so the busiest
directed link, not the sum over links, bounds the transfer time).

The machine's speed drifts (a shared host: ``single`` has measured 3.5 ms at the start of a
run and 6.5 ms at its end), so every household row is also bracketed by two short ``single``
measurements (30 requests each, right before and right after its own): ``single_ms_adjacent``
(their mean), ``floor_adjacent_ms`` (the floor with it as compute) and
``latency_over_floor_adjacent`` compare the row with the single device measured at the same
time; ``floor_ms`` / ``latency_over_floor`` stay against the run's faster reference.
Closest: the single device also runs *between* the row's own requests, in blocks of
:data:`BLOCK` after every :data:`BLOCK` timed household requests (each household block after
the first starts with one untimed request, as the household idled meanwhile; the first single
call of a block is untimed too): ``single_ms_interleaved`` (its median), ``floor_interleaved_ms``
and ``latency_over_floor_interleaved`` compare the two within the same fraction of a second.
(Alternating request by request instead left the household idle ~10 ms before every request,
and it answers slower after idling: 2.91 -> 4.02 ms for the 1-sync plan at 1 Gbit/s, session
12; blocks keep the household's measurement as it was.)

Diagnostics (not the floor above, which stays as defined): ``node_compute_ms``, the median
batch-1 time of each node's own shard program (its ``send`` and ``compute`` calls, the ones
the runtime makes, run in this process with no communication and no encoding), and
``floor_node_ms`` = the slowest node's compute + the same transfer and latency terms: what
the floor would be if a node's compute were what it measures rather than ``compute / N``.

``--model resnet50`` (issue 17's compute-bound benchmark, see ``bench/latency_models.py``):
torchvision's ResNet-50, random init, at ``--image-size`` px (default 224) on random images;
DISCO plans with hard masks from **calibrated random gate logits** (no trained plan exists:
``"masks": "random-calibrated"``, accuracy ``null``) at budgets 0.1 / 0.05, sync-point limits
none / 8, codecs fp32 / int8, each run with overlap on and off (``disco-fl serve
--no-overlap``); a third, Wi-Fi-like link (50 Mbit/s, 4 ms RTT); 15 timed requests per
configuration, no throughput pass (a batch of 32 at 224 px over dense TP would take minutes);
``--nodes 2`` by default. Every row carries ``speedup_vs_single`` (``single``'s median /
the row's median, same run; ``single`` is measured at the start and again at the end, and the
faster of the two is the reference) and ``overlap``. ``--nodes 4`` runs N = 4, but 4 one-thread
processes on a 2-core machine share 2 cores: that run cannot show a speedup there.
The ``resnet`` / ``vit_tiny_mnist`` runs keep their two links (the issue's floor bar is read
on them, and a third link would add half again to the ``--quick`` wall time).

``--busy-poll-us`` (default 1000): the nodes poll for up to that long while a request waits for
a frame instead of sleeping at once (``disco-fl serve --busy-poll-us``, see docs/serving.md),
in households of at most as many nodes as the machine has cores (larger ones: 0); every row
records ``busy_poll_us``. ``--busy-poll-us 0`` measures without; ``--busy-poll-us 0 1000``
runs every plan with each, in one run.

``--input-dtype uint8`` (issue 17): requests carry the raw uint8 image batch instead of the
normalized fp32 tensor; the plans declare the input normalization (``meta["input"]``: MNIST's,
or ImageNet's for resnet50, whose random images are then uniform uint8 pixels) and every node
normalizes the pixels itself, so the input hop costs 1 byte per pixel whatever the codec (4x
fewer than fp32). Every row records ``input_dtype`` (``float32`` by default; ``single`` rows
``null``: one device sends nothing).

Usage::

    python bench/latency.py --json latency.json            # N = 2 and 4
    python bench/latency.py --quick --json latency.json    # N = 2, < 10 min on 2 cores
    python bench/latency.py --model resnet50 --json r50.json   # N = 2, ~10 min on 2 cores
    python bench/latency_plot.py r50.json --out r50.png        # latency vs link
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import disco_fl
from disco_fl.cli.demo import free_ports
from disco_fl.core.heap import tune_heap
from disco_fl.core.pixels import pixels_to_input
from disco_fl.data import (
    MNIST_MEAN,
    MNIST_STD,
    load_builtin,
    load_npz,
    stratified_split,
    to_pixels,
    to_tensor,
)
from disco_fl.emulation.budget import BudgetConfig, evaluate, fit_budget, train_model
from disco_fl.emulation.comm import program_traffic
from disco_fl.emulation.export import load_shard
from disco_fl.models import build_model
from disco_fl.partition import get_spec, plan_open_count
from disco_fl.partition.plan import Plan
from disco_fl.runtime.serving import InferenceSession

LINKS = {"100Mbit_2ms": (100.0, 2.0), "1Gbit_0.5ms": (1000.0, 0.5)}
# --model resnet50: the two links above and a Wi-Fi-like one
LINKS_RESNET50 = {
    "1Gbit_0.5ms": (1000.0, 0.5),
    "100Mbit_2ms": (100.0, 2.0),
    "50Mbit_4ms": (50.0, 4.0),
}
# (budget, exchanges allowed): the plain budget plans, and the 0.05 budget with at most 3 and
# at most 1 exchanging layer besides the normalization layers that always exchange statistics
# (each sync point costs a one-way latency on a slow link)
PLANS = [(0.2, None), (0.1, None), (0.05, None), (0.05, 3), (0.05, 1)]
SETTINGS = {
    "full": {
        "nodes": [2, 4],
        "requests": 60,
        "throughput_images": 512,
        "dense_epochs": 4,
        "gate_steps": 60,  # batches per epoch of gate training and of fine-tuning
    },
    "quick": {
        "nodes": [2],
        "requests": 30,
        "throughput_images": 192,
        "dense_epochs": 2,
        "gate_steps": 30,  # batches per epoch of gate training and of fine-tuning
    },
}
# --model resnet50: no training, no throughput pass (throughput_images 0); plans of
# bench/latency_models.py (PLANS, QUICK_PLANS with --quick)
SETTINGS_RESNET50 = {
    "full": {"nodes": [2], "requests": 15, "throughput_images": 0},
    "quick": {"nodes": [2], "requests": 8, "throughput_images": 0},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _mnist() -> tuple[np.ndarray, np.ndarray, Any, Any]:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist_5k.npz"
    images, labels = load_npz(shared) if shared.exists() else load_builtin("mnist_5k")
    tr, te = stratified_split(labels, [4000, 1000], seed=0)
    return images, labels, tr, te


def load_test_pixels() -> tuple[torch.Tensor, dict[str, Any]]:
    """The test split of :func:`load_data` as uint8 pixels ``(N, 1, 28, 28)`` and the plans'
    ``meta`` that declares their normalization (``to_tensor`` of them is ``load_data``'s)."""
    images, _, _, te = _mnist()
    return to_pixels(images)[te], {"input": {"mean": [MNIST_MEAN], "std": [MNIST_STD]}}


def random_pixels(shape: Sequence[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform uint8 pixels of ``shape`` (seeded) and their ImageNet-normalized fp32 input."""
    g = torch.Generator().manual_seed(seed)
    px = torch.randint(0, 256, tuple(shape), generator=g, dtype=torch.uint8)
    norm = IMAGENET_NORMALIZATION
    return px, pixels_to_input(px, norm["mean"], norm["std"])


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, tr, te = _mnist()
    x = to_tensor(images)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return x[tr], y[tr], x[te], y[te]


class Household:
    """N ``disco-fl serve`` processes on loopback with an emulated link (``link``: Mbit/s and
    round trip in ms, or None with the link options in ``extra``, more ``serve`` options;
    ``addrs``: the nodes' addresses, default free ports)."""

    def __init__(
        self,
        plan_dir: Path,
        n: int,
        link: tuple[float, float] | None,
        work: Path,
        overlap: bool = True,
        extra: list[str] | None = None,
        addrs: list[str] | None = None,
    ) -> None:
        self.addrs = addrs or [f"127.0.0.1:{p}" for p in free_ports(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for k in range(n):
            ready = work / f"ready{k}"
            ready.unlink(missing_ok=True)
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
                "60",
                *([] if link is None else ["--link-mbps", str(link[0])]),
                *([] if link is None else ["--link-rtt-ms", str(link[1])]),
                "--ready-file",
                str(ready),
                *([] if overlap else ["--no-overlap"]),
                *(extra or []),
            ]
            with open(work / f"node{k}.log", "ab") as out:
                self.procs.append(
                    subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
                )
        deadline = time.monotonic() + 120
        for k in range(n):
            while not (work / f"ready{k}").exists():
                if self.procs[k].poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"node {k} did not start: {(work / f'node{k}.log')}")
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


def counters(addrs: list[str]) -> dict[str, Any]:
    payload = 0
    wire = 0
    per_link: dict[str, int] = {}
    for k, a in enumerate(addrs):
        with InferenceSession(a) as s:
            st = s.status()
        wire += st["framed_bytes_sent"]
        for key, b in st["payload_bytes_sent"].items():
            payload += b
            dst = key.split("/")[0]
            per_link[f"{k}->{dst}"] = per_link.get(f"{k}->{dst}", 0) + b
    return {"payload": payload, "wire": wire, "per_link": per_link}


def measure_single(model: torch.nn.Module, x: torch.Tensor, cfg: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(5):
            model(x[i : i + 1])
        for i in range(cfg["requests"]):
            t0 = time.perf_counter()
            model(x[i : i + 1])
            times.append((time.perf_counter() - t0) * 1e3)
        n = cfg["throughput_images"]
        thr = None  # throughput_images 0: no throughput pass
        if n:
            t0 = time.perf_counter()
            for b in range(0, n, 32):
                model(x[b : b + 32])
            thr = n / (time.perf_counter() - t0)
    return {"latency_ms_median": statistics.median(times), "throughput_per_s": thr}


def measure_node_compute(
    plan_dir: Path, n: int, x: torch.Tensor, cfg: dict[str, Any]
) -> list[float]:
    """Median batch-1 compute of each node's shard (ms), without communication.

    Runs every node's ``send`` and ``compute`` calls op by op in this process (1 torch
    thread), as :func:`disco_fl.runtime.inference.run_node` calls them, and times each node's calls
    only (messages are handed over in memory, without encoding).
    """
    torch.set_num_threads(1)
    nodes = [load_shard(plan_dir / "plan.json", k) for k in range(n)]
    program = nodes[0].plan.program
    steps = [(op, get_spec(op.kind)) for op in program.ops]
    r = program.requester

    def run(xi: torch.Tensor, acc: list[float]) -> None:
        envs: list[dict[str, Any]] = [{} for _ in range(n)]
        for op, spec in steps:
            xs = [
                [xi if k == r else None] if op.kind == "input" else [envs[k][i] for i in op.inputs]
                for k in range(n)
            ]
            inbox: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]
            for k in range(n):
                t0 = time.perf_counter()
                msgs = spec.send(op, nodes[k], xs[k])
                acc[k] += time.perf_counter() - t0
                for dst, t in (msgs or {}).items():
                    inbox[dst][k] = t
            for k in range(n):
                t0 = time.perf_counter()
                envs[k][op.name] = spec.compute(op, nodes[k], xs[k], inbox[k])
                acc[k] += time.perf_counter() - t0

    times: list[list[float]] = [[] for _ in range(n)]
    with torch.inference_mode():
        for i in range(5):
            run(x[i : i + 1], [0.0] * n)
        for i in range(cfg["requests"]):
            acc = [0.0] * n
            run(x[i : i + 1], acc)
            for k in range(n):
                times[k].append(acc[k] * 1e3)
    return [statistics.median(t) for t in times]


BLOCK = 10  # requests per block when the single device is interleaved (measure_household)


def measure_household(
    plan_dir: Path,
    n: int,
    link: tuple[float, float],
    x: torch.Tensor,
    cfg: dict[str, Any],
    overlap: bool = True,
    data_path: str = "socket",
    busy_poll_us: float = 0.0,
    single_block: Callable[[range], list[float]] | None = None,
) -> dict[str, Any]:
    """One household's row (medians over ``cfg["requests"]`` requests). ``single_block``:
    times the single device on requests ``idx`` now (ms each); given, it runs after every
    :data:`BLOCK` timed household requests (``single_ms_interleaved``), and the household's
    next block starts with one untimed request (it idled meanwhile)."""
    # polling while a frame is awaited: only where every node has a core of its own
    poll = busy_poll_us if n <= (os.cpu_count() or 1) else 0.0
    extra = ["--data-path", data_path, "--busy-poll-us", str(poll)]
    with tempfile.TemporaryDirectory() as work:
        hh = Household(plan_dir, n, link, Path(work), overlap=overlap, extra=extra)
        try:
            with InferenceSession(hh.addrs[0], timeout=120) as s:
                for i in range(5):  # warm-up: connections, allocator, first-call overheads
                    s.infer(x[i : i + 1])
                before = counters(hh.addrs)
                times = []  # the caller's round trip through node 0's Infer call
                node_times = []  # node 0's own time: input there -> output there
                singles: list[float] = []  # the single device, between the household's blocks
                m = cfg["requests"]
                served = m  # requests between the counters (the timed ones and re-warm-ups)
                for start in range(0, m, BLOCK):
                    if single_block is not None and start:
                        s.infer(x[start : start + 1])  # untimed: the household idled
                        served += 1
                    for i in range(start, min(start + BLOCK, m)):
                        t0 = time.perf_counter()
                        s.infer(x[i : i + 1])
                        times.append((time.perf_counter() - t0) * 1e3)
                        node_times.append(float(s.last_server_ms or 0.0))
                    if single_block is not None:
                        singles += single_block(range(start, min(start + BLOCK, m)))
                after = counters(hh.addrs)
                nimg = cfg["throughput_images"]
                thr = None  # throughput_images 0: no throughput pass
                if nimg:
                    t0 = time.perf_counter()
                    s.infer_many(x[:nimg], batch_size=32, max_inflight=2)
                    thr = nimg / (time.perf_counter() - t0)
                batched = counters(hh.addrs)
        finally:
            hh.stop()
    links = {k: (v - before["per_link"].get(k, 0)) / served for k, v in after["per_link"].items()}
    return {
        "busy_poll_us": poll,
        "latency_ms_median": statistics.median(node_times),
        "latency_ms_p90": float(np.percentile(node_times, 90)),
        "latency_rpc_ms_median": statistics.median(times),
        "single_ms_interleaved": statistics.median(singles) if singles else None,
        "throughput_per_s": thr,
        "payload_bytes_per_sample": (after["payload"] - before["payload"]) / served,
        "wire_bytes_per_sample": (after["wire"] - before["wire"]) / served,
        "busiest_link_payload_bytes": max(links.values()) if links else 0.0,
        "framing_overhead_batch32": (batched["wire"] - after["wire"])
        / max(batched["payload"] - after["payload"], 1)
        - 1
        if thr is not None
        else None,
    }


def make_plans(
    model: torch.nn.Module,
    n: int,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: dict[str, Any],
    out: Path,
    budgets: list[tuple[float, int | None]] = PLANS,
    meta: dict[str, Any] | None = None,
    dense: bool = True,
) -> list[dict[str, Any]]:
    """Export the dense-TP plan (``dense``) and one DISCO plan per entry of ``budgets``
    (default PLANS); each plan's ``meta`` is ``meta`` and, for the DISCO plans, the held-out
    ``accuracy`` (what a plan ladder ranks them by)."""
    xtr, ytr, xte, yte = data
    plans = []
    if dense:
        pm = disco_fl.partition(model, n, xtr[:2]).eval()
        d = out / f"n{n}_dense"
        pm.export(d, meta=meta)
        plans.append(
            {
                "mode": "dense_tp",
                "dir": d,
                "budget": None,
                "max_sync_points": None,
                "accuracy": evaluate(pm, xte, yte),
            }
        )
    # layers that always exchange (cross-node LayerNorm / GroupNorm statistics): a sync limit
    # of k means k exchanges on top of them
    closed = disco_fl.partition(copy.deepcopy(model), n, xtr[:2])
    closed.set_all_masks(0.0)
    always = closed.comm_report().sync_points
    for budget, extra in budgets:
        max_sync = None if extra is None else always + extra
        pmb = disco_fl.partition(copy.deepcopy(model), n, xtr[:2])
        bc = BudgetConfig(
            budget=budget,
            gate_epochs=cfg.get("gate_epochs", 1),
            finetune_epochs=cfg.get("finetune_epochs", 1),
            max_steps_per_epoch=cfg["gate_steps"],
            max_sync_points=max_sync,
            seed=0,
        )
        t0 = time.time()
        fit_budget(pmb, xtr, ytr, bc, teacher=model)
        pmb.eval()
        d = out / f"n{n}_b{budget}_s{max_sync}"
        acc = evaluate(pmb, xte, yte)
        pmb.export(d, meta={**(meta or {}), "accuracy": acc})
        rep = pmb.comm_report()
        log(
            f"N={n} budget {budget} max_sync {max_sync}: {rep.bytes_per_sample:,} B/sample "
            f"({rep.reduction:.1f}x less than dense), sync points {rep.sync_points}, accuracy "
            f"{100 * acc:.1f}% (trained in {time.time() - t0:.0f} s)"
        )
        plans.append(
            {
                "mode": "disco",
                "dir": d,
                "budget": budget,
                "max_sync_points": max_sync,
                "accuracy": acc,
            }
        )
    return plans


def _speedup(r: dict[str, Any]) -> str:
    v = r.get("speedup_vs_dense_tp")
    return "-" if v is None else f"{v:.2f}x"


def _rpc(r: dict[str, Any]) -> str:
    v = r.get("latency_rpc_ms_median")
    return "- | -" if v is None else f"{v:.2f} | {v / r['floor_ms']:.2f}"


def _thr(r: dict[str, Any]) -> str:
    v = r.get("throughput_per_s")
    return "-" if v is None else f"{v:.0f}"


def _path(r: dict[str, Any]) -> str:
    path = r.get("data_path", "grpc")
    return "" if path == "grpc" else f" ({path})"


def _ratio(r: dict[str, Any], key: str) -> str:
    v = r.get(key)
    return "-" if v is None else f"{v:.2f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as the table in BENCHMARKS.md."""
    head = (
        "| mode | N | budget | max sync | link | sync points | accuracy | latency ms (median) "
        "| floor ms | latency / floor | caller ms (via Infer) | caller / floor | vs dense TP "
        "| images/s | payload B/img | framing (batch 1) | framing (batch 32) "
        "| node compute ms (diag.) | floor_node ms (diag.) | latency / floor_node "
        "| latency / floor (adjacent single) | latency / floor (interleaved single) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        acc = r.get("accuracy")
        lines.append(
            f"| {r['mode']}{_path(r)} | {r['nodes']} "
            f"| {r['budget'] if r['budget'] is not None else '-'} "
            f"| {r.get('max_sync_points') or '-'} | {r['link']} | {r['sync_points']} "
            f"| {'-' if acc is None else f'{100 * acc:.1f}%'} | {r['latency_ms_median']:.2f} "
            f"| {r['floor_ms']:.2f} | {r['latency_ms_median'] / r['floor_ms']:.2f} "
            f"| {_rpc(r)} | {_speedup(r)} | {_thr(r)} "
            f"| {r['payload_bytes_per_sample']:,.0f} "
            f"| {100 * r.get('framing_overhead', 0.0):.2f}% "
            f"| {100 * (r.get('framing_overhead_batch32') or 0.0):.2f}% "
            f"| {' / '.join(f'{v:.2f}' for v in r.get('node_compute_ms', []))} "
            f"| {r.get('floor_node_ms', r['floor_ms']):.2f} "
            f"| {r['latency_ms_median'] / r.get('floor_node_ms', r['floor_ms']):.2f} "
            f"| {_ratio(r, 'latency_over_floor_adjacent')} "
            f"| {_ratio(r, 'latency_over_floor_interleaved')} |"
        )
    return head + "\n".join(lines)


def single_rows(
    single: dict[str, Any], links: dict[str, tuple[float, float]], accuracy: float | None
) -> list[dict[str, Any]]:
    """One ``single`` row per link (the same measurement)."""
    return [
        {
            "mode": "single",
            "nodes": 1,
            "budget": None,
            "link": link,
            **single,
            "wire_bytes_per_sample": 0,
            "payload_bytes_per_sample": 0,
            "sync_points": 0,
            "floor_ms": single["latency_ms_median"],
            "node_compute_ms": [single["latency_ms_median"]],
            "floor_node_ms": single["latency_ms_median"],
            "accuracy": accuracy,
            "overlap": True,
            "codec": None,
            "input_dtype": None,  # one device: nothing is sent
            "masks": None,
        }
        for link in links
    ]


def measure_plans(
    plans: list[dict[str, Any]],
    n: int,
    links: dict[str, tuple[float, float]],
    x: torch.Tensor,
    cfg: dict[str, Any],
    single_ms: float,
    pixels: torch.Tensor | None = None,
    single_now: Callable[[], float] | None = None,
    single_block: Callable[[range], list[float]] | None = None,
) -> list[dict[str, Any]]:
    """The rows of ``plans`` (:func:`make_plans`' dicts; ``overlaps``, default ``[True]``:
    run with overlap on and / or off) on every link of ``links`` at N = ``n``. ``pixels``
    (uint8, the images of ``x``): the requests carry them instead of ``x``. ``single_now``:
    measures the single device now (ms), called right before and right after every row;
    ``single_block``: see :func:`measure_household` (the interleaved floor)."""
    rows = []
    sent = x if pixels is None else pixels
    input_dtype = "uint8" if pixels is not None else "float32"
    for info in plans:
        plan_dir, budget = info["dir"], info["budget"]
        plan = Plan.load(plan_dir / "plan.json")
        rep = program_traffic(plan.program, plan_open_count(plan), plan.codec, input_dtype)
        node_ms = measure_node_compute(plan_dir, n, x, cfg)
        paths = cfg.get("data_paths", ["socket"])
        polls = cfg.get("busy_poll_us", [0.0])
        runs = [(o, d, p) for o in info.get("overlaps", [True]) for d in paths for p in polls]
        for overlap, data_path, poll in runs:
            name = f"{info['mode']}_{budget}_{info['max_sync_points']}_{plan.codec}"
            if info.get("capacities"):
                name += "_c" + "-".join(f"{c:g}" for c in info["capacities"])
            name += "" if overlap else "_nooverlap"
            name += "" if data_path == "grpc" else f"_{data_path}"
            name += f"_poll{poll:g}" if len(polls) > 1 else ""
            for link, (mbps, rtt_ms) in links.items():
                before = single_now() if single_now else None
                m = measure_household(
                    plan_dir, n, (mbps, rtt_ms), sent, cfg, overlap, data_path, poll, single_block
                )
                adjacent = None
                if single_now is not None and before is not None:
                    adjacent = (before + single_now()) / 2
                wire_per_link = m["busiest_link_payload_bytes"] * (
                    m["wire_bytes_per_sample"] / max(m["payload_bytes_per_sample"], 1)
                )
                comm = wire_per_link * 8 / (mbps * 1e6) * 1e3 + (rep.sync_points + 2) * rtt_ms / 2
                floor = single_ms / n + comm
                row = {
                    "mode": info["mode"],
                    "nodes": n,
                    "budget": budget,
                    "max_sync_points": info["max_sync_points"],
                    "codec": plan.codec,
                    "input_dtype": input_dtype,
                    "overlap": overlap,
                    "data_path": data_path,
                    "masks": info.get("masks", "trained" if info["mode"] == "disco" else None),
                    "capacities": info.get("capacities"),
                    "accuracy": info["accuracy"],
                    "link": link,
                    **m,
                    "sync_points": rep.sync_points,
                    "plan_bytes_per_sample": rep.bytes_per_sample,
                    "floor_ms": floor,  # against the run's reference single, set at the end
                    "comm_ms": comm,
                    "latency_over_floor": m["latency_ms_median"] / floor,
                    # diagnostics: measured shard compute per node, and the floor with the
                    # slowest node's measured compute in place of compute / N
                    "node_compute_ms": node_ms,
                    "floor_node_ms": max(node_ms) + comm,
                    "latency_over_floor_node": m["latency_ms_median"] / (max(node_ms) + comm),
                    "framing_overhead": m["wire_bytes_per_sample"]
                    / max(m["payload_bytes_per_sample"], 1)
                    - 1,
                    "speedup_vs_single": single_ms / m["latency_ms_median"],
                }
                if adjacent is not None:
                    row["single_ms_adjacent"] = adjacent
                    row["floor_adjacent_ms"] = adjacent / n + comm
                    row["latency_over_floor_adjacent"] = m["latency_ms_median"] / (
                        adjacent / n + comm
                    )
                if m["single_ms_interleaved"] is not None:
                    row["floor_interleaved_ms"] = m["single_ms_interleaved"] / n + comm
                    row["latency_over_floor_interleaved"] = (
                        m["latency_ms_median"] / row["floor_interleaved_ms"]
                    )
                rows.append(row)
                thr = m["throughput_per_s"]
                log(
                    f"N={n} {name:<24} {link:<12} {m['latency_ms_median']:8.2f} ms "
                    f"(x{row['speedup_vs_single']:.2f} vs single; floor {floor:.2f}, "
                    f"x{row['latency_over_floor']:.2f}; adjacent single "
                    f"{adjacent or float('nan'):.2f} ms, "
                    f"x{row.get('latency_over_floor_adjacent', float('nan')):.2f}; interleaved "
                    f"x{row.get('latency_over_floor_interleaved', float('nan')):.2f}; caller "
                    f"{m['latency_rpc_ms_median']:.2f} ms; node compute "
                    f"{'/'.join(f'{v:.2f}' for v in node_ms)}, floor_node "
                    f"{max(node_ms) + comm:.2f}) "
                    f"{'-' if thr is None else f'{thr:.1f}'}/s payload "
                    f"{m['payload_bytes_per_sample']:,.0f} B wire +"
                    f"{100 * row['framing_overhead']:.2f}%"
                )
    return rows


def _latency_models() -> Any:
    """bench/latency_models.py (bench/ is a folder of scripts, not a package)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import latency_models

    return latency_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--keep-plans",
        default=None,
        metavar="DIR",
        help="export the plans into DIR and keep them (for bench/latency_timeline.py)",
    )
    ap.add_argument(
        "--model",
        default="resnet",
        choices=["resnet", "vit_tiny_mnist", "resnet50"],
        help="model (default resnet: the core benchmark's 32/64/128 ResNet; resnet50: "
        "torchvision's, random init, plans from calibrated random gate logits)",
    )
    ap.add_argument(
        "--image-size", type=int, default=224, help="resnet50's input side, px (default 224)"
    )
    ap.add_argument(
        "--nodes",
        type=int,
        nargs="+",
        default=None,
        help="N values (default: 2 for resnet50; the settings' for the others)",
    )
    ap.add_argument("--requests", type=int, default=None, help="timed requests per configuration")
    ap.add_argument(
        "--plans",
        default=None,
        metavar="B:S:C,...",
        help="resnet50: the DISCO plans as budget:max-sync-points (or -):codec[:capacities], "
        "e.g. 0.02:8:int8,0.05:8:int8,0.02:4:int8:57/43 (capacities: uneven slices, node 0 "
        "first; default: latency_models.PLANS)",
    )
    ap.add_argument(
        "--input-dtype",
        default="float32",
        choices=["float32", "uint8"],
        help="what a request carries: the normalized fp32 input (default) or the raw uint8 "
        "image batch, 1 byte per pixel on the input hop, normalized by every node",
    )
    ap.add_argument(
        "--data-path",
        nargs="+",
        default=["socket"],
        choices=["socket", "grpc"],
        help="how the nodes' frames travel (disco-fl serve --data-path); several: each plan "
        "runs with each, in one run (default socket, as disco-fl serve's)",
    )
    ap.add_argument(
        "--busy-poll-us",
        type=float,
        nargs="+",
        default=[1000.0],
        help="disco-fl serve --busy-poll-us for households of at most as many nodes as this "
        "machine has cores (default 1000; larger households: 0, a polling node would take a "
        "core from a computing one); several: each plan runs with each, in one run",
    )
    args = ap.parse_args()
    tune_heap()  # as the disco-fl processes it compares with (disco_fl.core.heap)
    uint8 = args.input_dtype == "uint8"
    pixels: torch.Tensor | None = None  # uint8 requests: the images of xte
    meta: dict[str, Any] | None = None  # the plans' input normalization (uint8 requests)
    mode = "quick" if args.quick else "full"
    r50 = args.model == "resnet50"
    cfg: dict[str, Any] = dict((SETTINGS_RESNET50 if r50 else SETTINGS)[mode])
    if args.nodes:
        cfg["nodes"] = args.nodes
    if args.requests:
        cfg["requests"] = args.requests
    cfg["data_paths"] = args.data_path
    cfg["busy_poll_us"] = args.busy_poll_us
    t_start = time.time()
    torch.manual_seed(0)
    links = LINKS_RESNET50 if r50 else LINKS
    if r50:
        lm = _latency_models()
        cfg["image_size"] = args.image_size
        cfg["plans"] = lm.QUICK_PLANS if args.quick else lm.PLANS
        if args.plans:
            cfg["plans"] = lm.parse_plans(args.plans)
        model, xte = lm.load_resnet50(args.image_size, max(cfg["requests"], 5), seed=0)
        if uint8:  # uniform random pixels in place of N(0, 1) images, ImageNet-normalized
            pixels, xte = random_pixels(xte.shape)
            meta = {"input": IMAGENET_NORMALIZATION}
        dense_acc = None
        log(
            f"resnet50 at {args.image_size} px, random init; DISCO plans with masks "
            f"{lm.MASKS} (calibrated random gate logits: no trained plan exists, no accuracy)"
        )
    else:
        xtr, ytr, xte, yte = load_data()
        if uint8:
            pixels, meta = load_test_pixels()
        model = build_model(args.model)
        torch.set_num_threads(2)
        epochs = cfg["dense_epochs"] * (5 if args.model.startswith("vit") else 1)
        log(f"training the dense {args.model} ({epochs} epochs; short: see the docstring)")
        lr = 0.003 if args.model.startswith("vit") else 2e-3
        train_model(model, xtr, ytr, epochs=epochs, lr=lr, seed=0)
        model.eval()
        dense_acc = evaluate(model, xte, yte)
        log(f"dense accuracy {100 * dense_acc:.1f}%")
    single = measure_single(model, xte, cfg)
    thr = single["throughput_per_s"]
    log(
        f"single: {single['latency_ms_median']:.2f} ms/image, "
        f"{'-' if thr is None else f'{thr:.0f}'}/s"
    )
    rows: list[dict[str, Any]] = single_rows(single, links, dense_acc)

    def single_now() -> float:
        """The single device measured now (ms; no throughput pass)."""
        return float(
            measure_single(model, xte, {**cfg, "throughput_images": 0})["latency_ms_median"]
        )

    def single_block(idx: range) -> list[float]:
        """The single device on requests ``idx`` now (ms each), after one untimed call (this
        process waited for the household): its own loop, in pieces between the household's."""
        torch.set_num_threads(1)
        out = []
        with torch.no_grad():
            model(xte[idx.start : idx.start + 1])
            for i in idx:
                t0 = time.perf_counter()
                model(xte[i : i + 1])
                out.append((time.perf_counter() - t0) * 1e3)
        return out

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = args.keep_plans or tmp_dir
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for n in cfg["nodes"]:
            torch.set_num_threads(2)
            if r50:
                plans = lm.random_calibrated_plans(
                    model, n, xte, Path(tmp), cfg["plans"], log=log, meta=meta
                )
            else:
                plans = make_plans(model, n, (xtr, ytr, xte, yte), cfg, Path(tmp), meta=meta)
            rows += measure_plans(
                plans, n, links, xte, cfg, single["latency_ms_median"], pixels, single_now,
                single_block,
            )  # fmt: skip
    # the single device again at the end: this machine's speed drifts by up to ~20 % between
    # minutes (a shared host); every speed-up is against the faster of the two measurements
    # (the conservative one), both kept in the JSON
    single_after = measure_single(model, xte, cfg)["latency_ms_median"]
    reference = min(single["latency_ms_median"], single_after)
    log(f"single again: {single_after:.2f} ms/image; speed-ups against {reference:.2f} ms")
    for r in rows:
        r["model"] = args.model
        r["speedup_vs_single"] = reference / r["latency_ms_median"]
        if r["mode"] != "single":  # the floor's compute / N from the same reference
            r["floor_ms"] = reference / r["nodes"] + r["comm_ms"]
            r["latency_over_floor"] = r["latency_ms_median"] / r["floor_ms"]
    result = {
        "single_ms_before": single["latency_ms_median"],
        "single_ms_after": single_after,
        "single_ms_reference": reference,
        "rows": rows,
        "model": args.model,
        "masks": lm.MASKS if r50 else "trained",
        "settings": {"mode": mode, "input_dtype": args.input_dtype, **cfg},
        "wall_s": time.time() - t_start,
        "command": " ".join(["python", "bench/latency.py", *sys.argv[1:]]),
    }
    for r in rows:
        dense = [
            d
            for d in rows
            if d["mode"] == "dense_tp"
            and d["nodes"] == r["nodes"]
            and d["link"] == r["link"]
            and d.get("data_path") == r.get("data_path")
        ]
        if r["mode"] == "disco" and dense:
            r["speedup_vs_dense_tp"] = dense[0]["latency_ms_median"] / r["latency_ms_median"]
    print(lm.speed_table(rows) if r50 else markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    log(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
