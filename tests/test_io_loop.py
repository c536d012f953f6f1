"""The transport's I/O loop: busy polling while a frame is awaited (``busy_poll_s``)."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from disco_fl.core.wire import encode_tensor
from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.transport.grpc_transport import GrpcTransport
from disco_fl.runtime.transport.io_loop import PollingSelector


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_polling_selector_returns_what_comes_while_it_polls_and_honours_the_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sel = PollingSelector(poll_s=0.5)
    sel.polling = lambda: True
    sel.register(a, selectors.EVENT_READ)
    try:
        threading.Timer(0.05, b.send, args=(b"x",)).start()
        t0 = time.monotonic()
        ready = sel.select(5.0)
        assert [k.fileobj for k, _ in ready] == [a] and time.monotonic() - t0 < 2.0
        a.recv(1)
        for timeout in (0.1, 0.8):  # shorter than the poll, longer than it
            t0 = time.monotonic()
            assert sel.select(timeout) == []
            assert timeout - 0.01 <= time.monotonic() - t0 < timeout + 1.0
        assert sel.select(0) == []
    finally:
        sel.close()


def test_the_selector_tells_whether_the_loop_waited(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """``waited``: the latest ``select`` was asked to wait (the loop had nothing to run), so a
    timer run after it fired from a wait; timeout 0 means the loop had work (or an overdue
    timer). The link emulation learns its timers' wake-up lateness only from the former."""
    a, b = pair
    sel = PollingSelector(poll_s=0.001)
    sel.polling = lambda: True
    sel.register(a, selectors.EVENT_READ)
    try:
        for timeout, waited in [(0, False), (0.002, True), (0.0, False), (None, True)]:
            if timeout is None:  # no timeout: give it something to return
                b.send(b"x")
            sel.select(timeout)
            assert sel.waited is waited, timeout
    finally:
        sel.close()


def _cpu(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


@pytest.mark.parametrize("data_path", ["grpc", "socket"])
def test_a_transport_polls_only_while_a_frame_is_awaited(data_path: str) -> None:
    """Idle, the loop sleeps (no CPU); while ``recv_async`` waits it polls for up to
    ``busy_poll_s``, then sleeps; a frame sent meanwhile is received as without polling."""
    ts = [
        GrpcTransport(k, 2, plan_hash="b" * 64, num_layers=4, busy_poll_s=0.3, data_path=data_path)
        for k in range(2)
    ]
    try:
        for t in ts:
            t.set_peers([u.address for u in ts])
        ts[0].connect()
        loop_thread = ts[1]._io.thread
        c0 = _cpu(loop_thread)
        time.sleep(0.5)
        assert _cpu(loop_thread) - c0 < 0.05  # idle: no polling

        async def wait() -> None:
            await ts[1].recv_async("s", 2, 0, 0.6)

        c0 = _cpu(loop_thread)
        with pytest.raises(TimeoutError):
            ts[1].run(wait())
        # polled for 0.3 s of the 0.6 s wait (at least a third of it on a busy machine)
        assert _cpu(loop_thread) - c0 >= 0.1

        fwd = peer_pb2.Frame.FORWARD
        frame = peer_pb2.Frame(session_id="s", layer=3, src=0, dst=1, direction=fwd)
        encode_tensor(torch.arange(6.0).reshape(2, 3), out=frame.tensor)
        threading.Timer(0.05, ts[0].send, args=(frame,)).start()

        async def take() -> peer_pb2.Frame:
            return await ts[1].recv_async("s", 3, 0, 5.0)

        got = ts[1].run(take())
        assert got.tensor.data == frame.tensor.data
    finally:
        closers = [threading.Thread(target=t.close, args=(2.0,)) for t in ts]
        for c in closers:
            c.start()
        for c in closers:
            c.join(10.0)
