"""The ``ServerApp`` of DISCO fine-tuning (``disco_fl.fl.server.server_app:app``).

Run config keys (defaults in ``pyproject.toml`` ``[tool.flwr.app.config]``; override with
``flwr run . <connection> --run-config 'key=value ...'``):

``task`` (``"classification"``, default; ``"segmentation"`` or ``"super_resolution"``: the
nodes' loss, metric and built-in data, :mod:`disco_fl.tasks`; the evaluations report the
task's metric, ``miou`` / ``psnr_db``, and ``summary.json`` names it in ``"metric"``),
``model``, ``nodes``, ``num-classes``, ``in-channels``, ``image-size``, ``norm`` (the model,
see :class:`~disco_fl.fl.federated.ModelSpec`; a built-in model must be the task's:
``seg_small`` with ``num-classes = 11``, ``espcn`` with ``image-size = 14``, and an empty
``model`` is the task's built-in), ``households`` (expected households, 0: any),
``num-rounds``, ``steps``, ``batch-size``, ``lr``, ``gate-lr``, ``budget``,
``finetune-rounds``, ``init-penalty``, ``dual-lr``, ``codec`` (of the activations on the
wire: ``"int8"``, default, ``"fp16"``, or ``"fp32"``, exact), ``seed``, ``dp`` (bool),
``dp-noise``, ``dp-clip``, ``dp-delta``, ``evaluate`` (bool), ``eval-batch-size``,
``eval-every`` (0: last round only), ``query-timeout``, ``connect-timeout`` (the wait for the
expected nodes to connect before the roster query; 0, default: ``query-timeout``), ``step-timeout``,
``rendezvous-timeout``, ``round-timeout``, ``node-dropout`` (in [0, 1), default 0: each node
but a step's batch owner sits a training step out with this probability, so that the plan
still answers with a device gone), ``degraded-training`` (bool, default false: a household goes on
training without a node that failed mid-round or is unavailable at a round's start, not a batch
owner, and counts with its survivors' shards; :mod:`disco_fl.fl.server.degraded`,
:mod:`disco_fl.fl.server.availability`), ``degraded-statistics`` (``"auto"``, default: after the
last round a run with ``node-dropout > 0`` of a model with BatchNorm estimates the BatchNorm
statistics for each missing node on the households' data, and the delivered shards carry
them; ``"on"``: for any model with BatchNorm; ``"off"``: never;
:mod:`disco_fl.fl.server.calibration`), ``calibration-batches`` (default 16) and
``calibration-batch-size`` (default 256): the batches per missing node of that estimate,
``initial-checkpoint`` (dense state dict to start from; empty: the model's initialization),
``run-dir`` (checkpoint, exported plan and ``summary.json`` go there; a run resumes from its
checkpoint), ``deliver`` (bool, default true: at the end every node gets the plan and its
shard into its data folder, :mod:`disco_fl.fl.server.delivery`), ``input-shape`` (one
sample's shape, e.g. ``"3,32,32"``; default ``in-channels`` x ``image-size`` x
``image-size``), ``slices`` (``"channels"``, default, or ``"compute"``: how the nodes'
capacities become slices, below).

``model`` is a built-in name or a user's model, ``"package.module:function"``
(:mod:`disco_fl.models.user`): this process imports it, so the package must be installed
where the ServerApp runs (or be part of the Flower app, whose folder Flower puts on the
path); the nodes receive the partitioned program and never import it.

Devices that differ are described by the nodes: each SuperNode's
``capacity`` and ``memory-bytes`` (see ``disco_fl.fl.client_app``) decide the slices and the
memory check (:mod:`disco_fl.fl.server.devices`). The run config's ``slices`` picks how
capacities become slices: ``"channels"`` (default: channel shares proportional to the
capacities) or ``"compute"`` (shares at which each node's shard compute, timed on the server at
``budget``, over its capacity is equal; better for sparse plans); ``summary.json`` records the
rule (``"slices"``), the capacities and the ``"shares"`` partitioned with.
"""

from __future__ import annotations

import json
import tempfile
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from disco_fl.core.files import atomic_write_bytes
from disco_fl.core.heap import tune_heap
from disco_fl.data import MNIST_MEAN, MNIST_STD
from disco_fl.fl.federated import ModelSpec
from disco_fl.fl.server.calibration import calibrate_households, wants_calibration
from disco_fl.fl.server.delivery import deliver_shards
from disco_fl.fl.server.strategy import DiscoStrategy, DPSettings, EvaluateFn
from disco_fl.models import load_checkpoint_strict
from disco_fl.tasks import get_task

app = ServerApp()


