"""Link probe: round-trip time and bandwidth to a peer, over the peer channel itself.

A probe is a PROBE frame sent on this node's ``Exchange`` stream to the peer, exactly as an
activation frame is (same channel, same authentication: the handshake's plan hash, household
token and, with TLS, the node's certificate); the peer answers, once the frame has arrived
(through its :class:`~disco_fl.runtime.transport.link_emulation.LinkShape`, if it emulates one),
with a 4-byte PROBE_ACK on its own stream back (through ours). So the probe sees what
activations see: the link both ways, gRPC, and the software of one hop at each end.

- **round trip**: the median time of ``echoes`` probes carrying 4 bytes (``rtt_ms``), and the
  shortest (``rtt_min_ms``: the path without the time an echo waited behind other work on
  either node's event loop, which only ever adds);
- **bandwidth**: ``repeats`` (3) probes carrying ``payload_bytes`` (default 256 KiB, at most
  :data:`~disco_fl.runtime.transport.frames.MAX_PROBE_BYTES`); the fastest one's time less the
  shortest round trip is the time the extra bytes took on the link from this node to the peer
  (framed as the shaper counts them, :func:`~disco_fl.runtime.transport.frames.framed_size`).

Every wait is bounded by ``timeout`` (a dead or silent peer gives a :class:`LinkProbe` with
``error`` set, never a hang), and a probe's frames are dropped when it is over
(``end_session``). The peer's link *to* this node is measured by the peer's own probe.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.transport.frames import MAX_PROBE_BYTES, Frame, framed_size
from disco_fl.runtime.transport.grpc_transport import GrpcTransport

DEFAULT_PAYLOAD_BYTES = 256 << 10
DEFAULT_ECHOES = 5
DEFAULT_REPEATS = 3
DEFAULT_TIMEOUT_S = 5.0
MIN_TRANSFER_S = 1e-6  # floor of the measured transfer time (a link faster than we can time)


@dataclass(frozen=True)
class LinkProbe:
    """What a probe of the link to ``peer`` measured (``error`` set: it failed, no figures)."""

    peer: int
    rtt_ms: float | None  # median
    bandwidth_mbps: float | None
    payload_bytes: int
    echoes: int
    seconds: float
    error: str | None = None
    rtt_min_ms: float | None = None  # shortest echo

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _payload(nbytes: int) -> peer_pb2.Tensor:
    n = max(1, nbytes // 4)
    return peer_pb2.Tensor(
        dtype=peer_pb2.Tensor.DTYPE_FLOAT32,
        shape=[n],
        codec=peer_pb2.Tensor.CODEC_FP32,
        data=bytes(4 * n),
    )


async def _echo(
    t: GrpcTransport, dst: int, tensor: peer_pb2.Tensor, timeout: float
) -> tuple[float, int]:
    """Seconds from sending a PROBE to its PROBE_ACK, and the probe's serialized size."""
    sid = f"probe-{t.index}-{secrets.token_hex(6)}"
    frame = Frame(
        session_id=sid, layer=0, direction=Frame.PROBE, src=t.index, dst=dst, tensor=tensor
    )
    try:
        t0 = time.perf_counter()
        t.send(frame)
        ack = await t.recv_async(sid, 0, dst, timeout)
        dt = time.perf_counter() - t0
    finally:
        t.end_session(sid)
    if ack.error or ack.direction != Frame.PROBE_ACK:
        raise RuntimeError(f"peer {dst} answered the probe with {ack.error or ack.direction}")
    return dt, frame.ByteSize()


async def probe_link_async(
    t: GrpcTransport,
    dst: int,
    *,
    echoes: int = DEFAULT_ECHOES,
    payload_bytes: int = DEFAULT_PAYLOAD_BYTES,
    repeats: int = DEFAULT_REPEATS,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> LinkProbe:
    """Probe the link to peer ``dst`` (a coroutine on ``t.loop``; see the module)."""
    if not 1 <= echoes <= 100 or not 1 <= repeats <= 20:
        raise ValueError(f"echoes must be in [1, 100] and repeats in [1, 20]: {echoes}, {repeats}")
    if not 4 <= payload_bytes <= MAX_PROBE_BYTES - 64:
        raise ValueError(f"payload_bytes must be in [4, {MAX_PROBE_BYTES - 64}]: {payload_bytes}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    t0 = time.perf_counter()
    try:
        small = [await _echo(t, dst, _payload(4), timeout) for _ in range(echoes)]
        big = [await _echo(t, dst, _payload(payload_bytes), timeout) for _ in range(repeats)]
    except (Exception, asyncio.TimeoutError) as e:
        return LinkProbe(
            dst, None, None, payload_bytes, echoes, time.perf_counter() - t0, f"{e}".strip()
        )
    rtt = statistics.median(s for s, _ in small)
    rtt_min = min(s for s, _ in small)
    extra_bits = 8 * (framed_size(big[0][1]) - framed_size(small[0][1]))
    transfer = max(min(s for s, _ in big) - rtt_min, MIN_TRANSFER_S)
    return LinkProbe(
        dst,
        rtt * 1e3,
        extra_bits / transfer / 1e6,
        payload_bytes,
        echoes,
        time.perf_counter() - t0,
        rtt_min_ms=rtt_min * 1e3,
    )


def probe_links(
    t: GrpcTransport, peers: list[int] | None = None, **kwargs: Any
) -> dict[int, LinkProbe]:
    """:func:`probe_link_async` to every peer (or ``peers``), one after the other, from a
    thread other than the transport's loop."""
    dsts = [d for d in range(t.num_nodes) if d != t.index] if peers is None else peers
    timeout = float(kwargs.get("timeout", DEFAULT_TIMEOUT_S))
    per_peer = (
        (int(kwargs.get("echoes", DEFAULT_ECHOES)) + int(kwargs.get("repeats", DEFAULT_REPEATS)))
        * timeout
        + t.connect_timeout
        + 5
    )
    return {d: t.run(probe_link_async(t, d, **kwargs), timeout=per_peer) for d in dsts}


__all__ = ["DEFAULT_PAYLOAD_BYTES", "LinkProbe", "probe_link_async", "probe_links"]
