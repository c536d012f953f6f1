"""``disco-fl`` command line: ``demo``, ``train``, ``report``, ``probe``, ``serve``, ``infer``,
``certs``."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disco_fl.cli import latency as latency_cli
from disco_fl.cli.demo import add_demo_args, run_demo
from disco_fl.core.heap import tune_heap
from disco_fl.data import (
    MNIST_MEAN,
    MNIST_STD,
    SEGMENTATION_CLASSES,
    load_builtin,
    load_npz,
    stratified_split,
    task_data,
)
from disco_fl.emulation.balance import SLICE_RULES, compute_shares
from disco_fl.emulation.budget import BudgetConfig, evaluate, fit_budget, train_model
from disco_fl.emulation.capacity import channel_shares, parse_capacities
from disco_fl.emulation.comm import CommReport, program_traffic
from disco_fl.emulation.export import load_shard, model_digest, run_shards
from disco_fl.emulation.model import partition
from disco_fl.fl.federated import TASK_DEFAULTS, ModelSpec
from disco_fl.models import MODELS, load_checkpoint_strict
from disco_fl.models.registry import MODEL_TASKS
from disco_fl.models.user import call_with_standard_args, load_model
from disco_fl.partition import plan_open_count
from disco_fl.partition.plan import Plan, PlanError
from disco_fl.runtime.serving import commands as serving_commands
from disco_fl.runtime.serving import link_commands
from disco_fl.runtime.serving.client import InferenceError


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _data(path: str | None, seed: int, task: str = "classification") -> tuple[torch.Tensor, ...]:
    """Train and test ``(x, y)`` for ``task`` (:func:`disco_fl.data.task_data`: the labels, a
    per-pixel class map or the image at twice the input's size), a stratified 80 / 20 split."""
    images, labels = load_npz(path) if path else load_builtin()
    n = len(labels)
    n_test = max(n // 5, 1)
    tr, te = stratified_split(labels, [n - n_test, n_test], seed=seed)
    x, y = task_data(images, np.asarray(labels), task)
    return x[tr], y[tr], x[te], y[te]


def _print_report(rep: CommReport, title: str) -> None:
    print(f"\n{title} (codec {rep.codec}, per sample)")
    print(f"  {'layer readers':<44} {'bytes':>10} {'dense':>10}")
    for layer in rep.layers:
        name = (
            ", ".join(layer.readers) if layer.kind == "exchange" else f"[{layer.kind}] {layer.op}"
        )
        print(f"  {name[:44]:<44} {layer.bytes:>10,} {layer.dense_bytes:>10,}")
    print(
        f"  total {rep.bytes_per_sample:,} B vs dense tensor parallelism "
        f"{rep.dense_bytes_per_sample:,} B ({rep.reduction:.1f}x less), "
        f"sync points {rep.sync_points} (dense {rep.dense_sync_points})"
    )


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    link = latency_cli.target_link(args)
    torch.manual_seed(args.seed)
    task = args.task
    model_name = args.model or TASK_DEFAULTS[task]["name"]
    xtr, ytr, xte, yte = _data(args.data, args.seed, task)
    _log(
        f"data: {len(xtr)} train / {len(xte)} test images ({args.data or 'built-in mnist_5k'}), "
        f"task {task}"
    )
    in_ch = int(xtr.shape[1])
    ModelSpec(name=model_name, task=task)  # a built-in model of another task: a clear error
    classes = {"classification": int(ytr.max()) + 1, "segmentation": SEGMENTATION_CLASSES}
    kw: dict[str, Any] = {"in_channels": in_ch, "num_classes": classes.get(task, 1)}
    if model_name in MODEL_TASKS:  # seg_small, espcn: the standard arguments they take
        kw = call_with_standard_args(MODELS[model_name], kw)
    model = load_model(model_name, **kw)
    if args.checkpoint:
        load_checkpoint_strict(model, args.checkpoint)
        _log(f"loaded dense checkpoint {args.checkpoint}")
    else:
        _log(f"pretraining dense {model_name} for {args.dense_epochs} epochs")
        train_model(
            model, xtr, ytr, epochs=args.dense_epochs, lr=0.01, seed=args.seed, log=_log, task=task
        )
    metric = {"classification": "accuracy", "segmentation": "miou"}.get(task, "psnr_db")
    dense_acc = evaluate(model, xte, yte, task=task)
    _log(f"dense {metric} {dense_acc:.4f}")
    source_sha256 = model_digest(model)  # before fine-tuning (it may share the tensors)
    caps = parse_capacities(args.capacities, args.nodes)
    slice_by = caps
    if caps and args.slices == "compute":  # shares whose shard compute follows the capacities
        slice_by, _ = compute_shares(
            model,
            args.nodes,
            xtr[:1],
            caps,
            0.05 if args.budget is None else args.budget,
            args.max_sync_points,
            seed=args.seed,
            log=_log,
        )
    # fx, or torch.export where fx refuses the model (a user's; ESPCN's pixel shuffle)
    pm = partition(model, args.nodes, xtr[:2], capacities=slice_by, capture="auto")
    shares = channel_shares(pm.program)
    if caps:
        _log(
            f"uneven slices by {args.slices}: capacities {list(caps)}, channel shares "
            f"{_fmt_shares(shares)}"
        )
    choice = latency_cli.choose(args, model, pm, xtr[:1], link, _log) if link else None
    budget = choice.budget if choice else 0.05 if args.budget is None else args.budget
    codec = choice.codec if choice else args.codec or "int8"
    max_sync = choice.max_sync_points if choice else args.max_sync_points
    dense_rep = pm.comm_report(codec)
    cfg = BudgetConfig(
        budget=budget,
        max_sync_points=max_sync,
        gate_epochs=args.gate_epochs,
        finetune_epochs=args.finetune_epochs,
        augment_shift=2 if task == "classification" else 0,  # shifts move the input only
        seed=args.seed,
    )
    out = Path(args.out)
    _log(f"fine-tuning gates to budget {budget} on {args.nodes} nodes (emulation)")
    res = fit_budget(
        pm,
        xtr,
        ytr,
        cfg,
        teacher=copy.deepcopy(model),
        checkpoint_dir=out / "checkpoints",
        log=_log,
        task=task,
    )
    pm.codec = codec
    disco_acc = evaluate(pm, xte, yte, task=task)
    rep = pm.comm_report(codec)
    # the input's normalization (super-resolution: pixels in [0, 1], as task_data makes them)
    mean, std = (0.0, 1.0) if task == "super_resolution" else (MNIST_MEAN, MNIST_STD)
    meta: dict[str, Any] = {
        "model": model_name,
        "task": task,
        "input": {"mean": [mean] * in_ch, "std": [std] * in_ch},
        # plans of one model (a ladder, link_plans) are recognized by this, and ranked by
        # their accuracy (the task's metric on the held-out split)
        "model_sha256": source_sha256,
        "accuracy": float(disco_acc),
    }
    if task == "classification":
        meta["classes"] = list(range(int(ytr.max()) + 1))
    latency = latency_cli.trained(args, choice, pm, codec) if choice else None
    if latency is not None:
        meta["latency_target"] = latency
    exported = pm.export(out / "plan", codec=codec, meta=meta)
    _log(f"exported plan {exported.plan.hash[:12]} and {args.nodes} shards to {out / 'plan'}")
    nodes = [load_shard(out / "plan" / "plan.json", k) for k in range(args.nodes)]
    with torch.no_grad():
        pm.eval()
        # the shards' arithmetic vs the emulation's, both over the exact fp32 wire: with a
        # lossy codec, sums that differ in the last fp32 bit (dropped vs zeroed columns) can
        # land on two sides of a rounding step and come out one int8 step apart
        pm.codec = "fp32"
        diff = float((run_shards(nodes, xte[:64], codec="fp32") - pm(xte[:64])).abs().max())
        pm.codec = codec
    _print_report(rep, f"DISCO plan, {args.nodes} nodes, budget {budget}")
    figures = (
        {"accuracy_dense": dense_acc, "accuracy_disco": disco_acc}
        if task == "classification"
        else {"metric": metric, "metric_dense": dense_acc, "metric_disco": disco_acc}
    )
    summary = {
        "model": model_name,
        "task": task,
        "nodes": args.nodes,
        "capacities": list(caps) if caps else None,
        "slices": args.slices if caps else None,
        "channel_shares": shares,
        "budget": budget,
        "max_sync_points": max_sync,
        "codec": codec,
        "latency_target": latency,
        **figures,
        "bytes_per_sample_dense": dense_rep.bytes_per_sample,
        "bytes_per_sample_disco": rep.bytes_per_sample,
        "sync_points": rep.sync_points,
        "exchange_fraction": res.achieved_fraction,
        "param_bytes_per_node": exported.param_bytes_per_node,
        "param_bytes_whole_model": exported.whole_model_param_bytes,
        "shard_vs_emulation_max_abs_diff": diff,
        "plan_hash": exported.plan.hash,
        "wall_s": time.time() - t0,
    }
    print(
        f"\n  {metric} dense {dense_acc:.4f} | DISCO {disco_acc:.4f}\n"
        f"  bytes/sample dense TP {dense_rep.bytes_per_sample:,} | DISCO {rep.bytes_per_sample:,}\n"
        f"  parameter bytes per node {exported.param_bytes_per_node} (whole model "
        f"{exported.whole_model_param_bytes:,})\n"
        f"  shard-only execution vs emulation (fp32 wire): max |diff| {diff:.2e}\n"
        f"  wall time {summary['wall_s']:.0f}s"
    )
    if choice is not None and latency is not None:
        latency_cli.report(choice, latency, _log)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
        _log(f"wrote {args.json}")
    return summary


def _fmt_shares(shares: list[float]) -> str:
    return "/".join(f"{s:.2f}" for s in shares)


def cmd_report(args: argparse.Namespace) -> None:
    path = Path(args.plan)
    plan = Plan.load(path / "plan.json" if path.is_dir() else path)
    rep = program_traffic(plan.program, plan_open_count(plan), args.codec or plan.codec)
    _print_report(rep, f"plan {plan.hash[:12]}, {plan.num_nodes} nodes")
    for k, s in enumerate(plan.shards):
        print(f"  node {k}: {s.file} {s.param_bytes:,} parameter bytes")
    print(f"  channel shares per node {_fmt_shares(channel_shares(plan.program))}")


def cmd_probe(args: argparse.Namespace) -> dict[str, Any]:
    """``disco-fl probe``: this device's capacity and available memory
    (:mod:`disco_fl.runtime.probe`).

    With ``--peers``, also round trip and bandwidth to every peer over the peer channel
    (``links`` in the JSON)."""
    from disco_fl.runtime.probe import probe

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    links = link_commands.link_probes(args) if args.peers else None
    res = probe(args.seconds, links)
    c, m = res.compute, res.memory
    for lp in links or []:
        if lp.error:
            print(f"link to node {lp.peer}: failed: {lp.error}")
        else:
            print(f"link to node {lp.peer}: rtt {lp.rtt_ms:.2f} ms, {lp.bandwidth_mbps:.1f} Mbit/s")
    print(
        f"capacity {res.capacity:.1f} GFLOP/s (matmul {c.matmul_gflops:.1f}, conv "
        f"{c.conv_gflops:.1f}; {c.threads} threads, {c.seconds:.1f} s)\n"
        f"memory {res.memory_bytes:,} bytes available ({m.source})\n"
        f"node config: capacity={res.capacity:g} memory-bytes={res.memory_bytes}"
    )
    out = res.to_json()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        _log(f"wrote {args.json}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="disco-fl",
        description="DISCO on Flower: split every layer across household devices and learn which "
        "activations they exchange.",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    def train_args(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument(
            "--task",
            default="classification",
            choices=sorted(TASK_DEFAULTS),
            help="what the model's output means: its loss, metric and built-in data "
            "(segmentation: a per-pixel class map of the digits; super_resolution: x2, 14x14 "
            "-> 28x28; default classification)",
        )
        p.add_argument(
            "--model",
            default=None,
            help=f"a built-in model ({', '.join(sorted(MODELS))}; default the task's: "
            "resnet_narrow, seg_small, espcn) or "
            "your own, 'package.module:function' (a callable returning an nn.Module, called "
            "with those of num_classes, in_channels it names; importable here)",
        )
        p.add_argument(
            "--data", default=None, help=".npz with images/labels (default: built-in MNIST 5k)"
        )
        p.add_argument(
            "--checkpoint", default=None, help="dense torchvision-style checkpoint to start from"
        )
        p.add_argument("--nodes", type=int, default=4, help="nodes per household (default 4)")
        p.add_argument(
            "--capacities",
            default=None,
            help="relative capacity per node, e.g. 1,3 (`disco-fl probe`): slices proportional "
            "to it (default equal slices)",
        )
        p.add_argument(
            "--slices",
            default="channels",
            choices=list(SLICE_RULES),
            help="with --capacities: channel shares proportional to the capacities (channels, "
            "default), or shares whose measured shard compute is (compute: better for sparse "
            "plans; docs/deployment.md)",
        )
        p.add_argument(
            "--budget",
            type=float,
            default=None,
            help="fraction of dense exchange bytes (default 0.05)",
        )
        p.add_argument(
            "--codec",
            default=None,
            choices=["fp32", "fp16", "int8"],
            help="wire codec of the exchanged activations (default int8: 4x fewer bytes, no "
            "measured accuracy cost, docs/serving.md 'Which codec'; fp32: the exact oracle)",
        )
        p.add_argument(
            "--max-sync-points",
            type=int,
            default=None,
            help="at most this many layers exchange anything, each a round trip (default no limit)",
        )
        latency_cli.add_args(p)
        p.add_argument("--dense-epochs", type=int, default=15)
        p.add_argument("--gate-epochs", type=int, default=6)
        p.add_argument("--finetune-epochs", type=int, default=12)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=out, help=f"output folder (default {out})")
        p.add_argument("--json", default=None, help="write the summary JSON here")

    p = sub.add_parser(
        "demo",
        help="local Flower deployment: SuperLink + SuperNodes on loopback, federated DISCO "
        "fine-tuning, then collaborative inference with `disco-fl serve` processes",
    )
    add_demo_args(p)
    p = sub.add_parser("train", help="fine-tune a model's gates to a budget and export the plan")
    train_args(p, "disco_run")
    p = sub.add_parser("report", help="communication report of an exported plan")
    p.add_argument("plan", help="plan.json or its folder")
    p.add_argument(
        "--codec",
        default=None,
        choices=["fp32", "fp16", "int8"],
        help="report for this codec (default: the plan's)",
    )
    p = sub.add_parser(
        "probe",
        help="measure this device: capacity (matmul + conv GFLOP/s) and available memory, "
        "for the node config (capacity=..., memory-bytes=...)",
    )
    p.add_argument(
        "--seconds", type=float, default=1.0, help="compute timing, both kernels (default 1)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the current setting)"
    )
    p.add_argument("--json", default=None, help="write the result JSON here")
    link_commands.add_link_probe_args(p)
    serving_commands.add_parsers(sub)
    link_commands.add_ladder_args(sub.choices["serve"])
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_heap()  # freed tensors stay for the next run (disco_fl.core.heap)
    try:
        if args.command == "demo":
            run_demo(args)
        elif args.command == "train":
            cmd_train(args)
        elif args.command == "report":
            cmd_report(args)
        elif args.command == "probe":
            cmd_probe(args)
        elif args.command == "serve":
            if args.ladder:
                return link_commands.cmd_serve_ladder(args)
            return serving_commands.cmd_serve(args)
        elif args.command == "infer":
            serving_commands.cmd_infer(args)
        elif args.command == "certs":
            return serving_commands.cmd_certs(args)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    except (
        ValueError,
        FileNotFoundError,
        PlanError,
        InferenceError,
        TimeoutError,
        RuntimeError,
    ) as e:
        print(f"disco-fl: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
