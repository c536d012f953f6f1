"""The edge ``ClientApp``: one node of a household (one shard of every layer).

Node settings (``flower-supernode --node-config``):

- ``household`` (str, required): the household this node belongs to.
- ``shard`` (int, required): the shard index k in ``0..N-1``.
- ``peer-address`` (str, required): ``host:port`` of this node's peer endpoint (activations
  and gradients travel there, not through Flower); the household's peers must reach it.
- ``peer-listen`` (str, optional): the address to bind (default ``peer-address``).
- ``data`` (str, optional): local training data: a ``.npz`` (``images``, ``labels``),
  ``builtin:i/n`` (partition i of n of the built-in set's private part) or
  ``hf:<path>:<iid|dirichlet>:i/n[:key=value...]`` (a Hugging Face dataset on disk,
  partitioned by Flower Datasets: :mod:`disco_fl.data.flower_datasets`, the ``datasets``
  extra); empty: none. For a segmentation or super-resolution round (the round config's
  ``task``) the targets are derived from the images as the built-in ones are
  (:func:`disco_fl.data.task_data`), or a ``.npz`` gives ``images`` and its own ``targets``
  (:func:`disco_fl.fl.local_data.node_data`).
- ``eval-data`` (str, optional): a ``.npz`` or ``hf:`` setting of held-out data (default:
  20 % of ``data``).
- ``capacity`` (number or ``"probe"``, optional): this device's relative throughput (e.g.
  ``disco-fl probe``'s GFLOP/s); ``"probe"`` measures it when the roster asks (about 1 s).
  When the nodes report capacities, every layer is sliced in proportion to them.
- ``memory-bytes`` (int, optional): memory this node can give to the model; default the
  memory available when the roster asks (``disco-fl probe``: ``MemAvailable`` or the cgroup's
  headroom, the smaller). The strategy refuses, before training, a node whose shard needs more
  (``disco_fl.emulation.capacity.training_memory``).
- ``tls-dir`` (str, optional): a folder from ``disco-fl certs`` (``ca.pem``,
  ``node<k>.pem``/``.key``): the peer endpoint then uses mutual TLS, and a peer must present
  its own node's certificate; default plaintext (the per-round household token is checked
  either way).

- ``data-dir`` (str, optional): where the run's final plan and this node's shard are
  delivered (default ``$XDG_DATA_HOME/disco_fl/<household>/node<k>``, see
  :mod:`disco_fl.fl.delivery`); ``disco-fl serve <data-dir>`` starts from it.

Handlers (:func:`make_client_app`; ``app`` is ``make_client_app()``, a user's app passes its
own ``loss_fn`` / ``metric_fn``):

- ``query``: answers the roster query (household, shard, peer address, example counts,
  capacity and memory).
- ``query.ping``: an empty reply (the server's availability check, :mod:`disco_fl.fl.availability`).
- ``query.deliver``: stores the final plan and this node's shard in its data folder, checked
  against the plan hash (:func:`disco_fl.fl.delivery.deliver`).
Every ``train`` / ``evaluate`` message carries this node's shard (packed ``ArrayRecord``) and a
typed config (:class:`~disco_fl.fl.round_config.TrainConfig` / ``EvalConfig``, read once by
``from_config``: a missing or ill-typed key is a clear error). The node rebuilds only its own
shard from the plan's program and that record (:func:`~disco_fl.fl.federated.shard_from_record`):
it never builds or partitions the whole model, holds no other node's tensor, and unpickles
nothing.

- ``train``: brings up the peer endpoint, trains ``steps`` joint steps with the household
  (:class:`~disco_fl.runtime.training.NodeTrainer`; batch owners take turns) with the loss of
  the round's task (:mod:`disco_fl.tasks`; a user's ``loss_fn`` replaces it), replies with the
  shard and metrics. Any failure (a peer that died, a deadline) is raised, so Flower returns an
  error reply and the strategy keeps the household's previous shards.
- ``query.calibrate`` (after the last round, :mod:`disco_fl.fl.calibration`): the household's
  BatchNorm statistics for each missing node, each node feeding its own training data
  (:func:`~disco_fl.runtime.calibration.calibrate_node`); the reply holds this node's share.
- ``evaluate``: the household runs collaborative inference on the requester's held-out data
  (:func:`~disco_fl.runtime.inference.run_node` over the same peer channel), the requester reports
  ``correct`` and ``accuracy`` (classification), the task's metric under its name (``miou``
  for segmentation, ``psnr_db`` for super-resolution, over all its held-out outputs at once;
  :mod:`disco_fl.tasks`), or a user's ``metric_fn``'s metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import types
from collections.abc import Callable
from logging import INFO
from typing import Any, TypeVar

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from disco_fl.core.heap import tune_heap
from disco_fl.fl.availability import PING_ACTION, ping
from disco_fl.fl.calibration import (
    CALIBRATE_ACTION,
    calibration_data,
    calibration_rows,
    statistics_record,
)
from disco_fl.fl.delivery import DELIVER_ACTION, deliver
from disco_fl.fl.federated import NodeData, derive_seed, node_data, shard_arrays, shard_from_record
from disco_fl.fl.node_settings import device_report, node_identity, tls_folder
from disco_fl.fl.round_config import CalibrationConfig, EvalConfig, RoundConfig, TrainConfig
from disco_fl.node.shard import NodeShard
from disco_fl.partition.plan import Plan
from disco_fl.tasks import get_task, user_metrics

PROGRESS_EVERY = 10  # a progress line (SuperNode's log) every this many joint steps


def _process_start_time() -> float:
    """Wall-clock start of this process (Linux ``/proc``; else now), to report how much of a
    round the ClientApp process start-up (interpreter, imports) took."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


