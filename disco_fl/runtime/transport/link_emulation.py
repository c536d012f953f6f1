"""Link emulation for benchmarks: every peer link into a node behaves like a link of a given
rate and one-way delay (this machine's kernel has no ``netem``).

A :class:`LinkShape` (or a :class:`LinkSchedule`, a link that changes at given times: the
changing-link benchmark) is applied by the *receiving* node (:class:`LinkEmulation`): frames
from a peer are delivered in order, each when it would have arrived over such a link
(``framed bytes * 8 / rate`` on the link after the previous one, plus ``rtt / 2``), counted
from when it reached this node over loopback; the software time of the hop is thus paid on top
of the emulated link, as on a real one. An emulating sender stamps each frame with the time it
writes it (``Frame.sent_at_ns``; the nodes share one machine's monotonic clock), and a frame
that this node reads late (its loop was computing) is counted from that stamp plus the link's
shortest recent software hop instead (:class:`LinkClock`), as a real link would have delivered
it into the socket buffer meanwhile. Delivery timers are set early by the loop's own timer
lateness when it waits for them (:class:`TimerLateness`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.transport.frames import framed_size
from disco_fl.runtime.transport.io_loop import IoLoop

HOP_WINDOW = 32  # frames over which a link's shortest software hop is taken (LinkClock)
STAMP_BYTES = 9  # Frame.sent_at_ns on the wire (a 1-byte tag and a fixed64), counted nowhere
MAX_STAMP_AGE_S = 1.0  # an older send stamp is not trusted (another clock): the read time is used
MAX_WAKE_S = 100e-6  # a later timer is a stall (the GIL, a descheduled thread), not a wake-up


@dataclass(frozen=True)
class LinkShape:
    """An emulated link for every incoming peer stream.

    Parameters
    ----------
    rate_bps : float
        Link rate in bits per second (e.g. ``100e6``); ``math.inf`` for no limit.
    rtt_s : float, default 0
        Round-trip time in seconds; each frame is delayed by ``rtt_s / 2`` (one way).
    """

    rate_bps: float
    rtt_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.rate_bps > 0:
            raise ValueError(f"rate_bps must be positive, got {self.rate_bps}")
        if not (math.isfinite(self.rtt_s) and self.rtt_s >= 0):
            raise ValueError(f"rtt_s must be a finite number >= 0, got {self.rtt_s}")


class LinkSchedule:
    """An emulated link that changes during a run (benchmarks): ``steps[i] = (t_i, shape_i)``
    makes the link ``shape_i`` from ``t_i`` seconds after the epoch until the next step
    (``t_i`` strictly increasing, ``t_0 >= 0``); before ``t_0``, and before the epoch is set
    (:meth:`start`), ``shape_0``. The epoch is a ``time.time()`` value: given (the same on
    every node), or set when the node's household is ready (``disco-fl serve``), so that the
    nodes of a household change their links together.
    """

    def __init__(self, steps: Sequence[tuple[float, LinkShape]], epoch: float | None = None):
        self.steps = tuple(steps)
        times = [t for t, _ in self.steps]
        if not times or times[0] < 0 or any(b <= a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"link schedule times must be >= 0 and increasing, got {times}")
        self.epoch: float | None = None
        if epoch is not None:
            self.start(epoch)

    def start(self, epoch: float) -> None:
        """Count the schedule from ``epoch`` (``time.time()``); once only."""
        if not math.isfinite(epoch):
            raise ValueError(f"link schedule epoch must be a time, got {epoch}")
        if self.epoch is None:
            self.epoch = float(epoch)

    @staticmethod
    def parse(text: str, epoch: float | None = None) -> LinkSchedule:
        """``"T0:MBPS/RTT_MS,T1:MBPS/RTT_MS,..."`` (seconds, Mbit/s, milliseconds)."""
        steps = []
        for item in text.split(","):
            try:
                t, _, link = item.strip().partition(":")
                mbps, _, rtt = link.partition("/")
                steps.append((float(t), LinkShape(float(mbps) * 1e6, float(rtt or 0) / 1e3)))
            except ValueError as e:
                raise ValueError(
                    f"bad link schedule step {item!r} (want T:MBPS/RTT_MS, e.g. 30:20/4): {e}"
                ) from None
        return LinkSchedule(steps, epoch)

    def at(self, wall: float) -> LinkShape:
        """The link at ``time.time() == wall``."""
        shape = self.steps[0][1]
        if self.epoch is None:
            return shape
        for t, s in self.steps:
            if wall - self.epoch >= t:
                shape = s
        return shape


class LinkClock:
    """FIFO state of one emulated link: when it is free again, when each frame arrives.

    A frame's transfer starts when it reached this node (``now``). If the sender stamped it
    with the time it wrote it (``sent``, the same machine's monotonic clock), the transfer
    starts at ``sent`` plus the shortest software hop (``now - sent``) of this link's last
    :data:`HOP_WINDOW` frames instead: a frame read late, because this node's loop was busy
    computing when it came, then arrives when a real link would have had it here, while the
    software a hop costs (sending, loopback, waking up, reading) is still paid before the
    emulated transfer. With a :class:`LinkSchedule`, each frame takes the link of the moment it
    reaches the node.
    """

    def __init__(
        self, shape: LinkShape | LinkSchedule, framing: Callable[[int], int] = framed_size
    ) -> None:
        self.shape = shape
        self.framing = framing  # a frame's bytes on the connection (HTTP/2, or the socket's)
        self.free = 0.0
        self._hops: deque[float] = deque(maxlen=HOP_WINDOW)

    def arrival(self, message_bytes: int, now: float, sent: float | None = None) -> float:
        sh = self.shape.at(time.time()) if isinstance(self.shape, LinkSchedule) else self.shape
        ready = now
        if sent is not None and sent <= now:
            self._hops.append(now - sent)
            ready = sent + min(self._hops)
        start = max(ready, self.free)
        self.free = start + self.framing(message_bytes) * 8.0 / sh.rate_bps
        return self.free + sh.rtt_s / 2.0


class TimerLateness:
    """How late the loop's delivery timers fire when the loop waits for them: the shortest
    lateness of the last :data:`HOP_WINDOW` such timers (the thread's wake-up, tens of
    microseconds on this machine).

    An emulated link's timer is set that much before the frame is due. A real link's frame
    wakes the receiver once, when it arrives; the emulation wakes it twice, when the frame comes
    over loopback (a wake-up already paid in the hop's software time) and when it is due, and
    the second wake-up's lateness would otherwise be added to every emulated frame.

    Only a timer the loop was waiting for counts (``waited``), and only up to
    :data:`MAX_WAKE_S`. One that fires late because the loop was computing when it came due
    measures the computation, and one later than that a stall (another thread held the GIL,
    the process was descheduled), not a wake-up. Counted, they made a node deliver frames
    tenths of a millisecond, or milliseconds, before they were due (a bias in our favour, found
    in session 13): a node computing through its timers learnt their lateness, and a node whose
    first timer stalled for 3.6 ms then delivered every frame at once, so no later timer ever
    replaced that sample.
    """

    def __init__(self) -> None:
        self._seen: deque[float] = deque(maxlen=HOP_WINDOW)

    @property
    def early(self) -> float:
        return min(self._seen, default=0.0)

    def fired(self, scheduled: float, now: float, waited: bool = True) -> None:
        late = max(0.0, now - scheduled)
        if waited and late <= MAX_WAKE_S:
            self._seen.append(late)


class LinkEmulation:
    """The receiving side: one :class:`LinkClock` per peer, the frames on each link not yet
    delivered, and the loop's timer lateness (of the timers ``io``'s loop waited for:
    :attr:`~disco_fl.runtime.transport.io_loop.PollingSelector.waited`). Delivered frames go to
    ``accept(frame, size, src)``, on ``io``'s loop."""

    def __init__(
        self,
        shape: LinkShape | LinkSchedule,
        num_nodes: int,
        framing: Callable[[int], int],
        io: IoLoop,
        accept: Callable[[peer_pb2.Frame, int, int], str | None],
    ) -> None:
        self.clocks = [LinkClock(shape, framing) for _ in range(num_nodes)]
        self._on_link: list[deque[tuple[peer_pb2.Frame, int]]] = [deque() for _ in range(num_nodes)]
        self._late = TimerLateness()
        self._loop = io.loop
        self._selector = io.selector
        self._accept = accept

    def arrived(self, frame: peer_pb2.Frame, size: int, src: int, entered: float) -> str | None:
        """A checked frame from ``src`` reached this node at ``entered`` (on the loop): accept
        it now if its emulated link has delivered it and none is queued before it (returning
        what ``accept`` returns), else when it does (``None``). The handling since
        ``entered`` is paid after the emulated arrival."""
        stamp = frame.sent_at_ns
        sent = stamp / 1e9 if stamp and stamp / 1e9 >= entered - MAX_STAMP_AGE_S else None
        now = time.monotonic()
        at = self.clocks[src].arrival(size, entered, sent) + (now - entered)
        at -= self._late.early  # the timer's own wake-up is not part of the link
        on_link = self._on_link[src]
        if at <= now and not on_link:
            return self._accept(frame, size, src)
        on_link.append((frame, size))
        self._loop.call_at(at, self._fire, src, at)  # loop.time() is monotonic
        return None

    def _fire(self, src: int, at: float) -> None:
        """A timer of ``src``'s link fired: deliver its oldest frame (one per timer, so a
        link's frames are delivered in the order they came)."""
        self._late.fired(at, time.monotonic(), self._selector.waited)
        frame, size = self._on_link[src].popleft()
        self._accept(frame, size, src)
