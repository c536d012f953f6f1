"""The I/O loop of a gRPC transport: one asyncio event loop in a daemon thread of its own.

All gRPC work of a :class:`~disco_fl.runtime.transport.grpc_transport.GrpcTransport` runs on it. It
is a select-based loop, so its timers are precise to tens of microseconds instead of epoll's whole
milliseconds (and the thread asks Linux for 1 us of timer slack). Blocking callers on other threads
use :meth:`IoLoop.run` / :meth:`IoLoop.call_soon`; a coroutine on the loop itself needs no hand-off
at all.

Busy polling (``busy_poll_s``, off by default): while ``polling()`` says someone waits for a
frame, the loop polls its sockets for up to that long before it sleeps, so a frame that comes
meanwhile is taken without the sleeping thread's wake-up (``docs/serving.md``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import selectors
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from disco_fl.runtime.transport.frames import TransportError

_PR_SET_TIMERSLACK = 29
T = TypeVar("T")


def _precise_timers() -> None:
    """Ask Linux for 1 us of timer slack on this thread (default 50 us): its timed waits
    (the loop's ``select``) then wake within tens of microseconds of their deadline."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)


class PollingSelector(selectors.SelectSelector):
    """``select()`` that polls (timeout 0) for up to ``poll_s`` seconds while ``polling()``
    is true, then waits for what is left of the timeout as usual."""

    def __init__(self, poll_s: float = 0.0) -> None:
        super().__init__()
        self.poll_s = poll_s
        self.polling: Callable[[], bool] = lambda: False
        # whether the latest select() was asked to wait (timeout > 0 or none): the loop had
        # nothing to run, so a timer run after it fired from a wait, not late behind work
        self.waited = True

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.waited = timeout is None or timeout > 0
        if self.poll_s <= 0 or (timeout is not None and timeout <= 0) or not self.polling():
            return super().select(timeout)
        start = time.monotonic()
        spin = self.poll_s if timeout is None else min(self.poll_s, timeout)
        while True:
            ready = super().select(0)
            waited = time.monotonic() - start
            if ready or waited >= spin:
                break
        if ready or (timeout is not None and waited >= timeout):
            return ready
        return super().select(None if timeout is None else timeout - waited)


class IoLoop:
    """An asyncio event loop running in a daemon thread of its own (``busy_poll_s``: see the
    module's docstring; its :class:`PollingSelector` is :attr:`selector`)."""

    def __init__(self, name: str, busy_poll_s: float = 0.0) -> None:
        # select(): microsecond timeouts (epoll rounds every timer up to a whole millisecond)
        self.selector = PollingSelector(busy_poll_s)
        self.loop = asyncio.SelectorEventLoop(self.selector)
        self._ident: int | None = None
        started = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(started,), name=name, daemon=True)
        self.thread.start()
        started.wait()

    def _main(self, started: threading.Event) -> None:
        _precise_timers()
        asyncio.set_event_loop(self.loop)
        self._ident = threading.get_ident()
        started.set()
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                for task in asyncio.all_tasks(self.loop):
                    task.cancel()
                self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()

    def inside(self) -> bool:
        """Whether the calling thread is the loop's own."""
        return threading.get_ident() == self._ident

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from another thread)."""
        if self.inside():
            coro.close()
            raise RuntimeError("a blocking transport call was made on its own event loop")
        if self.loop.is_closed() or not self.thread.is_alive():
            coro.close()
            raise TransportError("the transport's event loop has stopped")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:  # (the builtin TimeoutError, since 3.11)
            if fut.done():
                raise  # the coroutine's own TimeoutError
            fut.cancel()
            why = f"the transport's event loop did not answer in {timeout} s"
            raise TimeoutError(why) from None

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop: at once on its thread, else as soon as it can."""
        if self.inside():
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)


def set_done(f: asyncio.Future[None]) -> None:
    """Wake the coroutine awaiting ``f`` (on the loop), unless it is already done."""
    if not f.done():
        f.set_result(None)
