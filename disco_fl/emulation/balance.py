"""Slices by compute: channel shares under which each node's shard compute is proportional to
its device's capacity (devices that differ).

``partition(..., capacities=c)`` gives node ``k`` a share of every layer's channels
proportional to ``c[k]`` (the *channels* rule). Under dense exchange a node's compute grows like
its share, so that balances the devices. Under a sparse plan it does not: a node's mixing layer
reads its own input channels and only the few open channels of its peers, so its compute grows
with about the square of its share, while per-op costs do not shrink with it; the fast device,
given its channel share, becomes the bottleneck (``bench/household_uneven.py``). The *compute*
rule (:func:`compute_shares`) measures instead of assuming:

1. it partitions the model at a few candidate shares (equal, channel-proportional and halfway
   between), each with hard masks from seeded random gate logits calibrated to the plan's
   budget and sync-point limit (the trained masks are not known before training; random masks
   at the budget have the same exchange sizes),
2. times every node's shard program on this machine (:func:`interleaved_compute_ms`: one
   thread, shard-only execution, the candidates in turns, the fastest of ``reps`` runs),
3. fits each node's time in its own share (:func:`fit_costs`: ``a_k + B s + C s^2``, the
   growth terms shared by the nodes and non-negative: robust to a noisy timing) and solves for
   the shares at which ``time_k / capacity_k`` is the same on every node
   (:func:`solve_shares`),
4. times the partition at that solution and at neighbours on the line from equal shares
   through it (``REFINE``: 0.9, 0.95, 1.05 and 1.1 of the way), all eight candidates again in
   turns, and keeps the one whose slowest node is fastest (the lowest measured ``max_k
   time_k / capacity_k``). A curve in the share is a smooth summary of a bumpy truth: on the
   2-core test machine 1.4 % more of the channels put 20 % more time on the fast node
   (``bench/household_uneven.py --sweep``), mostly because CPU kernels are faster on whole
   blocks of 8 channels (uneven slices now come in such groups,
   :func:`disco_fl.core.layout.split_sizes`), partly noise; the measured choice does not
   trust the curve between its points.

The result is a tuple of shares summing to 1, to pass to ``partition(..., capacities=...)``
(the shares requested for the chosen candidate: they reproduce its partition exactly);
``disco-fl train --slices compute``, the Flower strategy (``DiscoStrategy(slices="compute")``,
run config ``slices``, :mod:`disco_fl.fl.server.devices`) and ``bench/household_uneven.py`` use
it. It depends on this machine's timing (not bit-reproducible); the plan records the shares it
was partitioned with (and the Flower run's checkpoint, so that a resumed run keeps them).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from disco_fl.emulation.budget import calibrate_masks
from disco_fl.emulation.capacity import channel_shares
from disco_fl.emulation.export import ExportedShard, load_shard, run_shards
from disco_fl.emulation.model import PartitionedModel, partition

MIN_SHARE = 0.02
REFINE = (0.9, 0.95, 1.0, 1.05, 1.1)  # step 4: candidates this far from equal to the solution
SLICE_RULES = ("channels", "compute")  # capacities -> shares: proportional, or by compute
Log = Callable[[str], None]
# each node's compute (ms) of a partition's shards for an input (interleaved_compute_ms)
Timer = Callable[[Sequence[ExportedShard], torch.Tensor], Sequence[float]]


def check_slice_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`SLICE_RULES`, else ``ValueError`` naming them."""
    if rule not in SLICE_RULES:
        raise ValueError(
            f"slices must be one of {', '.join(repr(r) for r in SLICE_RULES)} (channel shares "
            f"proportional to the capacities, or by measured shard compute), got {rule!r}"
        )
    return rule


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shard_compute_ms(
    nodes: Sequence[ExportedShard], x: torch.Tensor, reps: int = 3, stat: Any = statistics.median
) -> list[float]:
    """Each node's compute (ms) for input ``x``: shard-only execution of the plan in this
    process, one thread, every node's stretches timed (its compute and the messages it hands
    over); ``stat`` of ``reps`` runs after one untimed run (the median; the rule takes the
    minimum, the least disturbed by other work)."""
    return interleaved_compute_ms([nodes], x, reps, stat)[0]


