"""Training across devices: step time, bytes per step and memory per node (issue 4).

Model: ResNet-18 widths (basic blocks, two per stage, widths 64/128/256/512, strides
1/2/2/2, 11.17M parameters) with the small-image stem (3x3 stride-1 convolution, no max-pool)
for 1x28x28 inputs and 10 classes, built with :class:`disco_fl.models.ResNetConfig`. Batch 64,
Adam, random inputs (step time and memory do not depend on the data).

Plans (N = 2): ``disco10``: gate logits drawn at random (seeded) and hard masks set by
:func:`disco_fl.emulation.budget.calibrate_masks` at a budget of 0.1 of the dense exchange bytes,
i.e. a DISCO plan of that budget without gate training; ``dense`` (full run): every gate open (dense
tensor parallelism).

Modes, each measured in its own fresh process (``--worker``), 1 torch thread per process:

- ``whole_model``: the original ``nn.Module`` (train: Adam; infer: ``eval()`` forward under
  ``no_grad``);
- ``emulation``: the :class:`~disco_fl.emulation.model.PartitionedModel` in one process (default
  execution, i.e. fused for fp32; train: Adam over every shard);
- ``distributed``: N processes over
:class:`~disco_fl.runtime.transport.grpc_transport.GrpcTransport`
  on 127.0.0.1. Train: each holds a :class:`~disco_fl.runtime.training.NodeTrainer` over only its
  shard, loaded from a file written by the parent (:meth:`NodeShard.from_tensors`; no process
  builds the whole model); node 0 owns the batches. The trainer is compact (``compact=True``:
  hard masks, only the weight columns of open channels are held trained, with their gradients
  and Adam state; the closed columns are kept aside, unchanged); ``--full-width`` trains every
  column instead. Infer: each runs
  :func:`disco_fl.runtime.inference.run_node` on its exported shard
  (:func:`disco_fl.emulation.export.load_shard`).

- ``clientapp`` (train only): the Flower ``ClientApp``'s ``train`` handler
  (``disco_fl.fl.client_app.train``) called once in each of N processes with the message a
  SuperNode hands it (node k's packed shard record and a ``TrainConfig`` of hard masks, the
  steps of the other modes, node 0 holding the batches), its peer channel pre-connected over
  gRPC on 127.0.0.1. The memory counts the incoming message, the shard the handler rebuilds
  from the plan and the record (no whole model, no partition), its training and the reply.
  Step time: the mean over the call's steps (the handler reports no per-step times).

Memory attributable to the model: ``model_mb = peak RSS - RSS just before the model and data
are loaded`` (the high-water mark ``VmHWM`` is reset by writing ``5`` to
``/proc/self/clear_refs`` right after the baseline is read; torch, gRPC and the transport are
already up by then). Workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors
go back to the kernel and RSS tracks live memory (same setting for every mode).

Step time: median over the steps after warm-up (distributed: node 0's
``StepResult.seconds``). Bytes per step: payload bytes sent by all nodes, forward + backward
(training) or forward (inference), counted by the transports; the emulation row repeats the
plan's prediction (:func:`disco_fl.runtime.training.predict_step_bytes`), nothing crosses a network.

Usage::

    python bench/train.py --quick --json bench/results_train_quick.json   # < 10 min, 2 cores
    python bench/train.py --json bench/results_train_full.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BATCH = 64
WIDTHS = (64, 128, 256, 512)
LR = 1e-3
SEED = 0
SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {"plans": ["disco10"], "warmup": 2, "train_steps": 4, "infer_reps": 6},
    "full": {"plans": ["disco10", "dense"], "warmup": 2, "train_steps": 8, "infer_reps": 12},
}
NODES = 2
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


# ---- memory -------------------------------------------------------------------------------
def _status_mb() -> dict[str, float]:
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    return out


def _baseline_mb() -> float:
    """Current RSS; resets the high-water mark to it (so VmHWM is the peak from now on)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    st = _status_mb()
    if st["VmHWM"] > st["VmRSS"] + 1.0:
        raise RuntimeError("cannot reset VmHWM (writing 5 to /proc/self/clear_refs failed)")
    return st["VmRSS"]


