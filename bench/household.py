"""Degraded households: accuracy with all nodes up and with each single node missing.

For ``resnet_narrow`` on the built-in MNIST split (4000 train / 1000 test, as
``bench/comm_accuracy.py``), N = 2 and 4, budget 0.1: a dense model is trained, partitioned
with the head split over the nodes (``head="split"``) or owned by the requester
(``head="requester"``), fine-tuned to the budget (``fit_budget``, the emulation), exported,
and evaluated by shard-only execution with every node up and with each node but the
requester missing (``run_shards(..., missing={k})``: exactly what a household in degraded
mode computes, ``disco-fl serve --degraded-wait``).

Plans: head split, no node dropout (the baseline); head on the requester, no dropout, without
and with BatchNorm statistics per missing node (:func:`~disco_fl.emulation.statistics.
calibrate_degraded`); head on the requester, trained with node dropout
(``BudgetConfig.node_dropout``, ``--dropout``, default 0.3: each node but the requester is
missing from a training step with that probability; ``fit_budget`` then calibrates the
statistics per missing node). Rows: ``{"model", "nodes", "budget", "head", "dropout",
"degraded_statistics", "missing": null | k, "accuracy"}`` (``dropout``: the rate, 0.0 = none;
a node missing uses the plan's statistics for it when ``degraded_statistics``, as a serving
household does once its sessions start without that node).

Usage::

    python bench/household.py --quick --json household.json   # ~10 min on 2 cores
    python bench/household.py --json household.json           # longer training
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import disco_fl
from disco_fl.data import load_builtin, stratified_split, to_tensor
from disco_fl.emulation.budget import BudgetConfig, evaluate, fit_budget, train_model
from disco_fl.emulation.export import load_shard, run_shards
from disco_fl.emulation.statistics import calibrate_degraded
from disco_fl.models import build_model

SETTINGS = {
    "quick": {"dense_epochs": 8, "gate_epochs": 2, "finetune_epochs": 3, "max_steps": 30},
    "full": {"dense_epochs": 15, "gate_epochs": 6, "finetune_epochs": 12, "max_steps": None},
}


def _accuracy(nodes: list[Any], x: torch.Tensor, y: torch.Tensor, missing: set[int]) -> float:
    correct = 0
    for i in range(0, len(x), 250):
        out = run_shards(nodes, x[i : i + 250], missing=missing)
        correct += int((out.argmax(-1) == y[i : i + 250]).sum())
    return correct / len(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nodes", default="2,4")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--dropout", type=float, default=0.3, help="node dropout rate of the plans trained with it"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    s = SETTINGS["quick" if args.quick else "full"]
    images, labels = load_builtin("mnist_5k")  # the split of bench/comm_accuracy.py
    train_idx, test_idx = stratified_split(labels, [4000, 1000], seed=0)
    x_all = to_tensor(images)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    xtr, ytr, xte, yte = x_all[train_idx], y_all[train_idx], x_all[test_idx], y_all[test_idx]
    source = "builtin:mnist_5k"
    torch.manual_seed(args.seed)
    dense = build_model("resnet_narrow")
    t0 = time.time()
    train_model(dense, xtr, ytr, epochs=s["dense_epochs"], lr=0.01, seed=args.seed)
    dense.eval()
    dense_acc = evaluate(dense, xte, yte)
    print(f"dense accuracy {dense_acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    rows: list[dict[str, Any]] = []
    for n in [int(v) for v in args.nodes.split(",")]:
        plans = [("split", 0.0, False), ("requester", 0.0, False), ("requester", 0.0, True)]
        plans.append(("requester", args.dropout, True))
        for head, dropout, stats in plans:
            pm = disco_fl.partition(copy.deepcopy(dense), n, xtr[:2], head=head)
            cfg = BudgetConfig(
                budget=args.budget,
                gate_epochs=s["gate_epochs"],
                finetune_epochs=s["finetune_epochs"],
                augment_shift=2,
                max_steps_per_epoch=s["max_steps"],
                seed=args.seed,
                node_dropout=dropout,
            )
            fit_budget(pm, xtr, ytr, cfg, teacher=copy.deepcopy(dense))
            if stats and not pm.degraded_statistics:  # fit_budget does it with node dropout
                calibrate_degraded(pm, xtr, batch_size=256)
            elif not stats:
                pm.degraded_statistics = {}
            with tempfile.TemporaryDirectory() as d:
                pm.export(d)
                nodes = [load_shard(Path(d) / "plan.json", k) for k in range(n)]
                requester = pm.program.requester
                for missing in [None, *[k for k in range(n) if k != requester]]:
                    acc = _accuracy(nodes, xte, yte, set() if missing is None else {missing})
                    row = {
                        "model": "resnet_narrow",
                        "nodes": n,
                        "budget": args.budget,
                        "head": head,
                        "dropout": dropout,
                        "degraded_statistics": stats,
                        "missing": missing,
                        "accuracy": acc,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out = {
        "settings": {"mode": "quick" if args.quick else "full", **s, "data": source},
        "dense_accuracy": dense_acc,
        "rows": rows,
        "seconds": time.time() - t0,
    }
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