def interleaved_compute_ms(
    plans: Sequence[Sequence[ExportedShard]],
    x: torch.Tensor,
    reps: int = 3,
    stat: Any = statistics.median,
) -> list[list[float]]:
    """:func:`shard_compute_ms` of several plans, timed in turns (one untimed run of each,
    then ``reps`` rounds running every plan once): a machine whose speed drifts (other work,
    a shared host) slows every plan alike, so their times compare."""
    acc: list[float] = []

    @contextlib.contextmanager
    def meter(k: int) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            acc[k] += time.perf_counter() - t0

    # times[plan][node]: that node's time (ms) in each round
    times: list[list[list[float]]] = [[[] for _ in nodes] for nodes in plans]
    with _one_thread(), torch.inference_mode():
        for nodes in plans:
            run_shards(nodes, x)
        for _ in range(max(1, reps)):
            for i, nodes in enumerate(plans):
                acc[:] = [0.0] * len(nodes)
                run_shards(nodes, x, meter=meter)
                for k, t in enumerate(acc):
                    times[i][k].append(t * 1e3)
    return [[float(stat(t)) for t in per_node] for per_node in times]


def random_plan(
    model: torch.nn.Module,
    num_nodes: int,
    example: torch.Tensor,
    shares: Sequence[float] | None,
    budget: float,
    max_sync_points: int | None = None,
    *,
    seed: int = 0,
    capture: Literal["fx", "export", "auto"] = "auto",
) -> tuple[PartitionedModel, float]:
    """``model`` partitioned by ``shares`` (None: equal) with hard masks from seeded random gate
    logits calibrated to ``budget`` (and ``max_sync_points``): what a plan of that budget
    computes and sends, before any training. Returns it and the achieved fraction of dense
    exchange bytes."""
    pm = partition(model, num_nodes, example[:1], capacities=shares, capture=capture).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, d, gates in pm.gate_items():
            gates.log_alpha[str(d)].copy_(torch.randn(gates.num_channels, generator=g))
    return pm, calibrate_masks(pm, budget, max_sync_points) if budget < 1.0 else 1.0


def _exported(pm: PartitionedModel) -> list[ExportedShard]:
    with tempfile.TemporaryDirectory(prefix="disco_balance_") as tmp:
        pm.export(tmp)
        return [load_shard(Path(tmp) / "plan.json", k) for k in range(pm.program.num_nodes)]


@dataclass(frozen=True)
class Curve:
    """A node's compute time (ms) as a function of its share: ``a + b s + c s^2``."""

    a: float
    b: float
    c: float

    def __call__(self, s: float) -> float:
        return self.a + self.b * s + self.c * s * s


def fit_costs(
    samples: Sequence[tuple[Sequence[float], Sequence[float]]],
) -> list[Curve] | None:
    """One cost curve per node from measured ``samples`` (``(shares, times)`` per candidate
    partition): ``time_k(s) = a_k + B s + C s^2``, least squares over all nodes' points, with
    ``B`` and ``C`` shared (every node runs the same program on its slice; ``a_k`` holds what
    only node ``k`` does, e.g. the requester's input and output) and kept non-negative (a
    node's time does not shrink as its share grows: the ``s^2`` term, then the ``s`` term,
    dropped when the fit makes it negative). None when the time does not grow with the share."""
    n = len(samples[0][0])
    rows = [(k, float(sh[k]), float(t[k])) for sh, t in samples for k in range(n)]
    scale = max(abs(t) for _, _, t in rows) or 1.0
    for terms in ((1, 2), (1,), (2,)):
        design = torch.tensor(
            [
                [1.0 if j == k else 0.0 for j in range(n)] + [s**p for p in terms]
                for k, s, _ in rows
            ],
            dtype=torch.float64,
        )
        y = torch.tensor([[t] for _, _, t in rows], dtype=torch.float64)
        sol = [float(v) for v in torch.linalg.lstsq(design, y).solution.flatten()]
        coef = dict(zip(terms, sol[n:], strict=True))
        if all(c >= -1e-9 * scale for c in coef.values()) and sum(coef.values()) > 1e-6 * scale:
            coef = {p: max(c, 0.0) for p, c in coef.items()}  # a rounding error below 0
            return [Curve(sol[k], coef.get(1, 0.0), coef.get(2, 0.0)) for k in range(n)]
    return None


def solve_shares(
    samples: Sequence[tuple[Sequence[float], Sequence[float]]], capacities: Sequence[float]
) -> tuple[float, ...]:
    """Shares at which ``time_k(share_k) / capacity_k`` is equal on every node (the curves of
    :func:`fit_costs`; the capacities' proportions when no curve can be fitted). Bisection on
    the common value ``lam``: each node's share is where its curve reaches ``lam *
    capacity_k`` (bisection too, within ``[MIN_SHARE, 1]``), and ``lam`` is found where the
    shares sum to 1."""
    n = len(capacities)
    fits = fit_costs(samples)
    if fits is None:
        total = float(sum(capacities))
        return tuple(c / total for c in capacities)
    curves = fits

    def share_at(k: int, target: float) -> float:
        lo, hi = MIN_SHARE, 1.0
        if curves[k](lo) >= target:
            return lo
        if curves[k](hi) <= target:
            return hi
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if curves[k](mid) < target else (lo, mid)
        return (lo + hi) / 2

    lam_lo, lam_hi = 0.0, max(curves[k](1.0) / capacities[k] for k in range(n)) * 2 + 1e-9
    for _ in range(60):
        lam = (lam_lo + lam_hi) / 2
        if sum(share_at(k, lam * capacities[k]) for k in range(n)) < 1.0:
            lam_lo = lam
        else:
            lam_hi = lam
    shares = [share_at(k, (lam_lo + lam_hi) / 2 * capacities[k]) for k in range(n)]
    total = sum(shares)
    return tuple(s / total for s in shares)


