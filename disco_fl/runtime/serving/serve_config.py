"""How one node serves its shard: :class:`ServeConfig`, and the rules it sets.

The configuration of ``disco-fl serve`` (deadline, in-flight and queued sessions, batch and
chunk sizes, connection limits), the error of a node with no room for a request
(:class:`BusyError`), the deadline of a session on a node that is not the requester
(:func:`peer_session_timeout`), and when an idle node gives freed memory back to the system
(``IDLE_TRIM_S``, ``IDLE_KEEP_BYTES``; :func:`disco_fl.core.heap.release_free_memory`).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from disco_fl.runtime.transport.grpc_transport import (
    DEFAULT_MAX_FRAME_BYTES,
    LinkSchedule,
    LinkShape,
)

CHUNK_INPUT_BYTES = 1 << 20  # automatic chunk_batch: about this many input bytes per chunk
IDLE_TRIM_S = 0.5  # a node idle this long gives the C heap's free pages back to the system
# ... unless the heap holds at most this much free: the working set of a typical request is
# kept for the next one (refaulting it costs every request after an idle pause; see
# docs/serving.md), a burst's excess goes back
IDLE_KEEP_BYTES = 128 << 20


def peer_session_timeout(deadline_s: float) -> float:
    """The deadline of a session on a node that is not the requester: ``deadline_s`` less a
    margin (a fifth of it, at least 0.25 s, at most 1 s; never below half of it).

    A node that gives up waiting for a stalled peer tells the requester which node stalled
    (``stalled_node`` on its error frames); giving up this much earlier lets that report
    arrive before the requester's own deadline, so the caller hears which node stalled rather
    than which healthy node was waiting for it.
    """
    margin = min(1.0, max(0.25, deadline_s / 5))
    return max(deadline_s / 2, deadline_s - margin)


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
        Largest batch accepted in one request (larger ones are refused with
        ``INVALID_ARGUMENT``); on the other nodes, the largest batch of a session.
    chunk_batch : int, default 0
        A request of more inputs than this runs as consecutive sessions of at most this many
        (0: automatic, about ``CHUNK_INPUT_BYTES`` of fp32 input per chunk: 334 inputs of
        1x28x28), so that one op of one chunk bounds how far computing can overrun a
        deadline and how long other requests wait for the event loop.
    max_queued : int or None, default None
        Sessions (on the nodes that are not the requester) waiting for a slot beyond the
        ``max_inflight`` running; more are refused at once (``None``: ``max_inflight``).
    max_frame_bytes : int, default 64 MiB
        Largest message accepted or sent (peer frames and inference requests).
    connect_timeout_s : float, default 3.0
        Bound on one handshake with a peer.
    link_shape : LinkShape, LinkSchedule or None
        Emulated link for the peer traffic into this node (benchmarks); a schedule changes
        it at given times.
    max_connections : int, default 128
        Connections the node's server holds at once (peers, callers, and connections still
        in their TLS/HTTP/2 handshake); more are closed as they are accepted.
    overlap : bool, default True
        Mixing layers compute the part of the node's own channels while the peers' channels
        travel (:func:`disco_fl.node.drive`); ``False`` for comparisons.
    degraded_wait_s : float or None, default None
        Degraded mode: a peer that sends nothing for this long, is unreachable or fails is
        left out of the session (its channels count as closed) and the household still
        answers, saying which nodes were missing. ``None``: such a request fails.
    data_path : {"socket", "grpc"}, default "socket"
        How peer frames travel: one TCP connection per peer opened with a ticket from the gRPC
        handshake (half the time per hop of a gRPC stream;
        :mod:`disco_fl.runtime.transport.socket_path`; a second port, ``data_port``), or one
        gRPC ``Exchange`` stream per peer (one port per node). Every node of a household must
        use the same one.
    data_ssl : (ssl.SSLContext, ssl.SSLContext) or None
        With TLS and ``data_path="socket"``: the node's server and client contexts
        (:func:`disco_fl.security.data_ssl_contexts`).
    data_port : int, default 0
        With ``data_path="socket"``: the data listener's port on ``listen``'s host, for a
        firewall to open (0: a free port, told to peers in the handshake).
    degraded_retry_s : float, default 10.0
        Degraded mode, on the requester: for this long after a session found a node missing,
        the following sessions start without it (named in their INPUT frames: no wait for it,
        and the statistics for that missing set); then one session tries it again.
    busy_poll_s : float, default 0.0
        While a session waits for a peer's frame, the node's loop polls for up to this long
        before it sleeps (:mod:`disco_fl.runtime.transport.io_loop`): less latency on a device
        serving one node, at that much CPU per wait. 0: off.
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
    chunk_batch: int = 0
    max_queued: int | None = None
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    connect_timeout_s: float = 3.0
    link_shape: LinkShape | LinkSchedule | None = None
    max_connections: int = 128
    overlap: bool = True
    degraded_wait_s: float | None = None
    degraded_retry_s: float = 10.0
    data_path: str = "socket"
    data_ssl: tuple[ssl.SSLContext, ssl.SSLContext] | None = None
    busy_poll_s: float = 0.0
    data_port: int = 0

    def __post_init__(self) -> None:
        self.plan = Path(self.plan)
        if self.plan.is_dir():
            self.plan = self.plan / "plan.json"
        if not (self.deadline_s > 0 and self.deadline_s < 86400):
            raise ValueError(f"deadline_s must be in (0, 86400), got {self.deadline_s}")
        if self.degraded_wait_s is not None and not 0 < self.degraded_wait_s < self.deadline_s:
            raise ValueError(
                f"degraded_wait_s must be in (0, deadline_s={self.deadline_s}), got "
                f"{self.degraded_wait_s}"
            )
        if not 0 <= self.degraded_retry_s < 86400:
            raise ValueError(f"degraded_retry_s must be in [0, 86400), got {self.degraded_retry_s}")
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.chunk_batch < 0:
            raise ValueError(f"chunk_batch must be >= 0, got {self.chunk_batch}")
        if self.max_queued is None:
            self.max_queued = self.max_inflight
        if self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {self.max_queued}")
        if not 0 <= self.busy_poll_s <= 1:
            raise ValueError(f"busy_poll_s must be in [0, 1], got {self.busy_poll_s}")
        if not 0 <= self.data_port < 65536:
            raise ValueError(f"data_port must be in [0, 65535], got {self.data_port}")
        if self.data_port and self.data_path != "socket":
            raise ValueError("a data port is for the socket data path (--data-path socket)")
