"""N connected transports in one process (tests, and running nodes as threads).

Frames cross as bytes (``SerializeToString`` / ``FromString``), so the wire format and the
receiver's validation are exercised exactly as over the network. Delivery is synchronous: a
frame the receiver refuses makes ``send`` raise
:class:`~disco_fl.runtime.transport.base.TransportError`.
"""

from __future__ import annotations

from collections.abc import Iterator

from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.transport.base import DEFAULT_MAX_PENDING_BYTES, Transport, TransportError


class InProcessTransport(Transport):
    def __init__(
        self,
        hub: InProcessHub,
        index: int,
        *,
        num_layers: int | None = None,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        super().__init__(
            index, hub.num_nodes, num_layers=num_layers, max_pending_bytes=max_pending_bytes
        )
        self._hub = hub

    def _transmit(self, frame: peer_pb2.Frame, size: int) -> None:
        data = frame.SerializeToString()
        peer = self._hub[frame.dst]
        if peer.closed:
            raise TransportError(f"node {self.index}: peer {frame.dst} is closed")
        try:
            incoming = peer_pb2.Frame.FromString(data)
        except Exception as e:  # protobuf's DecodeError
            raise TransportError(f"node {frame.dst} cannot parse a frame: {e}") from e
        reason = peer._accept(incoming, len(data))
        if reason is not None:
            self.errors.append(f"node {frame.dst} refused a frame: {reason}")
            raise TransportError(f"node {frame.dst} refused a frame from {self.index}: {reason}")


class InProcessHub:
    """``num_nodes`` transports connected to each other; ``hub[k]`` is node ``k``'s."""

    def __init__(
        self,
        num_nodes: int,
        *,
        num_layers: int | None = None,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.num_nodes = num_nodes
        self._transports: list[InProcessTransport] = []
        for k in range(num_nodes):
            self._transports.append(
                InProcessTransport(
                    self, k, num_layers=num_layers, max_pending_bytes=max_pending_bytes
                )
            )

    def __getitem__(self, k: int) -> InProcessTransport:
        return self._transports[k]

    def __len__(self) -> int:
        return self.num_nodes

    def __iter__(self) -> Iterator[InProcessTransport]:
        return iter(self._transports)

    def close(self) -> None:
        for t in self._transports:
            t.close()

    def __enter__(self) -> InProcessHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
