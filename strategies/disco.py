"""``DiscoStrategy``: the server side of DISCO fine-tuning on Flower's Message API.

Protocol (one run):

1. **Roster** (before any training): every connected node gets a ``query`` message and answers
   with its ``household``, ``shard`` index, ``peer-address`` (its peer endpoint for
   activations), ``num-examples`` (local training examples, 0 if it holds none) and
   ``num-eval`` (held-out examples). :func:`build_roster` checks that every household has all
   N shards exactly once (and, if configured, that the expected number of households came);
   otherwise the run stops with a :class:`RosterError` naming what is missing.
2. **Train** (each round): node ``(h, k)`` gets its shard ``k`` of the global model
   (``ArrayRecord`` of :class:`~disco_fl.emulation.NodeShard` state: weights, buffers, gate
   logits, hard masks) and a ``ConfigRecord``: the household roster (``peers``: addresses by
   shard, ``owners``: shards holding data, a per-household ``token``), the round's plan
   (JSON: program, hard masks, codec), ``steps``, ``batch-size``, ``lr``, ``gate-lr``,
   ``gate-mode``, ``gate-penalty``, ``budget``, DP settings, ``seed`` and deadlines. The
   household trains jointly over its peer channel and every node replies with its shard.
3. **Aggregate**: a household counts only if all its N nodes replied; shard ``k`` is the
   average of shard ``k`` over those households, weighted by their training examples (hard
   masks are the same everywhere; integer buffers are taken from the first household). A
   household with a failed or missing node keeps its previous shards for the round (it is
   left out of the average) and the run goes on; the failure is logged and counted.
4. **Evaluate** (each round, optional): every household runs collaborative inference on its
   held-out data; accuracy is averaged weighted by examples.
5. **Checkpoint** after every round (temporary file + rename); :meth:`DiscoStrategy.resume`
   continues from it.

**Budget schedule.** With ``R`` rounds of which the last ``finetune_rounds`` fine-tune, the
first ``G = R - finetune_rounds`` rounds train the gates (``gate-mode="stochastic"``) towards
a target that falls geometrically from 1 to the budget: ``budget ** (r / G)`` in round ``r``.
The gate penalty is ``lam / target``, where the multiplier ``lam`` (start ``init_penalty``)
follows dual ascent once per round, ``lam += dual_lr * (E / target - 1)`` (``E``: expected
fraction of dense exchange bytes of the aggregated gates). Before every round and every
evaluation the server sets the hard masks to the highest gate logits that fit the round's
target (:func:`~disco_fl.train.calibrate_masks`); the fine-tuning rounds train the weights
with the final masks fixed. Under differential privacy every round is a hard-mask round.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from disco_fl.federated import (
    ModelSpec,
    epsilon_of,
    global_state,
    rec_float,
    rec_int,
    round_budget,
    round_mode,
    shard_arrays,
    split_global_state,
    unpack_state,
)
from disco_fl.files import ChecksumError, load_torch, remove_stale_temps, save_torch
from disco_fl.train import calibrate_masks
from disco_fl.training import plan_of

CHECKPOINT_FORMAT = "disco_fl.fl_run/1"
CHECKPOINT_NAME = "checkpoint.pt"
CLIPPING_NORM_KEY = "clipping_norm"  # what Flower's client-side DP wrappers inject


class RosterError(ValueError):
    """The nodes do not form complete households (checked before any training)."""


@dataclass(frozen=True)
class NodeInfo:
    """One node, as it answered the roster query."""

    node_id: int
    household: str
    shard: int
    address: str
    num_examples: int = 0
    num_eval: int = 0


@dataclass
class Household:
    """The N nodes holding one full model."""

    name: str
    nodes: dict[int, NodeInfo]  # shard -> node
    token: str = ""

    @property
    def owners(self) -> list[int]:
        """Shards holding training data (batch owners), ascending."""
        return sorted(k for k, n in self.nodes.items() if n.num_examples > 0)

    @property
    def num_examples(self) -> int:
        return sum(n.num_examples for n in self.nodes.values())

    @property
    def eval_owner(self) -> int | None:
        """The shard that runs federated evaluation (first one with held-out data)."""
        have = sorted(k for k, n in self.nodes.items() if n.num_eval > 0)
        return have[0] if have else None

    def peers(self) -> list[str]:
        return [self.nodes[k].address for k in sorted(self.nodes)]


@dataclass(frozen=True)
class DPSettings:
    """Differential privacy inside each household (see :mod:`disco_fl.training.dp`).

    Attributes
    ----------
    noise_multiplier : float
        sigma of DP-SGD; default 1.0.
    max_grad_norm : float
        Clipping bound of the whole model's per-sample gradient; default 1.0.
    delta : float
        delta of the reported (epsilon, delta); default 1e-5.
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5


