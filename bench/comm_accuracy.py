"""Accuracy (or the task's metric) vs communication of DISCO plans (issues: the DISCO core;
16, tasks beyond classification).

Data: ``mnist_5k.npz`` (``../shared/data`` when present, else the copy inside the package),
stratified 4000/1000 train/test split, seed 0. Models: the small ResNet in two widths
(``resnet`` 32/64/128, ``resnet_narrow`` 8/16/32) and the ViT preset ``vit_tiny_mnist``
(patch 7, 64-dim embeddings, 4 heads, depth 4, partitioned by heads), trained dense first.
For every model, node count and budget: partition the dense model, fine-tune gates and
weights to the budget in the emulation (:func:`disco_fl.emulation.budget.fit_budget`, with
distillation from the dense model), and measure test accuracy and bytes per sample with the
fp32 and int8 codecs.

``--task segmentation`` (model ``seg_small``) and ``--task super_resolution`` (``espcn``)
(or ``seg_small_rh``, its one-classifier variant partitioned with ``head="requester"``,
or ``seg_narrow``, that variant at half the width: ``--models seg_narrow``)
use the data derived from the same digits (:mod:`disco_fl.data.pixel_tasks`: per-pixel
classes, 11 with the background; x2 super-resolution 14x14 -> 28x28) and the same split;
rows have the same schema, the metric in ``"accuracy"`` (mean IoU as a fraction, or PSNR in
dB) and its name in ``"metric"``. Defaults for these tasks: N = 2 and 4, budgets 0.2, 0.1,
0.05, 0.0 and dense (budget 1.0: the dense model partitioned with every gate open, not
trained further: dense tensor parallelism).

Usage::

    python bench/comm_accuracy.py --json comm_accuracy.json            # full run
    python bench/comm_accuracy.py --quick --json comm_accuracy.json    # < 15 min on 2 cores
    python bench/comm_accuracy.py --task segmentation --json seg.json  # or super_resolution
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

import disco_fl
from disco_fl.data import (
    load_builtin,
    load_npz,
    segmentation_data,
    stratified_split,
    super_resolution_data,
    to_tensor,
)
from disco_fl.emulation.budget import BudgetConfig, evaluate, fit_budget, train_model
from disco_fl.models import build_model
from disco_fl.tasks import get_task, psnr_db

BUDGETS = [0.5, 0.2, 0.1, 0.05, 0.02, 0.0]
NODES = [2, 4, 8]
MODELS = ["resnet_narrow", "resnet", "vit_tiny_mnist"]
TASK_MODELS = {"segmentation": ["seg_small"], "super_resolution": ["espcn"]}
# Models partitioned with the head on the requester (``partition(..., head="requester")``):
# seg_small_rh's one 14x14 classifier, so that its class maps never travel (``--models
# seg_small_rh``), and seg_narrow, the same network at half the width.
REQUESTER_HEAD = {"seg_small_rh", "seg_narrow"}
TASK_NODES = [2, 4]
TASK_BUDGETS = [1.0, 0.2, 0.1, 0.05, 0.0]  # 1.0: dense tensor parallelism, not trained

# Training lengths (epochs over the 4000 training images).
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "resnet": {"dense_epochs": 6, "gate_epochs": 1, "finetune_epochs": 1},
        "resnet_narrow": {"dense_epochs": 15, "gate_epochs": 6, "finetune_epochs": 12},
        # the ViT needs more epochs on 4000 images (and a lower dense learning rate)
        "vit_tiny_mnist": {
            "dense_epochs": 40,
            "dense_lr": 0.003,
            "dense_shift": 2,
            "gate_epochs": 6,
            "finetune_epochs": 8,
        },
    },
    "quick": {
        "resnet": {"dense_epochs": 2, "gate_epochs": 1, "finetune_epochs": 1, "max_steps": 6},
        "resnet_narrow": {
            "dense_epochs": 8,
            "gate_epochs": 2,
            "finetune_epochs": 2,
            "max_steps": 20,
        },
        "vit_tiny_mnist": {
            "dense_epochs": 20,
            "dense_lr": 0.003,
            "dense_shift": 2,
            "gate_epochs": 2,
            "finetune_epochs": 2,
            "max_steps": 20,
        },
    },
}
# The dense-prediction models (no shift augmentation: it would move the input only).
SETTINGS["full"].update(
    {
        # the same training as seg_small
        "seg_small_rh": {
            "dense_epochs": 10,
            "dense_lr": 0.01,
            "gate_epochs": 3,
            "finetune_epochs": 4,
        },
        # sized for ~30 min per task on 2 shared cores (a partitioned seg_small epoch is
        # ~1.5 min there); longer training is the first thing to try for a smaller gap
        "seg_small": {
            "dense_epochs": 10,
            "dense_lr": 0.01,
            "gate_epochs": 3,
            "finetune_epochs": 4,
        },
        # half of seg_small_rh's width: fast enough for longer training (a dense epoch is
        # ~3 s on one core), and 10 epochs leave it far from converged
        "seg_narrow": {
            "dense_epochs": 40,
            "dense_lr": 0.01,
            "gate_epochs": 3,
            "finetune_epochs": 12,
        },
        "espcn": {
            "dense_epochs": 40,
            "dense_lr": 0.005,
            "gate_epochs": 6,
            "finetune_epochs": 12,
        },
    }
)
SETTINGS["quick"].update(
    {
        "seg_small_rh": {
            "dense_epochs": 6,
            "dense_lr": 0.01,
            "gate_epochs": 2,
            "finetune_epochs": 2,
            "max_steps": 15,
        },
        "seg_small": {
            "dense_epochs": 6,
            "dense_lr": 0.01,
            "gate_epochs": 2,
            "finetune_epochs": 2,
            "max_steps": 15,
        },
        "seg_narrow": {
            "dense_epochs": 20,
            "dense_lr": 0.01,
            "gate_epochs": 2,
            "finetune_epochs": 2,
            "max_steps": 15,
        },
        "espcn": {
            "dense_epochs": 20,
            "dense_lr": 0.005,
            "gate_epochs": 3,
            "finetune_epochs": 3,
            "max_steps": 20,
        },
    }
)


def load_data(
    path: str | None, task: str = "classification"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist_5k.npz"
    if path is None and default.exists():
        path = str(default)
    if path is not None:
        images, labels = load_npz(path)
        source = path
    else:
        images, labels = load_builtin("mnist_5k")
        source = "builtin:mnist_5k"
    train_idx, test_idx = stratified_split(labels, [4000, 1000], seed=0)
    if task == "segmentation":
        x, y = segmentation_data(images, labels)
    elif task == "super_resolution":
        x, y = super_resolution_data(images)
    else:
        x = to_tensor(images)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx], source


def _task_of(args: tuple[Any, ...], n: int) -> str:
    return args[n] if len(args) > n else "classification"


def _job(
    args: tuple[Any, ...],
) -> dict[str, Any]:
    """One (model, nodes, budget) cell; ``args`` = (model, nodes, budget, setting, dense
    state, data path, seed[, task]). Returns ``{"rows": [...]}``, or ``{"rows": [], "skipped":
    {...}}`` with the reason when the model cannot be partitioned that way (for example the
    ViT's 4 heads over 8 nodes), so one impossible cell never costs the finished ones."""
    model_name, nodes, budget, setting, dense_state, data_path, seed = args[:7]
    task = _task_of(args, 7)
    torch.set_num_threads(1)
    xtr, ytr, xte, yte, _ = load_data(data_path, task)
    dense = build_model(model_name)
    dense.load_state_dict(dense_state)
    dense.eval()
    try:
        capture: Literal["fx", "auto"] = "fx" if task == "classification" else "auto"
        head: Literal["split", "requester"] = (
            "requester" if model_name in REQUESTER_HEAD else "split"
        )
        pm = disco_fl.partition(dense, nodes, xtr[:2], capture=capture, head=head)
    except disco_fl.PartitionError as e:
        reason = f"cannot partition: {e}"
        print(
            f"[{time.strftime('%H:%M:%S')}] {model_name} N={nodes} budget={budget}: "
            f"skipped ({reason})",
            flush=True,
        )
        return {
            "rows": [],
            "skipped": {"model": model_name, "nodes": nodes, "budget": budget, "reason": reason},
        }
    cfg = BudgetConfig(
        budget=budget,
        gate_epochs=setting["gate_epochs"],
        finetune_epochs=setting["finetune_epochs"],
        augment_shift=2 if task == "classification" else 0,
        max_steps_per_epoch=setting.get("max_steps"),
        seed=seed,
        **{k: setting[k] for k in ("lr", "distill", "gate_lr", "max_sync_points") if k in setting},
    )
    t0 = time.time()
    if budget >= 1.0 and task != "classification":  # dense tensor parallelism, as trained
        pm.set_all_masks(1.0)
        pm.gate_mode = "hard"
        pm.eval()
        seconds = 0.0
    else:
        seconds = fit_budget(pm, xtr, ytr, cfg, teacher=copy.deepcopy(dense), task=task).seconds
    metric = get_task(task).metric_name
    rows = []
    for codec in ("fp32", "int8"):
        pm.codec = codec
        rep = pm.comm_report(codec)
        rows.append(
            {
                "model": model_name,
                "nodes": nodes,
                "budget": budget,
                "codec": codec,
                "accuracy": evaluate(pm, xte, yte, task=task),
                "metric": metric,
                "bytes_per_sample": rep.bytes_per_sample,
                "dense_bytes_per_sample": rep.dense_bytes_per_sample,
                "sync_points": rep.sync_points,
                "max_sync_points": cfg.max_sync_points,
                "reduction": rep.reduction,
                "exchange_fraction": rep.exchange_fraction,
                "train_seconds": seconds,
            }
        )
    int8 = "n/a" if rows[1]["accuracy"] is None else f"{rows[1]['accuracy']:.4f}"
    print(
        f"[{time.strftime('%H:%M:%S')}] {model_name} N={nodes} budget={budget}: "
        f"{metric} fp32 {rows[0]['accuracy']:.4f} int8 {int8}, "
        f"{rows[0]['reduction']:.1f}x fewer fp32 bytes than dense TP, "
        f"{rows[0]['sync_points']} sync points ({time.time() - t0:.0f}s)",
        flush=True,
    )
    return {"rows": rows}


def _dense(
    args: tuple[Any, ...],
) -> tuple[str, dict[str, torch.Tensor], float]:
    model_name, setting, data_path, seed = args[:4]
    task = _task_of(args, 4)
    epochs = setting["dense_epochs"]
    torch.set_num_threads(1)
    xtr, ytr, xte, yte, _ = load_data(data_path, task)
    torch.manual_seed(seed)
    model = build_model(model_name)
    lr = setting.get("dense_lr", 0.01)
    shift = setting.get("dense_shift", 0)
    train_model(model, xtr, ytr, epochs=epochs, lr=lr, augment_shift=shift, seed=seed, task=task)
    acc = evaluate(model, xte, yte, task=task)
    metric = get_task(task).metric_name
    print(f"[{time.strftime('%H:%M:%S')}] dense {model_name}: {metric} {acc:.4f}", flush=True)
    return model_name, model.state_dict(), acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", required=True, help="output JSON path")
    ap.add_argument("--quick", action="store_true", help="short training (< 15 min on 2 cores)")
    ap.add_argument(
        "--data", default=None, help="mnist_5k.npz path (default ../shared/data, else builtin)"
    )
    ap.add_argument(
        "--task",
        default="classification",
        choices=["classification", *TASK_MODELS],
        help="the task (default classification); sets the default models, nodes and budgets",
    )
    ap.add_argument("--models", default=None)
    ap.add_argument("--nodes", default=None)
    ap.add_argument("--budgets", default=None)
    ap.add_argument("--workers", type=int, default=2, help="parallel processes (1 thread each)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting of every model (gate_epochs, finetune_epochs, "
        "dense_epochs, max_steps, lr, distill, gate_lr, max_sync_points, ...); repeatable",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    mode = "quick" if args.quick else "full"
    task = args.task
    dense_task = task != "classification"
    models = (args.models or ",".join(TASK_MODELS.get(task, MODELS))).split(",")
    nodes = [
        int(n)
        for n in (args.nodes or ",".join(map(str, TASK_NODES if dense_task else NODES))).split(",")
    ]
    budgets = [
        float(b)
        for b in (
            args.budgets or ",".join(map(str, TASK_BUDGETS if dense_task else BUDGETS))
        ).split(",")
    ]
    for m in models:
        if m not in SETTINGS[mode]:
            ap.error(f"unknown model {m!r}; choose from {list(SETTINGS[mode])}")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set wants KEY=VALUE, got {item!r}")
        for m in models:
            SETTINGS[mode][m] = {
                **SETTINGS[mode][m],
                key: float(value) if "." in value else int(value),
            }
    t0 = time.time()
    _, _, xte, yte, source = load_data(args.data, task)
    print(
        f"data: {source} (4000/1000 stratified split, seed 0); task {task}, mode {mode}", flush=True
    )
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        dense = pool.map(
            _dense, [(m, SETTINGS[mode][m], args.data, args.seed, task) for m in models]
        )
        states = {name: state for name, state, _ in dense}
        out: dict[str, Any] = {
            "dense_accuracy": {name: acc for name, _, acc in dense},
            "rows": [],
            "skipped": [],
            "meta": {
                "task": task,
                "metric": get_task(task).metric_name,
                "mode": mode,
                "data": source,
                "split": "stratified 4000/1000, seed 0",
                "settings": SETTINGS[mode],
                "budget_config": {
                    k: v for k, v in asdict(BudgetConfig(budget=0.1)).items() if k != "budget"
                },
                "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
            },
        }
        if task == "super_resolution":  # reference: no network, bilinear / bicubic x2
            out["meta"]["baselines_psnr_db"] = {
                mode_: psnr_db(
                    F.interpolate(xte, scale_factor=2, mode=mode_, align_corners=False), yte
                )
                for mode_ in ("bilinear", "bicubic")
            }
        jobs = [
            (m, n, b, SETTINGS[mode][m], states[m], args.data, args.seed, task)
            for m in models
            for n in nodes
            for b in budgets
        ]
        for cell in pool.imap(_job, jobs):
            out["rows"].extend(cell["rows"])
            if "skipped" in cell:
                out["skipped"].append(cell["skipped"])
            out["meta"]["wall_seconds"] = time.time() - t0
            Path(args.json).write_text(json.dumps(out, indent=1))
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json} ({time.time() - t0:.0f}s)")
    for cell in out["skipped"]:
        print(f"skipped {cell['model']} N={cell['nodes']} b={cell['budget']}: {cell['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
