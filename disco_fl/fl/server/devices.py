"""Devices that differ, on the server: slices follow the nodes' capacities, and every node's
shard must fit the memory it reports, checked before any training.

Right after the roster query (:meth:`~disco_fl.fl.server.strategy.DiscoStrategy.query_roster`),
:func:`fit_to_roster`:

1. takes the capacities the nodes reported (``capacity`` in their node config, or measured with
   ``capacity="probe"``; :func:`~disco_fl.fl.server.roster.roster_capacities`: one partition for all
   households, since shard ``k`` is averaged across them) and, when they differ from the current
   partition, partitions the strategy's dense model again with slices proportional to them
   (:func:`set_capacities`). A resumed run keeps the partition of its checkpoint (its shards have
   those shapes), with a warning when the nodes now report other capacities;
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
from logging import INFO, WARNING
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord
from flwr.supercore import log

from disco_fl.emulation.capacity import channel_shares, training_memory
from disco_fl.emulation.model import PartitionedModel
from disco_fl.fl.federated import ModelSpec
from disco_fl.fl.server.messages import DPSettings
from disco_fl.fl.server.roster import Household, check_memory, roster_capacities


class DiscoStrategy(Protocol):
    """What these functions use of :class:`disco_fl.fl.server.strategy.DiscoStrategy`."""

    spec: ModelSpec
    capacities: tuple[float, ...] | None
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


def set_capacities(strategy: DiscoStrategy, capacities: Sequence[float] | None) -> None:
    """Partition the strategy's dense model (that of ``initial_arrays(dense)``, else its own
    initialization) with slices proportional to ``capacities`` (None: equal)."""
    strategy.capacities = tuple(capacities) if capacities is not None else None
    strategy.pm = strategy.spec.partition(strategy.dense, strategy.capacities)


def fit_to_roster(strategy: DiscoStrategy) -> None:
    """The partition of the roster's capacities, then the memory check (see the module)."""
    roster = strategy.roster
    assert roster is not None
    n = strategy.spec.num_nodes
    caps = roster_capacities(roster, n)
    if strategy.round_offset > 0:
        if not _same(caps, strategy.capacities):
            log(
                WARNING,
                "resumed run keeps the partition of its checkpoint (capacities %s); the nodes "
                "now report %s",
                strategy.capacities, caps,
            )  # fmt: skip
    elif not _same(caps, strategy.capacities):
        set_capacities(strategy, caps)
        shares = "/".join(f"{s:.2f}" for s in channel_shares(strategy.pm.program))
        log(INFO, "partition by capacity %s: channel shares %s", strategy.capacities, shares)
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
        f"{strategy.capacities}: make them with strategy.initial_arrays(dense)"
    )


__all__ = ["fit_to_roster", "fitted_arrays", "set_capacities"]