def build_roster(
    infos: Sequence[NodeInfo],
    num_nodes: int,
    *,
    expected_households: int | None = None,
    unanswered: Sequence[int] = (),
) -> dict[str, Household]:
    """Group nodes into households and check that each has shards ``0..N-1`` exactly once.

    Raises
    ------
    RosterError
        Naming every household with a missing, duplicate or out-of-range shard, a household
        without training data, nodes that did not answer the query, a peer address used twice
        and a wrong number of households.
    """
    problems: list[str] = []
    if unanswered:
        problems.append(
            f"nodes {', '.join(str(n) for n in sorted(unanswered))} did not answer the roster query"
        )
    by_hh: dict[str, list[NodeInfo]] = {}
    for info in infos:
        by_hh.setdefault(info.household, []).append(info)
    households: dict[str, Household] = {}
    for name in sorted(by_hh):
        members = by_hh[name]
        shards = [m.shard for m in members]
        bad = sorted({s for s in shards if not 0 <= s < num_nodes})
        dup = sorted({s for s in shards if shards.count(s) > 1 and 0 <= s < num_nodes})
        missing = sorted(set(range(num_nodes)) - set(shards))
        if bad:
            problems.append(
                f"household {name!r}: shard index {bad} out of range for {num_nodes} nodes"
            )
        if dup:
            nodes = ", ".join(
                f"shard {s} on nodes {[m.node_id for m in members if m.shard == s]}" for s in dup
            )
            problems.append(f"household {name!r}: duplicate {nodes}")
        if missing:
            problems.append(
                f"household {name!r}: missing shard{'s' if len(missing) > 1 else ''} "
                f"{', '.join(str(s) for s in missing)} of {num_nodes}"
            )
        if bad or dup or missing:
            continue
        hh = Household(name, {m.shard: m for m in members})
        if not hh.owners:
            problems.append(f"household {name!r}: no node holds training data")
            continue
        households[name] = hh
    addrs = [i.address for i in infos]
    for a in sorted({a for a in addrs if addrs.count(a) > 1}):
        problems.append(f"peer address {a} is used by several nodes")
    if expected_households is not None and len(by_hh) != expected_households:
        problems.append(
            f"expected {expected_households} households, found {len(by_hh)} "
            f"({', '.join(sorted(by_hh)) or 'none'})"
        )
    if problems:
        raise RosterError("incomplete households, no training started: " + "; ".join(problems))
    return households


