"""``disco-fl demo``: a real local Flower deployment of DISCO on loopback.

Steps: pretrain a dense model on the public part of the built-in data (or load ``--checkpoint``);
start ``flower-superlink`` and one ``flower-supernode`` per node (each with its household, shard,
peer address, private data partition and, with ``--capacities``, its ``capacity`` in
``--node-config``: the strategy then slices every layer in proportion, or by measured shard
compute with ``--slices compute``, the run config's ``slices``); ``flwr run`` the DISCO app
(``disco_fl.fl.server.server_app:app`` / ``disco_fl.fl.client_app:app``) from a small app folder
whose components point into the installed package; wait for the exported plan and shards; start
``disco-fl serve`` on every node of one household; run collaborative inference on the held-out split
through :class:`~disco_fl.runtime.serving.InferenceSession`; print a summary and write the JSON.

``--task segmentation`` / ``--task super_resolution`` run the same deployment with the task's
built-in model (``seg_small`` / ``espcn``), data derived from the same digits
(:mod:`disco_fl.data.pixel_tasks`), loss and metric (mean IoU / PSNR in dB,
:mod:`disco_fl.tasks`); the JSON then reports ``"metric"`` (its name), ``metric_dense`` and
``metric_disco`` beside the bytes. Their defaults are smaller (:data:`DEMO_DEFAULTS`: 2 rounds
of 20 / 30 steps of batch 16) so that they finish in a few minutes on 2 cores.

The processes (ports, ``FLWR_HOME``, logs, stopping) are managed by
:mod:`disco_fl.cli.deployment`; all of them are stopped on success, failure, Ctrl-C and SIGTERM.
Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from disco_fl.cli.deployment import (
    START_S,
    Deployment,
    free_ports,
    progress,
    wait_for_run,
    write_app,
)
from disco_fl.core.files import save_torch
from disco_fl.emulation.balance import SLICE_RULES
from disco_fl.fl.federated import TASK_DEFAULTS, ModelSpec, builtin_tensors
from disco_fl.models import MODEL_TASKS
from disco_fl.partition.plan import Plan
from disco_fl.tasks import TASKS, get_task

#: The demo's defaults per task (``--rounds``, ``--steps``, ``--batch-size``,
#: ``--dense-epochs``) and the learning rate of pretraining. Classification's are the demo's
#: as always; the dense tasks' are small (a few minutes on 2 cores): more rounds and steps
#: narrow the gap to dense.
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"rounds": 3, "steps": 80, "batch_size": 32, "dense_epochs": 4},
    "segmentation": {"rounds": 2, "steps": 20, "batch_size": 16, "dense_epochs": 3},
    "super_resolution": {"rounds": 2, "steps": 30, "batch_size": 16, "dense_epochs": 10},
}
DENSE_LR = {"classification": 0.01, "segmentation": 0.01, "super_resolution": 0.005}


def _save_dense(model: torch.nn.Module, path: Path) -> None:
    save_torch(model.state_dict(), path)  # checksummed; read by load_checkpoint_strict


def delivered_dirs(dep: Deployment, summary: dict[str, Any], h: int = 0) -> list[Path]:
    """The data folders of household ``h``'s nodes, where the run delivered the final plan
    and each node's shard (``summary["delivered"]``: ``"ok"`` per node, else why not)."""
    delivered = summary.get("delivered") or {}
    bad = {n: why for n, why in delivered.items() if n.startswith(f"h{h}/") and why != "ok"}
    if bad or not delivered:
        raise RuntimeError(f"the run did not deliver household h{h}'s shards: {bad or 'none'}")
    return [dep.data_dir(h, k) for k in range(dep.nodes)]


