"""BatchNorm running statistics of a partitioned model: re-estimated, and per missing node.

:func:`recalibrate_batchnorm` re-estimates the running statistics with the final hard masks
(budget training ends with it: closing gates shifts every later activation).

:func:`calibrate_degraded` gives a household **statistics for each degraded configuration**.
With a node missing (degraded mode, :mod:`disco_fl.runtime.inference`), its channels count as
closed: every surviving node's later activations lose the missing node's contributions, their
mean and variance shift, and BatchNorm layers normalizing with the all-up running statistics
amplify the shift layer after layer. Measured on ``resnet_narrow``, N = 4, budget 0.1 (quick
settings of ``bench/household.py``): with one node missing, accuracy fell to 16-22 % with the
all-up statistics (44-56 % for a plan trained with node dropout 0.3), and rose to 37-71 %
(84-87 %) with statistics re-estimated for that missing node. This is the observation of
slimmable networks (Yu et al., ICLR 2019): one network run at several widths needs private
BatchNorm statistics per width; weights can be shared, statistics cannot.

So, for each set of missing nodes (default: every single node but the requester), the
statistics are re-estimated exactly as :func:`recalibrate_batchnorm` does, with those nodes
dropped (``pm.dropped_nodes``: nothing of theirs arrives), and the surviving nodes' slices are
kept in ``pm.degraded_statistics``: ``{frozenset(missing): {node: {op: {"running_mean": t,
"running_var": t}}}}``. The model's own statistics are left as they were. :func:`~disco_fl.
emulation.export.export` writes each node's share into its shard file, and a node uses the
statistics of the missing set its session starts with (:meth:`~disco_fl.emulation.export.
ExportedShard.context`; the runtime agrees on that set at the session's start, see
``docs/serving.md``, "Degraded mode").
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TypeVar

import torch
from torch import nn

from disco_fl.emulation.model import PartitionedModel
from disco_fl.partition import Op

# {missing nodes: {node: {batch_norm op: {"running_mean" | "running_var": tensor}}}}
DegradedStatistics = dict[frozenset[int], dict[int, dict[str, dict[str, torch.Tensor]]]]
STATS = ("running_mean", "running_var")


def recalibrate_batchnorm(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int = 256,
    max_batches: int = 16,
    *,
    dropped: Collection[int] = (),
) -> None:
    """Re-estimate BatchNorm running statistics of a partitioned model (cumulative average
    over up to ``max_batches`` batches of ``x``, hard masks, no gradients), with the nodes
    ``dropped`` missing (default none)."""
    if not isinstance(model, PartitionedModel):
        return
    bn_ops = [op for op in model.program.ops if op.kind == "batch_norm"]
    if not bn_ops or len(x) == 0:
        return
    mode, was_training, was_dropped = model.gate_mode, model.training, model.dropped_nodes
    model.gate_mode = "hard"
    model.dropped_nodes = frozenset(dropped)
    model.train()
    try:
        with torch.no_grad():
            starts = range(0, min(len(x), max_batches * batch_size), batch_size)
            cumulative_average(bn_ops, (x[s : s + batch_size] for s in starts), model)
    finally:
        model.gate_mode = mode
        model.dropped_nodes = was_dropped
        model.train(was_training)


B = TypeVar("B")


def cumulative_average(
    bn_ops: Sequence[Op], batches: Iterable[B], run: Callable[[B], object]
) -> int:
    """``run(batch)`` for each of ``batches`` (in training mode: BatchNorm normalizing with
    the batch's statistics and updating its running ones), the ``i``-th (from 0) with the
    momentum of every op of ``bn_ops`` set to ``1 / (i + 1)``: the running statistics end as
    the plain average of the batches' statistics (PyTorch's ``momentum=None``). The ops'
    momenta are restored afterwards; returns the number of batches run.

    The one cumulative average of the re-estimation: the emulation's
    (:func:`recalibrate_batchnorm`) and the household's over its peer channel
    (:func:`disco_fl.runtime.calibration.calibrate_node`, which runs each batch as a session of
    the nodes)."""
    saved = [(op, op.attrs["momentum"]) for op in bn_ops]
    i = 0
    try:
        for i, batch in enumerate(batches, start=1):  # noqa: B007 (the count is returned)
            for op in bn_ops:
                op.attrs["momentum"] = 1.0 / i
            run(batch)
    finally:
        for op, m in saved:
            op.attrs["momentum"] = m
    return i


def _running_stats(pm: PartitionedModel, k: int) -> dict[str, dict[str, torch.Tensor]]:
    """Node ``k``'s BatchNorm running statistics, by op (the tensors themselves)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    shard = pm.shard(k)
    for op in pm.program.ops:
        if op.kind != "batch_norm":
            continue
        t = shard.op_tensors(op.name)
        if all(s in t for s in STATS):
            out[op.name] = {s: t[s] for s in STATS}
    return out


def calibrate_degraded(
    pm: PartitionedModel,
    x: torch.Tensor,
    missing_sets: Iterable[Collection[int]] | None = None,
    batch_size: int = 256,
    max_batches: int = 16,
) -> DegradedStatistics:
    """BatchNorm statistics of ``pm`` for each set of missing nodes in ``missing_sets``
    (default: each single node but the requester), estimated on ``x``; stored in
    ``pm.degraded_statistics`` (replacing what was there) and returned. The model's own
    statistics are unchanged. A model without BatchNorm gets an empty dict."""
    n, requester = pm.num_nodes, pm.program.requester
    sets = (
        [frozenset({k}) for k in range(n) if k != requester]
        if missing_sets is None
        else [frozenset(int(k) for k in s) for s in missing_sets]
    )
    for s in sets:
        if not s or requester in s or not all(0 <= k < n for k in s) or len(s) >= n:
            raise ValueError(
                f"missing set {sorted(s)}: nodes of 0..{n - 1}, not empty, not the requester "
                f"(node {requester})"
            )
    out: DegradedStatistics = {}
    live = {k: _running_stats(pm, k) for k in range(n)}
    if not any(live.values()):
        pm.degraded_statistics = out
        return out
    saved = {k: {op: {s: t.clone() for s, t in d.items()} for op, d in ops.items()}
             for k, ops in live.items()}  # fmt: skip
    try:
        for s in sets:
            recalibrate_batchnorm(pm, x, batch_size, max_batches, dropped=s)
            out[s] = {
                k: {op: {st: t.detach().clone() for st, t in d.items()} for op, d in ops.items()}
                for k, ops in live.items()
                if k not in s and ops
            }
            _restore(live, saved)
    finally:
        _restore(live, saved)
    pm.degraded_statistics = out
    return out


def _restore(
    live: dict[int, dict[str, dict[str, torch.Tensor]]],
    saved: dict[int, dict[str, dict[str, torch.Tensor]]],
) -> None:
    with torch.no_grad():
        for k, ops in live.items():
            for op, d in ops.items():
                for s, t in d.items():
                    t.copy_(saved[k][op][s])
