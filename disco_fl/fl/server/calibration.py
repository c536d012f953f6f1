"""Federated calibration of the BatchNorm statistics per missing node (the server's side).

After the last round, before the final plan and shards are exported and delivered
(:func:`~disco_fl.fl.server.server_app.run_disco`), :func:`calibrate_households` sends every
node of every household a ``query.calibrate`` message (:data:`~disco_fl.fl.calibration.
CALIBRATE_TYPE`): its final shard (the final hard masks), the final plan and a
:class:`~disco_fl.fl.round_config.CalibrationConfig` (data owners and their example counts,
the missing nodes: each node but the requester, batch size and number of batches). Each
household estimates the statistics over its peer channel on its own data
(:func:`~disco_fl.runtime.calibration.calibrate_node`) and each node replies with its own
channels' share, checked here name by name and shape by shape
(:func:`~disco_fl.fl.calibration.statistics_of_record`).

A household counts only if all its nodes replied without error (they estimated jointly), as
in a training round. The statistics of each missing set are averaged over the households that
fed it batches, weighted by the rows they fed (:func:`~disco_fl.runtime.calibration.
calibration_batches`, from the roster's example counts: the server computes them itself), in
float64 as shard ``k`` is averaged (:func:`~disco_fl.fl.server.aggregation.average_states`;
an average of per-household statistics, as for the all-up running statistics). The result
goes into ``pm.degraded_statistics``, which :func:`~disco_fl.emulation.export.export` writes
into each node's shard file (``@missing=<m>/<op>.<statistic>``). A set no household could
feed (its only data on the missing node) gets none: its nodes keep the all-up statistics. A
failed household or a failed phase is reported, never fatal: the plan is then exported with
the statistics of the households that answered, or none.

**When** (:func:`wants_calibration`): ``"auto"`` (the default) calibrates where the emulation
does (``fit_budget``): a run trained with node dropout (> 0) of a model with BatchNorm running
statistics. ``"on"`` calibrates any model with BatchNorm (also N = 2: the only set is the
requester alone, which is still a degraded configuration), ``"off"`` never. We keep "auto" off
for runs without node dropout although such plans gain too (BENCHMARKS.md, "Degraded
households"): a run that did not ask for degraded robustness pays no extra phase (N - 1 sets
of up to ``max_batches`` forward passes per household) and sends the server no statistics
beyond the all-up ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from disco_fl.emulation.model import PartitionedModel
from disco_fl.emulation.statistics import STATS, DegradedStatistics
from disco_fl.fl.calibration import CALIBRATE_TYPE, NodeStatistics, statistics_of_record
from disco_fl.fl.federated import shard_arrays
from disco_fl.fl.round_config import CalibrationConfig
from disco_fl.fl.server.aggregation import average_states, complete_households, sort_replies
from disco_fl.fl.server.exchange import HouseholdGrid, HouseholdOf
from disco_fl.fl.server.messages import RoundCommon
from disco_fl.fl.server.roster import Household
from disco_fl.runtime.calibration import calibration_batches

SETTINGS = ("auto", "on", "off")


def has_batch_norm(pm: PartitionedModel) -> bool:
    """Whether some BatchNorm op of ``pm`` keeps running statistics."""
    names = {op.name for op in pm.program.ops if op.kind == "batch_norm"}
    return any(
        all(s in pm.shard(k).op_tensors(name) for s in STATS)
        for name in names
        for k in range(pm.num_nodes)
    )


def wants_calibration(setting: str, node_dropout: float, pm: PartitionedModel) -> bool:
    """Whether a run calibrates (module docstring): ``setting`` is ``"auto"``, ``"on"`` or
    ``"off"``."""
    if setting not in SETTINGS:
        raise ValueError(f"degraded-statistics must be one of {list(SETTINGS)}, got {setting!r}")
    return setting != "off" and has_batch_norm(pm) and (setting == "on" or node_dropout > 0)


def missing_nodes(pm: PartitionedModel) -> list[int]:
    """The missing nodes calibrated: each node but the requester (one set per node)."""
    return [k for k in range(pm.num_nodes) if k != pm.program.requester]


def fed_rows(hh: Household, m: int, batch_size: int, max_batches: int) -> int:
    """Rows household ``hh`` feeds with node ``m`` missing (0: none of its data elsewhere)."""
    rows = {o: min(hh.nodes[o].num_examples, batch_size * max_batches) for o in hh.owners}
    return sum(b - a for _, a, b in calibration_batches(rows, {m}, batch_size, max_batches))


def calibration_messages(
    pm: PartitionedModel,
    roster: Mapping[str, Household],
    common: RoundCommon,
    batch_size: int,
    max_batches: int,
) -> list[Message]:
    """A ``query.calibrate`` message for every node of ``roster``: its shard of ``pm`` and a
    :class:`CalibrationConfig`."""
    msgs = []
    for hh in roster.values():
        owners = tuple(hh.owners)
        for k, node in sorted(hh.nodes.items()):
            cfg = CalibrationConfig(
                **common.for_node(hh, k),
                owners=owners,
                owner_examples=tuple(hh.nodes[o].num_examples for o in owners),
                missing=tuple(missing_nodes(pm)),
                batch_size=batch_size,
                max_batches=max_batches,
            )
            content = RecordDict(
                {"arrays": shard_arrays(pm.shard(k)), "config": ConfigRecord(cfg.to_config())}
            )
            msgs.append(Message(content, message_type=CALIBRATE_TYPE, dst_node_id=node.node_id))
    return msgs


def household_statistics(
    pm: PartitionedModel, replies: Mapping[int, Message], sets: list[frozenset[int]]
) -> dict[int, NodeStatistics]:
    """Each node's checked statistics from its reply (``ValueError`` for a bad one)."""
    out: dict[int, NodeStatistics] = {}
    bn = [op.name for op in pm.program.ops if op.kind == "batch_norm"]
    for k, msg in replies.items():
        own = {
            name: {s: t[s] for s in STATS}
            for name in bn
            if all(s in (t := pm.shard(k).op_tensors(name)) for s in STATS)
        }
        mine = [s for s in sets if k not in s] if own else []
        record = msg.content.array_records["degraded"]
        out[k] = statistics_of_record(record, pm.program, k, own, mine)
    return out