def serve_and_infer(
    dep: Deployment,
    plan_dirs: list[Path],
    x: torch.Tensor,
    y: torch.Tensor,
    timeout: float = START_S,
    task: str = "classification",
) -> tuple[float, int]:
    """``disco-fl serve`` on the nodes of household 0, node ``k`` from ``plan_dirs[k]`` (its
    data folder), inference on ``x``: accuracy (the task's metric for a dense task) and the
    payload bytes the nodes counted."""
    from disco_fl.runtime.serving import InferenceSession

    n = dep.nodes
    ports = free_ports(n)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    ready = [dep.workdir / f"serve_ready_{k}.json" for k in range(n)]
    for f in ready:
        f.unlink(missing_ok=True)
    names = []
    for k in range(n):
        name = f"serve_n{k}"
        names.append(name)
        dep.procs.start(
            name,
            [
                sys.executable,
                "-m",
                "disco_fl.cli.main",
                "serve",
                str(plan_dirs[k]),
                "--node",
                str(k),
                "--peers",
                peers,
                "--threads",
                "1",
                "--ready-file",
                str(ready[k]),
            ],
        )
    end = time.monotonic() + timeout
    while not all(f.exists() for f in ready):
        dep.procs.check(names)
        if time.monotonic() > end:
            raise TimeoutError(f"serve processes not ready within {timeout:g} s")
        time.sleep(0.2)
    with InferenceSession(f"127.0.0.1:{ports[0]}", timeout=60.0) as sess:
        before = sess.status()
        logits = sess.infer_many(x, batch_size=100)
        after = sess.status()
    if task == "classification":
        acc = float((logits.argmax(1) == y).float().mean())
    else:
        acc = float(get_task(task).metric(logits, y))
    sent = _payload(after) - _payload(before)
    for name in names:
        dep.procs.kill(name)
    return acc, sent


def _payload(status: dict[str, Any]) -> int:
    v = status.get("payload_bytes_sent", 0)
    if isinstance(v, dict):
        return int(sum(v.values()))
    return int(v) if isinstance(v, (int, float)) else 0


