"""Plans for a latency target: the budget, sync-point limit and codec to fine-tune a model to,
chosen together for a link before training (``disco-fl train --latency-target-ms``).

Where it lives: here, in ``runtime.serving`` next to :mod:`~disco_fl.runtime.serving.link_plans`,
because it needs both that module's latency model (:class:`LinkEstimate`, :func:`plan_traffic`,
:func:`link_ms`, the one implementation of the prediction) and the emulation's mask
calibration (:func:`~disco_fl.emulation.budget.calibrate_masks`, a lower layer); this is the
lowest layer that sees both, and it stays below the Flower apps and the CLI, so that either
can choose a plan for a link.

**Candidates** (the grid; :data:`BUDGETS` x :data:`SYNC_LIMITS` x :data:`CODECS`):

- budget (fraction of dense exchange bytes) 1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.0;
- sync-point limit (``max_sync_points``: layers with any exchange) none, 8, 4, 2;
- codec fp32, int8.

Skipped, and listed with the reason: a limit at budget 1.0 or 0.0
(:func:`~disco_fl.emulation.budget.fit_budget` trains no gates there and opens, or closes, every
gate whatever the limit), and a limit below the model's cross-node normalization layers
(:func:`~disco_fl.emulation.budget.calibrate_masks` refuses it: they always exchange).

**Prediction** of a candidate: its hard masks as :func:`calibrate_masks` sets them from the
gates *as they are*, its traffic (:func:`plan_traffic` of
:func:`~disco_fl.partition.plan.plan_of` with the codec) and ``compute_ms + link_ms(traffic,
link)``, the same sum as :func:`~disco_fl.runtime.serving.link_plans.predict_ms` of the exported
plan. ``compute_ms`` is one node's computation, the same for every candidate (given, or
:func:`dense_compute_ms`). The model's masks are restored afterwards.

Before training all gate logits are equal, so the calibration takes the cheapest channels
first, in few layers; training spreads the budget over the layers it finds useful, and each
layer with any exchange costs a round trip. So by default (``upper_bound``) a candidate at a
budget strictly between 0 and 1 is counted with what training may still open: as many sync
points as the limit allows (every layer that can exchange, without a limit; one more frame on
the busiest link for each), and at least the busiest-link bytes of the budget's masks without
a limit (a limit lowers the bytes of the untrained masks, not the budget training fills).
It is a bound on the sync points; on the bytes, close to one (the trained plan may split the
budget's bytes between the links otherwise). With ``upper_bound=False`` the prediction is
exactly that of the calibrated masks (for gates already trained). Either way the trained plan
is predicted again from its own masks (``disco-fl train`` does, and warns when it misses).

**Accuracy order** (most accurate first; the choice is the first candidate that meets the
target): higher budget first; at equal budget no limit, then more sync points; fp32 before
int8 only at equal budget and limit. So int8 at a higher budget comes before fp32 at a lower
one: in BENCHMARKS.md int8 costs at most 0.1 point on the classification models, a smaller
budget more. If no candidate meets the target, :class:`LatencyTargetError` names the fastest
prediction. The choice is a function of the model's gates, the link, the target and
``compute_ms``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from disco_fl.emulation.budget import calibrate_masks
from disco_fl.emulation.model import PartitionedModel
from disco_fl.partition.plan import plan_of
from disco_fl.runtime.serving.link_plans import LinkEstimate, PlanTraffic, link_ms, plan_traffic

BUDGETS: tuple[float, ...] = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.0)
SYNC_LIMITS: tuple[int | None, ...] = (None, 8, 4, 2)
CODECS: tuple[str, ...] = ("fp32", "int8")
_CODEC_RANK = {"fp32": 0, "fp16": 1, "int8": 2}  # by precision, most accurate first


class LatencyTargetError(ValueError):
    """No candidate is predicted to meet the target; ``candidates`` holds the table."""

    def __init__(self, msg: str, candidates: Sequence[Candidate]) -> None:
        super().__init__(msg)
        self.candidates = tuple(candidates)


@dataclass(frozen=True)
class Candidate:
    """One row of the table: a setting and its prediction, or why it was skipped."""

    budget: float
    max_sync_points: int | None  # None: no limit
    codec: str
    achieved_fraction: float | None = None  # of dense exchange bytes, with these masks
    traffic: PlanTraffic | None = None
    predicted_ms: float | None = None
    extra_hops: int = 0  # sync points training may add under the limit (upper_bound)
    skipped: str | None = None  # why this setting is not a candidate

    def setting(self) -> str:
        lim = "-" if self.max_sync_points is None else str(self.max_sync_points)
        return f"budget {self.budget:g}, sync limit {lim}, {self.codec}"


@dataclass(frozen=True)
class LatencyChoice:
    """The setting chosen for ``target_ms`` on ``link``, and the whole candidate table."""

    budget: float
    max_sync_points: int | None
    codec: str
    predicted_ms: float
    traffic: PlanTraffic
    target_ms: float
    link: LinkEstimate
    compute_ms: float
    candidates: tuple[Candidate, ...]  # in the accuracy order, skipped ones included
    input_dtype: str = "float32"  # what the requests' input was counted as

    def to_json(self) -> dict[str, Any]:
        return {
            "target_ms": self.target_ms,
            "link": {
                "bandwidth_bps": self.link.bandwidth_bps,
                "rtt_s": self.link.rtt_s,
                "frame_s": self.link.frame_s,
            },
            "compute_ms": self.compute_ms,
            "budget": self.budget,
            "max_sync_points": self.max_sync_points,
            "codec": self.codec,
            "predicted_ms": self.predicted_ms,
            "busiest_link_bytes": self.traffic.busiest_link_bytes,
            "hops": self.traffic.hops,
            "input_dtype": self.input_dtype,
        }


def accuracy_key(budget: float, max_sync_points: int | None, codec: str) -> tuple[Any, ...]:
    """Sort key of the accuracy order (see the module): smaller is more accurate."""
    if codec not in _CODEC_RANK:
        raise ValueError(f"unknown codec {codec!r} (one of {', '.join(_CODEC_RANK)})")
    limit = math.inf if max_sync_points is None else max_sync_points
    return (-budget, -limit, _CODEC_RANK[codec])


def parse_link(text: str) -> LinkEstimate:
    """``"MBPS/RTT_MS"`` (e.g. ``"100/2"``: 100 Mbit/s, 2 ms round trip) as a
    :class:`LinkEstimate`."""
    parts = text.split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        mbps, rtt_ms = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"a link is MBPS/RTT_MS, e.g. 100/2, got {text!r}") from None
    return LinkEstimate(mbps * 1e6, rtt_ms / 1e3)


def _traffic(
    pm: PartitionedModel, codecs: Sequence[str], input_dtype: str
) -> dict[str, PlanTraffic]:
    return {c: plan_traffic(plan_of(pm, c), input_dtype=input_dtype) for c in codecs}


def _table(
    pm: PartitionedModel,
    link: LinkEstimate,
    compute_ms: float,
    grid: tuple[Sequence[float], Sequence[int | None], Sequence[str]],
    upper_bound: bool,
    input_dtype: str,
) -> list[Candidate]:
    budgets, sync_limits, codecs = grid
    rows: list[Candidate] = []
    for budget in budgets:
        trains = 0.0 < budget < 1.0  # fit_budget trains gates (and honours a limit)
        # the bytes the budget allows: its masks without a limit (upper_bound)
        allowed = {}
        if upper_bound and trains:
            calibrate_masks(pm, budget, None)
            allowed = _traffic(pm, codecs, input_dtype)
        for limit in sync_limits:
            if limit is not None and not trains:
                why = f"budget {budget:g} trains no gates: every gate open or closed, no limit"
                rows.extend(Candidate(budget, limit, c, skipped=why) for c in codecs)
                continue
            try:
                achieved = calibrate_masks(pm, budget, limit)
            except ValueError as e:  # a limit below the normalization layers
                rows.extend(Candidate(budget, limit, c, skipped=str(e)) for c in codecs)
                continue
            extra = 0
            if upper_bound and trains:
                rep = pm.comm_report()
                most = rep.dense_sync_points if limit is None else limit
                extra = max(0, min(most, rep.dense_sync_points) - rep.sync_points)
            for codec, t in _traffic(pm, codecs, input_dtype).items():
                if codec in allowed:
                    most_bytes = max(t.busiest_link_bytes, allowed[codec].busiest_link_bytes)
                    t = replace(t, busiest_link_bytes=most_bytes)
                traffic = replace(t, hops=t.hops + extra, frames=t.frames + extra)
                ms = compute_ms + link_ms(traffic, link)
                rows.append(Candidate(budget, limit, codec, achieved, traffic, ms, extra))
    return sorted(rows, key=lambda r: accuracy_key(r.budget, r.max_sync_points, r.codec))


def choose_for_latency(
    pm: PartitionedModel,
    link: LinkEstimate,
    target_ms: float,
    compute_ms: float,
    *,
    budgets: Sequence[float] = BUDGETS,
    sync_limits: Sequence[int | None] = SYNC_LIMITS,
    codecs: Sequence[str] = CODECS,
    upper_bound: bool = True,
    input_dtype: str = "float32",
) -> LatencyChoice:
    """The most accurate candidate predicted to meet ``target_ms`` on ``link`` (see the module).

    Parameters
    ----------
    pm : the partitioned model; its gates decide the masks, its masks are left as they were
    link : the household's link (bandwidth, round trip)
    target_ms : the latency to meet, ms (> 0)
    compute_ms : one node's computation per request, ms (>= 0), added to every candidate
    budgets, sync_limits, codecs : the grid (default :data:`BUDGETS`, :data:`SYNC_LIMITS`,
        :data:`CODECS`)
    upper_bound : count what training may still open: sync points up to the limit, bytes up
        to the budget (default True; see the module); False: the calibrated masks' traffic
        alone, for gates already trained
    input_dtype : what the requests' input travels as: ``"float32"`` (default, with each
        candidate's codec) or ``"uint8"`` (image pixels, 1 byte each)

    Raises
    ------
    LatencyTargetError
        when no candidate meets the target (the message names the fastest prediction).
    """
    if not (math.isfinite(target_ms) and target_ms > 0):
        raise ValueError(f"target_ms must be a positive number, got {target_ms}")
    if not (math.isfinite(compute_ms) and compute_ms >= 0):
        raise ValueError(f"compute_ms must be a finite number >= 0, got {compute_ms}")
    for codec in codecs:
        accuracy_key(0.0, None, codec)  # an unknown codec: a clear error
    saved = [(g, d, g.mask(d).clone()) for _, _, d, g in pm.gate_items()]
    try:
        grid = (budgets, sync_limits, codecs)
        rows = _table(pm, link, compute_ms, grid, upper_bound, input_dtype)
    finally:
        for g, d, mask in saved:
            g.set_mask(d, mask)
    valid = [r for r in rows if r.predicted_ms is not None]
    if not valid:
        raise LatencyTargetError("no valid candidate in the grid", rows)
    for r in valid:
        assert r.predicted_ms is not None and r.traffic is not None
        if r.predicted_ms <= target_ms:
            return LatencyChoice(
                r.budget,
                r.max_sync_points,
                r.codec,
                r.predicted_ms,
                r.traffic,
                target_ms,
                link,
                compute_ms,
                tuple(rows),
                input_dtype,
            )
    fast = min(
        valid, key=lambda r: (r.predicted_ms, accuracy_key(r.budget, r.max_sync_points, r.codec))
    )
    raise LatencyTargetError(
        f"no plan is predicted to meet {target_ms:g} ms on a link of {link.describe()}: the "
        f"fastest candidate ({fast.setting()}) is predicted at {fast.predicted_ms:.2f} ms "
        f"({compute_ms:.2f} ms of it compute per node); raise the target",
        rows,
    )


def format_candidates(rows: Sequence[Candidate], chosen: LatencyChoice | None = None) -> list[str]:
    """The table, compact: one line per budget and limit, the prediction per codec (``*`` marks
    the choice), then one line per reason a setting was skipped."""
    codecs = list(dict.fromkeys(r.codec for r in rows))
    head = f"{'budget':>6} {'sync':>4} {'hops':>4}" + "".join(
        f" {c + ' ms':>9} {c + ' kB':>8}" for c in codecs
    )
    lines = [head]
    skipped: dict[str, list[str]] = {}
    cells: dict[tuple[float, int | None], dict[str, Candidate]] = {}
    for r in rows:
        if r.skipped is not None:
            lim = "-" if r.max_sync_points is None else str(r.max_sync_points)
            skipped.setdefault(r.skipped, [])
            if f"{r.budget:g}/{lim}" not in skipped[r.skipped]:
                skipped[r.skipped].append(f"{r.budget:g}/{lim}")
        else:
            cells.setdefault((r.budget, r.max_sync_points), {})[r.codec] = r
    for (budget, limit), by_codec in cells.items():
        first = next(iter(by_codec.values())).traffic
        line = f"{budget:>6g} {'-' if limit is None else limit:>4} {first.hops if first else '':>4}"
        for c in codecs:
            cell = by_codec.get(c)
            if cell is None or cell.traffic is None or cell.predicted_ms is None:
                line += f" {'':>9} {'':>8}"
                continue
            pick = chosen is not None and (chosen.budget, chosen.max_sync_points, chosen.codec) == (
                budget,
                limit,
                c,
            )
            kb = cell.traffic.busiest_link_bytes / 1e3
            line += f" {cell.predicted_ms:>8.2f}{'*' if pick else ' '} {kb:>8.1f}"
        lines.append(line)
    for why, settings in skipped.items():
        lines.append(f"skipped (budget/sync) {', '.join(settings)}: {why}")
    return lines


def dense_compute_ms(
    model: nn.Module, example: torch.Tensor, num_nodes: int, *, warmup: int = 3, runs: int = 7
) -> float:
    """An estimate of one node's computation per request, ms: the dense model's forward time
    at batch 1 on one thread (median of ``runs`` after ``warmup``), divided by ``num_nodes``.
    Only an estimate: a node also computes its part of every mixing layer's inputs and waits
    for its peers, and other devices run at other speeds."""
    if num_nodes < 1 or runs < 1:
        raise ValueError("num_nodes and runs must be >= 1")
    threads, was = torch.get_num_threads(), model.training
    x = example[:1]
    times = []
    try:
        torch.set_num_threads(1)
        model.eval()
        with torch.no_grad():
            for i in range(warmup + runs):
                t0 = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        model.train(was)
    return 1e3 * statistics.median(times) / num_nodes


__all__ = [
    "BUDGETS",
    "CODECS",
    "SYNC_LIMITS",
    "Candidate",
    "LatencyChoice",
    "LatencyTargetError",
    "accuracy_key",
    "choose_for_latency",
    "dense_compute_ms",
    "format_candidates",
    "parse_link",
]
