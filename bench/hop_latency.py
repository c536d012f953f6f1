"""Round trip of one small frame between two processes: what one hop costs on this machine.

A diagnostic for ``bench/latency.py``, with no link emulation. Frame: an fp32 tensor of shape
(1, 8, 14, 14) (6,272 payload bytes), as an exchange of the small ResNet at batch 1. Three
paths, each a ping-pong between two processes (median round trip; a hop is about half):

- ``raw_grpc_aio``: plain ``grpc.aio`` with no disco_fl code: one bidirectional stream, the
  client writes a ``disco.v1.Frame`` and the server's handler writes it back (the least any
  Python gRPC hop costs here);
- ``raw_grpc_aio_two_streams``: the same, but each process opens its own stream to the other
  and sends on it, as the transport does (one stream per ordered pair);
- ``transport_loop``: :class:`~disco_fl.runtime.transport.grpc_transport.GrpcTransport` used the way
  ``disco-fl serve`` uses it: a coroutine on the transport's event loop sends and awaits
  (``recv_async``): no thread hand-off;
- ``transport_threads``: the same transport used from an ordinary thread (``send`` / blocking
  ``recv``), as joint training uses it: every frame changes threads on both sides;
- ``raw_asyncio_socket``: no gRPC at all: the same serialized ``disco.v1.Frame`` with a 4-byte
  length prefix over a plain asyncio TCP stream (``asyncio.start_server`` /
  ``open_connection``, TCP_NODELAY as asyncio sets it), the server parsing and writing it
  back: the least a data path beside gRPC costs per hop, without TLS;
- ``transport_loop_socket`` / ``transport_threads_socket``: the transport as above with the
  socket data path (``data_path="socket"``: the handshake on gRPC, then the frames over one
  TCP connection per ordered pair, :mod:`~disco_fl.runtime.transport.socket_path`).

``--syscalls`` also counts the syscalls of the pinging process per round trip of
``raw_grpc_aio`` and ``transport_loop`` (``strace -c -f`` attached for ~3 s of a longer
ping-pong): where a hop's software time goes.

Usage::

    python bench/hop_latency.py [--n 600] [--syscalls] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import torch

from disco_fl.core.wire import encode_tensor
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.transport.grpc_transport import GrpcTransport

SHAPE = (1, 8, 14, 14)


def _frame(src: int, dst: int, i: int) -> peer_pb2.Frame:
    f = peer_pb2.Frame(
        session_id=f"s{i}", layer=0, src=src, dst=dst, direction=peer_pb2.Frame.FORWARD
    )
    encode_tensor(torch.zeros(SHAPE), "fp32", out=f.tensor)
    return f


def _stats(rtts: list[float]) -> dict[str, Any]:
    steady = sorted(rtts[len(rtts) // 10 :])
    return {
        "round_trip_us_median": statistics.median(steady),
        "round_trip_us_p10": steady[len(steady) // 10],
        "round_trip_us_p90": steady[9 * len(steady) // 10],
        "n": len(steady),
    }


# ---- raw asyncio socket (no gRPC) ---------------------------------------------------------------
async def _read_frame(reader: asyncio.StreamReader) -> peer_pb2.Frame:
    size = int.from_bytes(await reader.readexactly(4), "big")
    return peer_pb2.Frame.FromString(await reader.readexactly(size))


def _framed(frame: peer_pb2.Frame) -> bytes:
    body = frame.SerializeToString()
    return len(body).to_bytes(4, "big") + body


def _socket_server(port_q: Any, n: int) -> None:
    async def main() -> None:
        done = asyncio.Event()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for _ in range(n):
                writer.write(_framed(await _read_frame(reader)))
                await writer.drain()
            writer.close()
            done.set()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port_q.put(server.sockets[0].getsockname()[1])
        await asyncio.wait_for(done.wait(), timeout=120)
        server.close()

    asyncio.run(main())


def _spawn_server(target: Callable[[Any, int], None], n: int) -> tuple[Any, Any]:
    """``target(queue, n)`` in a new process; returns the process and what it put on the
    queue (its address)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(q, n), daemon=True)
    p.start()
    return p, q.get(timeout=60)