_PROCESS_START = _process_start_time()
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], Any]
_DATA_CACHE: dict[tuple[str, str, str], NodeData] = {}


def _data(context: Context, task: str = "classification") -> NodeData:
    """The node's data for ``task`` (its example counts are the same for every task)."""
    spec = str(context.node_config.get("data", ""))
    ev = str(context.node_config.get("eval-data", ""))
    key = (spec, ev, task)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = node_data(spec, ev, task)
    return _DATA_CACHE[key]


def query(msg: Message, context: Context) -> Message:
    """Who this node is: household, shard, peer address, local example counts, capacity and
    memory (:func:`~disco_fl.fl.node_settings.device_report`)."""
    hh, k, addr, _ = node_identity(context)
    d = _data(context)
    rec = ConfigRecord(
        {
            "household": hh,
            "shard": k,
            "peer-address": addr,
            "num-examples": len(d.y_train),
            "num-eval": len(d.y_eval),
            **device_report(context),
        }
    )
    return Message(RecordDict({"node": rec}), reply_to=msg)


C = TypeVar("C", bound=RoundConfig)


def _setup(
    msg: Message,
    context: Context,
    kind: type[C] = TrainConfig,  # type: ignore[assignment]
) -> tuple[C, NodeShard, Plan, str, int]:
    """Check the message against this node; rebuild the round's plan and this node's shard
    from the plan's program and the message's record alone (no model is built or partitioned
    here, no other node's tensor is held, nothing is unpickled)."""
    cfg = kind.from_config(msg.content.config_records["config"])
    hh, k, _, listen = node_identity(context)
    if cfg.household != hh or cfg.shard != k:
        raise ValueError(
            f"message for household {cfg.household!r} shard {cfg.shard} reached "
            f"household {hh!r} shard {k}"
        )
    torch.set_num_threads(max(1, int(context.node_config.get("threads", 1))))
    plan = Plan.from_json(json.loads(cfg.plan))
    if len(cfg.peers) != plan.num_nodes:
        raise ValueError(f"{len(cfg.peers)} peers for a {plan.num_nodes}-node plan")
    shard = shard_from_record(plan.program, k, msg.content.array_records["arrays"])
    del msg.content.array_records["arrays"]  # the packed copy: the shard holds the tensors now
    return cfg, shard, plan, listen, k


