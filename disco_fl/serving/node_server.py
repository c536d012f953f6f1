"""One node of a household serving its shard: ``disco-fl serve``.

A :class:`NodeServer` loads *only* its own shard from an exported plan (``load_shard``), starts
its gRPC endpoint (the ``disco.v1.Peer`` service for the household and the
``disco.v1.Inference`` service for callers) and runs one peer session per request:

- on the **requester** (``plan.program.requester``, node 0), ``Inference.Infer`` gives each
  request a fresh session id and runs :func:`~disco_fl.runtime.run_node` with the input;
- on every other node, the requester's INPUT frame of a new session starts
  :func:`~disco_fl.runtime.run_node` for that session.

Everything runs on the transport's event loop (:mod:`disco_fl.transport.grpc_transport`):
the gRPC services, and the sessions themselves (:func:`~disco_fl.runtime.run_node_async`),
which compute on the loop's thread and wait for their peers' frames without blocking it, so
no frame or request changes threads on its way between gRPC and the computation. Sessions
interleave at their waits.

Several requests may be in flight at once (``max_inflight``); their frames are kept apart by
session id. Every request has a deadline (``deadline_s``, default 5 s): a dead or stalled peer
makes the request fail with a clear error within it (``DEADLINE_EXCEEDED`` or ``UNAVAILABLE``)
while the node goes on serving; once the peer is back, requests succeed again. Frames of
sessions that never start here (their requester gave up before reaching this node) are
dropped after ``2 x deadline_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from disco_fl.export import ShardNode, load_shard
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime import PeerError, run_node_async
from disco_fl.transport.base import TransportError
from disco_fl.transport.grpc_transport import (
    DEFAULT_MAX_FRAME_BYTES,
    GrpcTransport,
    HandshakeError,
    LinkShape,
)
from disco_fl.wire import WireError, decode_tensor, encode_tensor

log = logging.getLogger(__name__)

MD_TOKEN = "disco-token"
MAX_REQUEST_ID = 256


class BusyError(RuntimeError):
    """Too many requests in flight on this node."""


@dataclass
class ServeConfig:
    """How one node serves its shard.

    Parameters
    ----------
    plan : Path
        ``plan.json`` of an exported plan, or the directory holding it (with ``node_<k>.pt``).
    node : int
        This node's index; only ``node_<node>.pt`` is read.
    listen : str, default "127.0.0.1:0"
        Address to serve on (port 0 picks a free port).
    peers : sequence of str or None
        Every node's address, indexed by node (this node's own entry is ignored).
    token : str, default ""
        The household token (empty: none). Peers and inference callers must present it.
    server_credentials, channel_credentials : grpc credentials or None
        TLS (see :mod:`disco_fl.security`); ``None``: plaintext.
    deadline_s : float, default 5.0
        Deadline of one request on every node; a caller may ask for less, never more.
    max_inflight : int, default 8
        Requests served at once; more are refused with ``RESOURCE_EXHAUSTED``.
    max_batch : int, default 4096
        Largest batch accepted in one request.
    max_frame_bytes : int, default 64 MiB
        Largest message accepted or sent (peer frames and inference requests).
    connect_timeout_s : float, default 3.0
        Bound on one handshake with a peer.
    link_shape : LinkShape or None
        Emulated link for outgoing peer traffic (benchmarks).
    """

    plan: Path
    node: int
    listen: str = "127.0.0.1:0"
    peers: Sequence[str] | None = None
    token: str = ""
    server_credentials: grpc.ServerCredentials | None = None
    channel_credentials: grpc.ChannelCredentials | None = None
    deadline_s: float = 5.0
    max_inflight: int = 8
    max_batch: int = 4096
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    connect_timeout_s: float = 3.0
    link_shape: LinkShape | None = None

    def __post_init__(self) -> None:
        self.plan = Path(self.plan)
        if self.plan.is_dir():
            self.plan = self.plan / "plan.json"
        if not (self.deadline_s > 0 and self.deadline_s < 86400):
            raise ValueError(f"deadline_s must be in (0, 86400), got {self.deadline_s}")
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")


class NodeServer:
    """Node ``config.node`` of a household: its shard, its endpoint, its sessions."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.node: ShardNode = load_shard(config.plan, config.node)
        self.plan = self.node.plan
        self.index = config.node
        self.num_nodes = self.plan.num_nodes
        self.is_requester = self.index == self.plan.program.requester
        self._input_shape = list(self.plan.program.infos[self.plan.program.ops[0].name].shape)
        self._prefix = secrets.token_hex(3)  # session ids unique across restarts
        self._counter = 0
        self._lock = threading.Lock()
        self._active: set[str] = set()
        self._inflight = asyncio.Semaphore(config.max_inflight)  # requests (requester)
        self._slots = asyncio.Semaphore(config.max_inflight)  # sessions (other nodes)
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = {
            "requests_ok": 0,
            "requests_failed": 0,
            "sessions_ok": 0,
            "sessions_failed": 0,
            "sessions_expired": 0,
        }
        self.last_errors: list[str] = []
        servicer = InferenceServicer(self)
        self.transport = GrpcTransport(
            self.index,
            self.num_nodes,
            plan_hash=self.plan.hash,
            listen=config.listen,
            peers=config.peers,
            household_token=config.token,
            num_layers=len(self.plan.program.ops),
            max_frame_bytes=config.max_frame_bytes,
            connect_timeout=config.connect_timeout_s,
            server_credentials=config.server_credentials,
            channel_credentials=config.channel_credentials,
            services=[lambda s: peer_pb2_grpc.add_InferenceServicer_to_server(servicer, s)],
            max_extra_rpcs=config.max_inflight + 4,
            link_shape=config.link_shape,
        )
        if not self.is_requester:
            self.transport.on_session = self._start_session
        self._stop = threading.Event()
        self._sweeper = threading.Thread(
            target=self._sweep, name=f"disco-sweep-{self.index}", daemon=True
        )
        self._sweeper.start()

    @property
    def address(self) -> str:
        return self.transport.address

    # ---- peers ---------------------------------------------------------------------------
    def set_peers(self, addresses: Sequence[str]) -> None:
        self.transport.set_peers(addresses)

    def wait_for_peers(
        self, timeout: float = 60.0, progress: Callable[[str], None] | None = None
    ) -> None:
        """Connect to every peer, retrying until ``timeout`` s (raises ``TimeoutError``)."""
        deadline = time.monotonic() + timeout
        waiting = [d for d in range(self.num_nodes) if d != self.index]
        said: set[int] = set()
        while waiting:
            d = waiting[0]
            try:
                self.transport.connect([d])
                waiting.pop(0)
                if progress:
                    progress(f"node {self.index}: connected to peer {d}")
            except HandshakeError as e:
                if "refused" in str(e) and "did not answer" not in str(e):
                    raise  # a wrong plan, token or certificate does not get better by waiting
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"node {self.index}: peer {d} not reachable within {timeout:g} s: {e}"
                    ) from None
                if progress and d not in said:
                    progress(f"node {self.index}: waiting for peer {d} ...")
                    said.add(d)
                time.sleep(0.2)

    # ---- sessions ------------------------------------------------------------------------
    def _new_session_id(self) -> str:
        with self._lock:
            self._counter += 1
            return f"{self._prefix}-{self._counter}"

    def infer(
        self, x: torch.Tensor, deadline_s: float | None = None
    ) -> tuple[torch.Tensor, str, float]:
        """Run one request (requester only; from any thread but the transport's loop).

        Returns ``(output, session_id, ms)``. Raises ``TimeoutError``,
        :class:`~disco_fl.runtime.PeerError`, :class:`~disco_fl.transport.TransportError` or
        :class:`BusyError`.
        """
        return self.transport.run(self.infer_async(x, deadline_s))

    async def infer_async(
        self, x: torch.Tensor, deadline_s: float | None = None
    ) -> tuple[torch.Tensor, str, float]:
        """:meth:`infer` as a coroutine on the transport's event loop."""
        if not self.is_requester:
            raise RuntimeError(f"node {self.index} is not the requester")
        deadline = min(deadline_s or self.config.deadline_s, self.config.deadline_s)
        try:
            await asyncio.wait_for(self._inflight.acquire(), min(deadline, 0.5))
        except asyncio.TimeoutError:
            raise BusyError(
                f"node {self.index}: {self.config.max_inflight} requests already in flight"
            ) from None
        sid = self._new_session_id()
        t0 = time.perf_counter()
        try:
            with self._lock:
                self._active.add(sid)
            out = await run_node_async(
                self.node, self.transport, x, session_id=sid, timeout=deadline
            )
            if out is None:
                raise RuntimeError("the requester's run produced no output")
        except BaseException as e:
            self._failed("requests_failed", f"session {sid}: {type(e).__name__}: {e}")
            raise
        finally:
            with self._lock:
                self._active.discard(sid)
            self._inflight.release()
        with self._lock:
            self.stats["requests_ok"] += 1
        return out, sid, (time.perf_counter() - t0) * 1e3

    def _start_session(self, session_id: str, step: int) -> None:
        """A peer's INPUT frame opened a session here (called on the transport's loop)."""
        if self._stop.is_set():
            return
        with self._lock:
            if session_id in self._active:
                return
            self._active.add(session_id)
        task = self.transport.loop.create_task(self._serve_session(session_id, step))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_session(self, session_id: str, step: int) -> None:
        try:
            async with self._slots:
                await run_node_async(
                    self.node,
                    self.transport,
                    None,
                    session_id=session_id,
                    timeout=self.config.deadline_s,
                    step=step,
                )
            with self._lock:
                self.stats["sessions_ok"] += 1
        except Exception as e:
            self._failed("sessions_failed", f"session {session_id}: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._active.discard(session_id)

    def _failed(self, counter: str, msg: str) -> None:
        log.warning("node %d: %s", self.index, msg)
        with self._lock:
            self.stats[counter] += 1
            self.last_errors = [*self.last_errors[-19:], msg]

    def _sweep(self) -> None:
        """Drop frames of sessions that never started here (bounded memory)."""
        period = max(0.5, self.config.deadline_s / 2)
        while not self._stop.wait(period):
            with self._lock:
                keep = set(self._active)
            n = self.transport.mailbox.expire(2 * self.config.deadline_s, keep)
            if n:
                with self._lock:
                    self.stats["sessions_expired"] += n

    # ---- status and lifecycle ------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        t = self.transport
        with self._lock:
            stats = dict(self.stats)
            errors = list(self.last_errors)
            active = len(self._active)
        return {
            "node": self.index,
            "num_nodes": self.num_nodes,
            "requester": self.plan.program.requester,
            "plan_hash": self.plan.hash,
            "codec": self.plan.codec,
            "input_shape": self._input_shape[1:],
            "meta": self.plan.meta,
            "shard_param_bytes": self.node.param_bytes,
            "active_sessions": active,
            "stats": stats,
            "payload_bytes_sent": {
                f"{dst}/{layer}": b for (dst, layer), b in sorted(t.payload_bytes_sent().items())
            },
            "wire_bytes_sent": t.wire_bytes_sent,
            "framed_bytes_sent": t.framed_bytes_sent,
            "wire_bytes_received": t.wire_bytes_received,
            "frames_sent": t.frames_sent,
            "transport_errors": list(t.errors)[-20:],
            "last_errors": errors,
        }

    def reset_counters(self) -> None:
        self.transport.reset_counters()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving (idempotent): refuse new sessions, close the endpoint."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.transport.on_session = None
        self.transport.close(timeout)  # waiting sessions fail; the loop stops

    def __enter__(self) -> NodeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InferenceServicer(peer_pb2_grpc.InferenceServicer):
    """``disco.v1.Inference`` of one node: checks the caller, validates, runs the request."""

    def __init__(self, server: NodeServer) -> None:
        self.s = server

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        token = md.get(MD_TOKEN, "")
        if not hmac.compare_digest(token.encode(), self.s.config.token.encode()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong household token")

    async def Infer(  # type: ignore[override]
        self, request: peer_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.InferReply:
        await self._authorize(context)
        s = self.s
        if not s.is_requester:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {s.index} is not the requester; send requests to node "
                f"{s.plan.program.requester}",
            )
        if len(request.request_id) > MAX_REQUEST_ID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id too long")
        try:
            x = decode_tensor(request.input, max_bytes=s.config.max_frame_bytes)
        except WireError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad input tensor: {e}")
        want = s._input_shape[1:]
        if x.dim() != len(want) + 1 or list(x.shape[1:]) != want:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input of shape {list(x.shape)}; the plan expects [batch, "
                f"{', '.join(map(str, want))}]",
            )
        if not 1 <= x.shape[0] <= s.config.max_batch:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch of {x.shape[0]}; between 1 and {s.config.max_batch} accepted",
            )
        if not torch.isfinite(x).all():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input holds NaN or infinity")
        deadline = float(request.deadline_s) if request.deadline_s > 0 else None
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = min(deadline or remaining, remaining)
        try:
            out, sid, ms = await s.infer_async(x.float(), deadline)
        except BusyError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except TimeoutError as e:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except (PeerError, TransportError, WireError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except Exception as e:  # a bug in our own math: say so, keep serving
            log.exception("node %d: request failed", s.index)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        reply = peer_pb2.InferReply(session_id=sid, server_ms=ms)
        encode_tensor(out, "fp32", out=reply.output)
        return reply

    async def Status(  # type: ignore[override]
        self, request: peer_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.StatusReply:
        await self._authorize(context)
        return peer_pb2.StatusReply(json=json.dumps(self.s.status()))


def serve_forever(server: NodeServer, stop: threading.Event) -> None:
    """Block until ``stop`` is set, then stop the server."""
    with contextlib.suppress(KeyboardInterrupt):
        while not stop.wait(0.5):
            pass
    server.stop()