def strategy_from_config(cfg: Any) -> DiscoStrategy:
    """A :class:`DiscoStrategy` from a run config (missing keys: the strategy's defaults)."""
    spec = ModelSpec.from_config(cfg)
    dp = None
    if bool(cfg.get("dp", False)):
        dp = DPSettings(
            noise_multiplier=float(cfg.get("dp-noise", 1.0)),
            max_grad_norm=float(cfg.get("dp-clip", 1.0)),
            delta=float(cfg.get("dp-delta", 1e-5)),
        )
    households = int(cfg.get("households", 0))
    run_dir = str(cfg.get("run-dir", ""))
    return DiscoStrategy(
        spec,
        budget=float(cfg.get("budget", 0.1)),
        steps=int(cfg.get("steps", 80)),
        batch_size=int(cfg.get("batch-size", 32)),
        lr=float(cfg.get("lr", 2e-3)),
        gate_lr=float(cfg.get("gate-lr", 0.5)),
        finetune_rounds=int(cfg.get("finetune-rounds", 1)),
        init_penalty=float(cfg.get("init-penalty", 1.0)),
        dual_lr=float(cfg.get("dual-lr", 1.0)),
        codec=str(cfg.get("codec", "int8")),
        dp=dp,
        seed=int(cfg.get("seed", 0)),
        num_households=households or None,
        query_timeout=float(cfg.get("query-timeout", 120.0)),
        connect_timeout=float(cfg.get("connect-timeout", 0.0)) or None,  # 0: query-timeout
        step_timeout=float(cfg.get("step-timeout", 30.0)),
        rendezvous_timeout=float(cfg.get("rendezvous-timeout", 60.0)),
        evaluate=bool(cfg.get("evaluate", True)),
        eval_every=int(cfg.get("eval-every", 0)),
        eval_batch_size=int(cfg.get("eval-batch-size", 100)),
        checkpoint_dir=Path(run_dir) if run_dir else None,
        node_dropout=float(cfg.get("node-dropout", 0.0)),
        degraded_training=bool(cfg.get("degraded-training", False)),
        slices=str(cfg.get("slices", "channels")),
    )