def compute_shares(
    model: torch.nn.Module,
    num_nodes: int,
    example: torch.Tensor,
    capacities: Sequence[float],
    budget: float,
    max_sync_points: int | None = None,
    *,
    reps: int = 3,
    seed: int = 0,
    capture: Literal["fx", "export", "auto"] = "auto",
    log: Log | None = None,
    timer: Timer | None = None,
    refine: Sequence[float] = REFINE,
) -> tuple[tuple[float, ...], list[dict[str, Any]]]:
    """The *compute* rule of the module docstring: (shares summing to 1, every candidate
    partition ``[{"requested", "shares", "fit_node_compute_ms", "node_compute_ms",
    "bottleneck"}]``: the shares passed to ``partition``, the channel shares it gave, each
    node's time in the fit's timing (the first three only) and in the final one, where all
    candidates are timed in turns, and the largest final time over capacity). ``example``: one
    input batch of the size the plan will serve (its compute is what is balanced). Equal
    capacities: equal shares, nothing timed. ``timer(nodes, example)``: each node's compute in
    ms of a candidate's shards (default: :func:`interleaved_compute_ms`, the fastest of
    ``reps`` runs; a deterministic cost in tests). ``refine``: step 4's candidates as fractions
    of the way from equal shares to the fitted solution (``()``: the fitted solution, untimed).
    ``model`` keeps its train / eval mode."""
    n = num_nodes
    total = float(sum(capacities))
    caps = [c / total for c in capacities]
    even = [1.0 / n] * n
    if max(caps) - min(caps) < 1e-9:
        return tuple(even), []
    trials: list[dict[str, Any]] = []
    plans: list[list[ExportedShard]] = []
    was_training = model.training
    model.eval()

    def add(requested: Sequence[float]) -> None:
        pm, _ = random_plan(
            model, n, example, requested, budget, max_sync_points, seed=seed, capture=capture
        )
        plans.append(_exported(pm))  # the shard programs the nodes would run
        trials.append({"requested": list(requested), "shares": channel_shares(pm.program)})

    def time_all(key: str, what: Callable[[int], str]) -> None:
        if timer is None:
            times = interleaved_compute_ms(plans, example, reps, stat=min)
        else:
            times = [[float(v) for v in timer(nodes, example)] for nodes in plans]
        for i, (trial, t) in enumerate(zip(trials, times, strict=True)):
            trial[key] = t
            if log:
                log(
                    f"slices by compute: {what(i)} shares "
                    f"{[round(s, 3) for s in trial['shares']]}: node compute ms "
                    f"{[round(v, 1) for v in t]}"
                )

    try:
        for shares in (even, [(a + b) / 2 for a, b in zip(even, caps, strict=True)], caps):
            add(shares)
        time_all("fit_node_compute_ms", lambda i: f"candidate {i + 1}/3")
        samples = [(t["shares"], t["fit_node_compute_ms"]) for t in trials]
        fitted = solve_shares(samples, caps)
        if not refine:
            return fitted, trials
        for a in refine:
            moved = [max(MIN_SHARE, e + a * (f - e)) for e, f in zip(even, fitted, strict=True)]
            add([v / sum(moved) for v in moved])
        time_all("node_compute_ms", lambda i: f"partition {i + 1}/{len(plans)} (all in turns)")
    finally:
        model.train(was_training)
    for t in trials:
        t["bottleneck"] = max(v / c for v, c in zip(t["node_compute_ms"], caps, strict=True))
    best = min(trials, key=lambda t: t["bottleneck"])
    out = tuple(best["requested"])
    if log:
        log(
            f"slices by compute: shares {[round(s, 3) for s in out]} for capacities "
            f"{list(capacities)} (fitted {[round(s, 3) for s in fitted]}; the fastest "
            f"slowest node of {len(trials)} partitions timed)"
        )
    return out, trials


__all__ = [
    "MIN_SHARE",
    "REFINE",
    "SLICE_RULES",
    "Curve",
    "Timer",
    "check_slice_rule",
    "compute_shares",
    "fit_costs",
    "interleaved_compute_ms",
    "random_plan",
    "shard_compute_ms",
    "solve_shares",
]
