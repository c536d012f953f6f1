"""One node of a household serving its shard: ``disco-fl serve``.

A :class:`NodeServer` loads *only* its own shard (``load_shard``), serves ``disco.v1.Peer`` (the
household) and ``disco.v1.Inference`` (callers), and runs one peer session per request:

- on the **requester** (node 0), ``Inference.Infer`` runs each request as a fresh session;
- on every other node, the requester's INPUT frame (at the input layer; others are refused:
  ``Transport.session_origin``) starts a session; ``max_inflight`` run at once, ``max_queued``
  more wait, beyond that one is refused at once (``RESOURCE_EXHAUSTED`` for all its nodes).

Everything runs on the transport's event loop: the gRPC services and the sessions
(:func:`~disco_fl.runtime.inference.run_node_async`), which compute on the loop's thread and
await their peers' frames without blocking it (no thread changes between gRPC and the
computation; sessions interleave at their waits).

Requests in flight at once (``max_inflight``) are kept apart by session id. Each has a deadline
(``deadline_s``, default 5 s, from its ``Infer`` call or, elsewhere, its INPUT frame) bounding
the wait for a slot, for peers and the computing alike (checked between ops): a dead or stalled
peer or a request too large for it fails the request clearly (``DEADLINE_EXCEEDED`` or
``UNAVAILABLE``) while the node serves on, and requests succeed again once the peer is back.
Larger than ``chunk_batch``: consecutive sessions of at most that many inputs (one op of one
chunk is the most a deadline can be overrun by); larger than ``max_batch``: refused. Frames of
sessions that never start here are dropped after ``2 x deadline_s``; a session still running
then is cancelled.

A failed request frees its tensors at once: the error leaves the handler as a status
(``set_code``), not raised in an ``except`` block, and the program's frames are cleared from its
traceback (:func:`~disco_fl.runtime.inference.run_node_async`): no cycle keeps them alive.

Here: :class:`NodeServer` (admission, queue, sweeper); configuration in
:mod:`~disco_fl.runtime.serving.serve_config`, ``Inference`` in :mod:`.inference_service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from disco_fl.core.heap import free_heap_bytes, release_free_memory
from disco_fl.emulation.export import ExportedShard, load_shard
from disco_fl.proto_gen.disco.v1 import peer_pb2_grpc
from disco_fl.runtime.inference import BUSY_TAG, refuse_session, run_node_async
from disco_fl.runtime.serving.inference_service import InferenceHost, InferenceServicer
from disco_fl.runtime.serving.missing import MissingNodes
from disco_fl.runtime.serving.serve_config import (
    CHUNK_INPUT_BYTES,
    IDLE_KEEP_BYTES,
    IDLE_TRIM_S,
    BusyError,
    ServeConfig,
    peer_session_timeout,
)
from disco_fl.runtime.transport.grpc_transport import (
    GrpcTransport,
    HandshakeError,
    TransportError,
)

__all__ = [
    "BusyError",
    "InferenceServicer",
    "NodeServer",
    "ServeConfig",
    "peer_session_timeout",
]

log = logging.getLogger(__name__)


class NodeServer:
    """Node ``config.node`` of a household: its shard, its endpoint, its sessions."""

    def __init__(self, config: ServeConfig, inference_host: InferenceHost | None = None) -> None:
        self.config = config
        self.node: ExportedShard = load_shard(config.plan, config.node)
        self.plan = self.node.plan
        self.plan_hash = self.plan.hash  # once: hashing the plan's JSON takes a millisecond
        self.index = config.node
        self.num_nodes = self.plan.num_nodes
        self.is_requester = self.index == self.plan.program.requester
        self._input_shape = list(self.plan.program.infos[self.plan.program.ops[0].name].shape)
        per_input = 4 * math.prod(self._input_shape[1:])  # fp32 bytes of one input
        self.chunk_batch = config.chunk_batch or max(1, CHUNK_INPUT_BYTES // max(1, per_input))
        input_layer = next(
            (i for i, op in enumerate(self.plan.program.ops) if op.kind == "input"), 0
        )
        self._prefix = secrets.token_hex(3)  # session ids unique across restarts
        self._counter = 0
        self._lock = threading.Lock()
        self._active: set[str] = set()  # sessions running here (requests' and peers')
        self._starts = 0  # sessions started so far (an idle node trims if none started since)
        self._peak = 0  # most sessions at once since the node was last idle
        self._lone_free = 0  # free heap bytes the last session that ran alone left behind
        self._inflight = asyncio.Semaphore(config.max_inflight)  # requests (requester)
        self._slots = asyncio.Semaphore(config.max_inflight)  # sessions (other nodes)
        # sessions of the other nodes, running or queued: id -> (arrival, task)
        self._sessions: dict[str, tuple[float, asyncio.Task[None]]] = {}
        self.stats: dict[str, int] = {
            "requests_ok": 0,
            "requests_failed": 0,
            "sessions_ok": 0,
            "sessions_failed": 0,
            "sessions_refused": 0,
            "sessions_expired": 0,
        }
        self.last_errors: list[str] = []
        # a plan ladder's requester answers Infer for all its plans (ladder_server)
        servicer = InferenceServicer(inference_host or self)
        self.transport = GrpcTransport(
            self.index,
            self.num_nodes,
            plan_hash=self.plan_hash,
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
            max_connections=config.max_connections,
            data_path=config.data_path,
            data_ssl=config.data_ssl,
            data_listen_port=config.data_port,
            busy_poll_s=config.busy_poll_s,
        )
        # requester, degraded mode: the nodes its sessions start without (--degraded-retry)
        self._missing = (
            MissingNodes(
                config.degraded_retry_s,
                lambda k: self.transport.reconnect(k, config.connect_timeout_s),
            )
            if config.degraded_wait_s is not None and self.is_requester
            else None
        )
        # only the requester's INPUT frames, at the input layer, exist (and open sessions)
        self.transport.session_origin = (self.plan.program.requester, input_layer)
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
            except TransportError as e:
                # a peer found unreachable moments ago is answered from the transport's retry
                # window with a plain TransportError: not up yet, like a failed handshake
                refused = "refused" in str(e) and "did not answer" not in str(e)
                if isinstance(e, HandshakeError) and refused:
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
    ) -> tuple[torch.Tensor, str, float, list[int]]:
        """Run one request (requester only; from any thread but the transport's loop).

        Returns ``(output, session_id, ms, missing)``; ``missing`` lists the nodes left out
        in degraded mode (:attr:`ServeConfig.degraded_wait_s`). Raises ``TimeoutError``,
        :class:`~disco_fl.runtime.inference.PeerError`,
        :class:`~disco_fl.runtime.transport.TransportError` or
        :class:`BusyError`.
        """
        return self.transport.run(self.infer_async(x, deadline_s))

    async def infer_async(
        self,
        x: torch.Tensor,
        deadline_s: float | None = None,
        *,
        arrival: float | None = None,
        plan_hash: str = "",
    ) -> tuple[torch.Tensor, str, float, list[int]]:
        """:meth:`infer` as a coroutine on the transport's event loop (``plan_hash``: empty or
        this node's plan).

        The deadline (``deadline_s``, at most the node's) counts from ``arrival``
        (``time.monotonic()`` when the request arrived; default: now). A batch larger than
        :attr:`chunk_batch` runs as consecutive sessions (ids ``<id>``, ``<id>.1``, ...)."""
        if not self.is_requester:
            raise RuntimeError(f"node {self.index} is not the requester")
        if plan_hash not in ("", self.plan_hash):
            raise ValueError(f"plan {plan_hash[:12]!r} is not served here")
        cfg = self.config
        budget = min(deadline_s or cfg.deadline_s, cfg.deadline_s)
        deadline = (time.monotonic() if arrival is None else arrival) + budget
        n = int(x.shape[0]) if x.dim() else 0
        if not 1 <= n <= cfg.max_batch:
            raise ValueError(f"batch of {n}; between 1 and {cfg.max_batch} accepted")
        if self._inflight.locked():
            try:
                wait = min(deadline - time.monotonic(), 0.5)
                await asyncio.wait_for(self._inflight.acquire(), max(0.0, wait))
            except asyncio.TimeoutError:
                raise BusyError(
                    f"node {self.index}: {cfg.max_inflight} requests already in flight"
                ) from None
        else:
            await self._inflight.acquire()
        sid = self._new_session_id()
        t0 = time.perf_counter()
        parts = x.split(self.chunk_batch) if n > self.chunk_batch else (x,)
        outs: list[torch.Tensor] = []
        missing = await self._missing.start() if self._missing else set()
        try:
            for i, part in enumerate(parts):
                part_sid = sid if i == 0 else f"{sid}.{i}"
                left = deadline - time.monotonic()
                if left <= 0:  # between chunks: the deadline counts computation too
                    done = sum(int(o.shape[0]) for o in outs)
                    raise TimeoutError(
                        f"node {self.index}: the deadline of {budget:g} s passed after "
                        f"{done} of {n} inputs (request {sid!r})"
                    )
                with self._lock:
                    self._enter(part_sid)
                try:
                    out = await run_node_async(
                        self.node,
                        self.transport,
                        part,
                        session_id=part_sid,
                        timeout=left,
                        overlap=self.config.overlap,
                        degraded_wait=self.config.degraded_wait_s,
                        missing=missing,
                    )
                finally:
                    self._leave(part_sid)
                if out is None:
                    raise RuntimeError("the requester's run produced no output")
                outs.append(out)
            result = outs[0] if len(outs) == 1 else torch.cat(outs)
        except BaseException as e:
            self._failed("requests_failed", f"session {sid}: {type(e).__name__}: {e}")
            raise
        finally:
            outs.clear()
            self._inflight.release()
        if self._missing:
            self._missing.found(missing)
        with self._lock:
            self.stats["requests_ok"] += 1
            if missing:
                self.stats["requests_degraded"] = self.stats.get("requests_degraded", 0) + 1
        if missing:
            log.warning("node %d: request %s answered without nodes %s", self.index, sid,
                        sorted(missing))  # fmt: skip
        return result, sid, (time.perf_counter() - t0) * 1e3, sorted(missing)

    def _start_session(
        self, session_id: str, step: int, batch: int = 0, missing: tuple[int, ...] = ()
    ) -> None:
        """The requester's INPUT frame opened a session here (called on the transport's
        loop): start it (it waits for a slot if ``max_inflight`` run), or refuse it when
        ``max_inflight + max_queued`` sessions are already here or its batch is too large."""
        if self._stop.is_set():
            return
        cfg = self.config
        arrival = time.monotonic()  # the session's deadline counts from here
        why = None
        with self._lock:
            if session_id in self._active:
                return
            room = cfg.max_inflight + (cfg.max_queued or 0)
            if batch > cfg.max_batch:
                why = f"batch of {batch} refused; at most {cfg.max_batch} accepted"
            elif len(self._sessions) >= room:
                why = (
                    f"{BUSY_TAG} {len(self._sessions)} sessions running or queued here "
                    f"(max_inflight {cfg.max_inflight} + max_queued {cfg.max_queued}); "
                    f"session refused"
                )
            else:
                self._enter(session_id)
                task = self.transport.loop.create_task(
                    self._serve_session(session_id, step, arrival, set(missing))
                )
                self._sessions[session_id] = (arrival, task)
        if why is not None:
            self._failed("sessions_refused", f"session {session_id}: {why}")
            self.transport.end_session(session_id)  # drops its INPUT frame
            refuse_session(self.node, self.transport, session_id, step, why)

    async def _serve_session(
        self, session_id: str, step: int, arrival: float, missing: set[int]
    ) -> None:
        budget = peer_session_timeout(self.config.deadline_s)
        deadline = arrival + budget
        started = False
        try:
            if self._slots.locked():  # queued: the wait counts against the deadline
                try:
                    left = max(0.0, deadline - time.monotonic())
                    await asyncio.wait_for(self._slots.acquire(), left)
                except asyncio.TimeoutError:
                    raise TimeoutError(
                        f"node {self.index}: {BUSY_TAG} session {session_id!r} waited its "
                        f"deadline of {budget:g} s for one of {self.config.max_inflight} slots"
                    ) from None
            else:
                await self._slots.acquire()
            try:
                started = True
                if self.config.degraded_wait_s is not None:  # the requester counts on them
                    for j in sorted(self.transport.mailbox.down() - missing):
                        await self.transport.reconnect(j, self.config.connect_timeout_s)
                await run_node_async(
                    self.node,
                    self.transport,
                    None,
                    session_id=session_id,
                    timeout=max(0.0, deadline - time.monotonic()),
                    step=step,
                    overlap=self.config.overlap,
                    degraded_wait=self.config.degraded_wait_s,
                    missing=missing,
                )
            finally:
                self._slots.release()
            with self._lock:
                self.stats["sessions_ok"] += 1
        except asyncio.CancelledError:
            self._failed("sessions_expired", f"session {session_id}: cancelled")
            raise
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
            self._failed("sessions_failed", f"session {session_id}: {why}")
            if not started:  # its peers wait for it: tell them (run_node_async does if run)
                self.transport.end_session(session_id)
                refuse_session(self.node, self.transport, session_id, step, why)
        finally:
            with self._lock:
                self._sessions.pop(session_id, None)
            self._leave(session_id)

    def _enter(self, session_id: str) -> None:
        """A session starts here (under ``_lock``)."""
        self._active.add(session_id)
        self._starts += 1
        self._peak = max(self._peak, len(self._active))

    def _leave(self, session_id: str) -> None:
        """A session ended here (on the loop). After ``IDLE_TRIM_S`` idle, freed memory beyond
        what a lone request left free (+25 %, at least ``IDLE_KEEP_BYTES``) goes back to the
        system: no peak RSS after a burst, no page faults for the next request
        (:mod:`disco_fl.core.heap`)."""
        with self._lock:
            self._active.discard(session_id)
            idle = not self._active
            mark = self._starts
            lone = idle and self._peak == 1
            if idle:
                self._peak = 0
        if lone:
            self._lone_free = free_heap_bytes() or 0
        if idle and not self._stop.is_set():
            with contextlib.suppress(RuntimeError):  # the loop has stopped
                self.transport.loop.call_later(IDLE_TRIM_S, self._trim_if_idle, mark)

    def _trim_if_idle(self, mark: int) -> None:
        with self._lock:
            if self._active or self._starts != mark:
                return  # a session started since: it is not idle time
            keep = max(IDLE_KEEP_BYTES, self._lone_free + self._lone_free // 4)
        release_free_memory(keep)

    def _failed(self, counter: str, msg: str) -> None:
        log.warning("node %d: %s", self.index, msg)
        with self._lock:
            self.stats[counter] += 1
            self.last_errors = [*self.last_errors[-19:], msg]

    def _sweep(self) -> None:
        """Drop frames of sessions that never started here, and cancel sessions here that
        outlived twice the deadline (their own deadline ends them first; this is the
        backstop), so that memory stays bounded."""
        period = max(0.5, self.config.deadline_s / 2)
        limit = 2 * self.config.deadline_s
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                keep = set(self._active)
                stuck = [task for t0, task in self._sessions.values() if now - t0 > limit]
            for task in stuck:
                with contextlib.suppress(RuntimeError):  # the loop has stopped
                    self.transport.loop.call_soon_threadsafe(task.cancel)
            n = self.transport.mailbox.expire(limit, keep)
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
            "plan_hash": self.plan_hash,
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

    def plan_of(self, session_id: str) -> str:
        return self.plan_hash

    def served_plans(self) -> list[str]:
        return [self.plan_hash]

    @property
    def session_prefix(self) -> str:
        """What this server's session ids start with (``<prefix>-<n>``)."""
        return self._prefix

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
