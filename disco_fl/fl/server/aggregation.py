"""Replies as data: sorted by household, failures kept as reasons, shards averaged.

A household counts in a round only if all its N nodes replied without error (they trained
jointly: one node's shard is not an update without the others'), or, with degraded training, all
but the nodes it trained without (:mod:`disco_fl.fl.server.degraded`). Shard ``k`` of the global
model is the average of shard ``k`` over the households that count, weighted by their
training examples; hard masks and integer buffers are the same everywhere and are taken from
the first household.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import WARNING
from typing import Any

import torch
from flwr.app import Message, MetricRecord
from flwr.supercore import log

from disco_fl.emulation.model import PartitionedModel
from disco_fl.fl.federated import rec_float, rec_int, unpack_state
from disco_fl.fl.server.roster import Household

Good = dict[str, dict[int, Message]]  # household -> shard -> reply
Failed = dict[str, str]  # household -> why it failed (first failed shard)

# metrics of each node's train reply with the wall-clock times of its round (see timeline)
TIMELINE_KEYS = ("t-process", "t-handler", "t-connected", "t-done")


def sort_replies(
    replies: Iterable[Message],
    households: Iterable[str],
    household_of: Callable[[int], tuple[str, int] | None],
    what: str,
) -> tuple[Good, Failed]:
    """Good replies by household and shard; the failure reason of each household with an
    error reply (logged). Replies of nodes of no household are logged and dropped."""
    good: Good = {h: {} for h in households}
    failed: Failed = {}
    for msg in replies:
        who = household_of(msg.metadata.src_node_id)
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


def complete_households(
    good: Good,
    failed: Failed,
    num_nodes: int,
    what: str,
    gone: Mapping[str, frozenset[int]] | None = None,
) -> tuple[list[str], Failed]:
    """Households whose ``num_nodes`` nodes all replied (but the shards ``gone[h]`` that a
    degraded household trained without, :mod:`disco_fl.fl.server.degraded`); a household with
    another reply missing is added to ``failed`` (returned, updated)."""
    complete = []
    for h, replies in good.items():
        expected = set(range(num_nodes)) - (gone or {}).get(h, frozenset())
        if set(replies) == expected and h not in failed:
            complete.append(h)
        elif h not in failed:
            missing = sorted(expected - set(replies))
            failed[h] = f"no reply from shard(s) {missing} before the round's timeout"
            log(WARNING, "%s: household %r: %s", what, h, failed[h])
    return complete, failed


def average_states(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The ``weights``-weighted average of ``states`` (float64 accumulation) for floating
    tensors other than hard masks (``mask_*``); the first state's value for the others."""
    total = sum(weights)
    merged: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.is_floating_point() and "mask_" not in key:
            acc = torch.zeros_like(first, dtype=torch.float64)
            for w, st in zip(weights, states, strict=True):
                acc += st[key].double() * (w / total)
            merged[key] = acc.to(first.dtype)
        else:
            merged[key] = first.clone()
    return merged


def average_shards(
    pm: PartitionedModel,
    good: Good,
    households: Sequence[str],
    weights: Sequence[float],
    gone: Mapping[str, frozenset[int]] | None = None,
) -> None:
    """Load into ``pm`` every shard ``k`` averaged over ``households`` (their replies in
    ``good``), weighted by ``weights``, leaving out the households that trained without node
    ``k`` (``gone[h]``, degraded training); a shard none of them trained keeps its value."""
    gone = gone or {}
    for k in range(pm.program.num_nodes):
        have = [
            (h, w) for h, w in zip(households, weights, strict=True) if k not in gone.get(h, ())
        ]
        if not have:
            continue
        states = [unpack_state(good[h][k].content.array_records["arrays"]) for h, _ in have]
        pm.shard(k).load_state_dict(average_states(states, [w for _, w in have]), strict=True)


def epsilon_metrics(epsilons: Mapping[str, float]) -> dict[str, float]:
    """``epsilon/<household>`` for each household and ``epsilon``, the largest."""
    out = {f"epsilon/{h}": v for h, v in epsilons.items()}
    if epsilons:
        out["epsilon"] = max(epsilons.values())
    return out


