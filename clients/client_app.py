"""The edge ``ClientApp``: one node of a household (one shard of every layer).

Node settings (``flower-supernode --node-config``):

- ``household`` (str, required): the household this node belongs to.
- ``shard`` (int, required): the shard index k in ``0..N-1``.
- ``peer-address`` (str, required): ``host:port`` of this node's peer endpoint (activations
  and gradients travel there, not through Flower); the household's peers must reach it.
- ``peer-listen`` (str, optional): the address to bind (default ``peer-address``).
- ``data`` (str, optional): local training data: a ``.npz`` (``images``, ``labels``) or
  ``builtin:i/n`` (partition i of n of the built-in set's private part); empty: none.
- ``eval-data`` (str, optional): a ``.npz`` of held-out data (default: 20 % of ``data``).
- ``tls-dir`` (str, optional): a folder from ``disco-fl certs`` (``ca.pem``,
  ``node<k>.pem``/``.key``): the peer endpoint then uses mutual TLS, and a peer must present
  its own node's certificate; default plaintext (the per-round household token is checked
  either way).

Handlers:

- ``query``: answers the roster query (household, shard, peer address, example counts).
- ``train``: brings up the peer endpoint, trains ``steps`` joint steps with the household
  (:class:`~disco_fl.training.NodeTrainer`; batch owners take turns), replies with the shard
  and metrics. Any failure (a peer that died, a deadline) is raised, so Flower returns an
  error reply and the strategy keeps the household's previous shards.
- ``evaluate``: the household runs collaborative inference on the requester's held-out data
  (:func:`~disco_fl.runtime.run_node` over the same peer channel), the requester reports
  accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import types
from logging import INFO
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from disco_fl.federated import (
    ModelSpec,
    NodeData,
    derive_seed,
    load_shard_arrays,
    node_data,
    rec_float,
    rec_int,
    rec_list,
    shard_arrays,
)
from disco_fl.plan import Plan

app = ClientApp()

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
_DATA_CACHE: dict[tuple[str, str], NodeData] = {}


def _node_setting(context: Context, key: str, default: Any = None) -> Any:
    v = context.node_config.get(key, default)
    if v is None:
        raise ValueError(f"node config lacks {key!r} (flower-supernode --node-config '{key}=...')")
    return v


def _data(context: Context) -> NodeData:
    spec = str(context.node_config.get("data", ""))
    ev = str(context.node_config.get("eval-data", ""))
    key = (spec, ev)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = node_data(spec, ev)
    return _DATA_CACHE[key]


def _identity(context: Context) -> tuple[str, int, str, str]:
    hh = str(_node_setting(context, "household"))
    k = int(_node_setting(context, "shard"))
    addr = str(_node_setting(context, "peer-address"))
    listen = str(context.node_config.get("peer-listen", addr))
    return hh, k, addr, listen


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is: household, shard, peer address, local example counts."""
    hh, k, addr, _ = _identity(context)
    d = _data(context)
    rec = ConfigRecord(
        {
            "household": hh,
            "shard": k,
            "peer-address": addr,
            "num-examples": len(d.y_train),
            "num-eval": len(d.y_eval),
        }
    )
    return msg.create_reply(RecordDict({"node": rec}))


def _setup(msg: Message, context: Context) -> tuple[ConfigRecord, Any, Plan, str, int]:
    """Check the message against this node, rebuild its shard and the round's plan."""
    cfg = msg.content.config_records["config"]
    hh, k, _, listen = _identity(context)
    if str(cfg["household"]) != hh or rec_int(cfg, "shard") != k:
        raise ValueError(
            f"message for household {cfg['household']!r} shard {rec_int(cfg, 'shard')} reached "
            f"household {hh!r} shard {k}"
        )
    torch.set_num_threads(max(1, int(context.node_config.get("threads", 1))))
    spec = ModelSpec.from_config(cfg)
    pm = spec.partition()  # no disk cache: see ModelSpec.partition
    plan = Plan.from_json(json.loads(str(cfg["plan"])))
    if plan.program.to_json() != pm.program.to_json():
        raise ValueError(
            f"the server's plan does not fit model {spec.name!r} partitioned over "
            f"{spec.num_nodes} nodes on this node (different versions?)"
        )
    shard = pm.shard(k)
    load_shard_arrays(shard, msg.content.array_records["arrays"])
    return cfg, shard, plan, listen, k


