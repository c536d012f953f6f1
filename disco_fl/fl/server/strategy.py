"""``DiscoStrategy``: the server side of DISCO fine-tuning, as a Flower 1.41 ``Strategy``.

It overrides Flower's hooks and lets ``Strategy.start`` run the rounds; a thin :meth:`start`
checks the roster first (:mod:`disco_fl.fl.server.roster`). ``configure_train`` sends node
``(h, k)`` its shard ``k`` and a :class:`~disco_fl.fl.round_config.TrainConfig`, all N nodes of
every household in one push (they train jointly over their peer channel); ``aggregate_train``
(:mod:`disco_fl.fl.server.aggregation`) averages shard ``k`` over the households whose N nodes
all replied (a failed household keeps its shards; the run goes on); ``configure_evaluate`` /
``aggregate_evaluate``: federated evaluation. After each round the history grows and the
checkpoint is replaced atomically (:mod:`disco_fl.fl.server.checkpoint`); an ``evaluate_fn`` is
honoured as in Flower (:meth:`DiscoStrategy.assembled_model` turns ``arrays`` into the model).

**What Flower's ``start`` cannot express**: a DISCO round is decided once every household has all
its replies or one error (its other nodes cannot finish a joint round without the failed one), so
``start`` hands Flower a :class:`~disco_fl.fl.server.exchange.HouseholdGrid` whose
``send_and_receive`` stops there. Rounds in logs, history, checkpoints and ``Result`` count from
the start of the run (after a resume, Flower's ``[ROUND i/n]`` lines count this start's rounds).
Budget schedule: :func:`~disco_fl.fl.federated.round_budget`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from disco_fl.emulation.budget import calibrate_masks
from disco_fl.emulation.model import PartitionedModel
from disco_fl.fl.federated import (
    ModelSpec,
    epsilon_of,
    global_state,
    rec_float,
    round_budget,
    round_mode,
    split_global_state,
)
from disco_fl.fl.server.aggregation import (
    average_shards,
    epsilon_metrics,
    evaluate_metrics,
    sort_replies,
    timeline,
    train_metrics,
)
from disco_fl.fl.server.availability import Availability
from disco_fl.fl.server.checkpoint import CHECKPOINT_NAME, RunState, load_run, save_run
from disco_fl.fl.server.degraded import degraded_metrics, sort_train_replies
from disco_fl.fl.server.devices import Slicing, fit_to_roster, fitted_arrays
from disco_fl.fl.server.exchange import HouseholdGrid, shift_rounds
from disco_fl.fl.server.messages import (
    CLIPPING_NORM_KEY,
    WRAPPED_BY_FLOWER_DP,
    DPSettings,
    RoundCommon,
    check_strategy_args,
    evaluate_messages,
    train_messages,
)
from disco_fl.fl.server.roster import Household, household_of, query_roster
from disco_fl.runtime.training import plan_of

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class DiscoStrategy(Strategy):
    """DISCO fine-tuning of one partitioned model by households of N nodes.

    Parameters
    ----------
    spec : ModelSpec
        The model the server partitions; nodes build only their own shard from the plan.
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
    codec : str (default: "int8")
        Wire codec of forward activations ("fp32", "fp16", "int8"); "fp32" is exact.
    dp : DPSettings or None (default: None)
        Differential privacy inside households (needs ``spec.norm == "group"``).
    seed : int (default: 0)
        Seed of batch order and gate noise (mixed with round and household); never DP noise.
    num_households : int or None (default: None)
        Expected households; None accepts any number of complete households.
    query_timeout : float (default: 120.0)
        Seconds to wait for the roster query's answers (and for the nodes to connect).
    connect_timeout : float or None (default: None: ``query_timeout``)
        Seconds to wait for the expected nodes to connect before the roster query.
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
    node_dropout : float (default: 0.0)
        In [0, 1): each node but the step's owner sits a step out this often; not with ``dp``.
    degraded_training : bool (default: False)
        A household trains on without a failed or unavailable node (not a batch owner) and
        counts with its survivors' shards (:mod:`disco_fl.fl.server.degraded`); not with ``dp``.
    slices : str (default: "channels")
        Reported capacities -> slices (:mod:`disco_fl.fl.server.devices`): ``"channels"``,
        proportional channel shares; ``"compute"``, shard compute (timed on the server at
        ``budget``) proportional. Equal or unreported capacities: equal slices.
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
        codec: str = "int8",
        dp: DPSettings | None = None,
        seed: int = 0,
        num_households: int | None = None,
        query_timeout: float = 120.0,
        connect_timeout: float | None = None,
        step_timeout: float = 30.0,
        rendezvous_timeout: float = 60.0,
        evaluate: bool = True,
        eval_every: int = 0,
        eval_batch_size: int = 100,
        checkpoint_dir: str | Path | None = None,
        node_dropout: float = 0.0,
        degraded_training: bool = False,
        slices: str = "channels",
    ) -> None:
        check_strategy_args(
            budget=budget, steps=steps, batch_size=batch_size, eval_batch_size=eval_batch_size,
            finetune_rounds=finetune_rounds, dp=dp, norm=spec.norm, node_dropout=node_dropout,
            degraded_training=degraded_training, slices=slices,
        )  # fmt: skip
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
        self.node_dropout = float(node_dropout)
        self.degraded_training = bool(degraded_training)
        self.seed = int(seed)
        self.num_households = num_households
        self.query_timeout = float(query_timeout)
        self.connect_timeout = None if connect_timeout is None else float(connect_timeout)
        self.step_timeout = float(step_timeout)
        self.rendezvous_timeout = float(rendezvous_timeout)
        self.evaluate = evaluate
        self.eval_every = int(eval_every)
        self.eval_batch_size = int(eval_batch_size)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.slices = slices  # the rule for the roster's capacities
        self.slicing = Slicing(slices)  # of the partition; see disco_fl.fl.server.devices
        self.dense = spec.build_dense()  # partitioned again when the roster has capacities
        self.pm = spec.partition(self.dense)
        self.made_arrays: ArrayRecord | None = None  # the last initial_arrays()
        self.roster: dict[str, Household] | None = None
        self.round_offset = 0  # rounds done before this start() (resume)
        self.num_rounds = 0  # total rounds of the run (set by start)
        self.lam = self.init_penalty
        self.history: list[dict[str, Any]] = []
        # household -> [(sigma, sample rate, committed DP steps)] of its data owners
        self.dp_history: dict[str, list[tuple[float, float, int]]] = {}
        self._round_record: dict[str, Any] = {}
        self._arrays: ArrayRecord | None = None  # the global record after the last round
        self._t_round = time.monotonic()  # start of the current round
        self._t_push = time.time()  # wall clock of the current round's push
        self._evaluate_due = False
        self._evaluate_fn: EvaluateFn | None = None
        self.availability = Availability(self.rendezvous_timeout)  # who can take part (degraded)

    @property
    def capacities(self) -> tuple[float, ...] | None:
        """The capacities the nodes reported, that the partition follows (None: equal)."""
        return self.slicing.capacities

    # ---- settings ----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed."""
        return {
            "spec": self.spec.settings(), "budget": self.budget, "steps": self.steps,
            "batch_size": self.batch_size, "finetune_rounds": self.finetune_rounds,
            "codec": self.codec, "dp": asdict(self.dp) if self.dp else None, "seed": self.seed,
        }  # fmt: skip

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        s = self.spec
        log(INFO, "\t├──> DISCO: %s over %d nodes per household", s.name, s.num_nodes)
        log(INFO, "\t│\t├── budget %.4g (final), %d finetune round(s), codec %s",
            self.budget, self.finetune_rounds, self.codec)  # fmt: skip
        log(INFO, "\t│\t├── %d steps of %d per round, lr %g", self.steps, self.batch_size, self.lr)
        log(INFO, "\t│\t└── DP: %s", asdict(self.dp) if self.dp else "off")

    # ---- model state -------------------------------------------------------------------
    def initial_arrays(self, dense: Any = None) -> ArrayRecord:
        """The global record (all shards, ``"<k>/<key>"``) of ``dense`` (default: own model)."""
        if dense is not None:
            self.dense, self.pm = dense, self.spec.partition(dense, self.slicing.shares)
        self.made_arrays = ArrayRecord(global_state(self.pm))
        return self.made_arrays

    def _load(self, arrays: ArrayRecord) -> None:
        states = split_global_state(arrays.to_torch_state_dict(), self.spec.num_nodes)
        for k, st in enumerate(states):
            self.pm.shard(k).load_state_dict(st, strict=True)

    def assembled_model(self, arrays: ArrayRecord) -> PartitionedModel:
        """The strategy's own partitioned model (not a copy; do not train it) holding
        ``arrays``: ``strategy.assembled_model(arrays)(x)`` computes what households would."""
        self._load(arrays)
        return self.pm

    def _set_masks(self, target: float) -> float:
        if target >= 1.0:
            self.pm.set_all_masks(1.0)
            return 1.0
        return calibrate_masks(self.pm, target)

    def _target(self, r: int) -> float:
        return round_budget(r, self.num_rounds, self.budget, self.finetune_rounds)

    # ---- roster ------------------------------------------------------------------------
    def query_roster(self, grid: Grid) -> dict[str, Household]:
        """Ask every node who it is (:func:`disco_fl.fl.server.roster.query_roster`); slice by their
        capacities and check their memory (:func:`disco_fl.fl.server.devices.fit_to_roster`)."""
        hgrid = grid if isinstance(grid, HouseholdGrid) else HouseholdGrid(grid)
        self.roster = query_roster(
            hgrid,
            self.spec.num_nodes,
            num_households=self.num_households,
            query_timeout=self.query_timeout,
            connect_timeout=self.connect_timeout,
        )
        fit_to_roster(self)
        self.availability.answered_roster(self.roster)
        return self.roster

    def _household_of(self, node_id: int) -> tuple[str, int] | None:
        return household_of(self.roster or {}, node_id)

    # ---- train -------------------------------------------------------------------------
    def _common(self, r: int) -> RoundCommon:
        """What every message of round ``r`` shares; the plan of the current hard masks."""
        s, plan = self, json.dumps(plan_of(self.pm, self.codec).to_json(), separators=(",", ":"))
        return RoundCommon(r, plan, s.seed, s.step_timeout, s.rendezvous_timeout, s.spec.task)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each node's shard and the round's :class:`TrainConfig` (roster, plan, schedule,
        DP); every node of every household of the roster, in one push."""
        if CLIPPING_NORM_KEY in config:
            raise ValueError(WRAPPED_BY_FLOWER_DP)
        self._t_round = time.monotonic()
        if self.roster is None:
            self.query_roster(grid)
        assert self.roster is not None
        r = server_round + self.round_offset
        self._load(arrays)
        self._arrays = arrays
        target = self._target(r)
        achieved = self._set_masks(target)
        mode = round_mode(r, self.num_rounds, self.finetune_rounds, self.dp is not None)
        penalty = self.lam / target if mode == "stochastic" else 0.0
        log(INFO, "round %d/%d: target %.4f of dense bytes (masks %.4f), gates %s, penalty %.3g",
            r, self.num_rounds, target, achieved, mode, penalty)  # fmt: skip
        self._round_record = {"round": r, "target": target, "mode": mode, "penalty": penalty}
        dp = self.dp
        train: dict[str, Any] = {
            "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
            "gate_lr": self.gate_lr, "gate_mode": mode, "gate_penalty": penalty,
            "budget": target, "node_dropout": self.node_dropout,
            "degraded_training": self.degraded_training,
            **(dp.train_fields() if dp else {}),
        }  # fmt: skip
        invite = None  # degraded training: only the available nodes (and households)
        if self.degraded_training:
            invite = self.availability.round_start(grid, self.roster, f"round {r} train")
        msgs = train_messages(self.pm, self.roster, self._common(r), train, invite)
        self._t_push = time.time()
        return self.availability.pushed(msgs)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average shard ``k`` over the households whose N nodes all replied (or, degraded,
        all but the nodes they trained without: :mod:`disco_fl.fl.server.degraded`)."""
        assert self.roster is not None
        r, replies = server_round + self.round_offset, self.availability.replied(replies)
        good, complete, failed, gone = sort_train_replies(
            replies, self.roster, self._household_of, self.spec.num_nodes, f"round {r} train",
            degraded=self.degraded_training, refused=self.availability.refused,
        )  # fmt: skip
        self.availability.went_missing(gone)
        metrics: dict[str, Any] = {"households-ok": len(complete), "households-failed": len(failed)}
        metrics.update(degraded_metrics(gone) if self.degraded_training else {})
        arrays: ArrayRecord | None = None
        if complete:
            weights = [float(max(self.roster[h].num_examples, 1)) for h in complete]
            average_shards(self.pm, good, complete, weights, gone)
            arrays = ArrayRecord(global_state(self.pm))
            self._arrays = arrays
            metrics.update(self._train_metrics(good, complete, weights))
            self._round_record["timeline"] = timeline(good, complete, self._t_push)
        elif self._arrays is not None:
            self._load(self._arrays)  # no household completed: the previous model stays
        metrics.update(epsilon_metrics(self.epsilons()))
        self._round_record.update({"failed": dict(failed), "train": dict(metrics)})
        self._round_record["train-seconds"] = time.monotonic() - self._t_round
        return arrays, MetricRecord(metrics)

    def _train_metrics(
        self, good: dict[str, dict[int, Message]], complete: list[str], weights: list[float]
    ) -> dict[str, Any]:
        """:func:`~disco_fl.fl.server.aggregation.train_metrics`, DP steps for the accountant,
        and the dual step on ``lam`` in gate rounds."""
        out, dp_steps = train_metrics(good, complete, weights, self.steps * self.batch_size)
        if self.dp is not None:
            for h, steps in dp_steps.items():
                self.dp_history.setdefault(h, []).extend(steps)
        if self._round_record.get("mode") == "stochastic":
            target = rec_float(self._round_record, "target")
            e = float(self.pm.expected_exchange_fraction().detach())
            self.lam = max(0.0, self.lam + self.dual_lr * (e / target - 1.0))
            out["expected-fraction"] = e
            out["lambda"] = self.lam
        return out

    def epsilons(self) -> dict[str, float]:
        """epsilon (at ``dp.delta``) of each household's data so far."""
        dp = self.dp
        return {h: epsilon_of(v, dp.delta) for h, v in self.dp_history.items()} if dp else {}

    # ---- evaluate ----------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Households run inference on their held-out data with the round's hard masks
        (after the last round, and every ``eval_every``-th)."""
        r = server_round + self.round_offset
        due = r == self.num_rounds or (self.eval_every > 0 and r % self.eval_every == 0)
        self._evaluate_due = self.evaluate and due
        if not self._evaluate_due:
            return []
        if self.roster is None:
            self.query_roster(grid)
        assert self.roster is not None
        self._load(arrays)
        self._set_masks(self._target(r))
        skip = self.availability.skipped(self.roster, f"round {r} evaluate")
        return self.availability.pushed(
            evaluate_messages(self.pm, self.roster, self._common(r), self.eval_batch_size, skip)
        )

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Accuracy per household (from its requester) and their example-weighted mean; None
        in a round without federated evaluation. Without an ``evaluate_fn`` this is the
        round's last hook: the round is recorded and checkpointed here."""
        assert self.roster is not None
        r = server_round + self.round_offset
        out: MetricRecord | None = None
        if self._evaluate_due:
            what, replies = f"round {r} evaluate", self.availability.replied(replies)
            good, failed = sort_replies(replies, self.roster, self._household_of, what)
            failed.update(self.availability.skipping)  # households configure_evaluate skipped
            out = evaluate_metrics(good, failed, self.roster, self.pm.comm_report(self.codec))
            self._round_record["evaluate"] = dict(out)
        if self._evaluate_fn is None:
            self._finish_round(r)
        return out

    def _server_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The ``evaluate_fn`` Flower's loop calls: the user's, with the run's round; after a
        round (not before the first) it then records and checkpoints the round."""
        assert self._evaluate_fn is not None
        r = server_round + self.round_offset
        res = self._evaluate_fn(r, arrays)
        if server_round > 0:
            if res is not None:
                self._round_record["evaluate-server"] = dict(res)
            self._finish_round(r)
        return res

    # ---- end of round, checkpoint, resume ------------------------------------------------
    def _finish_round(self, r: int) -> None:
        self._round_record["seconds"] = time.monotonic() - self._t_round
        self.history.append(dict(self._round_record))
        if self._arrays is not None:
            self.save_checkpoint(r, self._arrays)

    def checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / CHECKPOINT_NAME if self.checkpoint_dir else None

    def save_checkpoint(self, done_rounds: int, arrays: ArrayRecord) -> None:
        """Write the run's state after ``done_rounds`` rounds (:mod:`.checkpoint`)."""
        if (path := self.checkpoint_path()) is not None:
            save_run(path, RunState.of(self, done_rounds, arrays.to_torch_state_dict()))

    def resume(self) -> ArrayRecord | None:
        """The last checkpoint's global arrays (rounds done set), or None. Refuses one of other
        settings or corrupted (:class:`~disco_fl.core.files.ChecksumError`); plain data only
        (``weights_only=True``); removes temporary files of killed writes."""
        path = self.checkpoint_path()
        state = load_run(path, self.settings()) if path is not None else None
        if state is None:
            return None
        self._arrays = arrays = state.restore(self)
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
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Check the roster, then let Flower's ``Strategy.start`` run ``num_rounds`` more
        rounds (after :meth:`resume`, the rounds already done count towards the schedule).

        ``timeout`` bounds each exchange; a round stops waiting once every household has
        replied or failed (:class:`~disco_fl.fl.server.exchange.HouseholdGrid`).
        ``evaluate_fn(round, arrays)``, if given, is called before the first round and after
        each round with the global record of all shards (:meth:`assembled_model`); its metrics
        go to the ``Result`` and to the round's history (``evaluate-server``). The
        ``Result``'s rounds count from the start of the run."""
        self.num_rounds = self.round_offset + num_rounds
        hgrid = grid if isinstance(grid, HouseholdGrid) else HouseholdGrid(grid)
        hgrid.household_of, hgrid.num_nodes = self._household_of, self.spec.num_nodes
        if self.degraded_training:  # only an owner's error decides a household's round
            hgrid.owners_of = lambda h: self.roster[h].owners if self.roster else []
        if self.roster is None:
            self.query_roster(hgrid)
        initial_arrays = self._arrays = fitted_arrays(self, initial_arrays)
        self._evaluate_fn = evaluate_fn
        try:
            result = super().start(
                hgrid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                self._server_evaluate if evaluate_fn is not None else None,
            )
        finally:
            self._evaluate_fn = None
        if not result.arrays and self._arrays is not None:
            result.arrays = self._arrays  # no round completed a household: the start's model
        return shift_rounds(result, self.round_offset)


__all__ = ["DPSettings", "DiscoStrategy"]
