"""The caller's side of collaborative inference: :class:`InferenceSession`.

An :class:`InferenceSession` connects to the household's requester node (node 0 of the plan)
and sends batches of model inputs; the household computes them together and the requester
answers with the outputs. Several batches may be in flight at once (``max_inflight``); the
nodes keep them apart by session id.

>>> with InferenceSession("127.0.0.1:7000", token="...") as s:   # doctest: +SKIP
...     logits = s.infer(x)                     # one batch (B, C, H, W) -> (B, classes)
...     logits = s.infer_many(x, batch_size=64)  # any number of inputs, batched
...     logits = s.infer(pixels)                # uint8 (B, C, H, W): the nodes normalize

A uint8 batch (raw image pixels ``[N, C, H, W]``) is sent as it is, 1 byte per pixel, for a
plan whose ``meta["input"]`` has a mean and std; every node turns it into the model input
(:func:`disco_fl.core.pixels.model_input`), exactly as the float input ``(x / 255 - mean) /
std`` would be. Any other dtype is sent as fp32.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import grpc
import torch

from disco_fl.core.codecs import PIXELS
from disco_fl.core.pixels import PIXEL_DTYPE
from disco_fl.core.wire import WireError, decode_tensor, encode_tensor
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.transport.grpc_transport import DEFAULT_MAX_FRAME_BYTES, MD_TOKEN


class InferenceError(RuntimeError):
    """A request failed; ``code`` is the gRPC status (e.g. ``DEADLINE_EXCEEDED``)."""

    def __init__(self, code: grpc.StatusCode | None, message: str) -> None:
        super().__init__(f"{code.name if code else 'ERROR'}: {message}")
        self.code = code
        self.message = message


def _error(e: grpc.RpcError) -> InferenceError:
    if isinstance(e, grpc.Call):
        return InferenceError(e.code(), e.details() or "")
    return InferenceError(None, str(e))


class InferenceSession:
    """A connection to the requester node of a household.

    Parameters
    ----------
    address : str
        ``host:port`` of the requester node (node 0).
    token : str, default ""
        The household token.
    channel_credentials : grpc.ChannelCredentials or None
        TLS with a client certificate (see :mod:`disco_fl.security`); ``None``: plaintext.
    timeout : float, default 30.0
        Client-side bound on one call in seconds (the node's own deadline is usually shorter).
    max_message_bytes : int, default 64 MiB
        Largest request or reply.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str = "",
        channel_credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        opts = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self.address = address
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._md = [(MD_TOKEN, token)]
        self._channel = (
            grpc.secure_channel(address, channel_credentials, options=opts)
            if channel_credentials is not None
            else grpc.insecure_channel(address, options=opts)
        )
        self._stub = peer_pb2_grpc.InferenceStub(self._channel)
        self._counter = 0
        # the requester node's own time for the last ``infer`` (input there -> output there),
        # in ms, as the node reports it: the request's latency without this call's own hop
        self.last_server_ms: float | None = None
        # degraded mode: the nodes the household answered the last ``infer`` / ``infer_many``
        # without (their channels counted as closed); empty when every node took part
        self.last_missing: tuple[int, ...] = ()
        self.last_plan_hash = ""  # the plan that computed the last reply

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The node's status: plan hash, input shape, ``meta``, counters."""
        try:
            reply = self._stub.Status(
                peer_pb2.StatusRequest(),
                metadata=self._md,
                timeout=timeout or self.timeout,
                wait_for_ready=True,
            )
        except grpc.RpcError as e:
            raise _error(e) from None
        result: dict[str, Any] = json.loads(reply.json)
        return result

    def _request(
        self, x: torch.Tensor, deadline_s: float | None, plan_hash: str = ""
    ) -> peer_pb2.InferRequest:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
            raise ValueError("x must be a tensor with a batch dimension of at least 1")
        self._counter += 1
        req = peer_pb2.InferRequest(
            request_id=str(self._counter), deadline_s=deadline_s or 0.0, plan_hash=plan_hash
        )
        if x.dtype == PIXEL_DTYPE:  # image pixels, exact: the nodes normalize them
            encode_tensor(x.detach().contiguous(), PIXELS.name, out=req.input)
        else:
            encode_tensor(x.detach().float().contiguous(), "fp32", out=req.input)
        return req

    def _decode(self, reply: peer_pb2.InferReply) -> torch.Tensor:
        try:
            return decode_tensor(reply.output, max_bytes=self.max_message_bytes)
        except WireError as e:
            raise InferenceError(None, f"malformed reply: {e}") from None

    def infer(
        self, x: torch.Tensor, *, deadline_s: float | None = None, plan_hash: str = ""
    ) -> torch.Tensor:
        """Outputs for one batch ``x`` (batch first; float, or uint8 image pixels ``[N, C, H,
        W]``); ``plan_hash``: run on that plan of the node's plan ladder (default: the node's
        choice). Raises :class:`InferenceError`."""
        try:
            reply = self._stub.Infer(
                self._request(x, deadline_s, plan_hash), metadata=self._md, timeout=self.timeout
            )
        except grpc.RpcError as e:
            raise _error(e) from None
        self.last_server_ms = float(reply.server_ms)
        self.last_missing = tuple(sorted(reply.missing_nodes))
        self.last_plan_hash = str(reply.plan_hash)
        return self._decode(reply)

    def infer_many(
        self,
        x: torch.Tensor,
        *,
        batch_size: int = 64,
        max_inflight: int = 4,
        deadline_s: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Outputs for all of ``x``, sent in batches of ``batch_size``, ``max_inflight`` at once.

        ``progress(done, total)`` is called after each batch. Raises :class:`InferenceError`
        on the first failed batch (the others still in flight are cancelled).
        """
        if batch_size < 1 or max_inflight < 1:
            raise ValueError("batch_size and max_inflight must be >= 1")
        n = int(x.shape[0])
        starts = list(range(0, n, batch_size))
        results: dict[int, torch.Tensor] = {}
        missing: set[int] = set()
        pending: dict[int, Any] = {}
        nxt = 0
        try:
            while len(results) < len(starts):
                while nxt < len(starts) and len(pending) < max_inflight:
                    b = starts[nxt]
                    pending[nxt] = self._stub.Infer.future(
                        self._request(x[b : b + batch_size], deadline_s),
                        metadata=self._md,
                        timeout=self.timeout,
                    )
                    nxt += 1
                i = min(pending)  # in order: the oldest first
                try:
                    reply = pending.pop(i).result()
                except grpc.RpcError as e:
                    raise _error(e) from None
                results[i] = self._decode(reply)
                missing.update(reply.missing_nodes)
                if progress:
                    progress(min(n, starts[i] + batch_size), n)
        finally:
            for f in pending.values():
                f.cancel()
            self.last_missing = tuple(sorted(missing))
        return torch.cat([results[i] for i in range(len(starts))])

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the node answers ``Status`` (returns it)."""
        t_end = time.monotonic() + timeout
        while True:
            try:
                return self.status(timeout=max(0.1, min(2.0, t_end - time.monotonic())))
            except InferenceError:
                if time.monotonic() >= t_end:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