def peer_credentials(tls_dir: str, k: int) -> tuple[Any, Any]:
    """``(server, channel)`` gRPC credentials of node ``k`` from ``tls_dir`` (None if empty)."""
    if not tls_dir:
        return None, None
    from disco_fl.security import TLSFiles, channel_credentials, server_credentials

    tls = TLSFiles.from_dir(tls_dir, k)
    return server_credentials(tls), channel_credentials(tls)


def _transport(
    cfg: ConfigRecord, plan: Plan, k: int, listen: str, num_nodes: int, tls_dir: str = ""
) -> Any:
    from disco_fl.transport.grpc_transport import GrpcTransport

    peers = [str(a) for a in rec_list(cfg, "peers")]
    server_creds, channel_creds = peer_credentials(tls_dir, k)
    t = GrpcTransport(
        k,
        num_nodes,
        plan_hash=plan.hash,
        training_round=rec_int(cfg, "server-round"),  # peers of another round are refused
        listen=listen,
        peers=peers,
        household_token=str(cfg["token"]),
        num_layers=len(plan.program.ops),
        connect_timeout=rec_float(cfg, "rendezvous-timeout"),
        server_credentials=server_creds,
        channel_credentials=channel_creds,
    )
    try:
        t.connect()  # rendezvous: every peer's endpoint is up (bounded by connect_timeout)
    except BaseException:
        t.close(1.0)
        raise
    log(
        INFO,
        "[disco] household %s shard %d: peer endpoint %s (%s), %d peers connected",
        cfg["household"], k, listen, "mutual TLS" if tls_dir else "plaintext", num_nodes - 1,
    )  # fmt: skip
    return t


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Joint training steps with the household; reply with the shard and metrics."""
    from disco_fl.train import random_shift
    from disco_fl.training import NodeTrainer, default_param_groups
    from disco_fl.training.dp import DPConfig

    t0, w0 = time.monotonic(), time.time()
    cfg, shard, plan, listen, k = _setup(msg, context)
    n = plan.num_nodes
    owners = [int(o) for o in rec_list(cfg, "owners")]
    sizes = [int(s) for s in rec_list(cfg, "owner-examples")]
    steps = rec_int(cfg, "steps")
    batch = rec_int(cfg, "batch-size")
    r = rec_int(cfg, "server-round")
    seed = rec_int(cfg, "seed")
    hh = str(cfg["household"])
    data = _data(context)
    if k in owners and len(data.y_train) == 0:
        raise ValueError(f"shard {k} is a batch owner but holds no training data")
    mode = str(cfg["gate-mode"])
    if mode not in ("hard", "stochastic"):
        raise ValueError(f"gate-mode must be 'hard' or 'stochastic', got {mode!r}")
    dp = None
    if bool(cfg["dp"]):
        b = min([batch, *sizes])
        # no seed: DP noise and Poisson sampling come from each node's OS CSPRNG, never from
        # the run config (the server holds it; DPConfig.insecure_seed is for tests only)
        dp = DPConfig(
            dataset_sizes=dict(zip(owners, sizes, strict=True)),
            max_grad_norm=rec_float(cfg, "dp-clip"),
            noise_multiplier=rec_float(cfg, "dp-noise"),
            target_delta=rec_float(cfg, "dp-delta"),
            batch_size=b,
        )
        if k in owners and dp.dataset_sizes[k] != len(data.y_train):
            raise ValueError(
                f"shard {k} holds {len(data.y_train)} training examples, the round's config "
                f"says {dp.dataset_sizes[k]}: the DP sample rate and epsilon would be wrong"
            )
    opt = torch.optim.Adam(
        default_param_groups(shard, rec_float(cfg, "lr"), rec_float(cfg, "gate-lr"))
    )
    gen = torch.Generator().manual_seed(derive_seed(seed, hh, r, "batches"))
    perm = torch.randperm(len(data.y_train), generator=gen) if len(data.y_train) else None
    pos = 0
    transport = _transport(cfg, plan, k, listen, n, str(_node_setting(context, "tls-dir", "")))
    t_steps = time.monotonic()
    try:
        trainer = NodeTrainer(
            shard,
            plan,
            transport,
            opt,
            gate_mode="hard" if mode == "hard" else "stochastic",
            gate_seed=derive_seed(seed, hh, r, "gates"),
            gate_penalty=rec_float(cfg, "gate-penalty"),
            owners=owners,
            timeout=rec_float(cfg, "step-timeout"),
            dp=dp,
            # fixed masks: hold and train only the open weight columns (less memory)
            compact=mode == "hard",
        )
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
                x = random_shift(data.x_train[idx], 1, gen)
                y = data.y_train[idx]
            res = trainer.step(t, x, y, run_id=f"{hh}/r{r}")
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
    }
    if dp is not None and trainer.dp_state is not None:
        own = [res for res in trainer.history if res.owner == k]
        metrics["dp-steps"] = len(own)
        metrics["dp-noise"] = float(trainer.dp_state.sigma)
        metrics["dp-rate"] = dp.sample_rate(k) if k in owners else 0.0
        # not for the server under DP: the training loss is computed on the private batches
        # without noise, and the count of steps with a loss tells which batches were empty
        del metrics["loss"], metrics["owner-steps"]
    return msg.create_reply(
        RecordDict({"arrays": shard_arrays(shard), "metrics": MetricRecord(metrics)})
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Collaborative inference of the household on the requester's held-out data."""
    from disco_fl.export import ShardNode, _compact_state
    from disco_fl.runtime import run_node

    cfg, shard, plan, listen, k = _setup(msg, context)
    requester = rec_int(cfg, "requester")
    r = rec_int(cfg, "server-round")
    hh = str(cfg["household"])
    eplan = dataclasses.replace(
        plan, program=dataclasses.replace(plan.program, requester=requester)
    )
    holder = types.SimpleNamespace(program=eplan.program, shards={k: shard})
    node = ShardNode(eplan, k, _compact_state(holder, eplan, k))
    data = _data(context)
    batches = rec_int(cfg, "eval-batches")
    bs = rec_int(cfg, "eval-batch-size")
    if k == requester and math.ceil(len(data.y_eval) / bs) != batches:
        raise ValueError(f"{len(data.y_eval)} held-out examples do not make {batches} batches")
    correct = 0
    tls_dir = str(_node_setting(context, "tls-dir", ""))
    transport = _transport(cfg, plan, k, listen, plan.num_nodes, tls_dir)
    try:
        with torch.no_grad():
            for i in range(batches):
                x = data.x_eval[i * bs : (i + 1) * bs] if k == requester else None
                out = run_node(
                    node,
                    transport,
                    x,
                    session_id=f"{hh}/eval/r{r}/b{i}",
                    timeout=rec_float(cfg, "step-timeout"),
                )
                if out is not None:
                    correct += int((out.argmax(1) == data.y_eval[i * bs : (i + 1) * bs]).sum())
    finally:
        transport.close(2.0)
    n_eval = len(data.y_eval) if k == requester else 0
    metrics: dict[str, Any] = {
        "num-examples": n_eval,
        "correct": correct,
        "accuracy": correct / n_eval if n_eval else 0.0,
    }
    return msg.create_reply(RecordDict({"metrics": MetricRecord(metrics)}))


__all__ = ["app"]