def average_statistics(
    pm: PartitionedModel,
    stats: Mapping[str, dict[int, NodeStatistics]],
    weights: Mapping[str, Mapping[frozenset[int], float]],
) -> DegradedStatistics:
    """Per missing set and node, the households' statistics averaged with ``weights``
    (household -> set -> rows it fed; households with none are left out)."""
    out: DegradedStatistics = {}
    for m in missing_nodes(pm):
        s = frozenset({m})
        fed = [h for h in stats if weights[h].get(s, 0) > 0]
        if not fed:
            continue
        for k in range(pm.num_nodes):
            if k in s or not stats[fed[0]][k].get(s):
                continue
            flat = [
                {f"{op}.{n}": t for op, st in stats[h][k][s].items() for n, t in st.items()}
                for h in fed
            ]
            avg = average_states(flat, [weights[h][s] for h in fed])
            node: dict[str, dict[str, Any]] = {}
            for key, t in avg.items():
                op, _, n = key.rpartition(".")
                node.setdefault(op, {})[n] = t
            out.setdefault(s, {})[k] = node
    return out


def calibrate_households(
    grid: Grid,
    pm: PartitionedModel,
    roster: Mapping[str, Household],
    common: RoundCommon,
    household_of: HouseholdOf,
    *,
    batch_size: int,
    max_batches: int,
    timeout: float,
    skip: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The calibration phase (module docstring) of ``pm`` (the final shards and hard masks;
    ``common``: the phase's round, a round after the last, and the final plan): sets
    ``pm.degraded_statistics``; returns its summary (the sets, the households counted, those
    that failed and why). ``skip``: households sent nothing, with the reason (a node gone in
    the last round, :mod:`disco_fl.fl.server.availability`), counted as failed."""
    sets = [frozenset({m}) for m in missing_nodes(pm)]
    skip = dict(skip or {})
    asked = {h: hh for h, hh in roster.items() if h not in skip}
    msgs = calibration_messages(pm, asked, common, batch_size, max_batches)
    hgrid = grid if isinstance(grid, HouseholdGrid) else HouseholdGrid(grid)
    hgrid.household_of = household_of
    log(INFO, "calibrating BatchNorm statistics for missing nodes %s", missing_nodes(pm))
    replies = hgrid.send_and_receive(msgs, timeout=timeout)
    good, failed = sort_replies(replies, asked, household_of, "calibration")
    complete, failed = complete_households(good, failed, pm.num_nodes, "calibration")
    failed.update(skip)
    stats: dict[str, dict[int, NodeStatistics]] = {}
    for h in complete:
        try:
            stats[h] = household_statistics(pm, good[h], sets)
        except (ValueError, KeyError) as e:
            failed[h] = f"bad statistics: {e}"
            log(WARNING, "calibration: household %r: %s", h, failed[h])
    weights = {
        h: {s: float(fed_rows(roster[h], min(s), batch_size, max_batches)) for s in sets}
        for h in stats
    }
    pm.degraded_statistics = average_statistics(pm, stats, weights)
    done = [sorted(s) for s in sorted(pm.degraded_statistics, key=sorted)]
    log(INFO, "calibration: statistics for missing %s from %d household(s)", done, len(stats))
    return {"missing_sets": done, "households": sorted(stats), "failed": dict(failed)}


__all__ = [
    "SETTINGS",
    "average_statistics",
    "calibrate_households",
    "calibration_messages",
    "fed_rows",
    "has_batch_norm",
    "household_statistics",
    "missing_nodes",
    "wants_calibration",
]
