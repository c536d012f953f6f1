"""The typed config of one Flower round, as the strategy writes it and the ClientApp reads it.

:class:`TrainConfig` (``train`` messages) and :class:`EvalConfig` (``evaluate`` messages) share
:class:`RoundConfig`'s fields. Each field names its record key (``metadata["key"]``);
:meth:`RoundConfig.to_config` gives the ``ConfigRecord`` content and
:meth:`RoundConfig.from_config` checks every key against the field's type (a missing or
ill-typed key raises ``ValueError`` naming it; keys of no field are ignored, so a newer server
may add some). Nothing is parsed twice: the ClientApp reads attributes.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, TypeVar

from disco_fl.core.gates import check_node_dropout

TaskName = Literal["classification", "segmentation", "super_resolution"]


def _key(name: str, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"key": name})


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    """What every message of a round tells node ``shard`` of ``household``."""

    server_round: int = _key("server-round")  # the run's round, 1-based (resume included)
    household: str = _key("household")
    shard: int = _key("shard")  # the node's shard index k
    peers: tuple[str, ...] = _key("peers")  # peer endpoint of each shard, by shard
    token: str = _key("token")  # per-household secret of this round's peer channel
    plan: str = _key("plan")  # Plan JSON: program, hard masks, codec
    seed: int = _key("seed", 0)  # run seed (batch order, gate noise; never DP noise)
    step_timeout: float = _key("step-timeout", 30.0)  # deadline of one step / eval batch
    rendezvous_timeout: float = _key("rendezvous-timeout", 60.0)  # wait for the peers
    # the task (disco_fl.tasks): the loss of training, the metric of evaluation, built-in data
    task: TaskName = _key("task", "classification")

    def __post_init__(self) -> None:
        if self.task not in typing.get_args(TaskName):
            known = ", ".join(typing.get_args(TaskName))
            raise ValueError(f"round config: unknown task {self.task!r}; known tasks: {known}")

    def to_config(self) -> dict[str, Any]:
        """The ``ConfigRecord`` content (lists for tuples; ``None`` fields left out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[f.metadata["key"]] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_config(cls: type[C], cfg: Mapping[str, Any]) -> C:
        """From a ``ConfigRecord``; ``ValueError`` naming a missing or ill-typed key."""
        hints = typing.get_type_hints(cls)
        kw: dict[str, Any] = {}
        for f in fields(cls):
            key = f.metadata["key"]
            if key not in cfg:
                if f.default is MISSING:
                    raise ValueError(f"round config lacks {key!r}")
                continue
            kw[f.name] = _typed(key, cfg[key], hints[f.name])
        return cls(**kw)


C = TypeVar("C", bound=RoundConfig)


def _typed(key: str, v: Any, hint: Any) -> Any:
    """``v`` checked against ``hint`` (int, float, str, bool, Literal, tuple[X, ...], X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if v is None:
            return None
        return _typed(key, v, next(a for a in args if a is not type(None)))
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"round config {key!r} must be a list, got {v!r}")
        return tuple(_typed(f"{key}[{i}]", x, args[0]) for i, x in enumerate(v))
    if origin is Literal:
        if v not in args:
            raise ValueError(f"round config {key!r} must be one of {list(args)}, got {v!r}")
        return v
    ok = {
        bool: isinstance(v, bool),
        int: isinstance(v, int) and not isinstance(v, bool),
        float: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: isinstance(v, str),
    }[hint]
    if not ok:
        raise ValueError(f"round config {key!r} must be {hint.__name__}, got {v!r}")
    return float(v) if hint is float else v


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RoundConfig):
    """A training round: joint steps of the household (see ``disco_fl.fl.client_app.train``)."""

    owners: tuple[int, ...] = _key("owners")  # shards holding training data, ascending
    owner_examples: tuple[int, ...] = _key("owner-examples")  # their example counts
    steps: int = _key("steps")  # joint steps; batch owners take turns
    batch_size: int = _key("batch-size")
    lr: float = _key("lr")  # Adam learning rate of the weights
    gate_lr: float = _key("gate-lr")  # Adam learning rate of the gate logits
    gate_mode: Literal["hard", "stochastic"] = _key("gate-mode")
    gate_penalty: float = _key("gate-penalty")  # lam / target of the budget constraint
    budget: float = _key("budget")  # the round's target fraction of dense exchange bytes
    dp: bool = _key("dp", False)  # differential privacy inside the household
    dp_noise: float | None = _key("dp-noise", None)  # sigma (with dp)
    dp_clip: float | None = _key("dp-clip", None)  # whole-model clipping bound (with dp)
    dp_delta: float | None = _key("dp-delta", None)  # delta of the reported epsilon (with dp)
    # each node but the step's owner sits a step out with this probability (NodeTrainer)
    node_dropout: float = _key("node-dropout", 0.0)
    # go on without a failed node that is not a batch owner (disco_fl.runtime.training.degraded)
    degraded_training: bool = _key("degraded-training", False)
    # shards found unavailable at the round's start (not batch owners; with degraded_training):
    # the round trains without them from step 0, no peer connection to them is attempted
    missing_nodes: tuple[int, ...] = _key("missing-nodes", ())

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.owners) != len(self.owner_examples):
            raise ValueError(
                f"round config: {len(self.owners)} owners but "
                f"{len(self.owner_examples)} owner-examples"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("round config: steps and batch-size must be >= 1")
        if self.dp and None in (self.dp_noise, self.dp_clip, self.dp_delta):
            raise ValueError("round config: dp needs dp-noise, dp-clip and dp-delta")
        check_node_dropout(self.node_dropout)
        if self.dp and self.node_dropout:
            raise ValueError("round config: node-dropout cannot go with dp")
        if self.dp and self.degraded_training:
            raise ValueError("round config: degraded-training cannot go with dp")
        gone = self.missing_nodes
        if gone and not self.degraded_training:
            raise ValueError("round config: missing-nodes needs degraded-training")
        if len(set(gone)) != len(gone) or any(not 0 <= j < len(self.peers) for j in gone):
            raise ValueError(f"round config: missing-nodes {list(gone)}: distinct shard indices")
        if self.shard in gone or set(gone) & set(self.owners):
            raise ValueError(
                f"round config: missing-nodes {list(gone)} names this shard or a batch owner"
            )


@dataclass(frozen=True, kw_only=True)
class EvalConfig(RoundConfig):
    """An evaluation round: collaborative inference on the requester's held-out data."""

    requester: int = _key("requester")  # the shard holding the held-out data
    eval_batches: int = _key("eval-batches")
    eval_batch_size: int = _key("eval-batch-size")


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig(RoundConfig):
    """After the last round: the household's BatchNorm statistics per missing node, on the
    nodes' training data (see ``disco_fl.fl.client_app.calibrate``)."""

    owners: tuple[int, ...] = _key("owners")  # shards holding data (they feed), ascending
    owner_examples: tuple[int, ...] = _key("owner-examples")  # their example counts
    missing: tuple[int, ...] = _key("missing")  # each one missing node, one set per node
    batch_size: int = _key("batch-size")  # rows per calibration batch
    max_batches: int = _key("max-batches")  # batches per missing node, at most

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.owners) != len(self.owner_examples):
            raise ValueError("round config: as many owner-examples as owners")
        if self.batch_size < 1 or self.max_batches < 1:
            raise ValueError("round config: batch-size and max-batches must be >= 1")


__all__ = ["CalibrationConfig", "EvalConfig", "RoundConfig", "TaskName", "TrainConfig"]