FAILED_NAME = "failed.json"  # in run-dir: why the ServerApp stopped (the demo waits on it)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Roster, DISCO rounds (resuming a checkpoint), export of the plan and shards; a
    failure is also written to ``<run-dir>/failed.json`` before it is raised."""
    tune_heap()  # freed tensors stay for the next use (disco_fl.core.heap)
    run_dir = str(context.run_config.get("run-dir", ""))
    if run_dir:
        (Path(run_dir) / FAILED_NAME).unlink(missing_ok=True)
    try:
        _main(grid, context)
    except Exception as e:
        if run_dir:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            why = {"error": f"{type(e).__name__}: {e}"}
            atomic_write_bytes(Path(run_dir) / FAILED_NAME, json.dumps(why).encode())
        raise


def _main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    run_disco(
        grid,
        strategy_from_config(cfg),
        int(cfg.get("num-rounds", 3)),
        initial_checkpoint=str(cfg.get("initial-checkpoint", "")),
        seed=int(cfg.get("seed", 0)),
        round_timeout=float(cfg.get("round-timeout", 600.0)),
        deliver=bool(cfg.get("deliver", True)),
        degraded_statistics=str(cfg.get("degraded-statistics", "auto")),
        calibration_batches=int(cfg.get("calibration-batches", 16)),
        calibration_batch_size=int(cfg.get("calibration-batch-size", 256)),
    )


def run_disco(
    grid: Grid,
    strategy: DiscoStrategy,
    num_rounds: int,
    *,
    initial_checkpoint: str | Path = "",
    seed: int = 0,
    round_timeout: float = 600.0,
    deliver: bool = True,
    evaluate_fn: EvaluateFn | None = None,
    degraded_statistics: str = "auto",
    calibration_batches: int = 16,
    calibration_batch_size: int = 256,
) -> dict[str, Any]:
    """A whole DISCO run, the body of a ``ServerApp``'s main: resume from the strategy's
    checkpoint (``checkpoint_dir``) or start from the dense model (seeded, with
    ``initial_checkpoint`` loaded strictly), ``num_rounds`` rounds (in all, a resume
    included), the final plan and shards exported to ``<checkpoint_dir>/plan`` (a temporary
    folder without one) and, with ``deliver``, sent to every node's data folder
    (:mod:`disco_fl.fl.server.delivery`). Before the export, with ``degraded_statistics``
    (``"auto"``: after training with node dropout; ``"on"``; ``"off"``) and BatchNorm in the
    model, the households estimate the BatchNorm statistics per missing node on their data,
    ``calibration_batches`` batches of ``calibration_batch_size`` at most per missing node,
    and the shards carry them (:mod:`disco_fl.fl.server.calibration`). Returns the summary
    (also ``summary.json`` in the checkpoint folder)."""
    t0 = time.time()
    calibrate = wants_calibration(degraded_statistics, strategy.node_dropout, strategy.pm)
    arrays = strategy.resume()
    if arrays is None:
        dense = strategy.spec.build_dense(seed)
        if initial_checkpoint:
            load_checkpoint_strict(dense, initial_checkpoint)
            log(INFO, "dense model loaded from %s", initial_checkpoint)
        else:
            log(WARNING, "no initial-checkpoint: fine-tuning starts from a random model")
        arrays = strategy.initial_arrays(dense)
    remaining = num_rounds - strategy.round_offset
    strategy.num_rounds = num_rounds
    if remaining > 0:
        result = strategy.start(
            grid, arrays, remaining, timeout=round_timeout, evaluate_fn=evaluate_fn
        )
        arrays = result.arrays
    else:
        log(INFO, "all %d rounds done already (checkpoint)", num_rounds)
    if calibrate and strategy.roster is None:  # every round came from the checkpoint
        strategy.query_roster(grid)  # before loading: it may slice the model anew
    strategy._load(arrays)
    achieved = strategy._set_masks(strategy.budget)
    calibration = None
    if calibrate:  # the final shards and masks; a round's channel of its own
        assert strategy.roster is not None
        calibration = calibrate_households(
            grid, strategy.pm, strategy.roster, strategy._common(num_rounds + 1),
            strategy._household_of, batch_size=calibration_batch_size,
            max_batches=calibration_batches, timeout=round_timeout,
            skip=strategy.availability.skipped(strategy.roster, "calibration"),
        )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = strategy.checkpoint_dir
        folder = Path(run_dir) / "plan" if run_dir else Path(tmp)
        exported = _export(strategy, folder)
        delivered = _deliver(strategy, grid, folder) if deliver else None
    rep = strategy.pm.comm_report(strategy.codec)
    summary = {
        "rounds": num_rounds,
        "households": sorted(strategy.roster or {}),
        "nodes": strategy.spec.num_nodes,
        "capacities": list(strategy.capacities) if strategy.capacities else None,
        "slices": strategy.slicing.rule,
        "shares": list(strategy.slicing.shares) if strategy.slicing.shares else None,
        "budget": strategy.budget,
        "task": strategy.spec.task,
        "metric": get_task(strategy.spec.task).metric_name,  # its key in the evaluations
        "exchange_fraction": achieved,
        "bytes_per_sample": rep.bytes_per_sample,
        "bytes_per_sample_dense": rep.dense_bytes_per_sample,
        "epsilon": strategy.epsilons() if strategy.dp else None,
        "history": strategy.history,
        "plan_hash": exported.plan.hash,
        "delivered": delivered,
        "degraded_statistics": calibration,
        "seconds": time.time() - t0,
    }
    if run_dir:
        text = json.dumps(summary, indent=1, default=str).encode()
        atomic_write_bytes(Path(run_dir) / "summary.json", text)
        log(INFO, "exported plan %s and shards to %s", exported.plan.hash[:12], folder)
    return summary


def _export(strategy: DiscoStrategy, folder: Path) -> Any:
    """The final plan and compact shards (the interface for callers in the plan's meta; a
    dense task's name in ``meta["task"]``, which ``disco-fl infer`` reads)."""
    spec = strategy.spec
    channels = spec.sample_shape[0] if len(spec.sample_shape) == 3 else spec.in_channels
    mean, std = (0.0, 1.0) if spec.task == "super_resolution" else (MNIST_MEAN, MNIST_STD)
    meta: dict[str, Any] = {
        "model": spec.name,
        "input": {"mean": [mean] * channels, "std": [std] * channels},
    }
    if spec.task != "super_resolution":
        meta["classes"] = list(range(spec.num_classes))
    if spec.task != "classification":
        meta["task"] = spec.task
    return strategy.pm.export(folder, codec=strategy.codec, meta=meta)


def _deliver(strategy: DiscoStrategy, grid: Grid, folder: Path) -> dict[str, str]:
    """Every node's shard and the plan into its data folder (:mod:`.delivery`)."""
    if strategy.roster is None:  # every round came from the checkpoint: ask who is there
        strategy.query_roster(grid)
    assert strategy.roster is not None
    gone = strategy.availability.missing  # degraded training: nodes gone in the last round
    return deliver_shards(grid, strategy.roster, folder, strategy.query_timeout, gone)


__all__ = ["app", "run_disco", "strategy_from_config"]
