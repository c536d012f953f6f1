"""BatchNorm statistics per missing node, estimated by a household over its peer channel.

The emulation's :func:`~disco_fl.emulation.statistics.calibrate_degraded` re-estimates, for each
missing node ``m`` (every node but the requester), the BatchNorm running statistics with ``m``
dropped, on one tensor ``x`` in one process. A household trained by the Flower apps holds no
such ``x``: each node's data stays on it. :func:`calibrate_node` is node ``k``'s part of the
same estimate made by the household's nodes together (``disco_fl.fl`` runs it after the last
round; :mod:`disco_fl.fl.server.calibration`):

- **Batches.** The nodes holding data (``examples``: node -> rows it offers) feed the batches,
  in turns: :func:`calibration_batches` lists ``(feeder, start, stop)`` for a missing set, the
  same on every node (it needs only the counts). The missing node never feeds (it is not
  there); a set whose only data is on its missing node gets no batch, hence no statistics (its
  nodes then normalize with the all-up ones, as they would without this estimate).
- **Sessions.** Each batch is one inference session of the nodes but ``m``
  (:func:`~disco_fl.runtime.inference.run_node` with ``missing={m}``: the plan's hard masks and
  codec, ``m``'s channels closed, no gradients), whose requester is the batch's feeder (as a
  training step's is its batch owner), session ``"<run_id>/m<m>/b<i>"``.
- **Statistics.** BatchNorm computes in training mode (batch statistics) and the ``i``-th batch
  updates the running statistics with momentum ``1 / (i + 1)``: the one cumulative average of
  :func:`~disco_fl.emulation.statistics.cumulative_average`, as the emulation. Each node keeps
  the running statistics of its own channels for ``{m}`` and starts the next set from the
  all-up ones; its shard is not changed.
- **The end** is a barrier, the commit vote of a training step
  (:func:`~disco_fl.runtime.training.commit.commit`): a node returns only once every node is
  done, so a node with nothing left to do (N = 2: the requester's peer, the only missing node)
  does not close its peer endpoint before its peers have reached it. A node that fails aborts
  the peers waiting there.

With the same model and the batches of one tensor ``x`` in the same order, the result equals
``calibrate_degraded(pm, x)`` (``tests/test_federated_calibration.py``). Stochastic depth, when
a model has it, draws one mask per batch shared by every node (as a training step does).
"""

from __future__ import annotations

import dataclasses
import time
import types
from collections.abc import Collection, Mapping, Sequence

import torch

from disco_fl.core.gates import gate_generator
from disco_fl.emulation.export import ExportedShard, _compact_state
from disco_fl.emulation.statistics import STATS, cumulative_average
from disco_fl.node.shard import NodeShard
from disco_fl.partition import Op
from disco_fl.partition.plan import Plan
from disco_fl.runtime.inference import run_node
from disco_fl.runtime.training.commit import StepIO, commit
from disco_fl.runtime.transport.base import Transport

Batch = tuple[int, int, int]  # (feeder, first row, end row) of the feeder's calibration data


def calibration_batches(
    examples: Mapping[int, int], missing: Collection[int], batch_size: int, max_batches: int
) -> list[Batch]:
    """The batches of one missing set: the nodes of ``examples`` (node -> rows) but those
    ``missing`` take turns (ascending), each feeding its next ``batch_size`` rows (fewer at
    its end), until ``max_batches`` or every feeder's rows are used."""
    if batch_size < 1 or max_batches < 0:
        raise ValueError("batch_size must be >= 1 and max_batches >= 0")
    feeders = [f for f in sorted(examples) if f not in missing and examples[f] > 0]
    pos = dict.fromkeys(feeders, 0)
    out: list[Batch] = []
    while len(out) < max_batches and any(pos[f] < examples[f] for f in feeders):
        for f in feeders:
            if len(out) < max_batches and pos[f] < examples[f]:
                stop = min(pos[f] + batch_size, examples[f])
                out.append((f, pos[f], stop))
                pos[f] = stop
    return out