def timeline(good: Good, households: Sequence[str], t_push: float) -> dict[str, list[float]]:
    """Per node (``"<household>/<shard>"``), seconds after ``t_push`` (the server's push) at
    which its ClientApp process started, its handler started, its peers were connected and
    its steps were done (where Flower's time goes; see docs/deployment.md)."""
    out: dict[str, list[float]] = {}
    for h in households:
        for k, m in sorted(good[h].items()):
            rec = m.content.metric_records["metrics"]
            if all(key in rec for key in TIMELINE_KEYS):
                out[f"{h}/{k}"] = [round(rec_float(rec, key) - t_push, 2) for key in TIMELINE_KEYS]
    return out


def train_metrics(
    good: Good, complete: Sequence[str], weights: Sequence[float], samples_per_household: int
) -> tuple[dict[str, Any], dict[str, list[tuple[float, float, int]]]]:
    """The round's training metrics over the ``complete`` households: ``loss`` (mean over
    the batch owners that reported one, weighted by ``weights``; absent under DP, where nodes
    keep it), ``train-bytes-per-sample``; and per household the DP steps its nodes committed
    (``(sigma, sample rate, steps)``, for the accountant)."""
    out: dict[str, Any] = {}
    dp: dict[str, list[tuple[float, float, int]]] = {}
    losses, sent, wsum = 0.0, 0.0, 0.0
    for h, w in zip(complete, weights, strict=True):
        ms = [m.content.metric_records["metrics"] for _, m in sorted(good[h].items())]
        owner_losses = [rec_float(m, "loss") for m in ms if rec_float(m, "owner-steps", 0) > 0]
        if owner_losses:
            losses += w * sum(owner_losses) / len(owner_losses)
            wsum += w
        sent += sum(rec_float(m, "bytes-sent") for m in ms)
        for m in ms:
            steps = rec_int(m, "dp-steps", 0)
            if steps:
                dp.setdefault(h, []).append(
                    (rec_float(m, "dp-noise"), rec_float(m, "dp-rate"), steps)
                )
    if wsum:
        out["loss"] = losses / wsum
    out["train-bytes-per-sample"] = sent / max(len(complete) * samples_per_household, 1)
    return out, dp


def evaluate_metrics(
    good: Good, failed: Failed, roster: Mapping[str, Household], comm: Any
) -> MetricRecord:
    """Accuracy per household (from its requester's ``correct``), their example-weighted
    mean, and the bytes per sample of the plan evaluated (``comm``: a comm report). A
    requester of a user's ``metric_fn`` (no ``correct``) reports its own metrics instead:
    each per household (``<name>/<household>``) and their example-weighted mean."""
    metrics: dict[str, Any] = {}
    correct = total = counted = 0
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for h, hh in roster.items():
        owner = hh.eval_owner
        if owner is None or h in failed or owner not in good[h]:
            continue
        m = good[h][owner].content.metric_records["metrics"]
        n = rec_int(m, "num-examples")
        if "correct" in m:
            c = rec_int(m, "correct")
            metrics[f"accuracy/{h}"] = c / max(n, 1)
            correct += c
            counted += n
        for key in m:
            if key not in ("num-examples", "correct") and not (
                "correct" in m and key == "accuracy"
            ):
                v = rec_float(m, key)
                metrics[f"{key}/{h}"] = v
                sums[key] = sums.get(key, 0.0) + n * v
                weights[key] = weights.get(key, 0.0) + n
        total += n
    if total:
        if counted:
            metrics["accuracy"] = correct / counted
        metrics["num-examples"] = total
    for key, s in sums.items():
        metrics[key] = s / weights[key] if weights[key] else 0.0
    metrics["bytes-per-sample"] = int(comm.bytes_per_sample)
    metrics["households-failed"] = len(failed)
    return MetricRecord(metrics)


__all__ = [
    "average_states",
    "complete_households",
    "evaluate_metrics",
    "sort_replies",
    "timeline",
    "train_metrics",
]