class DiscoStrategy(Strategy):
    """DISCO fine-tuning of one partitioned model by households of N nodes.

    Parameters
    ----------
    spec : ModelSpec
        The model every party partitions (name, N, classes, input, norm).
    budget : float (default: 0.1)
        Final fraction of dense exchange bytes (hard masks of the last round).
    steps : int (default: 40)
        Joint training steps per household and round.
    batch_size : int (default: 32)
        Samples per step (on the step's batch owner).
    lr : float (default: 2e-3)
        Adam learning rate of the weights (a fresh optimizer each round).
    gate_lr : float (default: 0.5)
        Adam learning rate of the gate logits (gate rounds).
    finetune_rounds : int (default: 1)
        The last rounds train the weights with the final masks fixed.
    init_penalty : float (default: 1.0)
        Start value of the Lagrange multiplier ``lam`` of the budget constraint.
    dual_lr : float (default: 1.0)
        Step of the per-round dual ascent on ``lam``.
    codec : str (default: "fp32")
        Wire codec of forward activations ("fp32", "fp16", "int8").
    dp : DPSettings or None (default: None)
        Differential privacy inside households (needs ``spec.norm == "group"``).
    seed : int (default: 0)
        Seed of batch order, gate noise and DP noise (mixed with round and household).
    num_households : int or None (default: None)
        Expected households; None accepts any number of complete households.
    query_timeout : float (default: 120.0)
        Seconds to wait for the expected nodes to connect, and again for their answers to the
        roster query.
    step_timeout : float (default: 30.0)
        Deadline of one training step (and of one evaluation batch) on the nodes.
    rendezvous_timeout : float (default: 60.0)
        How long a node waits for its household's peer endpoints at the start of a round.
    evaluate : bool (default: True)
        Federated evaluation (household inference on held-out data).
    eval_every : int (default: 0)
        Evaluate after every ``eval_every``-th round; 0: after the last round only.
    eval_batch_size : int (default: 100)
        Batch of federated evaluation.
    checkpoint_dir : str or Path or None (default: None)
        Where the per-round checkpoint goes (``checkpoint.pt``); None: no checkpoints.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        budget: float = 0.1,
        steps: int = 40,
        batch_size: int = 32,
        lr: float = 2e-3,
        gate_lr: float = 0.5,
        finetune_rounds: int = 1,
        init_penalty: float = 1.0,
        dual_lr: float = 1.0,
        codec: str = "fp32",
        dp: DPSettings | None = None,
        seed: int = 0,
        num_households: int | None = None,
        query_timeout: float = 120.0,
        step_timeout: float = 30.0,
        rendezvous_timeout: float = 60.0,
        evaluate: bool = True,
        eval_every: int = 0,
        eval_batch_size: int = 100,
        checkpoint_dir: str | Path | None = None,
    ) -> None:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        if steps < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError("steps, batch_size and eval_batch_size must be >= 1")
        if finetune_rounds < 0:
            raise ValueError("finetune_rounds must be >= 0")
        if dp is not None and spec.norm != "group":
            raise ValueError(
                "differential privacy needs per-sample gradients: build the model with "
                "norm='group' (BatchNorm mixes the samples of a batch)"
            )
        self.spec = spec
        self.budget = float(budget)
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.gate_lr = float(gate_lr)
        self.finetune_rounds = int(finetune_rounds)
        self.init_penalty = float(init_penalty)
        self.dual_lr = float(dual_lr)
        self.codec = codec
        self.dp = dp
        self.seed = int(seed)
        self.num_households = num_households
        self.query_timeout = float(query_timeout)
        self.step_timeout = float(step_timeout)
        self.rendezvous_timeout = float(rendezvous_timeout)
        self.evaluate = evaluate
        self.eval_every = int(eval_every)
        self.eval_batch_size = int(eval_batch_size)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.pm = spec.partition()
        self.roster: dict[str, Household] | None = None
        self.round_offset = 0  # rounds done before this start() (resume)
        self.num_rounds = 0  # total rounds of the run (set by start)
        self.lam = self.init_penalty
        self._t_push = time.time()
        self._sent_to: dict[str, int] = {}  # message id -> destination node (last push)
        self.history: list[dict[str, Any]] = []
        # household -> [(sigma, sample rate, committed DP steps)] of its data owners
        self.dp_history: dict[str, list[tuple[float, float, int]]] = {}
        self._round_record: dict[str, Any] = {}

    # ---- settings ----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed."""
        return {
            "spec": asdict(self.spec),
            "budget": self.budget,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "finetune_rounds": self.finetune_rounds,
            "codec": self.codec,
            "dp": asdict(self.dp) if self.dp else None,
            "seed": self.seed,
        }

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        s = self.spec
        log(INFO, "\t├──> DISCO: %s over %d nodes per household", s.name, s.num_nodes)
        log(
            INFO,
            "\t│\t├── budget %.4g (final), %d finetune round(s), codec %s",
            self.budget,
            self.finetune_rounds,
            self.codec,
        )
        log(INFO, "\t│\t├── %d steps of %d per round, lr %g", self.steps, self.batch_size, self.lr)
        log(INFO, "\t│\t└── DP: %s", asdict(self.dp) if self.dp else "off")

    # ---- model state -------------------------------------------------------------------
    def initial_arrays(self, dense: torch.nn.Module | None = None) -> ArrayRecord:
        """The global record (all shards, keys ``"<k>/<key>"``) of ``dense`` partitioned
        (default: the strategy's current model)."""
        if dense is not None:
            self.pm = self.spec.partition(dense)
        return ArrayRecord(global_state(self.pm))

    def _load(self, arrays: ArrayRecord) -> None:
        states = split_global_state(arrays.to_torch_state_dict(), self.spec.num_nodes)
        for k, st in enumerate(states):
            self.pm.shard(k).load_state_dict(st, strict=True)

    def _set_masks(self, target: float) -> float:
        if target >= 1.0:
            self.pm.set_all_masks(1.0)
            return 1.0
        return calibrate_masks(self.pm, target)

    def _target(self, r: int) -> float:
        return round_budget(r, self.num_rounds, self.budget, self.finetune_rounds)

    # ---- roster ------------------------------------------------------------------------
    def query_roster(self, grid: Grid) -> dict[str, Household]:
        """Ask every node who it is; wait for the expected nodes up to ``query_timeout``."""
        end = time.monotonic() + self.query_timeout
        want = self.num_households * self.spec.num_nodes if self.num_households else None
        node_ids: list[int] = []
        while True:
            node_ids = sorted(grid.get_node_ids())
            enough = len(node_ids) >= want if want else len(node_ids) >= self.spec.num_nodes
            if enough or time.monotonic() >= end:
                break
            time.sleep(0.5)
        log(INFO, "roster: querying %d connected nodes", len(node_ids))
        msgs = [
            Message(
                content=RecordDict({"config": ConfigRecord({"action": "roster"})}),
                message_type=MessageType.QUERY,
                dst_node_id=nid,
            )
            for nid in node_ids
        ]
        # the replies get their own window: each node starts a ClientApp process to answer
        replies = self._exchange(grid, msgs, self.query_timeout, None)
        infos: list[NodeInfo] = []
        answered: set[int] = set()
        offline: set[int] = set()
        for msg in replies:
            src = self._sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                if msg.error.code == ErrorCode.NODE_UNAVAILABLE:
                    # registered once but gone (e.g. a SuperNode of an earlier deployment)
                    offline.add(src)
                    log(WARNING, "roster: node %d is offline, left out", src)
                else:
                    log(WARNING, "roster: node %d failed: %s", src, msg.error.reason)
                continue
            c = msg.content.config_records.get("node")
            if c is None:
                log(WARNING, "roster: node %d sent no 'node' record", src)
                continue
            answered.add(src)
            infos.append(
                NodeInfo(
                    src,
                    str(c["household"]),
                    rec_int(c, "shard"),
                    str(c["peer-address"]),
                    rec_int(c, "num-examples", 0),
                    rec_int(c, "num-eval", 0),
                )
            )
        roster = build_roster(
            infos,
            self.spec.num_nodes,
            expected_households=self.num_households,
            unanswered=[n for n in node_ids if n not in answered and n not in offline],
        )
        if not roster:
            raise RosterError(
                f"no household connected within {self.query_timeout:g} s "
                f"({len(node_ids)} nodes seen)"
            )
        for hh in roster.values():
            hh.token = secrets.token_hex(16)
            log(
                INFO,
                "roster: household %r: %s (data on shards %s, %d examples)",
                hh.name,
                ", ".join(f"{k}@{n.address}" for k, n in sorted(hh.nodes.items())),
                hh.owners,
                hh.num_examples,
            )
        self.roster = roster
        return roster

    def _household_of(self, node_id: int) -> tuple[str, int] | None:
        assert self.roster is not None
        for name, hh in self.roster.items():
            for k, n in hh.nodes.items():
                if n.node_id == node_id:
                    return name, k
        return None

    # ---- train -------------------------------------------------------------------------
    def _base_config(self, r: int, hh: Household, k: int) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            **self.spec.to_config(),
            "server-round": r,
            "household": hh.name,
            "shard": k,
            "peers": hh.peers(),
            "token": hh.token,
            "seed": self.seed,
            "step-timeout": self.step_timeout,
            "rendezvous-timeout": self.rendezvous_timeout,
        }
        return cfg

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each node's shard and the round's config (roster, plan, schedule, DP)."""
        if CLIPPING_NORM_KEY in config:
            raise ValueError(
                "DiscoStrategy cannot be wrapped in Flower's client-side fixed-clipping DP "
                "strategies: they clip whole-model updates on each client and add noise to "
                "every aggregated array, but a DISCO node holds one shard (its update is not "
                "the model's) and the record also carries hard masks and normalization "
                "buffers that noise would corrupt. Use DiscoStrategy(dp=DPSettings(...)) "
                "(per-sample clipping across the household's shards, Opacus accounting)."
            )
        if self.roster is None:
            self.query_roster(grid)
        assert self.roster is not None
        r = server_round + self.round_offset
        self._load(arrays)
        target = self._target(r)
        achieved = self._set_masks(target)
        mode = round_mode(r, self.num_rounds, self.finetune_rounds, self.dp is not None)
        penalty = self.lam / target if mode == "stochastic" else 0.0
        plan = plan_of(self.pm, self.codec)
        plan_json = json.dumps(plan.to_json(), separators=(",", ":"))
        log(
            INFO,
            "round %d: target %.4f of dense bytes (masks %.4f), gates %s, penalty %.3g",
            r,
            target,
            achieved,
            mode,
            penalty,
        )
        self._round_record = {"round": r, "target": target, "mode": mode, "penalty": penalty}
        msgs: list[Message] = []
        for hh in self.roster.values():
            owners = hh.owners
            for k, node in sorted(hh.nodes.items()):
                cfg = self._base_config(r, hh, k)
                cfg.update(
                    {
                        "plan": plan_json,
                        "owners": owners,
                        "owner-examples": [hh.nodes[o].num_examples for o in owners],
                        "steps": self.steps,
                        "batch-size": self.batch_size,
                        "lr": self.lr,
                        "gate-lr": self.gate_lr,
                        "gate-mode": mode,
                        "gate-penalty": penalty,
                        "budget": target,
                        "dp": self.dp is not None,
                    }
                )
                if self.dp is not None:
                    cfg.update(
                        {
                            "dp-noise": self.dp.noise_multiplier,
                            "dp-clip": self.dp.max_grad_norm,
                            "dp-delta": self.dp.delta,
                        }
                    )
                msgs.append(self._shard_message(k, cfg, MessageType.TRAIN, node.node_id))
        return msgs

    def _shard_message(self, k: int, cfg: dict[str, Any], kind: str, node_id: int) -> Message:
        """Node ``k``'s shard (packed) and the round's config, addressed to ``node_id``."""
        content = RecordDict(
            {"arrays": shard_arrays(self.pm.shard(k)), "config": ConfigRecord(cfg)}
        )
        return Message(content=content, message_type=kind, dst_node_id=node_id)

    def _sort_replies(
        self, replies: Iterable[Message], what: str
    ) -> tuple[dict[str, dict[int, Message]], dict[str, str]]:
        """Good replies by household and shard; failure reason by household."""
        assert self.roster is not None
        good: dict[str, dict[int, Message]] = {h: {} for h in self.roster}
        failed: dict[str, str] = {}
        for msg in replies:
            who = self._household_of(msg.metadata.src_node_id)
            if who is None:
                log(WARNING, "%s: reply from unknown node %d", what, msg.metadata.src_node_id)
                continue
            h, k = who
            if msg.has_error():
                reason = (msg.error.reason or "").strip().splitlines()
                text = reason[-1] if reason else f"error code {msg.error.code}"
                failed.setdefault(h, f"shard {k}: {text}")
                log(WARNING, "%s: household %r shard %d failed: %s", what, h, k, text)
            else:
                good[h][k] = msg
        return good, failed

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average shard ``k`` over the households whose N nodes all replied."""
        assert self.roster is not None
        r = server_round + self.round_offset
        good, failed = self._sort_replies(replies, f"round {r} train")
        n = self.spec.num_nodes
        complete = []
        for h, _hh in self.roster.items():
            if len(good[h]) == n and h not in failed:
                complete.append(h)
            elif h not in failed:
                missing = sorted(set(range(n)) - set(good[h]))
                failed[h] = f"no reply from shard(s) {missing} before the round's timeout"
                log(WARNING, "round %d: household %r: %s", r, h, failed[h])
        for h in failed:
            log(
                WARNING,
                "round %d: household %r failed (%s); it keeps its previous shards this round",
                r,
                h,
                failed[h],
            )
        metrics: dict[str, Any] = {
            "households-ok": len(complete),
            "households-failed": len(failed),
        }
        arrays: ArrayRecord | None = None
        if complete:
            weights = [float(max(self.roster[h].num_examples, 1)) for h in complete]
            total = sum(weights)
            for k in range(n):
                states = [
                    unpack_state(good[h][k].content.array_records["arrays"]) for h in complete
                ]
                merged: dict[str, torch.Tensor] = {}
                for key, first in states[0].items():
                    if first.is_floating_point() and "mask_" not in key:
                        acc = torch.zeros_like(first, dtype=torch.float64)
                        for w, st in zip(weights, states, strict=True):
                            acc += st[key].double() * (w / total)
                        merged[key] = acc.to(first.dtype)
                    else:
                        merged[key] = first.clone()
                self.pm.shard(k).load_state_dict(merged, strict=True)
            arrays = ArrayRecord(global_state(self.pm))
            losses, sent, wsum = 0.0, 0.0, 0.0
            for h, w in zip(complete, weights, strict=True):
                ms = [good[h][k].content.metric_records["metrics"] for k in range(n)]
                owner_losses = [
                    rec_float(m, "loss") for m in ms if rec_float(m, "owner-steps", 0) > 0
                ]
                if owner_losses:
                    losses += w * sum(owner_losses) / len(owner_losses)
                    wsum += w
                sent += sum(rec_float(m, "bytes-sent") for m in ms)
                if self.dp is not None:
                    hist = self.dp_history.setdefault(h, [])
                    for m in ms:
                        steps = rec_int(m, "dp-steps", 0)
                        if steps:
                            hist.append((rec_float(m, "dp-noise"), rec_float(m, "dp-rate"), steps))
            if wsum:
                metrics["loss"] = losses / wsum
            self._round_record["timeline"] = self._timeline(good, complete)
            samples = len(complete) * self.steps * self.batch_size
            metrics["train-bytes-per-sample"] = sent / max(samples, 1)
            if self._round_record.get("mode") == "stochastic":
                target = rec_float(self._round_record, "target")
                e = float(self.pm.expected_exchange_fraction().detach())
                self.lam = max(0.0, self.lam + self.dual_lr * (e / target - 1.0))
                metrics["expected-fraction"] = e
                metrics["lambda"] = self.lam
        if self.dp is not None:
            eps = self.epsilons()
            for h, v in eps.items():
                metrics[f"epsilon/{h}"] = v
            if eps:
                metrics["epsilon"] = max(eps.values())
        self._round_record.update({"failed": dict(failed), "train": dict(metrics)})
        return arrays, MetricRecord(metrics)

    def _timeline(
        self, good: Mapping[str, Mapping[int, Message]], households: Sequence[str]
    ) -> dict[str, list[float]]:
        """Per node, seconds after the round's push: its ClientApp process started, its
        handler started, its peers were connected, its steps were done (where Flower's time
        goes; see docs/deployment.md)."""
        out: dict[str, list[float]] = {}
        keys = ("t-process", "t-handler", "t-connected", "t-done")
        for h in households:
            for k, m in sorted(good[h].items()):
                rec = m.content.metric_records["metrics"]
                if all(key in rec for key in keys):
                    out[f"{h}/{k}"] = [round(rec_float(rec, key) - self._t_push, 2) for key in keys]
        return out

    def epsilons(self) -> dict[str, float]:
        """epsilon (at ``dp.delta``) of each household's data so far."""
        if self.dp is None:
            return {}
        return {h: epsilon_of(hist, self.dp.delta) for h, hist in self.dp_history.items()}

    # ---- evaluate ----------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Households run inference on their held-out data with the round's hard masks."""
        r = server_round + self.round_offset
        due = r == self.num_rounds or (self.eval_every > 0 and r % self.eval_every == 0)
        if not self.evaluate or not due:
            return []
        if self.roster is None:
            self.query_roster(grid)
        assert self.roster is not None
        self._load(arrays)
        self._set_masks(self._target(r))
        plan_json = json.dumps(plan_of(self.pm, self.codec).to_json(), separators=(",", ":"))
        msgs: list[Message] = []
        for hh in self.roster.values():
            owner = hh.eval_owner
            if owner is None:
                continue
            n_eval = hh.nodes[owner].num_eval
            batches = -(-n_eval // self.eval_batch_size)
            for k, node in sorted(hh.nodes.items()):
                cfg = self._base_config(r, hh, k)
                cfg.update(
                    {
                        "plan": plan_json,
                        "requester": owner,
                        "eval-batches": batches,
                        "eval-batch-size": self.eval_batch_size,
                    }
                )
                msgs.append(self._shard_message(k, cfg, MessageType.EVALUATE, node.node_id))
        return msgs

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Accuracy per household (from its requester) and their example-weighted mean."""
        assert self.roster is not None
        r = server_round + self.round_offset
        good, failed = self._sort_replies(replies, f"round {r} evaluate")
        metrics: dict[str, Any] = {}
        correct = total = 0
        for h, hh in self.roster.items():
            owner = hh.eval_owner
            if owner is None or h in failed or owner not in good[h]:
                continue
            m = good[h][owner].content.metric_records["metrics"]
            c, n = rec_int(m, "correct"), rec_int(m, "num-examples")
            metrics[f"accuracy/{h}"] = c / max(n, 1)
            correct += c
            total += n
        if total:
            metrics["accuracy"] = correct / total
            metrics["num-examples"] = total
        rep = self.pm.comm_report(self.codec)
        metrics["bytes-per-sample"] = int(rep.bytes_per_sample)
        metrics["households-failed"] = len(failed)
        self._round_record["evaluate"] = dict(metrics)
        return MetricRecord(metrics)

    # ---- run -----------------------------------------------------------------------------
    def _exchange(
        self,
        grid: Grid,
        messages: Iterable[Message],
        timeout: float,
        households: Mapping[str, Household] | None,
    ) -> list[Message]:
        """Push ``messages`` and pull replies until all came, the deadline passed, or (with
        ``households``) every household is decided: all its replies arrived or one failed
        (its other nodes cannot finish a joint round without it)."""
        messages = list(messages)
        pushed = list(grid.push_messages(messages))
        self._sent_to = {
            mid: m.metadata.dst_node_id for mid, m in zip(pushed, messages, strict=True)
        }
        ids = set(pushed)
        end = time.monotonic() + timeout
        got: list[Message] = []
        while ids:
            replies = list(grid.pull_messages(ids))
            got.extend(replies)
            ids.difference_update(m.metadata.reply_to_message_id for m in replies)
            if not ids or time.monotonic() >= end:
                break
            if households is not None and self._all_decided(got, households):
                break
            time.sleep(0.5)
        if ids:
            log(WARNING, "%d repl%s did not arrive", len(ids), "y" if len(ids) == 1 else "ies")
        return got

    def _all_decided(self, got: Sequence[Message], households: Mapping[str, Household]) -> bool:
        seen: dict[str, set[int]] = {h: set() for h in households}
        bad: set[str] = set()
        for m in got:
            who = self._household_of(m.metadata.src_node_id)
            if who is None:
                continue
            seen[who[0]].add(who[1])
            if m.has_error():
                bad.add(who[0])
        return all(h in bad or len(seen[h]) == len(hh.nodes) for h, hh in households.items())

    def checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / CHECKPOINT_NAME if self.checkpoint_dir else None

    def save_checkpoint(self, done_rounds: int, arrays: ArrayRecord) -> None:
        """Write the run's state after ``done_rounds`` rounds: tensors and plain data with a
        sha256 checksum, atomically (a killed write leaves the previous checkpoint)."""
        path = self.checkpoint_path()
        if path is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "rounds_done": done_rounds,
            "num_rounds": self.num_rounds,
            "settings": self.settings(),
            "arrays": {k: v.clone() for k, v in arrays.to_torch_state_dict().items()},
            "lam": self.lam,
            "history": self.history,
            "dp_history": self.dp_history,
        }
        save_torch(state, path)

    def resume(self) -> ArrayRecord | None:
        """Load the last checkpoint, if any: returns the global arrays (and sets the rounds
        already done), or None when there is none. Refuses one of other settings, and a
        corrupted one (:class:`~disco_fl.files.ChecksumError` naming the file); only plain
        data is unpickled (``weights_only=True``). Removes temporary files of killed writes."""
        path = self.checkpoint_path()
        if path is None:
            return None
        remove_stale_temps(path.parent)  # what a write killed in an earlier start left
        if not path.exists():
            return None
        try:
            state = load_torch(path)
        except ChecksumError as e:
            raise ChecksumError(f"cannot read run checkpoint {path}: {e}") from e
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read run checkpoint {path}: {e}") from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a DISCO run checkpoint")
        if state["settings"] != self.settings():
            raise ValueError(
                f"checkpoint {path} was written with other settings: {state['settings']}"
            )
        self.round_offset = rec_int(state, "rounds_done")
        self.lam = rec_float(state, "lam")
        self.history = list(state["history"])
        self.dp_history = {h: [tuple(x) for x in v] for h, v in state["dp_history"].items()}
        arrays = ArrayRecord(state["arrays"])
        self._load(arrays)
        log(INFO, "resumed from %s after round %d", path, self.round_offset)
        return arrays

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Run ``num_rounds`` more rounds (after :meth:`resume`, the rounds already done
        count towards the schedule). The roster is checked before the first round; a round
        stops waiting once every household has replied or failed, or after ``timeout``."""
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        self.num_rounds = self.round_offset + num_rounds
        if self.roster is None:
            self.query_roster(grid)
        assert self.roster is not None
        result = Result()
        arrays = initial_arrays
        result.arrays = arrays
        for current in range(1, num_rounds + 1):
            r = current + self.round_offset
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", r, self.num_rounds)
            t0 = time.monotonic()
            msgs = self.configure_train(current, arrays, train_config, grid)
            self._t_push = time.time()
            replies = self._exchange(grid, msgs, timeout, self.roster)
            agg, metrics = self.aggregate_train(current, replies)
            if agg is not None:
                arrays = agg
                result.arrays = agg
            else:
                self._load(arrays)  # no household completed: the previous model stays
            if metrics is not None:
                log(INFO, "\t└──> train: %s", dict(metrics))
                result.train_metrics_clientapp[r] = metrics
            self._round_record["train-seconds"] = time.monotonic() - t0
            emsgs = list(self.configure_evaluate(current, arrays, evaluate_config, grid))
            if emsgs:
                ereplies = self._exchange(grid, emsgs, timeout, self.roster)
                em = self.aggregate_evaluate(current, ereplies)
                if em is not None:
                    log(INFO, "\t└──> evaluate: %s", dict(em))
                    result.evaluate_metrics_clientapp[r] = em
            self._round_record["seconds"] = time.monotonic() - t0
            self.history.append(dict(self._round_record))
            self.save_checkpoint(r, arrays)
        return result


__all__ = [
    "CHECKPOINT_FORMAT",
    "DPSettings",
    "DiscoStrategy",
    "Household",
    "NodeInfo",
    "RosterError",
    "build_roster",
]