def _transport(
    cfg: RoundConfig,
    plan: Plan,
    k: int,
    listen: str,
    num_nodes: int,
    tls_dir: str = "",
    missing: tuple[int, ...] = (),
) -> Any:
    from disco_fl.runtime.transport.grpc_transport import GrpcTransport
    from disco_fl.security import peer_credentials

    server_creds, channel_creds = peer_credentials(tls_dir, k)
    t = GrpcTransport(
        k,
        num_nodes,
        plan_hash=plan.hash,
        training_round=cfg.server_round,  # peers of another round are refused
        listen=listen,
        peers=list(cfg.peers),
        household_token=cfg.token,
        num_layers=len(plan.program.ops),
        connect_timeout=cfg.rendezvous_timeout,
        server_credentials=server_creds,
        channel_credentials=channel_creds,
    )
    try:
        # rendezvous: every peer's endpoint is up (bounded by connect_timeout); a missing
        # node (gone at the round's start, degraded training) is not waited for
        t.connect([d for d in range(num_nodes) if d not in missing])
    except BaseException:
        t.close(1.0)
        raise
    log(
        INFO,
        "[disco] household %s shard %d: peer endpoint %s (%s), %d peers connected",
        cfg.household, k, listen, "mutual TLS" if tls_dir else "plaintext",
        num_nodes - 1 - len(missing),
    )  # fmt: skip
    return t