def _raw_socket(n: int) -> list[float]:
    p, port = _spawn_server(_socket_server, n)
    rtts: list[float] = []

    async def main() -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(n):
            frame = _frame(0, 1, i)
            t0 = time.perf_counter()
            writer.write(_framed(frame))
            await writer.drain()
            await _read_frame(reader)
            rtts.append((time.perf_counter() - t0) * 1e6)
        writer.close()
        return rtts

    try:
        return asyncio.run(main())
    finally:
        p.kill()
        p.join(10)


# ---- raw grpc.aio ----------------------------------------------------------------------------
class _Echo(peer_pb2_grpc.PeerServicer):
    async def Exchange(  # type: ignore[override]
        self, request_iterator: AsyncIterator[peer_pb2.Frame], context: Any
    ) -> AsyncIterator[peer_pb2.Frame]:
        async for frame in request_iterator:
            yield frame


def _raw_server(port_q: Any, n: int) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        peer_pb2_grpc.add_PeerServicer_to_server(_Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_q.put(f"127.0.0.1:{port}")
        await server.wait_for_termination(timeout=120)

    asyncio.run(main())


def _raw(n: int, syscalls: dict[str, Any] | None = None) -> list[float]:
    p, address = _spawn_server(_raw_server, n)
    rtts: list[float] = []

    async def main() -> list[float]:
        async with grpc.aio.insecure_channel(address) as channel:
            call = peer_pb2_grpc.PeerStub(channel).Exchange()
            for i in range(n):
                frame = _frame(0, 1, i)
                t0 = time.perf_counter()
                await call.write(frame)
                await call.read()
                rtts.append((time.perf_counter() - t0) * 1e6)
            await call.done_writing()
            return rtts

    try:
        if syscalls is None:
            return asyncio.run(main())
        syscalls.update(_traced(lambda: asyncio.run(main()), rtts))
        return rtts
    finally:
        p.kill()
        p.join(10)


class _Sink(peer_pb2_grpc.PeerServicer):
    def __init__(self, inbox: asyncio.Queue[peer_pb2.Frame]) -> None:
        self.inbox = inbox

    async def Exchange(  # type: ignore[override]
        self, request_iterator: AsyncIterator[peer_pb2.Frame], context: Any
    ) -> AsyncIterator[peer_pb2.Frame]:
        async for frame in request_iterator:
            self.inbox.put_nowait(frame)
        return
        yield  # an (empty) response stream


def _two_streams_node(mine: Any, theirs: Any, n: int, result: Any) -> None:
    """One side of the two-stream ping-pong (``result`` is None on the echoing side)."""

    async def main() -> list[float]:
        inbox: asyncio.Queue[peer_pb2.Frame] = asyncio.Queue()
        server = grpc.aio.server()
        peer_pb2_grpc.add_PeerServicer_to_server(_Sink(inbox), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        mine.put(port)
        other = await asyncio.get_running_loop().run_in_executor(None, theirs.get)
        rtts: list[float] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{other}") as channel:
            call = peer_pb2_grpc.PeerStub(channel).Exchange()
            for i in range(n):
                frame = _frame(0, 1, i)
                if result is None:
                    await inbox.get()
                    await call.write(frame)
                else:
                    t0 = time.perf_counter()
                    await call.write(frame)
                    await inbox.get()
                    rtts.append((time.perf_counter() - t0) * 1e6)
            await asyncio.sleep(0.5)
            call.cancel()
        await server.stop(0.5)
        return rtts

    rtts = asyncio.run(main())
    if result is not None:
        result.put(rtts)


def _raw_two_streams(n: int) -> list[float]:
    ctx = mp.get_context("spawn")
    a, b, result = ctx.Queue(), ctx.Queue(), ctx.Queue()
    echo = ctx.Process(target=_two_streams_node, args=(b, a, n, None), daemon=True)
    ping = ctx.Process(target=_two_streams_node, args=(a, b, n, result), daemon=True)
    echo.start()
    ping.start()
    try:
        rtts: list[float] = result.get(timeout=300)
        return rtts
    finally:
        for p in (ping, echo):
            p.join(10)
            if p.is_alive():
                p.kill()


# ---- the transport ---------------------------------------------------------------------------
def _echo(port_q: Any, addr_q: Any, n: int, on_loop: bool, data_path: str) -> None:
    torch.set_num_threads(1)
    t = GrpcTransport(1, 2, plan_hash="h", num_layers=1, data_path=data_path)
    port_q.put(t.address)
    t.set_peers([addr_q.get(), t.address])
    t.connect()
    if on_loop:

        async def serve() -> None:
            for i in range(n):
                await t.recv_async(f"s{i}", 0, 0, 30)
                t.send(_frame(1, 0, i))
                await asyncio.sleep(0)  # let the link's writer hand it to gRPC

        t.run(serve())
    else:
        for i in range(n):
            t.recv(f"s{i}", 0, 0, 30)
            t.send(_frame(1, 0, i))
    time.sleep(1.0)
    t.close()


def _strace_counts(path: Path) -> dict[str, int]:
    """Calls per syscall from an ``strace -c`` summary file."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    return counts


def _traced(ping_pong: Callable[[], Any], rtts: list[float]) -> dict[str, Any]:
    """Run ``ping_pong`` (which appends to ``rtts``) in a thread; count this process's
    syscalls per round trip over ~3 s of it, after 1 s of warm-up (``strace -c -f``)."""
    runner = threading.Thread(target=ping_pong)
    runner.start()
    time.sleep(1.0)
    out = Path(tempfile.mkdtemp()) / "strace.txt"
    before = len(rtts)
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-p", str(os.getpid()), "-o", str(out)], stderr=subprocess.DEVNULL
    )
    time.sleep(3.0)
    tracer.terminate()
    tracer.wait(30)
    traced = len(rtts) - before  # round trips while traced (one may straddle each end)
    runner.join()
    counts = _strace_counts(out)
    ordered = sorted(counts.items(), key=lambda kv: -kv[1])
    return {
        "round_trips": traced,
        "per_round_trip": {k: round(v / traced, 2) for k, v in ordered},
        "total_per_round_trip": round(sum(counts.values()) / traced, 1),
    }


def _transport(
    n: int, on_loop: bool, syscalls: dict[str, Any] | None = None, data_path: str = "grpc"
) -> list[float]:
    """The transport's ping-pong; with ``syscalls`` (a dict to fill, ``on_loop`` only), the
    pinging process's syscalls during ~3 s of it (``strace -c -f``), per round trip."""
    ctx = mp.get_context("spawn")
    pq, aq = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_echo, args=(pq, aq, n, on_loop, data_path))
    p.start()
    t = GrpcTransport(0, 2, plan_hash="h", num_layers=1, data_path=data_path)
    peer = pq.get(timeout=60)
    aq.put(t.address)
    t.set_peers([t.address, peer])
    t.connect()
    rtts: list[float] = []
    if on_loop:

        async def ping() -> None:
            for i in range(n):
                frame = _frame(0, 1, i)
                t0 = time.perf_counter()
                t.send(frame)
                await asyncio.sleep(0)
                await t.recv_async(f"s{i}", 0, 1, 30)
                rtts.append((time.perf_counter() - t0) * 1e6)

        if syscalls is None:
            t.run(ping())
        else:
            syscalls.update(_traced(lambda: t.run(ping()), rtts))
    else:
        for i in range(n):
            frame = _frame(0, 1, i)
            t0 = time.perf_counter()
            t.send(frame)
            t.recv(f"s{i}", 0, 1, 30)
            rtts.append((time.perf_counter() - t0) * 1e6)
    p.join(30)
    t.close()
    return rtts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--syscalls",
        action="store_true",
        help="also count the pinging process's syscalls per round trip of transport_loop "
        "(strace -c -f for ~3 s of a separate, longer ping-pong; needs strace and ptrace)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    out: dict[str, Any] = {
        "frame_payload_bytes": 4 * 8 * 14 * 14,
        "raw_grpc_aio": _stats(_raw(args.n)),
        "raw_grpc_aio_two_streams": _stats(_raw_two_streams(args.n)),
        "transport_loop": _stats(_transport(args.n, on_loop=True)),
        "transport_threads": _stats(_transport(args.n, on_loop=False)),
        "raw_asyncio_socket": _stats(_raw_socket(args.n)),
        "transport_loop_socket": _stats(_transport(args.n, on_loop=True, data_path="socket")),
        "transport_threads_socket": _stats(_transport(args.n, on_loop=False, data_path="socket")),
    }
    if args.syscalls:
        raw: dict[str, Any] = {}
        ours: dict[str, Any] = {}
        _raw(max(args.n, 5000), syscalls=raw)
        _transport(max(args.n, 5000), on_loop=True, syscalls=ours)
        out["syscalls"] = {"raw_grpc_aio": raw, "transport_loop": ours}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