class _CalibrationNode(ExportedShard):
    """Node ``k`` as it runs a calibration batch: BatchNorm in training mode, and a random op
    that every node must share (stochastic depth) drawn from the run's seed and the batch."""

    seed = 0
    batch = 0

    def __init__(self, plan: Plan, k: int, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__(plan, k, state)
        self.training = True
        self._layer = {op.name: i for i, op in enumerate(self.program.ops)}

    def shared_generator(self, op: Op) -> torch.Generator:  # type: ignore[override]
        return gate_generator(self.seed, self.batch, self._layer[op.name], -1, -1)


def calibrate_node(
    shard: NodeShard,
    plan: Plan,
    transport: Transport,
    x: torch.Tensor | None,
    examples: Mapping[int, int],
    missing: Sequence[int],
    *,
    batch_size: int = 256,
    max_batches: int = 16,
    timeout: float = 30.0,
    run_id: str = "calibration",
    seed: int = 0,
) -> dict[frozenset[int], dict[str, dict[str, torch.Tensor]]]:
    """Node ``shard.index``'s BatchNorm running statistics for each missing node of
    ``missing`` (module docstring), estimated with its peers over ``transport``:
    ``{frozenset({m}): {op: {"running_mean": t, "running_var": t}}}`` for every ``m`` but
    itself that got batches (this node's share of
    :data:`~disco_fl.emulation.statistics.DegradedStatistics`); empty for a model without
    BatchNorm.

    ``x``: this node's calibration data (at least ``examples[k]`` rows when it feeds; else
    ignored). ``examples``: rows each feeding node offers (the same on every node).
    ``missing``: the same sequence on every node, none of them the plan's requester.
    ``timeout``: the deadline of one batch. ``seed``: of stochastic depth's draws. A failure
    (a peer that died, a deadline) raises, as :func:`~disco_fl.runtime.inference.run_node`
    does; the shard is never changed."""
    k, n = shard.index, plan.num_nodes
    requester = plan.program.requester
    if len(set(missing)) != len(missing) or any(not 0 <= m < n or m == requester for m in missing):
        raise ValueError(
            f"missing nodes {list(missing)}: distinct nodes of 0..{n - 1} but the requester "
            f"(node {requester})"
        )
    if any(not 0 <= f < n or c < 0 for f, c in examples.items()):
        raise ValueError(f"examples {dict(examples)}: rows per node of 0..{n - 1}")
    if examples.get(k, 0) and (x is None or len(x) < examples[k]):
        held = 0 if x is None else len(x)
        raise ValueError(f"node {k} feeds {examples[k]} rows but holds {held}")
    # the end is a barrier (the commit vote of a training step): a node leaves only once every
    # node is done, so that one with nothing to do (N = 2: the requester's peer) does not close
    # its endpoint before a peer has reached it; a failure aborts the peers waiting there
    wait = timeout * (len(missing) * max_batches + 1)
    done = StepIO(transport, f"{run_id}/done", 0, time.monotonic() + wait, wait)
    try:
        out = _estimate(shard, plan, transport, x, examples, missing, batch_size, max_batches,
                        timeout, run_id, seed)  # fmt: skip
        commit(done, requester)
    except BaseException as e:
        done.broadcast_abort(k, f"{type(e).__name__}: {e}")
        raise
    finally:
        done.end()
    return out


def _estimate(
    shard: NodeShard,
    plan: Plan,
    transport: Transport,
    x: torch.Tensor | None,
    examples: Mapping[int, int],
    missing: Sequence[int],
    batch_size: int,
    max_batches: int,
    timeout: float,
    run_id: str,
    seed: int,
) -> dict[frozenset[int], dict[str, dict[str, torch.Tensor]]]:
    """:func:`calibrate_node`'s sessions (its arguments checked)."""
    k = shard.index
    # a private copy: the BatchNorm ops' momenta are set per batch (cumulative_average)
    own = Plan.from_json(plan.to_json())
    bn_ops = [op for op in own.program.ops if op.kind == "batch_norm"]
    holder = types.SimpleNamespace(program=own.program, shards={k: shard})
    state = _compact_state(holder, own, k)  # copies: the shard itself is never changed
    live = {
        op.name: {s: state[f"{op.name}.{s}"] for s in STATS}
        for op in bn_ops
        if all(f"{op.name}.{s}" in state for s in STATS)
    }
    if not live:
        return {}
    all_up = {op: {s: t.clone() for s, t in d.items()} for op, d in live.items()}
    nodes: dict[int, _CalibrationNode] = {}  # by feeder; they share ``state``'s tensors

    def node_for(feeder: int) -> _CalibrationNode:
        if feeder not in nodes:
            program = dataclasses.replace(own.program, requester=feeder)
            nodes[feeder] = _CalibrationNode(dataclasses.replace(own, program=program), k, state)
        return nodes[feeder]

    out: dict[frozenset[int], dict[str, dict[str, torch.Tensor]]] = {}
    for m in missing:
        if m == k:
            continue  # this node is the one missing: it sits the set out
        batches = calibration_batches(examples, {m}, batch_size, max_batches)

        def run(batch: tuple[int, Batch], m: int = m) -> None:
            i, (feeder, start, stop) = batch
            node = node_for(feeder)
            node.seed, node.batch = seed, i
            xb = x[start:stop] if feeder == k and x is not None else None
            sid = f"{run_id}/m{m}/b{i}"
            run_node(node, transport, xb, session_id=sid, timeout=timeout, missing={m})

        if cumulative_average(bn_ops, enumerate(batches), run):
            out[frozenset({m})] = {
                op: {s: t.detach().clone() for s, t in d.items()} for op, d in live.items()
            }
        with torch.no_grad():
            for op, d in live.items():
                for s, t in d.items():
                    t.copy_(all_up[op][s])
    return out
