"""Plans chosen for the link: a ladder of plans of one model, their predicted latency on a
measured link, and the choice among them (pure and deterministic).

A :class:`PlanLadder` holds several exported plans of the **same model** (different budgets,
sync-point limits or codecs). What identifies the model is ``meta["model_sha256"]`` of each
``plan.json``: the sha256 of the dense model's state the plan was fine-tuned from
(:func:`~disco_fl.emulation.export.model_digest`, written by ``disco-fl train``), together with
the partition itself (number of nodes, the program's ops and the requester). A ladder mixing
models, or holding a plan that does not say its model, is refused with :class:`LadderError`.
Each plan's accuracy comes from its ``meta["accuracy"]`` (``disco-fl train`` records the held-out
metric) unless the caller gives one per plan, which then wins; a plan with neither is refused.

**Prediction.** For one request of ``batch`` inputs on a link of bandwidth ``R`` and round trip
``T`` (:class:`LinkEstimate`, what :func:`~disco_fl.runtime.transport.link_probe.probe_link`
measures)::

    predicted = compute_ms + busiest-link bytes * 8 / R + hops * T / 2 + frames * frame_s

- ``compute_ms``: the plan's computation, given, or measured on the household as its fixed
  cost (the median node time less the predicted link time on the link measured then:
  compute plus the software of its hops beyond the probe's round trip; may be below 0);
- busiest-link bytes: the plan's traffic as the emulation accounts it
  (:func:`~disco_fl.emulation.comm.program_traffic`, the same count the wire is tested against),
  each message framed for the wire (:func:`~disco_fl.runtime.transport.frames.framed_size`),
  summed per directed link; links are full duplex and independent, so the busiest one bounds
  the transfer time (as in ``bench/latency.py``'s floor);
- ``hops``: sync points (layers where any message is sent) plus the input and output hops;
- ``frames``: messages on the busiest link, times ``frame_s``, the software cost of a frame
  beyond what the measured round trip already holds (the probe's echoes go through the same
  path, so one hop's software cost is in ``T``; ``frame_s`` defaults to 0).

**Choice** (:func:`choose`): the most accurate plan whose prediction meets the target, else the
fastest. With hysteresis against a measured link that wobbles around a threshold, given the
current :class:`Choice` (the plan in use and the link it was chosen for):

1. the current plan misses the target on the new link: switch now, to the plain choice;
2. else, only if the link differs from the one the current choice was made for by more than
   ``margin`` (relative, in bandwidth or round trip), move up to the most accurate plan whose
   prediction meets ``target * (1 - margin)``, if that is more accurate than the current one;
3. else keep the current plan (and the link it was chosen for).

So a decision is a function of ``(ladder, link, target, current)`` alone; moving down is
immediate (the target must hold) and moving up needs a clear margin. Every switch is logged
(plan, link, predicted ms).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from disco_fl.core.pixels import plan_pixel_problem
from disco_fl.emulation.comm import program_traffic
from disco_fl.partition import plan_open_count
from disco_fl.partition.plan import Plan
from disco_fl.runtime.transport.frames import framed_size

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.2


class LadderError(ValueError):
    """Plans that cannot form a ladder (different models, no accuracy, bad figures)."""


@dataclass(frozen=True)
class LinkEstimate:
    """A measured (or assumed) link between the household's nodes.

    ``bandwidth_bps`` in bits per second, ``rtt_s`` the round trip in seconds, ``frame_s`` the
    software cost of one frame not already in the round trip (seconds, default 0).
    """

    bandwidth_bps: float
    rtt_s: float
    frame_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.bandwidth_bps > 0 and not math.isnan(self.bandwidth_bps)):
            raise ValueError(f"bandwidth_bps must be positive, got {self.bandwidth_bps}")
        for name in ("rtt_s", "frame_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")

    def differs(self, other: LinkEstimate, margin: float) -> bool:
        """Whether bandwidth or round trip differ by more than ``margin`` (relative)."""

        def rel(a: float, b: float) -> float:
            return abs(a - b) / max(a, b) if max(a, b) > 0 else 0.0

        return (
            rel(self.bandwidth_bps, other.bandwidth_bps) > margin
            or rel(self.rtt_s, other.rtt_s) > margin
        )

    def describe(self) -> str:
        return f"{self.bandwidth_bps / 1e6:.1f} Mbit/s, rtt {self.rtt_s * 1e3:.2f} ms"


@dataclass(frozen=True)
class PlanTraffic:
    """What one request of a plan puts on the link (see the module)."""

    busiest_link_bytes: int  # framed bytes on the busiest directed link
    hops: int  # sync points + input hop + output hop
    frames: int  # messages on the busiest directed link


def plan_traffic(plan: Plan, batch: int = 1, input_dtype: str = "float32") -> PlanTraffic:
    """:class:`PlanTraffic` of ``batch`` inputs, from the emulation's accounting.

    ``input_dtype``: what the requests' input travels as, ``"float32"`` (with the plan's codec)
    or ``"uint8"`` (image pixels, 1 byte each: :mod:`disco_fl.core.pixels`)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    rep = program_traffic(plan.program, plan_open_count(plan), plan.codec, input_dtype)
    per_link: dict[str, int] = {}
    frames: dict[str, int] = {}
    for layer in rep.layers:
        for pair, b in layer.pairs.items():
            if b:
                per_link[pair] = per_link.get(pair, 0) + framed_size(b * batch)
                frames[pair] = frames.get(pair, 0) + 1
    busiest = max(per_link, key=lambda p: (per_link[p], p)) if per_link else None
    hops = rep.sync_points + (rep.input_bytes > 0) + (rep.output_bytes > 0)
    return PlanTraffic(
        per_link[busiest] if busiest else 0, int(hops), frames[busiest] if busiest else 0
    )