def demo_run_config(
    args: argparse.Namespace, spec: ModelSpec, dense_path: Path, run_dir: Path
) -> dict[str, Any]:
    """The run config of the demo's ``flwr run`` (the ServerApp's keys,
    :mod:`disco_fl.fl.server.server_app`) from its arguments (the task's defaults filled in)."""
    return {
        **spec.to_config(),
        "households": args.households,
        "num-rounds": args.rounds,
        "steps": args.steps,
        "batch-size": args.batch_size,
        "lr": args.lr,
        "budget": args.budget,
        "finetune-rounds": min(args.finetune_rounds, args.rounds),
        "codec": args.codec,
        "seed": args.seed,
        "dp": bool(args.dp),
        "dp-noise": args.dp_noise,
        "dp-clip": args.dp_clip,
        "node-dropout": args.node_dropout,
        "evaluate": True,
        "step-timeout": args.step_timeout,
        "round-timeout": args.round_timeout,
        "initial-checkpoint": str(dense_path),
        "run-dir": str(run_dir),
        "slices": getattr(args, "slices", "channels"),
    }


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The whole demo; returns the summary (also written to ``--json``)."""
    from disco_fl.emulation.budget import evaluate, train_model
    from disco_fl.emulation.capacity import channel_shares, parse_capacities
    from disco_fl.emulation.model import partition
    from disco_fl.models import load_checkpoint_strict

    t0 = time.time()
    task = getattr(args, "task", "classification")
    if task not in DEMO_DEFAULTS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(DEMO_DEFAULTS)}")
    for name, v in DEMO_DEFAULTS[task].items():
        if getattr(args, name, None) is None:
            setattr(args, name, v)
    if getattr(args, "model", None) is None:
        args.model = TASK_DEFAULTS[task]["name"]
    if args.dp and args.model in MODEL_TASKS:
        raise ValueError(f"--dp needs a GroupNorm model; {args.model} has BatchNorm")
    dense_task = task != "classification"
    metric = get_task(task).metric_name
    if not 0.0 < args.budget <= 1.0:
        raise ValueError(f"--budget must be in (0, 1], got {args.budget}")
    for name in ("households", "nodes", "rounds", "steps", "batch_size", "dense_epochs"):
        if getattr(args, name) < 1 and not (name == "dense_epochs" and args.checkpoint):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    caps = parse_capacities(args.capacities, args.nodes)
    torch.manual_seed(args.seed)
    workdir = Path(args.out).resolve()
    if workdir.exists() and not args.resume:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / "run"
    norm = "group" if args.dp else "batch"
    spec = ModelSpec.for_task(task, name=args.model, num_nodes=args.nodes, norm=norm)
    x_pub, y_pub = builtin_tensors("public", task)
    x_test, y_test = builtin_tensors("test", task)
    dense = spec.build_dense(args.seed)
    dense_path = workdir / "dense.pth"
    if args.checkpoint:
        load_checkpoint_strict(dense, args.checkpoint)
        progress(f"loaded dense checkpoint {args.checkpoint}")
    elif args.resume and dense_path.exists():
        load_checkpoint_strict(dense, dense_path)
        progress(f"resuming: dense model of the previous run ({dense_path})")
    else:
        progress(
            f"pretraining dense {args.model}{' (GroupNorm, for DP)' if args.dp else ''} for "
            f"{args.dense_epochs} epochs on the public part ({len(y_pub)} images"
            f"{f', {task}' if dense_task else ''})"
        )
        train_model(
            dense,
            x_pub,
            y_pub,
            epochs=args.dense_epochs,
            lr=DENSE_LR[task],
            batch_size=32,
            augment_shift=0 if dense_task else 1,  # a shift would move the input only
            seed=args.seed,
            log=progress,
            task=task,
        )
    _save_dense(dense, dense_path)
    acc_dense = evaluate(dense, x_test, y_test, task=task)
    dense_bytes = int(
        partition(dense, args.nodes, x_test[:2], capacities=caps, capture=spec.capture)
        .comm_report(args.codec)
        .bytes_per_sample
    )
    progress(f"dense {metric} {acc_dense:.4f} on {len(y_test)} held-out images")

    config = demo_run_config(args, spec, dense_path, run_dir)
    app = write_app(workdir / "app", config)
    dep = Deployment(workdir, args.households, args.nodes)
    stop_signal = {"sig": 0}

    def on_signal(sig: int, frame: Any) -> None:
        stop_signal["sig"] = sig
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        progress(
            f"starting flower-superlink on 127.0.0.1:{dep.link_port} (FLWR_HOME {dep.flwr_home})"
        )
        dep.start_superlink()
        for h in range(args.households):
            for k in range(args.nodes):
                data = f"builtin:{h}/{args.households}" if k == 0 else ""
                dep.start_supernode(h, k, data, {"capacity": caps[k]} if caps else None)
        progress(
            f"started {args.households * args.nodes} flower-supernodes: {args.households} "
            f"households x {args.nodes} nodes (node 0 of each holds its private partition"
            f"{f'; capacities {list(caps)}' if caps else ''})"
        )
        (run_dir / "summary.json").unlink(missing_ok=True)  # a resumed run writes a new one
        dep.flwr_run(app, {})
        progress(
            f"flwr run: {args.rounds} rounds x {args.steps} steps, budget {args.budget}"
            f"{', DP' if args.dp else ''} (logs: {dep.procs.logdir})"
        )
        fl = wait_for_run(dep, run_dir, args.timeout)
        progress(
            f"federated fine-tuning done in {fl['seconds']:.0f}s; serving the shards delivered "
            "to household h0's nodes"
        )
        acc_disco, sent = serve_and_infer(dep, delivered_dirs(dep, fl), x_test, y_test, task=task)
        shares = channel_shares(Plan.load(run_dir / "plan" / "plan.json").program)
    finally:
        dep.stop()
        signal.signal(signal.SIGTERM, old)
    eps = fl.get("epsilon")
    figures: dict[str, Any] = (
        {"task": task, "metric": metric, "metric_dense": acc_dense, "metric_disco": acc_disco}
        if dense_task
        else {"accuracy_dense": acc_dense, "accuracy_disco": acc_disco}
    )
    summary = {
        **figures,
        "bytes_per_sample_dense": dense_bytes,
        "bytes_per_sample_disco": int(fl["bytes_per_sample"]),
        "bytes_per_sample_requester_sent": sent / max(len(y_test), 1),
        "epsilon": max(eps.values()) if isinstance(eps, dict) and eps else None,
        "epsilon_per_household": eps if isinstance(eps, dict) else None,
        "nodes": args.nodes,
        "capacities": list(caps) if caps else None,
        "slices": fl.get("slices"),
        "channel_shares": shares,
        "households": args.households,
        "rounds": args.rounds,
        "budget": args.budget,
        "exchange_fraction": fl["exchange_fraction"],
        "federated_history": fl["history"],
        "wall_s": time.time() - t0,
    }
    rows = [
        (f"{metric} (held-out)", f"{acc_dense:.4f}", f"{acc_disco:.4f}"),
        ("bytes / sample", f"{dense_bytes:,}", f"{summary['bytes_per_sample_disco']:,}"),
    ]
    print(
        f"\nDISCO on Flower: {args.households} households x {args.nodes} nodes, "
        f"{args.rounds} rounds{f', {task} ({args.model})' if dense_task else ''}"
        + (f", channel shares {'/'.join(f'{x:.2f}' for x in shares)}" if caps else "")
    )
    print(f"  {'':<22} {'dense TP':>12} {'DISCO':>12}")
    for name, a, b in rows:
        print(f"  {name:<22} {a:>12} {b:>12}")
    print(
        f"  serving: node 0 sent {summary['bytes_per_sample_requester_sent']:,.0f} B/sample "
        f"(payload it counted); "
        f"epsilon: {summary['epsilon'] if summary['epsilon'] is not None else 'n/a (no --dp)'}"
        f"\n  wall time {summary['wall_s']:.0f}s; work folder {workdir}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
        progress(f"wrote {args.json}")
    return summary


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        default="classification",
        choices=sorted(TASKS),
        help="classification (default; accuracy), segmentation (seg_small, per-pixel digit "
        "class, mean IoU) or super_resolution (espcn, x2 14->28, PSNR in dB); the dense "
        "tasks default to --rounds 2, --steps 20 (segmentation) / 30, --batch-size 16, "
        "--dense-epochs 3 / 10",
    )
    p.add_argument(
        "--model",
        default=None,
        help="a built-in model (default: the task's, resnet_narrow for classification) or "
        "your own, 'package.module:function' "
        "(a callable returning an nn.Module for 1x28x28 inputs and 10 classes, called with "
        "those of num_classes, in_channels, norm it names); it must be importable here (e.g. "
        "on PYTHONPATH): the demo and its ServerApp build it, the nodes never do",
    )
    p.add_argument(
        "--checkpoint", default=None, help="dense state dict to start from (skips pretraining)"
    )
    p.add_argument("--households", type=int, default=2, help="households (default 2)")
    p.add_argument("--nodes", type=int, default=2, help="nodes per household (default 2)")
    p.add_argument(
        "--capacities",
        default=None,
        help="relative capacity per node, e.g. 1,3 (`disco-fl probe`), given to every "
        "household's SuperNodes as capacity=...: slices proportional to it (default equal; "
        "see --slices)",
    )
    p.add_argument(
        "--slices",
        default="channels",
        choices=list(SLICE_RULES),
        help="with --capacities, the run config's slices: channel shares proportional to the "
        "capacities (channels, default), or shares whose shard compute, timed by the "
        "ServerApp, is (compute: better for sparse plans; docs/deployment.md)",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="federated rounds (default 3; dense tasks 2)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="joint steps per round (default 80; see --task)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (dense tasks 16)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--budget",
        type=float,
        default=0.1,
        help="final fraction of dense exchange bytes (default 0.1)",
    )
    p.add_argument(
        "--finetune-rounds", type=int, default=1, help="last rounds with masks fixed (default 1)"
    )
    p.add_argument(
        "--codec",
        default="int8",
        choices=["fp32", "fp16", "int8"],
        help="wire codec of the exchanged activations, in training and serving (default int8: "
        "4x fewer bytes, no measured accuracy cost, docs/serving.md 'Which codec'; fp32: exact)",
    )
    p.add_argument(
        "--dp", action="store_true", help="differential privacy inside households (GroupNorm model)"
    )
    p.add_argument("--dp-noise", type=float, default=1.0, help="DP noise multiplier (default 1.0)")
    p.add_argument("--dp-clip", type=float, default=1.0, help="DP clipping bound (default 1.0)")
    p.add_argument(
        "--node-dropout",
        type=float,
        default=0.0,
        help="each node but a step's batch owner sits a training step out with this "
        "probability (default 0); above 0, the delivered shards also carry BatchNorm "
        "statistics per missing node (degraded mode, docs/serving.md)",
    )
    p.add_argument(
        "--dense-epochs", type=int, default=None, help="pretraining epochs (default 4; see --task)"
    )
    p.add_argument("--step-timeout", type=float, default=30.0)
    p.add_argument("--round-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the federated run, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="disco_demo", help="work folder (default disco_demo)")
    p.add_argument("--resume", action="store_true", help="keep the work folder (resume the run)")
    p.add_argument("--json", default=None, help="write the summary JSON here")
