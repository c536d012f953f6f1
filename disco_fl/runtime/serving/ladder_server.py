"""A node serving a ladder of plans (``disco-fl serve PLAN --ladder PLAN2,PLAN3``).

**One** :class:`~disco_fl.runtime.serving.node_server.NodeServer` **per plan.** Plan ``i`` of
the ladder (the positional plan is 0, then ``--ladder``'s in order) is served on every node at
the node's port ``+ i``, with its own peer endpoint, handshake (its own plan hash) and
sessions: a request runs one plan on every node because it runs on that plan's NodeServers
only. Nothing of serving is implemented twice (admission, deadlines, chunks, degraded mode
are the NodeServer's), and no protocol field is needed to agree on the plan. The cost: ``K``
ports and ``K`` shards in memory per node.

On the **requester**, a :class:`LadderServer` answers ``Infer`` on plan 0's port for the whole
ladder: it probes the link to every peer over plan 0's peer channel
(:func:`~disco_fl.runtime.transport.link_probe.probe_link_async`; the household's link is the
slowest peer's bandwidth and the longest round trip, each peer's shortest echo: the path
without the time an echo waited behind computation on a node's event loop), measures each
plan's fixed cost (the shortest node time of its last 9 requests less their predicted link
time: 9 at start, then one per plan at every probe, 3 and the older ones dropped when the link
changed by more than the margin, so that the prediction is exact on the measured link under
the load of the moment; or takes compute times given),
chooses the plan with :func:`~disco_fl.runtime.serving.link_plans.choose` and runs each
request on that plan's NodeServer. A thread re-probes every ``probe_interval_s`` and re-chooses
for the best of the last three probes (highest bandwidth, shortest round trip: probes slowed by
the device's own load do not switch the plan; a real drop is acted on two intervals later;
hysteresis and the log of every switch are ``choose``'s); a failed probe keeps the plan in use.
Each reply names its plan (``InferReply.plan_hash``); ``Status`` has a ``ladder`` entry.

Link emulation: each plan's transport has its own emulated links (a ``LinkShape`` or
``LinkSchedule``), so traffic of one plan does not queue behind another's in the emulation,
and the probe shares the emulated link with plan 0's requests only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from disco_fl.runtime.serving.link_plans import (
    Choice,
    LinkEstimate,
    PlanLadder,
    choose,
    link_ms,
    predict_ms,
)
from disco_fl.runtime.serving.node_server import NodeServer, ServeConfig
from disco_fl.runtime.transport.link_probe import LinkProbe, probe_link_async

log = logging.getLogger(__name__)

CALIBRATION_WARMUP = 3  # single-input requests per plan before timing (connections, allocator)
CALIBRATION_REQUESTS = 9  # timed single-input requests per plan (the median) at start
CALIBRATION_FRESH = 3  # requests per plan when the link changed (its samples start again)
# the link "changed" for the fixed costs when it moves some plan's predicted link time by more
# than this fraction of the target: a probe's bandwidth on a fast link is noisy (a 64 kB echo
# takes half a millisecond), and restarting the samples at every noisy probe left only the
# last few, loaded ones (bench/household_link.py: a switch back up 42 s late)
FRESH_SHIFT = 0.05
SMOOTHING_PROBES = 3  # the link in use is the best of this many last probes


def port_offset(address: str, i: int) -> str:
    """``host:port`` with the port moved up by ``i`` (plan ``i`` of a ladder)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"a plan ladder needs host:port addresses, got {address!r}")
    if i and int(port) == 0:
        raise ValueError("a plan ladder needs fixed ports (port 0 picks a free one)")
    return f"{host}:{int(port) + i}"


def ladder_configs(base: ServeConfig, plans: Sequence[Any]) -> list[ServeConfig]:
    """One config per plan: plan ``i`` on every address's port ``+ i`` (and on the data port
    ``+ i``, when one is given)."""
    if base.peers is None:
        raise ValueError("a plan ladder needs the peers' addresses")
    return [
        replace(
            base,
            plan=p,
            listen=port_offset(base.listen, i),
            peers=[port_offset(a, i) for a in base.peers],
            data_port=base.data_port + i if base.data_port else 0,
        )
        for i, p in enumerate(plans)
    ]


def household_link(probes: Sequence[LinkProbe], frame_s: float = 0.0) -> LinkEstimate | None:
    """The household's link: the slowest bandwidth and the longest (shortest-echo) round trip
    over the peers (None if a probe failed)."""
    if not probes or any(p.error or p.rtt_min_ms is None or not p.bandwidth_mbps for p in probes):
        return None
    return LinkEstimate(
        min(float(p.bandwidth_mbps or 0.0) for p in probes) * 1e6,
        max(float(p.rtt_min_ms or 0.0) for p in probes) / 1e3,
        frame_s,
    )