@dataclass(frozen=True)
class LadderPlan:
    """One rung: an exported plan, its accuracy, compute time and traffic."""

    path: Path  # the plan's folder
    hash: str
    accuracy: float
    compute_ms: float  # given: >= 0; measured by a LadderServer: the fixed cost, any sign
    traffic: PlanTraffic

    @property
    def name(self) -> str:
        return f"{self.path.name} ({self.hash[:12]})"


def link_ms(traffic: PlanTraffic, link: LinkEstimate) -> float:
    """The link's part (ms) of one request with ``traffic`` on ``link``: transfer of the
    busiest link's bytes, half a round trip per hop, ``frame_s`` per frame (see the module).
    The one implementation of the link model (:func:`predict_ms`, and the plan chooser of
    :mod:`disco_fl.runtime.serving.latency_target`)."""
    return 1e3 * (
        traffic.busiest_link_bytes * 8.0 / link.bandwidth_bps
        + traffic.hops * link.rtt_s / 2.0
        + traffic.frames * link.frame_s
    )


def predict_ms(plan: LadderPlan, link: LinkEstimate) -> float:
    """Predicted latency (ms) of one request of ``plan`` on ``link``: its compute time plus
    :func:`link_ms` of its traffic (see the module)."""
    return plan.compute_ms + link_ms(plan.traffic, link)


def _model_of(plan: Plan, where: Path) -> tuple[str, str]:
    sha = plan.meta.get("model_sha256")
    if not isinstance(sha, str) or not sha:
        raise LadderError(
            f"{where}: the plan does not say which model it comes from (meta['model_sha256']; "
            f"export with meta={{'model_sha256': model_digest(dense_model)}}, as disco-fl "
            f"train does)"
        )
    p = plan.program
    structure = json.dumps(
        [plan.num_nodes, p.requester, [(op.name, op.kind) for op in p.ops]], sort_keys=True
    )
    return sha, structure