def _peak_mb() -> float:
    return _status_mb()["VmHWM"]


def _warm_up_torch() -> None:
    """Run a tiny model's training step (conv, BatchNorm, ReLU, linear, cross entropy, Adam)
    and forward under ``no_grad`` before the baseline: torch's lazy initialization (e.g. the
    optimizer's first use imports ~70 MB of modules) is not the model's memory."""
    import torch.nn.functional as F
    from torch import nn

    tiny = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )
    opt = torch.optim.Adam(tiny.parameters(), LR)
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([0, 1])
    F.cross_entropy(tiny(x), y).backward()
    opt.step()
    with torch.no_grad():
        tiny.eval()(x)


# ---- model and artifacts ------------------------------------------------------------------
def build_model() -> torch.nn.Module:
    from disco_fl.models import ResNet, ResNetConfig

    cfg = ResNetConfig(
        block="basic",
        layers=(2, 2, 2, 2),
        widths=WIDTHS,
        strides=(1, 2, 2, 2),
        stem="small",
        in_channels=1,
        num_classes=10,
    )
    return ResNet(cfg)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED + 1)
    return [
        (torch.randn(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
        for _ in range(n)
    ]


def prepare(root: Path, plan_name: str, nodes: int, n_batches: int) -> dict[str, Any]:
    """Write everything the workers load: whole model, partitioned model, per-node training
    shards, the plan, the exported inference shards and the batches."""
    import disco_fl
    from disco_fl.emulation.budget import calibrate_masks
    from disco_fl.fl.federated import shard_arrays
    from disco_fl.runtime.training import plan_of, plan_open_count, predict_step_bytes

    torch.manual_seed(SEED)
    model = build_model().train()
    torch.save(model.state_dict(), root / "whole.pt")
    pm = disco_fl.partition(model, nodes, torch.randn(2, 1, 28, 28)).train()
    fraction = 1.0
    if plan_name.startswith("disco"):
        budget = int(plan_name[len("disco") :]) / 100.0
        g = torch.Generator().manual_seed(SEED + 2)
        with torch.no_grad():
            for _, _, d, gates in pm.gate_items():
                gates.log_alpha[str(d)].copy_(torch.randn(gates.num_channels, generator=g))
        fraction = calibrate_masks(pm, budget)
    torch.save(pm.state_dict(), root / "emulation.pt")  # tensors only: weights_only loads
    _check_emulation(pm, _load_model(root, "emulation", nodes))
    plan = plan_of(pm)
    plan.save(root / "train_plan.json")
    for k in range(nodes):
        shard = pm.shard(k)
        torch.save(
            {"tensors": shard.own_tensors(), "gates": shard.gates.state_dict()},
            root / f"train_node_{k}.pt",
        )
    for k in range(nodes):  # what a SuperNode hands the ClientApp: the packed shard record
        rec = shard_arrays(pm.shard(k))
        packed = {key: torch.from_numpy(rec[key].numpy().copy()) for key in ("index", "data")}
        torch.save(packed, root / f"clientapp_node_{k}.pt")
    exp = pm.export(root / "export")
    torch.save(_batches(n_batches), root / "data.pt")
    pred = predict_step_bytes(plan.program, plan_open_count(plan), BATCH)
    rep = pm.comm_report()
    return {
        "exchange_fraction": fraction,
        "params": sum(p.numel() for p in model.parameters()),
        "predicted_train_bytes": pred.forward + pred.backward,
        "predicted_infer_bytes": pred.forward,
        "infer_bytes_per_sample": rep.bytes_per_sample,
        "dense_infer_bytes_per_sample": rep.dense_bytes_per_sample,
        "export_param_bytes_per_node": exp.param_bytes_per_node,
    }


# ---- workers ------------------------------------------------------------------------------
def _transport(spec: dict[str, Any], plan_hash: str, num_layers: int) -> Any:
    from disco_fl.runtime.transport.grpc_transport import GrpcTransport

    k, n = spec["node"], spec["nodes"]
    addrs = [f"127.0.0.1:{p}" for p in spec["ports"]]
    t = GrpcTransport(
        k, n, plan_hash=plan_hash, listen=addrs[k], peers=addrs, num_layers=num_layers
    )
    t.connect()
    return t


def _skeleton(nodes: int) -> Any:
    """The partitioned model traced on the meta device: structure, no tensor memory."""
    import disco_fl

    with torch.device("meta"):
        return disco_fl.partition(build_model(), nodes, torch.empty(2, 1, 28, 28))


def _load_model(root: Path, mode: str, nodes: int, skeleton: Any = None) -> Any:
    """The one-process model of ``mode``: the whole model or the emulated partitioned one.

    The partitioned model is ``skeleton`` (default: :func:`_skeleton`; the workers trace it
    before their memory baseline) with the tensors of ``emulation.pt`` (``assign=True``: held
    once, as unpickling the whole module did, but only tensors are unpickled)."""
    if mode == "whole_model":
        model = build_model()
        model.load_state_dict(torch.load(root / "whole.pt", weights_only=True))
        return model
    pm = skeleton if skeleton is not None else _skeleton(nodes)
    pm.load_state_dict(torch.load(root / "emulation.pt", weights_only=True), assign=True)
    left = [n for n, t in [*pm.named_parameters(), *pm.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"emulation.pt lacks {left[:5]}")
    return pm


def _check_emulation(pm: Any, loaded: Any) -> None:
    """The partitioned model rebuilt from ``emulation.pt`` computes what ``pm`` does."""
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(SEED + 3))
    pm.eval()
    loaded.eval()
    with torch.no_grad():
        same = torch.equal(pm(x), loaded(x))
    pm.train()
    if not same:
        raise RuntimeError("the partitioned model rebuilt from emulation.pt differs")


def _worker_train(spec: dict[str, Any]) -> dict[str, Any]:
    import torch.nn.functional as F

    from disco_fl.runtime.training import default_param_groups

    root = Path(spec["dir"])
    warm, steps = spec["warmup"], spec["steps"]
    mode = spec["mode"]
    times: list[float] = []
    nbytes: list[int] = []
    if mode == "distributed":
        from disco_fl.node.shard import NodeShard
        from disco_fl.partition.plan import Plan
        from disco_fl.runtime.training import NodeTrainer

        plan = Plan.load(root / "train_plan.json")
        tr = _transport(spec, plan.hash, len(plan.program.ops))
        k = spec["node"]
        base = _baseline_mb()
        st = torch.load(root / f"train_node_{k}.pt", weights_only=True)
        shard = NodeShard.from_tensors(plan.program, k, st["tensors"], st["gates"])
        del st
        opt = torch.optim.Adam(default_param_groups(shard, LR))
        trainer = NodeTrainer(shard, plan, tr, opt, timeout=600.0, compact=spec["compact"])
        data = torch.load(root / "data.pt", weights_only=True) if k == 0 else None
        for t in range(warm + steps):
            x, y = data[t] if data is not None else (None, None)
            res = trainer.step(t, x, y)
            if t >= warm:
                times.append(res.seconds)
                nbytes.append(res.forward_bytes + res.backward_bytes)
        peak = _peak_mb()
        tr.close(5.0)
    elif mode == "clientapp":
        return _worker_clientapp(spec)
    else:
        skeleton = _skeleton(spec["nodes"]) if mode == "emulation" else None
        base = _baseline_mb()
        model = _load_model(root, mode, spec["nodes"], skeleton).train()
        if mode == "whole_model":
            opt = torch.optim.Adam(model.parameters(), LR)
        else:
            groups = [g for s in model.shards for g in default_param_groups(s, LR)]
            opt = torch.optim.Adam(groups)
        data = torch.load(root / "data.pt", weights_only=True)
        for t in range(warm + steps):
            x, y = data[t]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if t >= warm:
                times.append(time.perf_counter() - t0)
                nbytes.append(0)
        peak = _peak_mb()
    return {"times": times, "bytes": nbytes, "base_mb": base, "peak_mb": peak}


def _worker_clientapp(spec: dict[str, Any]) -> dict[str, Any]:
    """One call of the ClientApp's ``train`` handler (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # clients/ of this checkout
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import disco_fl.emulation.budget  # noqa: F401  (the handler's lazy imports, before the baseline)
    import disco_fl.fl.client_app as ca
    import disco_fl.runtime.training  # noqa: F401
    from disco_fl.fl.federated import NodeData
    from disco_fl.fl.round_config import TrainConfig
    from disco_fl.partition.plan import Plan

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    root = Path(spec["dir"])
    k, n, steps = spec["node"], spec["nodes"], spec["warmup"] + spec["steps"]
    plan_json = (root / "train_plan.json").read_text()
    plan = Plan.from_json(json.loads(plan_json))
    tr = _transport(spec, f"{plan.hash}/r1", len(plan.program.ops))
    close = tr.close
    tr.close = lambda *a, **kw: None  # closed below, after the measurement
    ca._transport = lambda *a, **kw: tr  # type: ignore[assignment]
    batches = torch.load(root / "data.pt", weights_only=True)
    x = torch.cat([b[0] for b in batches]) if k == 0 else torch.zeros(0)
    y = torch.cat([b[1] for b in batches]) if k == 0 else torch.zeros(0, dtype=torch.long)
    data = NodeData(x, y, torch.zeros(0), torch.zeros(0, dtype=torch.long))
    ca._data = lambda ctx: data  # type: ignore[assignment]
    cfg = TrainConfig(
        server_round=1, household="bench", shard=k, token="bench", plan=plan_json, seed=SEED,
        peers=tuple(f"127.0.0.1:{p}" for p in spec["ports"]), step_timeout=600.0,
        owners=(0,), owner_examples=(len(batches[0][1]) * len(batches),), steps=steps,
        batch_size=BATCH, lr=LR, gate_lr=0.0, gate_mode="hard", gate_penalty=0.0, budget=1.0,
    )  # fmt: skip
    node_config = {
        "household": "bench",
        "shard": k,
        "peer-address": f"127.0.0.1:{spec['ports'][k]}",
    }
    ctx = Context(run_id=1, node_id=k, node_config=node_config, state=RecordDict(), run_config={})
    base = _baseline_mb()
    packed = torch.load(root / f"clientapp_node_{k}.pt", weights_only=True)
    arrays = ArrayRecord({key: Array(t.numpy()) for key, t in packed.items()})
    del packed
    msg = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(cfg.to_config())}),
        dst_node_id=k,
        message_type="train",
    )
    del arrays
    reply = ca.train(msg, ctx)
    peak = _peak_mb()
    metrics = reply.content.metric_records["metrics"]
    per_step = (float(metrics["t-done"]) - float(metrics["t-connected"])) / steps  # type: ignore[arg-type]
    sent = float(metrics["bytes-sent"]) / steps  # type: ignore[arg-type]
    n_meas = spec["steps"]
    close(5.0)
    return {
        "times": [per_step] * n_meas,
        "bytes": [int(sent)] * n_meas,
        "base_mb": base,
        "peak_mb": peak,
        "nodes": n,
    }


def _worker_infer(spec: dict[str, Any]) -> dict[str, Any]:
    root = Path(spec["dir"])
    reps = spec["warmup"] + spec["steps"]
    mode = spec["mode"]
    times: list[float] = []
    nbytes: list[int] = []
    if mode == "distributed":
        from disco_fl.emulation.export import load_shard
        from disco_fl.partition.plan import Plan
        from disco_fl.runtime.inference import run_node

        plan = Plan.load(root / "export" / "plan.json")
        tr = _transport(spec, plan.hash, len(plan.program.ops))
        k = spec["node"]
        base = _baseline_mb()
        node = load_shard(root / "export" / "plan.json", k)
        data = torch.load(root / "data.pt", weights_only=True) if k == 0 else None
        for t in range(reps):
            x = data[t % len(data)][0] if data is not None else None
            before = sum(tr.payload_bytes_sent().values())
            t0 = time.perf_counter()
            run_node(
                node,
                tr,
                x,
                session_id=f"infer/{t}",
                step=t,
                timeout=600.0,
                overlap=spec.get("overlap", True),
            )
            dt = time.perf_counter() - t0
            if t >= spec["warmup"]:
                times.append(dt)
                nbytes.append(sum(tr.payload_bytes_sent().values()) - before)
        peak = _peak_mb()
        tr.close(5.0)
    else:
        skeleton = _skeleton(spec["nodes"]) if mode == "emulation" else None
        base = _baseline_mb()
        model = _load_model(root, mode, spec["nodes"], skeleton).eval()
        data = torch.load(root / "data.pt", weights_only=True)
        with torch.no_grad():
            for t in range(reps):
                x = data[t % len(data)][0]
                t0 = time.perf_counter()
                model(x)
                if t >= spec["warmup"]:
                    times.append(time.perf_counter() - t0)
                    nbytes.append(0)
        peak = _peak_mb()
    return {"times": times, "bytes": nbytes, "base_mb": base, "peak_mb": peak}


def worker(spec: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    _warm_up_torch()
    import disco_fl.models  # noqa: F401  (imported before every mode's baseline: code, not model)

    out = _worker_train(spec) if spec["phase"] == "train" else _worker_infer(spec)
    Path(spec["out"]).write_text(json.dumps(out))


def _run_config(
    root: Path, plan_name: str, mode: str, phase: str, nodes: int, s: dict[str, Any]
) -> dict[str, Any]:
    procs = nodes if mode in ("distributed", "clientapp") else 1
    from disco_fl.cli.demo import free_ports

    ports = free_ports(procs)
    env = {**os.environ, **WORKER_ENV}
    running = []
    outs = []
    for k in range(procs):
        out = root / f"out_{mode}_{phase}_{k}.json"
        if out.exists():
            out.unlink()
        spec = {
            "dir": str(root),
            "mode": mode,
            "phase": phase,
            "node": k,
            "nodes": nodes,
            "ports": ports,
            "warmup": s["warmup"],
            "steps": s["train_steps"] if phase == "train" else s["infer_reps"],
            "out": str(out),
            "compact": s["compact"],
            "overlap": s["overlap"],
        }
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        running.append(subprocess.Popen(cmd, env=env))
        outs.append(out)
    for p in running:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"{mode}/{phase} worker failed with exit code {p.returncode}")
    res = [json.loads(o.read_text()) for o in outs]
    model_mb = [r["peak_mb"] - r["base_mb"] for r in res]
    per_step = [sum(vals) for vals in zip(*(r["bytes"] for r in res), strict=True)]
    return {
        "plan": plan_name,
        "mode": mode,
        "nodes": nodes,
        "phase": phase,
        "step_ms_median": 1000 * statistics.median(res[0]["times"]),
        "step_ms_all": [round(1000 * t, 1) for t in res[0]["times"]],
        "bytes_per_step": int(statistics.median(per_step)) if per_step else 0,
        "bytes_measured": mode in ("distributed", "clientapp"),
        "peak_rss_mb_per_node": max(r["peak_mb"] for r in res),
        "model_mb_per_node": max(model_mb),
        "model_mb_each_node": [round(m, 1) for m in model_mb],
        **({"overlap": s["overlap"]} if mode == "distributed" and phase == "infer" else {}),
        "baseline_rss_mb_each_node": [round(r["base_mb"], 1) for r in res],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    whole = {r["phase"]: r["model_mb_per_node"] for r in rows if r["mode"] == "whole_model"}
    lines = [
        "| plan | mode | N | phase | step ms (median) | bytes / step | peak RSS MB / node "
        "| model MB / node | vs whole model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["bytes_per_step"]
        bs = f"{b / 1e6:.2f} MB" + ("" if r["bytes_measured"] or not b else " (predicted)")
        ratio = r["model_mb_per_node"] / whole[r["phase"]] if r["phase"] in whole else float("nan")
        lines.append(
            f"| {r['plan']} | {r['mode']} | {r['nodes']} | {r['phase']} | "
            f"{r['step_ms_median']:.0f} | {bs} | {r['peak_rss_mb_per_node']:.0f} | "
            f"{r['model_mb_per_node']:.0f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="one plan, fewer steps (< 10 min)")
    ap.add_argument(
        "--full-width",
        action="store_true",
        help="distributed training without compact weights (every weight column trained)",
    )
    ap.add_argument(
        "--no-overlap",
        action="store_true",
        help="distributed inference without compute / transfer overlap (issue 17)",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="run only these MODE/PHASE pairs, comma-separated (e.g. distributed/infer)",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    torch.set_num_threads(1)
    s = {
        **SETTINGS["quick" if args.quick else "full"],
        "compact": not args.full_width,
        "overlap": not args.no_overlap,
    }
    only = set(args.only.split(",")) if args.only else None
    t_start = time.monotonic()
    rows: list[dict[str, Any]] = []
    plans: dict[str, Any] = {}
    n_batches = max(s["warmup"] + s["train_steps"], s["warmup"] + s["infer_reps"])
    with tempfile.TemporaryDirectory(prefix="disco_train_bench_") as tmp:
        for i, plan_name in enumerate(s["plans"]):
            root = Path(tmp) / plan_name
            root.mkdir()
            plans[plan_name] = prepare(root, plan_name, NODES, n_batches)
            print(f"plan {plan_name}: {plans[plan_name]}", flush=True)
            for phase in ("train", "infer"):
                modes = ["whole_model"] if i == 0 else []
                modes += ["emulation", "distributed"]
                modes += ["clientapp"] if phase == "train" and i == 0 else []
                for mode in modes:
                    if only is not None and f"{mode}/{phase}" not in only:
                        continue
                    n = 1 if mode == "whole_model" else NODES
                    row = _run_config(root, plan_name, mode, phase, n, s)
                    if phase == "train" and mode != "whole_model":
                        row["predicted_bytes_per_step"] = plans[plan_name]["predicted_train_bytes"]
                    elif mode != "whole_model":
                        row["predicted_bytes_per_step"] = plans[plan_name]["predicted_infer_bytes"]
                    if mode == "emulation":
                        row["bytes_per_step"] = row["predicted_bytes_per_step"]
                    rows.append(row)
                    print(
                        f"{plan_name:>8} {mode:>12} N={n} {phase}: {row['step_ms_median']:.0f} ms, "
                        f"{row['bytes_per_step'] / 1e6:.2f} MB/step, model "
                        f"{row['model_mb_per_node']:.0f} MB/node (peak RSS "
                        f"{row['peak_rss_mb_per_node']:.0f} MB)",
                        flush=True,
                    )
    wall = time.monotonic() - t_start
    rows.sort(key=lambda r: (r["phase"] != "train", r["plan"], r["mode"] != "whole_model"))
    table = _table(rows)
    print(table)
    whole_rows = [r for r in rows if r["mode"] == "whole_model" and r["phase"] == "train"]
    whole_train = whole_rows[0]["model_mb_per_node"] if whole_rows else float("nan")  # --only
    bar = {
        r["plan"]: r["model_mb_per_node"] / whole_train
        for r in rows
        if r["mode"] == "distributed" and r["phase"] == "train"
    }
    clientapp = {
        r["plan"]: r["model_mb_per_node"] / whole_train for r in rows if r["mode"] == "clientapp"
    }
    print(f"train model MB per node / whole model: {bar} (bar: <= 0.6); wall {wall:.0f} s")
    print(f"ClientApp train call, model MB per node / whole model: {clientapp}")
    if args.json:
        out = {
            "rows": rows,
            "plans": plans,
            "settings": {**s, "batch": BATCH, "widths": WIDTHS, "nodes": NODES, "lr": LR},
            "worker_env": WORKER_ENV,
            "train_ratio_vs_whole": bar,
            "clientapp_ratio_vs_whole": clientapp,
            "wall_s": round(wall, 1),
            "argv": sys.argv[1:],
        }
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