class PlanServers:
    """One NodeServer per plan of a ladder on one node (a node other than the requester)."""

    def __init__(self, configs: Sequence[ServeConfig]) -> None:
        self.servers: list[NodeServer] = []
        try:
            for cfg in configs:
                self.servers.append(NodeServer(cfg))
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return self.servers[0].address

    def wait_for_peers(
        self, timeout: float = 60.0, progress: Callable[[str], None] | None = None
    ) -> None:
        for s in self.servers:
            s.wait_for_peers(timeout, progress)

    def stop(self, timeout: float = 2.0) -> None:
        for s in self.servers:
            s.stop(timeout)


class LadderServer(PlanServers):
    """The requester of a ladder: one NodeServer per plan, and the choice among them.

    Parameters
    ----------
    configs : one per plan (:func:`ladder_configs`), plan 0 first; ``node`` the requester
    ladder : the plans (their accuracies; compute times are measured unless ``measure`` is off)
    target_ms : the latency target of one request
    probe_interval_s : seconds between link probes (bounded to [0.2, 3600])
    margin : the hysteresis margin of :func:`choose`
    measure : measure each plan's fixed cost, at start and at every probe (else the ladder's
        ``compute_ms``)
    probe_kwargs : for :func:`probe_link_async` (``payload_bytes``, ``timeout``, ...)
    """

    def __init__(
        self,
        configs: Sequence[ServeConfig],
        ladder: PlanLadder,
        *,
        target_ms: float,
        probe_interval_s: float = 5.0,
        margin: float = 0.2,
        measure: bool = True,
        frame_s: float = 0.0,
        probe_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not 0.2 <= probe_interval_s <= 3600:
            raise ValueError(f"probe_interval_s must be in [0.2, 3600], got {probe_interval_s}")
        if not target_ms > 0:
            raise ValueError(f"target_ms must be positive, got {target_ms}")
        self.ladder = ladder
        self.target_ms = float(target_ms)
        self.interval = float(probe_interval_s)
        self.margin = margin
        self.frame_s = frame_s
        self._measure = measure
        self._probe_kwargs = dict(probe_kwargs or {})
        self.servers: list[NodeServer] = []
        try:
            for i, cfg in enumerate(configs):
                self.servers.append(NodeServer(cfg, inference_host=self if i == 0 else None))
        except BaseException:
            self.stop()
            raise
        first = self.servers[0]
        if not first.is_requester:
            self.stop()
            raise ValueError("a LadderServer is the requester's; other nodes run NodeServers")
        self.by_hash = {s.plan_hash: s for s in self.servers}
        missing = [r.name for r in ladder.plans if r.hash not in self.by_hash]
        if missing or len(self.by_hash) != len(ladder.plans):
            self.stop()
            raise ValueError(f"the ladder and the served plans differ: {missing}")
        # what the Inference servicer reads (InferenceHost): plan 0's interface
        self.config, self.plan, self.index = first.config, first.plan, first.index
        self.is_requester, self._input_shape = True, first._input_shape
        self.current: Choice | None = None
        self.link: LinkEstimate | None = None
        self.switches = 0
        self.probes_failed = 0
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None
        self._recent: deque[LinkEstimate] = deque(maxlen=SMOOTHING_PROBES)
        self._fixed: dict[str, deque[float]] = {}  # plan hash -> fixed cost samples (ms)
        self._fixed_link: LinkEstimate | None = None  # the link they were taken on

    # ---- start: link, compute, first choice --------------------------------------------------
    def start(self) -> Choice:
        """Probe the link, measure the plans' compute, choose, start re-probing."""
        link = self.probe()
        if link is None:
            raise RuntimeError("the link probe failed at start: see the log")
        if self._measure:
            self._calibrate(link, CALIBRATION_WARMUP, CALIBRATION_REQUESTS)
            self._fixed_link = link
        self.link = link
        self.current = choose(self.ladder, link, self.target_ms, None, self.margin)
        self._prober = threading.Thread(target=self._reprobe, name="disco-ladder", daemon=True)
        self._prober.start()
        return self.current

    def probe(self) -> LinkEstimate | None:
        """Probe every peer once over plan 0's peer channel (bounded by the probe's timeouts)."""
        t = self.servers[0].transport
        probes = []
        for d in range(t.num_nodes):
            if d != t.index:
                coro = probe_link_async(t, d, **self._probe_kwargs)
                probes.append(t.run(coro, timeout=self.interval + 120))
        link = household_link(probes, self.frame_s)
        if link is None:
            self.probes_failed += 1
            log.warning("link probe failed: %s", "; ".join(str(p.error) for p in probes))
        return link

    def _calibrate(self, link: LinkEstimate, warmup: int, requests: int) -> None:
        """Each plan's fixed cost: its node time in ``requests`` single-input requests less
        its predicted link time on ``link``; the ladder takes the smallest of the last
        ``CALIBRATION_REQUESTS`` samples per plan, so that the prediction is exact on the link
        and under the load of the moment. It holds the plan's compute and the software of
        its hops beyond what the probe's round trip holds; it may be negative when a probe's
        echo costs more software time than a hop of the plan (the probe's round trip,
        counted per hop, then overstates the hops' cost)."""
        # the requests' input as the ladder counts it: fp32, or uint8 pixels
        dtype = torch.uint8 if self.ladder.input_dtype == "uint8" else torch.float32
        x = torch.zeros([1, *self._input_shape[1:]], dtype=dtype)
        for r in self.ladder.plans:
            srv = self.by_hash[r.hash]
            for _ in range(warmup):
                srv.infer(x)
            on_link = link_ms(r.traffic, link)
            samples = self._fixed.setdefault(r.hash, deque(maxlen=CALIBRATION_REQUESTS))
            samples.extend(srv.infer(x)[2] - on_link for _ in range(requests))
        # the fastest sample: a request slowed by other requests on the same cores measures
        # them, not the plan (as the probe's shortest echo measures the link)
        fixed = {h: min(v) for h, v in self._fixed.items()}
        self.ladder = self.ladder.with_compute(fixed)
        log.debug("fixed costs (ms): %s", {h[:12]: round(v, 2) for h, v in fixed.items()})

    def _moves_plans(self, old: LinkEstimate, new: LinkEstimate) -> bool:
        """Whether going from ``old`` to ``new`` moves some plan's predicted link time by more
        than ``FRESH_SHIFT`` of the target."""
        limit = FRESH_SHIFT * self.target_ms
        return any(
            abs(link_ms(r.traffic, new) - link_ms(r.traffic, old)) > limit
            for r in self.ladder.plans
        )

    def _reprobe(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                link = self.probe()
            except Exception as e:  # a probe must never stop serving
                log.warning("link probe failed: %s", e)
                continue
            if link is None or self._stop.is_set():
                continue
            self._recent.append(link)
            # the best of the last probes: one probe slowed by this device's own load does not
            # switch the plan; a real change is seen one interval later
            link = LinkEstimate(
                max(e.bandwidth_bps for e in self._recent),
                min(e.rtt_s for e in self._recent),
                self.frame_s,
            )
            self.link = link
            if self._measure:  # fixed costs on this link, under the load of the moment
                fresh = self._fixed_link is None or self._moves_plans(self._fixed_link, link)
                if fresh:  # samples of another link hold that link's error of the model
                    self._fixed.clear()
                    self._fixed_link = link
                try:
                    self._calibrate(link, 0, CALIBRATION_FRESH if fresh else 1)
                except Exception as e:  # e.g. a peer down: keep the last fixed costs
                    log.warning("calibration request failed: %s", e)
            before = self.current
            self.current = choose(self.ladder, link, self.target_ms, before, self.margin)
            if before is not None and self.current.plan.hash != before.plan.hash:
                self.switches += 1

    # ---- requests (InferenceHost) ----------------------------------------------------------
    async def infer_async(
        self,
        x: torch.Tensor,
        deadline_s: float | None = None,
        *,
        arrival: float | None = None,
        plan_hash: str = "",
    ) -> tuple[torch.Tensor, str, float, list[int]]:
        """Run one request on the plan in use, or on ``plan_hash`` if given (called on plan 0's
        event loop)."""
        cur = self.current
        if plan_hash:
            srv = self.by_hash[plan_hash]
        else:
            srv = self.servers[0] if cur is None else self.by_hash[cur.plan.hash]
        coro = srv.infer_async(x, deadline_s, arrival=arrival)
        if srv is self.servers[0]:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, srv.transport.loop))

    def served_plans(self) -> list[str]:
        return list(self.by_hash)

    def plan_of(self, session_id: str) -> str:
        prefix = session_id.split("-", 1)[0]
        for s in self.servers:
            if s.session_prefix == prefix:
                return s.plan_hash
        return ""

    def status(self) -> dict[str, Any]:
        st = self.servers[0].status()
        cur, link = self.current, self.link
        st["ladder"] = {
            "plan_hash": cur.plan.hash if cur else None,
            "target_ms": self.target_ms,
            "link": None
            if link is None
            else {"bandwidth_mbps": link.bandwidth_bps / 1e6, "rtt_ms": link.rtt_s * 1e3},
            "switches": self.switches,
            "probes_failed": self.probes_failed,
            # a --link-schedule's epoch (time.time()), for benchmarks to find its phases
            "link_epoch": getattr(self.config.link_shape, "epoch", None),
            "plans": [
                {
                    "plan_hash": r.hash,
                    "path": str(r.path),
                    "accuracy": r.accuracy,
                    "compute_ms": r.compute_ms,
                    "predicted_ms": None if link is None else predict_ms(r, link),
                }
                for r in self.ladder.plans
            ],
        }
        return st

    def stop(self, timeout: float = 2.0) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        super().stop(timeout)


__all__ = ["LadderServer", "PlanServers", "household_link", "ladder_configs", "port_offset"]