class PlanLadder:
    """Plans of one model, most accurate first (ties: the faster on no link, then the hash).

    Parameters
    ----------
    paths : sequence of plan folders (or ``plan.json`` files)
    accuracies : per plan, or None to read ``meta["accuracy"]`` of each plan
    compute_ms : per plan, the computation of one request (ms); None: 0 for every plan until
        measured (:meth:`with_compute`)
    batch : inputs per request the traffic is counted for (default 1)
    input_dtype : what the requests' input travels as (:func:`plan_traffic`): ``"float32"``
        (default; over-counts the input hop of requests sent as pixels) or ``"uint8"``
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        accuracies: Sequence[float] | None = None,
        compute_ms: Sequence[float] | None = None,
        batch: int = 1,
        input_dtype: str = "float32",
    ) -> None:
        if not paths:
            raise LadderError("a plan ladder needs at least one plan")
        if input_dtype not in ("float32", "uint8"):
            raise LadderError(f"input_dtype must be 'float32' or 'uint8', got {input_dtype!r}")
        for name, vals in (("accuracies", accuracies), ("compute_ms", compute_ms)):
            if vals is not None and len(vals) != len(paths):
                raise LadderError(f"{len(paths)} plans but {len(vals)} {name}")
        rungs: list[LadderPlan] = []
        model: tuple[str, str] | None = None
        first: Path | None = None
        for i, raw in enumerate(paths):
            f = Path(raw)
            f = f / "plan.json" if f.is_dir() else f
            plan = Plan.load(f)
            this = _model_of(plan, f.parent)
            if model is None:
                model, first = this, f.parent
            elif this != model:
                what = "model" if this[0] != model[0] else "partition (nodes, ops, requester)"
                raise LadderError(
                    f"{f.parent} is a plan of another {what} than {first}: a ladder holds plans "
                    f"of one model (meta['model_sha256'] {this[0][:12]} vs {model[0][:12]})"
                )
            acc = accuracies[i] if accuracies is not None else plan.meta.get("accuracy")
            if not isinstance(acc, (int, float)) or not math.isfinite(acc):
                raise LadderError(
                    f"{f.parent}: no accuracy for this plan (meta['accuracy'] is {acc!r}); "
                    f"give one per plan"
                )
            ms = float(compute_ms[i]) if compute_ms is not None else 0.0
            if not (math.isfinite(ms) and ms >= 0):
                raise LadderError(f"{f.parent}: compute_ms must be >= 0, got {ms}")
            if input_dtype == "uint8":
                shape = plan.program.infos[plan.program.ops[0].name].shape
                if (why := plan_pixel_problem(shape, plan.meta)) is not None:
                    raise LadderError(f"{f.parent}: uint8 requests cannot feed this plan: {why}")
            traffic = plan_traffic(plan, batch, input_dtype)
            rungs.append(LadderPlan(f.parent, plan.hash, float(acc), ms, traffic))
        if len({r.hash for r in rungs}) != len(rungs):
            raise LadderError("the same plan appears twice in the ladder")
        assert model is not None
        self._set(model[0], rungs, input_dtype)

    def _set(self, model_sha256: str, rungs: Sequence[LadderPlan], input_dtype: str) -> None:
        self.model_sha256 = model_sha256
        self.input_dtype = input_dtype
        self.plans: tuple[LadderPlan, ...] = tuple(
            sorted(rungs, key=lambda r: (-r.accuracy, r.traffic.busiest_link_bytes, r.hash))
        )

    @classmethod
    def of(
        cls, model_sha256: str, rungs: Sequence[LadderPlan], input_dtype: str = "float32"
    ) -> PlanLadder:
        """A ladder of rungs already checked to be of one model (tests, :meth:`with_compute`);
        ``input_dtype``: what their traffic was counted with."""
        if not rungs or len({r.hash for r in rungs}) != len(rungs):
            raise LadderError("a plan ladder needs distinct plans")
        out = object.__new__(cls)
        out._set(model_sha256, rungs, input_dtype)
        return out

    def with_compute(self, compute_ms: dict[str, float]) -> PlanLadder:
        """A copy with the compute times (ms) of the plans named by hash (others unchanged)."""
        return PlanLadder.of(
            self.model_sha256,
            [
                replace(r, compute_ms=float(compute_ms.get(r.hash, r.compute_ms)))
                for r in self.plans
            ],
            self.input_dtype,
        )

    def by_hash(self, plan_hash: str) -> LadderPlan | None:
        return next((r for r in self.plans if r.hash == plan_hash), None)


@dataclass(frozen=True)
class Choice:
    """The plan in use, the link it was chosen for, its prediction there and the target."""

    plan: LadderPlan
    link: LinkEstimate
    predicted_ms: float
    target_ms: float


def _plain(ladder: PlanLadder, link: LinkEstimate, target_ms: float) -> LadderPlan:
    """The most accurate plan meeting ``target_ms``, else the fastest."""
    for r in ladder.plans:  # most accurate first
        if predict_ms(r, link) <= target_ms:
            return r
    return min(ladder.plans, key=lambda r: (predict_ms(r, link), -r.accuracy, r.hash))


def choose(
    ladder: PlanLadder,
    link: LinkEstimate,
    target_ms: float,
    current: Choice | None = None,
    margin: float = DEFAULT_MARGIN,
) -> Choice:
    """The plan to run on ``link`` for ``target_ms``, with hysteresis (see the module)."""
    if not (math.isfinite(target_ms) and target_ms > 0):
        raise ValueError(f"target_ms must be a positive number, got {target_ms}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    cur = ladder.by_hash(current.plan.hash) if current is not None else None
    if current is None or cur is None:
        pick, why = _plain(ladder, link, target_ms), "first choice"
    elif predict_ms(cur, link) > target_ms:
        pick, why = _plain(ladder, link, target_ms), "the plan in use misses the target"
    elif link.differs(current.link, margin):
        up = _plain(ladder, link, target_ms * (1 - margin))
        if up.accuracy > cur.accuracy and predict_ms(up, link) <= target_ms * (1 - margin):
            pick, why = up, "a more accurate plan meets the target with margin"
        else:
            return replace(
                current, plan=cur, predicted_ms=predict_ms(cur, link), target_ms=target_ms
            )
    else:
        return replace(current, plan=cur, predicted_ms=predict_ms(cur, link), target_ms=target_ms)
    choice = Choice(pick, link, predict_ms(pick, link), target_ms)
    if current is None or pick.hash != current.plan.hash:
        log.info(
            "plan %s (%s): %s -> %s on a link of %s: predicted %.2f ms (target %.2f ms)",
            "chosen" if current is None else "switch",
            why,
            "-" if current is None else current.plan.name,
            pick.name,
            link.describe(),
            choice.predicted_ms,
            target_ms,
        )
    return choice


__all__ = [
    "Choice",
    "LadderError",
    "LadderPlan",
    "LinkEstimate",
    "PlanLadder",
    "PlanTraffic",
    "choose",
    "link_ms",
    "plan_traffic",
    "predict_ms",
]
