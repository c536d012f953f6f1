"""Devices that differ, on the server: slices follow the nodes' capacities, and every node's
shard must fit the memory it reports, checked before any training.

Right after the roster query (:meth:`~disco_fl.fl.server.strategy.DiscoStrategy.query_roster`),
:func:`fit_to_roster`:

1. takes the capacities the nodes reported (``capacity`` in their node config, or measured with
   ``capacity="probe"``; :func:`~disco_fl.fl.server.roster.roster_capacities`: one partition for all
   households, since shard ``k`` is averaged across them) and, when they differ from the current
   partition, partitions the strategy's dense model again (:func:`set_slicing`) by the
   strategy's rule (``DiscoStrategy(slices=...)``, run config ``slices``; :func:`slicing_for`):
   ``"channels"`` (default), channel shares proportional to the capacities; ``"compute"``,
   the shares at which each node's measured shard compute over its capacity is equal
   (:func:`disco_fl.emulation.balance.compute_shares` at the run's budget, timed on the
   server; no timing when the capacities are equal or missing). The :class:`Slicing` (rule,
   reported capacities, shares partitioned with) goes into the checkpoint: a resumed run keeps
   the partition of its checkpoint (its shards have those shapes), with a warning when the
   nodes now report other capacities or the run asks for another rule;
2. estimates each shard's training memory (:func:`disco_fl.emulation.capacity.training_memory` at
   the run's batch size, with DP's per-sample gradients when DP is on) and refuses every node
   reporting less (:class:`~disco_fl.fl.server.roster.NodeMemoryError` naming the node, its memory
   and the need).

:func:`fitted_arrays` gives ``start`` initial arrays of the partition that will train: arrays
made by ``initial_arrays`` before the roster changed the partition are made again from the
same dense model; arrays of another partition are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord
from flwr.supercore import log

from disco_fl.emulation.balance import check_slice_rule, compute_shares
from disco_fl.emulation.capacity import channel_shares, training_memory
from disco_fl.emulation.model import PartitionedModel
from disco_fl.fl.federated import ModelSpec
from disco_fl.fl.server.messages import DPSettings
from disco_fl.fl.server.roster import Household, check_memory, roster_capacities


@dataclass(frozen=True)
class Slicing:
    """How the strategy's partition is sliced (what a checkpoint keeps of it)."""

    rule: str = "channels"  # "channels" or "compute" (disco_fl.emulation.balance.SLICE_RULES)
    capacities: tuple[float, ...] | None = None  # as the nodes reported them; None: not reported
    shares: tuple[float, ...] | None = None  # what the model was partitioned with; None: equal

    def __post_init__(self) -> None:
        check_slice_rule(self.rule)


class DiscoStrategy(Protocol):
    """What these functions use of :class:`disco_fl.fl.server.strategy.DiscoStrategy`."""

    spec: ModelSpec
    slices: str
    slicing: Slicing
    budget: float
    seed: int
    dense: torch.nn.Module
    pm: PartitionedModel
    made_arrays: ArrayRecord | None
    roster: dict[str, Household] | None
    round_offset: int
    batch_size: int
    dp: DPSettings | None

    def initial_arrays(self, dense: Any = None) -> ArrayRecord: ...


def _same(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b, strict=True)
    )


def slicing_for(strategy: DiscoStrategy, capacities: Sequence[float] | None) -> Slicing:
    """The :class:`Slicing` of the strategy's rule for the reported ``capacities``: equal
    slices without them; under ``"channels"`` shares proportional to them; under
    ``"compute"`` the shares of :func:`~disco_fl.emulation.balance.compute_shares` for the
    strategy's dense model, one sample of the spec's example input, its ``budget`` (no
    sync-point limit, as its rounds' masks), ``seed`` and capture (equal capacities: equal
    shares, nothing timed)."""
    rule = check_slice_rule(strategy.slices)
    if capacities is None:
        return Slicing(rule)
    caps = tuple(float(c) for c in capacities)
    if rule == "channels":
        return Slicing(rule, caps, caps)
    spec = strategy.spec
    shares, _ = compute_shares(
        strategy.dense,
        spec.num_nodes,
        spec.example()[:1],
        caps,
        strategy.budget,
        None,
        seed=strategy.seed,
        capture=spec.capture,
        log=lambda msg: log(INFO, "%s", msg),
    )
    return Slicing(rule, caps, tuple(shares))


def set_slicing(strategy: DiscoStrategy, slicing: Slicing) -> None:
    """Partition the strategy's dense model (that of ``initial_arrays(dense)``, else its own
    initialization) with ``slicing.shares`` (None: equal slices)."""
    strategy.slicing = slicing
    strategy.pm = strategy.spec.partition(strategy.dense, slicing.shares)


def _fmt(values: Sequence[float] | None) -> str:
    return "equal" if values is None else "/".join(f"{v:.3g}" for v in values)


def fit_to_roster(strategy: DiscoStrategy) -> None:
    """The partition of the roster's capacities by the strategy's rule, then the memory check
    (see the module)."""
    roster = strategy.roster
    assert roster is not None
    n = strategy.spec.num_nodes
    caps = roster_capacities(roster, n)
    have = strategy.slicing
    if strategy.round_offset > 0:
        if not _same(caps, have.capacities) or (caps and strategy.slices != have.rule):
            log(
                WARNING,
                "resumed run keeps the partition of its checkpoint (slices by %s: capacities "
                "%s, shares %s); the nodes now report capacities %s%s",
                have.rule, _fmt(have.capacities), _fmt(have.shares), _fmt(caps),
                f" and the run asks for slices by {strategy.slices}"
                if strategy.slices != have.rule else "",
            )  # fmt: skip
    elif not _same(caps, have.capacities) or strategy.slices != have.rule:
        set_slicing(strategy, slicing_for(strategy, caps))
        if caps is not None:
            got = strategy.slicing
            shares = "/".join(f"{s:.2f}" for s in channel_shares(strategy.pm.program))
            log(INFO, "slices by %s: capacities %s, shares %s: channel shares %s",
                got.rule, _fmt(caps), _fmt(got.shares), shares)  # fmt: skip
    dp = strategy.dp is not None
    needs = [training_memory(strategy.pm, k, strategy.batch_size, dp=dp) for k in range(n)]
    check_memory(roster, needs)


def fitted_arrays(strategy: DiscoStrategy, arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` if they fit the strategy's partition; arrays the strategy made before the
    roster changed the partition, made again; otherwise ``ValueError``."""
    want = {
        f"{k}/{key}": tuple(v.shape)
        for k in range(strategy.spec.num_nodes)
        for key, v in strategy.pm.shard(k).state_dict().items()
    }
    have = {key: tuple(a.shape) for key, a in arrays.items()}
    if have == want:
        return arrays
    if arrays is strategy.made_arrays:
        return strategy.initial_arrays()
    raise ValueError(
        f"the initial arrays do not fit the partition of the nodes' capacities "
        f"{strategy.slicing.capacities} (slices by {strategy.slicing.rule}): make them with "
        "strategy.initial_arrays(dense)"
    )


__all__ = ["Slicing", "fit_to_roster", "fitted_arrays", "set_slicing", "slicing_for"]
