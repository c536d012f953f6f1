"""What each node is sent in a round: its shard ``k`` (packed ``ArrayRecord``: weights,
buffers, gate logits, hard masks) and a typed config (:mod:`disco_fl.fl.round_config`).

Every node of every household of the roster gets its message in the same list, so Flower
pushes them together: the nodes of a household train (and evaluate) jointly over their peer
channel, so all of them must be in the round at the same time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from disco_fl.core.gates import check_node_dropout
from disco_fl.emulation.balance import check_slice_rule
from disco_fl.emulation.model import PartitionedModel
from disco_fl.fl.federated import shard_arrays
from disco_fl.fl.round_config import EvalConfig, RoundConfig, TrainConfig
from disco_fl.fl.server.roster import Household


@dataclass(frozen=True)
class DPSettings:
    """Differential privacy inside each household (see :mod:`disco_fl.runtime.training.dp`).

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

    def train_fields(self) -> dict[str, Any]:
        """The :class:`TrainConfig` fields of these settings."""
        return {
            "dp": True,
            "dp_noise": self.noise_multiplier,
            "dp_clip": self.max_grad_norm,
            "dp_delta": self.delta,
        }


CLIPPING_NORM_KEY = "clipping_norm"  # what Flower's client-side DP wrappers inject
WRAPPED_BY_FLOWER_DP = (
    "DiscoStrategy cannot be wrapped in Flower's client-side fixed-clipping DP "
    "strategies: they clip whole-model updates on each client and add noise to "
    "every aggregated array, but a DISCO node holds one shard (its update is not "
    "the model's) and the record also carries hard masks and normalization "
    "buffers that noise would corrupt. Use DiscoStrategy(dp=DPSettings(...)) "
    "(per-sample clipping across the household's shards, Opacus accounting)."
)


def check_strategy_args(
    *,
    budget: float,
    steps: int,
    batch_size: int,
    eval_batch_size: int,
    finetune_rounds: int,
    dp: DPSettings | None,
    norm: str,
    node_dropout: float,
    degraded_training: bool = False,
    slices: str = "channels",
) -> None:
    """``ValueError`` for arguments :class:`~disco_fl.fl.server.strategy.DiscoStrategy` cannot
    run with (``norm``: the model spec's normalization)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    if steps < 1 or batch_size < 1 or eval_batch_size < 1:
        raise ValueError("steps, batch_size and eval_batch_size must be >= 1")
    if finetune_rounds < 0:
        raise ValueError("finetune_rounds must be >= 0")
    if dp is not None and norm != "group":
        raise ValueError(
            "differential privacy needs per-sample gradients: build the model with "
            "norm='group' (BatchNorm mixes the samples of a batch)"
        )
    if check_node_dropout(node_dropout) and dp is not None:
        raise ValueError("node_dropout cannot go with dp (DP-SGD needs every node in a step)")
    if degraded_training and dp is not None:
        raise ValueError("degraded_training cannot go with dp (DP-SGD needs every node)")
    check_slice_rule(slices)


@dataclass(frozen=True)
class RoundCommon:
    """What every message of a round shares (see :class:`RoundConfig`)."""

    server_round: int
    plan: str  # Plan JSON
    seed: int
    step_timeout: float
    rendezvous_timeout: float
    task: str = "classification"  # the nodes' loss, metric and built-in data

    def for_node(self, hh: Household, k: int) -> dict[str, Any]:
        """:class:`RoundConfig` fields of node ``k`` of ``hh``."""
        return {
            "server_round": self.server_round,
            "household": hh.name,
            "shard": k,
            "peers": tuple(hh.peers()),
            "token": hh.token,
            "plan": self.plan,
            "seed": self.seed,
            "step_timeout": self.step_timeout,
            "rendezvous_timeout": self.rendezvous_timeout,
            "task": self.task,
        }


def shard_message(pm: PartitionedModel, k: int, cfg: RoundConfig, node_id: int) -> Message:
    """Node ``k``'s shard of ``pm`` (packed) and ``cfg``, addressed to ``node_id``."""
    kind = MessageType.EVALUATE if isinstance(cfg, EvalConfig) else MessageType.TRAIN
    content = RecordDict(
        {"arrays": shard_arrays(pm.shard(k)), "config": ConfigRecord(cfg.to_config())}
    )
    return Message(content=content, message_type=kind, dst_node_id=node_id)


def train_messages(
    pm: PartitionedModel,
    roster: Mapping[str, Household],
    common: RoundCommon,
    train: Mapping[str, Any],
    invite: Mapping[str, frozenset[int]] | None = None,
) -> list[Message]:
    """A train message for every node of ``roster``; ``train``: the :class:`TrainConfig`
    fields every household shares (steps, learning rates, gates, budget, DP). ``invite``
    (degraded training, :mod:`disco_fl.fl.server.availability`): only these households, each
    without the shards named (its survivors get them as ``missing-nodes``); None: all."""
    msgs = []
    for h, hh in roster.items():
        if invite is not None and h not in invite:
            continue
        gone = (invite or {}).get(h, frozenset())
        owners = tuple(hh.owners)
        examples = tuple(hh.nodes[o].num_examples for o in owners)
        for k, node in sorted(hh.nodes.items()):
            if k in gone:
                continue
            cfg = TrainConfig(
                **common.for_node(hh, k), owners=owners, owner_examples=examples,
                missing_nodes=tuple(sorted(gone)), **train,
            )  # fmt: skip
            msgs.append(shard_message(pm, k, cfg, node.node_id))
    return msgs


def evaluate_messages(
    pm: PartitionedModel,
    roster: Mapping[str, Household],
    common: RoundCommon,
    batch_size: int,
    skip: Iterable[str] = (),
) -> list[Message]:
    """An evaluate message for every node of each household holding held-out data (but the
    households in ``skip``); the household's first shard with such data is the requester."""
    msgs = []
    skip = set(skip)
    for h, hh in roster.items():
        owner = hh.eval_owner
        if owner is None or h in skip:
            continue
        batches = -(-hh.nodes[owner].num_eval // batch_size)
        for k, node in sorted(hh.nodes.items()):
            cfg = EvalConfig(
                **common.for_node(hh, k),
                requester=owner,
                eval_batches=batches,
                eval_batch_size=batch_size,
            )
            msgs.append(shard_message(pm, k, cfg, node.node_id))
    return msgs


__all__ = [
    "CLIPPING_NORM_KEY",
    "WRAPPED_BY_FLOWER_DP",
    "DPSettings",
    "check_strategy_args",
    "RoundCommon",
    "evaluate_messages",
    "shard_message",
    "train_messages",
]