def train(msg: Message, context: Context, loss_fn: LossFn | None = None) -> Message:
    """Joint training steps with the household; reply with the shard and metrics.
    ``loss_fn(outputs, targets)``: the batch owner's loss (default: the round's task's,
    cross-entropy for classification)."""
    from disco_fl.emulation.budget import random_shift
    from disco_fl.runtime.training import NodeTrainer, default_param_groups
    from disco_fl.runtime.training.degraded import degraded_step, enable_degraded
    from disco_fl.runtime.training.dp import DPConfig

    t0, w0 = time.monotonic(), time.time()
    cfg, shard, plan, listen, k = _setup(msg, context, TrainConfig)
    n = plan.num_nodes
    owners, sizes = list(cfg.owners), list(cfg.owner_examples)
    steps, batch, r, hh = cfg.steps, cfg.batch_size, cfg.server_round, cfg.household
    data = _data(context, cfg.task)
    if loss_fn is None and cfg.task != "classification":  # classification: the trainer's own
        loss_fn = get_task(cfg.task).loss
    if k in owners and len(data.y_train) == 0:
        raise ValueError(f"shard {k} is a batch owner but holds no training data")
    mode = cfg.gate_mode
    dp = None
    if cfg.dp:
        assert cfg.dp_clip is not None and cfg.dp_noise is not None and cfg.dp_delta is not None
        b = min([batch, *sizes])
        # no seed: DP noise and Poisson sampling come from each node's OS CSPRNG, never from
        # the run config (the server holds it; DPConfig.insecure_seed is for tests only)
        dp = DPConfig(
            dataset_sizes=dict(zip(owners, sizes, strict=True)),
            max_grad_norm=cfg.dp_clip,
            noise_multiplier=cfg.dp_noise,
            target_delta=cfg.dp_delta,
            batch_size=b,
        )
        if k in owners and dp.dataset_sizes[k] != len(data.y_train):
            raise ValueError(
                f"shard {k} holds {len(data.y_train)} training examples, the round's config "
                f"says {dp.dataset_sizes[k]}: the DP sample rate and epsilon would be wrong"
            )
    opt = torch.optim.Adam(default_param_groups(shard, cfg.lr, cfg.gate_lr))
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, hh, r, "batches"))
    perm = torch.randperm(len(data.y_train), generator=gen) if len(data.y_train) else None
    pos = 0
    transport = _transport(cfg, plan, k, listen, n, tls_folder(context), cfg.missing_nodes)
    t_steps = time.monotonic()
    try:
        trainer = NodeTrainer(
            shard,
            plan,
            transport,
            opt,
            gate_mode="hard" if mode == "hard" else "stochastic",
            gate_seed=derive_seed(cfg.seed, hh, r, "gates"),
            gate_penalty=cfg.gate_penalty,
            owners=owners,
            timeout=cfg.step_timeout,
            dp=dp,
            loss_fn=loss_fn,
            # fixed masks: hold and train only the open weight columns (less memory)
            compact=mode == "hard",
            node_dropout=cfg.node_dropout,
        )
        if cfg.degraded_training:  # a failed peer (not an owner): go on without it
            enable_degraded(trainer, cfg.missing_nodes)  # and without those gone already
        run_step = degraded_step if cfg.degraded_training else NodeTrainer.step
        shard.train()
        losses: list[float] = []
        for t in range(steps):
            x = y = None
            if trainer.owner_of(t) == k and trainer.dp_state is not None:
                # DP: Poisson sampling (what the accountant assumes), secure randomness; an
                # empty batch is a noise-only step
                idx = trainer.dp_state.sample_batch(t)
                x, y = data.x_train[idx], data.y_train[idx]
            elif trainer.owner_of(t) == k:
                assert perm is not None
                b = min(batch, len(perm))
                if pos + b > len(perm):
                    perm = torch.randperm(len(perm), generator=gen)
                    pos = 0
                idx = perm[pos : pos + b]
                pos += b
                x, y = data.x_train[idx], data.y_train[idx]
                if x.dim() == 4 and y.dim() == 1:  # a label per image: shifts keep it
                    x = random_shift(x, 1, gen)
            res = run_step(trainer, t, x, y, run_id=f"{hh}/r{r}")
            if res.loss is not None:
                losses.append(res.loss)
            if (t + 1) % PROGRESS_EVERY == 0 or t + 1 == steps:
                log(
                    INFO,
                    "[disco] household %s shard %d round %d: step %d/%d (%.1f s)",
                    hh, k, r, t + 1, steps, time.monotonic() - t_steps,
                )  # fmt: skip
        sent = sum(res.total_bytes for res in trainer.history)
        if mode == "hard":
            trainer.expand()  # the full-width shard goes back (closed columns unchanged)
    finally:
        transport.close(2.0)
    metrics: dict[str, Any] = {
        "num-examples": len(data.y_train),
        "loss": sum(losses) / len(losses) if losses else 0.0,
        "owner-steps": len(losses),
        "bytes-sent": float(sent),
        "seconds": time.monotonic() - t0,
        # where a round's time goes on this node (wall clock): process start, handler start,
        # peers connected, steps done (the strategy reports them relative to its push)
        "t-process": _PROCESS_START,
        "t-handler": w0,
        "t-connected": w0 + (t_steps - t0),
        "t-done": w0 + (time.monotonic() - t0),
        # degraded training: the nodes this household went on without (checked by the server)
        "missing-nodes": sorted(trainer.missing),
    }
    if dp is not None and trainer.dp_state is not None:
        own = [res for res in trainer.history if res.owner == k]
        metrics["dp-steps"] = len(own)
        metrics["dp-noise"] = float(trainer.dp_state.sigma)
        metrics["dp-rate"] = dp.sample_rate(k) if k in owners else 0.0
        # not for the server under DP: the training loss is computed on the private batches
        # without noise, and the count of steps with a loss tells which batches were empty
        del metrics["loss"], metrics["owner-steps"]
    content = RecordDict({"arrays": shard_arrays(shard), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def calibrate(msg: Message, context: Context) -> Message:
    """This node's BatchNorm statistics per missing node, estimated with its household on the
    nodes' training data (:mod:`disco_fl.fl.calibration`)."""
    from disco_fl.runtime.calibration import calibrate_node

    t0 = time.monotonic()
    cfg, shard, plan, listen, k = _setup(msg, context, CalibrationConfig)
    x = calibration_data(cfg, _data(context, cfg.task).x_train, k)
    transport = _transport(cfg, plan, k, listen, plan.num_nodes, tls_folder(context))
    try:
        stats = calibrate_node(
            shard, plan, transport, x, calibration_rows(cfg), cfg.missing,
            batch_size=cfg.batch_size, max_batches=cfg.max_batches, timeout=cfg.step_timeout,
            run_id=f"{cfg.household}/calibrate/r{cfg.server_round}", seed=cfg.seed,
        )  # fmt: skip
    finally:
        transport.close(2.0)
    metrics = MetricRecord({"seconds": time.monotonic() - t0, "sets": len(stats)})
    content = RecordDict({"degraded": statistics_record(stats), "metrics": metrics})
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context, metric_fn: MetricFn | None = None) -> Message:
    """Collaborative inference of the household on the requester's held-out data; the
    requester reports ``correct`` and ``accuracy`` (classification), the task's metric under
    its name (dense tasks) or, with ``metric_fn(outputs, targets)`` (all held-out outputs at
    once), its metrics (:func:`user_metrics`)."""
    from disco_fl.emulation.export import ExportedShard, _compact_state
    from disco_fl.runtime.inference import run_node

    cfg, shard, plan, listen, k = _setup(msg, context, EvalConfig)
    requester, r, hh = cfg.requester, cfg.server_round, cfg.household
    eplan = dataclasses.replace(
        plan, program=dataclasses.replace(plan.program, requester=requester)
    )
    holder = types.SimpleNamespace(program=eplan.program, shards={k: shard})
    node = ExportedShard(eplan, k, _compact_state(holder, eplan, k))
    del holder, shard  # inference runs on the compact tensors only
    data = _data(context, cfg.task)
    task = get_task(cfg.task)
    keep = metric_fn is not None or task.name != "classification"  # all outputs, then the metric
    batches, bs = cfg.eval_batches, cfg.eval_batch_size
    if k == requester and math.ceil(len(data.y_eval) / bs) != batches:
        raise ValueError(f"{len(data.y_eval)} held-out examples do not make {batches} batches")
    correct = 0
    outputs: list[torch.Tensor] = []
    transport = _transport(cfg, plan, k, listen, plan.num_nodes, tls_folder(context))
    try:
        with torch.no_grad():
            for i in range(batches):
                x = data.x_eval[i * bs : (i + 1) * bs] if k == requester else None
                out = run_node(
                    node,
                    transport,
                    x,
                    session_id=f"{hh}/eval/r{r}/b{i}",
                    timeout=cfg.step_timeout,
                )
                if out is not None and keep:
                    outputs.append(out)
                elif out is not None:
                    correct += int((out.argmax(1) == data.y_eval[i * bs : (i + 1) * bs]).sum())
    finally:
        transport.close(2.0)
    n_eval = len(data.y_eval) if k == requester else 0
    metrics: dict[str, Any] = {"num-examples": n_eval}
    if not keep:
        metrics.update({"correct": correct, "accuracy": correct / n_eval if n_eval else 0.0})
    elif k == requester and outputs and metric_fn is not None:
        metrics.update(user_metrics(metric_fn, torch.cat(outputs), data.y_eval))
    elif k == requester and outputs:
        metrics[task.metric_name] = float(task.metric(torch.cat(outputs), data.y_eval))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_client_app(loss_fn: LossFn | None = None, metric_fn: MetricFn | None = None) -> ClientApp:
    """A DISCO ``ClientApp`` (handlers ``query``, ``train``, ``evaluate``, ``query.ping``,
    ``query.deliver`` and ``query.calibrate``), optionally with a user's loss and metric.

    Parameters
    ----------
    loss_fn : callable ``(outputs, targets) -> scalar tensor``, optional
        The batch owner's training loss on the model's outputs (the logits, for a classifier)
        and the batch's targets (the node's labels); its gradient flows back through every
        node of the household. Default: the round's task's loss (cross-entropy for
        classification and segmentation, MSE for super-resolution).
    metric_fn : callable ``(outputs, targets) -> number or {name: number}``, optional
        The held-out metrics, computed by the household's requester on all its held-out
        outputs at once; the server reports each per household (``<name>/<household>``) and
        their example-weighted mean (``<name>``). Default: ``correct`` and ``accuracy``
        (classification), the task's metric (``miou``, ``psnr_db``) for the dense tasks.

    ``disco_fl.fl.client_app:app`` is ``make_client_app()``. A user's own app (a Flower
    app's ``client_app.py``) is ``app = make_client_app(loss_fn=..., metric_fn=...)``.
    """
    client = ClientApp()

    @client.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context)

    @client.query(PING_ACTION)
    def _ping(msg: Message, context: Context) -> Message:
        return ping(msg, context)

    @client.query(DELIVER_ACTION)
    def _deliver(msg: Message, context: Context) -> Message:
        return deliver(msg, context)

    @client.query(CALIBRATE_ACTION)
    def _calibrate(msg: Message, context: Context) -> Message:
        tune_heap()  # freed tensors stay for the next step (disco_fl.core.heap)
        return calibrate(msg, context)

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        tune_heap()  # freed tensors stay for the next step (disco_fl.core.heap)
        return train(msg, context, loss_fn)

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        tune_heap()  # freed tensors stay for the next step (disco_fl.core.heap)
        return evaluate(msg, context, metric_fn)

    return client


app = make_client_app()

__all__ = ["LossFn", "MetricFn", "app", "deliver", "make_client_app", "user_metrics"]
