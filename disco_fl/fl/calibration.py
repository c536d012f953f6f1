"""Federated calibration of the BatchNorm statistics per missing node: what the node and the
server share.

After the last round of a run that trains with node dropout (``node-dropout > 0``) a model with
BatchNorm (or always with ``degraded-statistics = "on"``), the server sends every node of every
household the final shard and plan in a ``query.calibrate`` message (:data:`CALIBRATE_TYPE`,
a :class:`~disco_fl.fl.round_config.CalibrationConfig`; :mod:`disco_fl.fl.server.calibration`).
The household's nodes estimate, for each missing node ``m`` but the requester, the running
statistics with ``m`` dropped, over their peer channel, each feeding batches of its own
training data (:func:`~disco_fl.runtime.calibration.calibrate_node`; the ClientApp's
``calibrate`` handler), and each node replies with its own channels' statistics
(:func:`statistics_record`: one array per tensor, keyed as in a shard file,
``"@missing=<m>/<op>.running_mean"``). The server checks every name and shape
(:func:`statistics_of_record`), averages them over households and exports them in the shards.

What leaves a node is what its shard already holds for the all-up case: per-channel means and
variances of activations over many samples (the all-up running statistics travel in every
round's shard); no sample, label or per-sample value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MessageType

from disco_fl.emulation.export import DEGRADED, degraded_key, parse_degraded_key
from disco_fl.emulation.statistics import STATS
from disco_fl.fl.federated import derive_seed
from disco_fl.fl.round_config import CalibrationConfig
from disco_fl.partition import Program

CALIBRATE_ACTION = "calibrate"
CALIBRATE_TYPE = f"{MessageType.QUERY}.{CALIBRATE_ACTION}"

NodeStatistics = dict[frozenset[int], dict[str, dict[str, torch.Tensor]]]  # one node's share


def calibration_rows(cfg: CalibrationConfig) -> dict[int, int]:
    """Rows each data owner feeds: its examples, at most ``batch_size * max_batches``."""
    cap = cfg.batch_size * cfg.max_batches
    return {o: min(n, cap) for o, n in zip(cfg.owners, cfg.owner_examples, strict=True)}


def calibration_data(cfg: CalibrationConfig, x_train: torch.Tensor, k: int) -> torch.Tensor | None:
    """Node ``k``'s calibration rows: a seeded shuffle of its training data (from the run's
    seed and the household: data stored sorted by class would bias the first batches), the
    first :func:`calibration_rows` of it; ``None`` for a node holding none."""
    rows = calibration_rows(cfg).get(k, 0)
    if rows == 0:
        return None
    if len(x_train) != dict(zip(cfg.owners, cfg.owner_examples, strict=True))[k]:
        raise ValueError(
            f"shard {k} holds {len(x_train)} training examples, the config says "
            f"{dict(zip(cfg.owners, cfg.owner_examples, strict=True))[k]}"
        )
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, cfg.household, "calibration"))
    return x_train[torch.randperm(len(x_train), generator=gen)[:rows]]


def statistics_record(stats: NodeStatistics) -> ArrayRecord:
    """One node's statistics as an ``ArrayRecord``: one array per tensor, keys
    ``"@missing=<m>/<op>.<statistic>"`` (:func:`~disco_fl.emulation.export.degraded_key`)."""
    arrays = {
        f"{degraded_key(s)}{op}.{name}": Array(t.detach().cpu().contiguous().numpy())
        for s, ops in sorted(stats.items(), key=lambda kv: sorted(kv[0]))
        for op, st in ops.items()
        for name, t in st.items()
    }
    return ArrayRecord(arrays)


def statistics_of_record(
    record: ArrayRecord,
    program: Program,
    k: int,
    own: Mapping[str, Mapping[str, torch.Tensor]],
    sets: Sequence[frozenset[int]],
) -> NodeStatistics:
    """Node ``k``'s statistics from its reply, checked: exactly the running mean and variance
    of every BatchNorm op of ``own`` (node ``k``'s own statistics, by op) for each of ``sets``
    (the missing sets it fed batches to; none holding ``k``), each a finite array of its own
    statistic's dtype and shape (a variance not negative). ``ValueError`` naming what is wrong."""
    bn = {op.name for op in program.ops if op.kind == "batch_norm"}
    want = {f"{degraded_key(s)}{op}.{n}" for s in sets for op in own for n in STATS}
    got = set(record.keys())
    if got != want or any(k in s for s in sets) or not set(own) <= bn:
        raise ValueError(
            f"shard {k}: statistics {sorted(got - want)[:3]} not asked for, "
            f"{sorted(want - got)[:3]} missing"
        )
    out: NodeStatistics = {}
    for key in sorted(got):
        if not key.startswith(DEGRADED):
            raise ValueError(f"shard {k}: {key!r} is no degraded-statistics key")
        missing, rest = parse_degraded_key(key, program.num_nodes)
        op, _, name = rest.rpartition(".")
        t = torch.from_numpy(np.array(record[key].numpy(), copy=True))
        ref = own[op][name]
        if t.dtype != ref.dtype or t.shape != ref.shape:
            raise ValueError(
                f"shard {k}: {key} is {t.dtype} {list(t.shape)}, not {ref.dtype} {list(ref.shape)}"
            )
        if not torch.isfinite(t).all() or (name == "running_var" and (t < 0).any()):
            raise ValueError(f"shard {k}: {key} holds values no statistic has")
        out.setdefault(missing, {}).setdefault(op, {})[name] = t
    return out


__all__ = [
    "CALIBRATE_ACTION",
    "CALIBRATE_TYPE",
    "NodeStatistics",
    "calibration_data",
    "calibration_rows",
    "statistics_of_record",
    "statistics_record",
]
