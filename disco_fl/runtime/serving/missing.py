"""The requester's memory of missing nodes in degraded mode (``disco-fl serve --degraded-wait``).

A session that finds a node missing (silent past ``--degraded-wait``, unreachable or failed)
answers without it. :class:`MissingNodes` remembers when each such node was first found
missing, so that for ``--degraded-retry`` seconds the following sessions start without it
(the requester names it in their INPUT frames: nobody waits for it, and every node normalizes
with its statistics for that missing set, :meth:`~disco_fl.emulation.export.ExportedShard.
context`). After that period, before the next session, the node's link is tried again
(``reconnect``): up, it takes part again; still down, another period starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class MissingNodes:
    """Nodes found missing, and since when (thread-safe; ``start`` runs on the event loop)."""

    def __init__(self, retry_s: float, reconnect: Callable[[int], Awaitable[bool]]) -> None:
        self.retry_s = retry_s
        self._reconnect = reconnect
        self._since: dict[int, float] = {}
        self._lock = threading.Lock()

    async def start(self) -> set[int]:
        """The nodes the next session starts without: those found missing less than
        ``retry_s`` ago, and older ones whose link does not come back when tried now."""
        now = time.monotonic()
        with self._lock:
            known = dict(self._since)
        out = {k for k, t in known.items() if now - t < self.retry_s}
        for k in sorted(set(known) - out):
            if await self._reconnect(k):
                with self._lock:
                    self._since.pop(k, None)
                log.info("node %d is reachable again", k)
            else:
                with self._lock:
                    self._since[k] = time.monotonic()
                out.add(k)
        return out

    def found(self, missing: set[int]) -> None:
        """After a request: the nodes still missing keep the time they were first found so
        (one whose period ended starts a new one); the others are forgotten."""
        now = time.monotonic()
        with self._lock:
            known = self._since
            self._since = {
                k: known[k] if k in known and now - known[k] < self.retry_s else now
                for k in missing
            }
