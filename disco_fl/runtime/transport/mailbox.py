"""The mailbox of one node: frames received and not yet taken, bounded in bytes.

Frames are kept by :func:`~disco_fl.runtime.transport.frames.frame_key`; at most one frame per key
may be pending (a duplicate is rejected). A waiter blocks on one key (:meth:`Mailbox.get`) or the
first of several (:meth:`Mailbox.get_first`: a training step waits for its frame and for every
peer's abort at once), or, on an event loop, registers a wake-up (:meth:`Mailbox.watch`). Sessions
ended here are remembered, so late frames for them are dropped; a peer whose stream broke is marked
down, so a waiter for its frames fails at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.transport.frames import (
    Frame,
    FrameKey,
    PeerDownError,
    TransportError,
    frame_key,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING_BYTES = 1 << 30


class Mailbox:
    """Frames received and not yet taken, keyed by :func:`frame_key`; bounded in bytes.

    Sessions ended with :meth:`end_session` stay remembered (the last ``max_closed_sessions``):
    late frames for them are dropped and ``get`` on them fails at once.
    """

    def __init__(
        self,
        *,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_closed_sessions: int = 1024,
    ) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._frames: dict[FrameKey, tuple[peer_pb2.Frame, int, float]] = {}
        self._bytes = 0
        self._max_bytes = max_pending_bytes
        self._closed_sessions: OrderedDict[str, None] = OrderedDict()
        self._max_closed = max_closed_sessions
        self._closed = False
        self._down: dict[int, str] = {}  # peer -> why its frames will not come
        self._watchers: dict[FrameKey, list[Callable[[], None]]] = {}  # see watch()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._frames)

    @property
    def pending_bytes(self) -> int:
        """Serialized bytes of the frames held (bounded by ``max_pending_bytes``)."""
        with self._cond:
            return self._bytes

    def put(self, frame: peer_pb2.Frame, size: int) -> str | None:
        """Store ``frame`` (``size`` serialized bytes); return why it was refused, or None.

        Frames of an ended session are dropped without complaint (they are late, not bad)."""
        key = frame_key(frame)
        with self._cond:
            if self._closed:
                return "the receiving transport is closed"
            if key[0] in self._closed_sessions:
                # a late frame of a finished or failed session: harmless, dropped quietly
                log.debug("dropped a late frame of ended session %r: %s", key[0], key)
                return None
            if key in self._frames:
                return (
                    f"duplicate frame for session {key[0]!r} layer {key[2]} from {key[3]}"
                    f"{'' if not key[5] else ' (' + Frame.SubChannel.Name(key[5]) + ')'}"
                )
            if self._bytes + size > self._max_bytes:
                return (
                    f"mailbox full ({self._bytes} bytes pending, limit {self._max_bytes}); "
                    f"frame of {size} bytes refused"
                )
            self._frames[key] = (frame, size, time.monotonic())
            self._bytes += size
            self._cond.notify_all()
            self._wake((key,))
        return None

    def ended(self, session_id: str) -> bool:
        """Whether ``session_id`` has ended on this node (its late frames are dropped)."""
        with self._cond:
            return session_id in self._closed_sessions

    def mark_down(self, src: int, reason: str) -> None:
        """Frames from ``src`` will not come: waiting and later ``get`` calls for it fail."""
        with self._cond:
            self._down[src] = reason
            self._cond.notify_all()
            self._wake([k for k in self._watchers if k[3] == src])

    def down(self) -> set[int]:
        """The peers whose frames are marked as not coming."""
        with self._cond:
            return set(self._down)

    def mark_up(self, src: int) -> None:
        with self._cond:
            self._down.pop(src, None)

    def take(self, key: FrameKey) -> peer_pb2.Frame | None:
        """Take the frame ``key`` if it is here (never waits); ``None`` if it is not.

        Raises :class:`PeerDownError` when the sender is marked down and its frame is not here,
        :class:`TransportError` when the mailbox is closed or the session has ended.
        """
        with self._cond:
            if self._closed:
                raise TransportError("transport closed while waiting for a frame")
            if key[0] in self._closed_sessions:
                raise TransportError(f"session {key[0]!r} has ended on this node")
            item = self._frames.pop(key, None)
            if item is not None:
                self._bytes -= item[1]
                return item[0]
            down = self._down.get(key[3])
            if down is not None:
                raise PeerDownError(down)
            return None

    def get(self, key: FrameKey, timeout: float) -> peer_pb2.Frame | None:
        """Take the frame ``key``, waiting at most ``timeout`` seconds (``None`` if none came).

        Raises :class:`PeerDownError` when the sender is marked down and its frame is not here.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                frame = self.take(key)  # the condition's lock is re-entrant
                if frame is not None:
                    return frame
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def get_first(
        self, keys: list[FrameKey], timeout: float
    ) -> tuple[FrameKey, peer_pb2.Frame] | None:
        """Take the first frame to arrive among ``keys`` (the earlier key first when several
        are here), waiting at most ``timeout`` seconds (``None`` if none came). A frame that
        arrives wakes the waiter at once (no polling).

        Raises :class:`PeerDownError` (its ``peer`` set) when the sender of one of the keys is
        marked down and that key's frame is not here.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for key in keys:
                    try:
                        frame = self.take(key)
                    except PeerDownError as e:
                        e.peer = key[3]
                        raise
                    if frame is not None:
                        return key, frame
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def watch(self, key: FrameKey, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake()`` (from the thread that stores it) when something may have changed
        for ``key``: its frame arrived, its sender went down, its session ended or the mailbox
        closed. For waiters that cannot block (an event loop); returns the un-watch function.
        """
        with self._cond:
            self._watchers.setdefault(key, []).append(wake)

        def unwatch() -> None:
            with self._cond:
                ws = self._watchers.get(key)
                if ws is not None:
                    with contextlib.suppress(ValueError):
                        ws.remove(wake)
                    if not ws:
                        del self._watchers[key]

        return unwatch

    def _wake(self, keys: Iterable[FrameKey] | None = None) -> None:
        """Wake the watchers of ``keys`` (all watchers if ``None``); caller holds the lock."""
        if not self._watchers:
            return
        if keys is None:
            keys = list(self._watchers)
        for key in keys:
            for wake in self._watchers.get(key, ()):
                wake()

    def expire(self, max_age: float, keep: set[str]) -> int:
        """End every session not in ``keep`` holding a frame older than ``max_age`` seconds
        (frames of sessions that never started here); returns how many were ended."""
        limit = time.monotonic() - max_age
        with self._cond:
            stale = {k[0] for k, v in self._frames.items() if v[2] < limit and k[0] not in keep}
        for sid in stale:
            self.end_session(sid)
        return len(stale)

    def end_session(self, session_id: str) -> int:
        """Forget the session's pending frames (returns how many) and drop its late frames."""
        with self._cond:
            gone = [k for k in self._frames if k[0] == session_id]
            for k in gone:
                self._bytes -= self._frames.pop(k)[1]
            self._closed_sessions[session_id] = None
            self._closed_sessions.move_to_end(session_id)
            while len(self._closed_sessions) > self._max_closed:
                self._closed_sessions.popitem(last=False)
            self._cond.notify_all()
            self._wake([k for k in self._watchers if k[0] == session_id])
            return len(gone)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._frames.clear()
            self._bytes = 0
            self._cond.notify_all()
            self._wake()
