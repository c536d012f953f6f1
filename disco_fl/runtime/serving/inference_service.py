"""The ``disco.v1.Inference`` service of one node: checks the caller, validates, runs.

:class:`InferenceServicer` answers ``Infer`` (the household token, then a strict check of the
request: requester node, id length, input tensor decoded without unpickling, its shape, batch
size and finiteness; uint8 image pixels only for a plan with an input normalization,
:mod:`disco_fl.core.pixels`) and ``Status``. It runs the request with its node server's
``infer_async`` and maps the failures to gRPC status codes: ``RESOURCE_EXHAUSTED`` (no room
here or at a peer), ``DEADLINE_EXCEEDED``, ``UNAVAILABLE`` (a peer failed), ``INTERNAL`` (a
bug in our own math; the node goes on serving).

A failed request frees its tensors at once: the error leaves the handler as a status
(``set_code``), never as an exception raised inside an ``except`` block, so no reference cycle
through gRPC's call state keeps the activations alive until the garbage collector runs.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any, Protocol

import grpc
import torch

from disco_fl.core.pixels import PIXEL_DTYPE, PixelError, pixel_problem
from disco_fl.core.wire import WireError, decode_tensor, encode_tensor
from disco_fl.partition.plan import Plan
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.inference import PeerBusyError, PeerError
from disco_fl.runtime.serving.serve_config import BusyError, ServeConfig
from disco_fl.runtime.transport.base import TransportError
from disco_fl.runtime.transport.grpc_transport import MD_TOKEN

log = logging.getLogger(__name__)

MD_SERVER_MS = "disco-server-ms"  # trailing metadata of a failed Infer: the node's own time
MAX_REQUEST_ID = 256


class InferenceHost(Protocol):
    """What the servicer needs of its node (a
    :class:`~disco_fl.runtime.serving.node_server.NodeServer`)."""

    config: ServeConfig
    plan: Plan
    index: int
    is_requester: bool
    _input_shape: list[int]

    async def infer_async(
        self,
        x: torch.Tensor,
        deadline_s: float | None = None,
        *,
        arrival: float | None = None,
        plan_hash: str = "",
    ) -> tuple[torch.Tensor, str, float, list[int]]: ...

    def status(self) -> dict[str, Any]: ...

    def served_plans(self) -> list[str]:
        """The hashes of the plans a request may name (``InferRequest.plan_hash``)."""
        ...

    def plan_of(self, session_id: str) -> str:
        """The hash of the plan that ran session ``session_id``."""
        ...


class InferenceServicer(peer_pb2_grpc.InferenceServicer):
    """``disco.v1.Inference`` of one node: checks the caller, validates, runs the request."""

    def __init__(self, server: InferenceHost) -> None:
        self.s = server

    def _token_ok(self, context: grpc.aio.ServicerContext) -> bool:
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        token = md.get(MD_TOKEN, "")
        return hmac.compare_digest(token.encode(), self.s.config.token.encode())

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self._token_ok(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong household token")

    async def Infer(  # type: ignore[override]
        self, request: peer_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.InferReply:
        arrival = time.monotonic()  # the request's deadline counts from here
        if not self._token_ok(context):
            code, message, reply = grpc.StatusCode.PERMISSION_DENIED, "wrong household token", None
        else:
            code, message, reply = await self._infer(request, context, arrival)
        if code is not None or reply is None:
            # a status, not an exception: context.abort() raises, and the exception's
            # traceback would hold this frame (the request) and, raised while handling the
            # failure, that failure's frames (the activations) in a reference cycle with the
            # call's state until the garbage collector ran
            context.set_code(code or grpc.StatusCode.INTERNAL)
            context.set_details(message)
            # the node's own time, arrival to answer (the caller's also has the transfers)
            ms = (time.monotonic() - arrival) * 1e3
            context.set_trailing_metadata(((MD_SERVER_MS, f"{ms:.1f}"),))
            return peer_pb2.InferReply()
        return reply

    async def _infer(
        self, request: peer_pb2.InferRequest, context: grpc.aio.ServicerContext, arrival: float
    ) -> tuple[grpc.StatusCode | None, str, peer_pb2.InferReply | None]:
        """Validate and run one request: ``(None, "", reply)`` or ``(code, message, None)``
        (errors are returned, never raised, and hold no traceback once returned)."""
        s = self.s
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if not s.is_requester:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {s.index} is not the requester; send requests to node "
                f"{s.plan.program.requester}",
                None,
            )
        if len(request.request_id) > MAX_REQUEST_ID:
            return invalid, "request_id too long", None
        if request.plan_hash and request.plan_hash not in s.served_plans():
            return invalid, f"plan {request.plan_hash[:64]!r} is not served here", None
        try:
            x = decode_tensor(request.input, max_bytes=s.config.max_frame_bytes, pixels=True)
        except WireError as e:
            return invalid, f"bad input tensor: {e}", None
        want = s._input_shape[1:]
        if x.dim() != len(want) + 1 or list(x.shape[1:]) != want:
            return (
                invalid,
                f"input of shape {list(x.shape)}; the plan expects [batch, "
                f"{', '.join(map(str, want))}]",
                None,
            )
        if not 1 <= x.shape[0] <= s.config.max_batch:
            return (
                invalid,
                f"batch of {x.shape[0]}; between 1 and {s.config.max_batch} accepted",
                None,
            )
        if x.dtype == PIXEL_DTYPE:  # sent to the peers as they are; every node normalizes
            why = pixel_problem(x, s._input_shape, s.plan.meta)
            if why is not None:
                return invalid, f"bad input pixels: {why}", None
        elif not torch.isfinite(x).all():
            return invalid, "input holds NaN or infinity", None
        deadline = float(request.deadline_s) if request.deadline_s > 0 else None
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = min(deadline or remaining, remaining)
        try:
            out, sid, ms, missing = await s.infer_async(
                x if x.dtype == PIXEL_DTYPE else x.float(),
                deadline,
                arrival=arrival,
                plan_hash=request.plan_hash,
            )
        except BusyError as e:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), None
        except PixelError as e:  # pixels that do not fit the plan a ladder chose
            return invalid, f"bad input pixels: {e}", None
        except TimeoutError as e:
            return grpc.StatusCode.DEADLINE_EXCEEDED, str(e), None
        except PeerBusyError as e:  # a peer has no room for the session
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), None
        except (PeerError, TransportError, WireError) as e:
            return grpc.StatusCode.UNAVAILABLE, str(e), None
        except Exception as e:  # a bug in our own math: say so, keep serving
            log.error("node %d: request failed: %s: %s", s.index, type(e).__name__, e)
            return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}", None
        del x
        reply = peer_pb2.InferReply(
            session_id=sid,
            server_ms=ms,
            degraded=bool(missing),
            missing_nodes=missing,
            plan_hash=s.plan_of(sid),
        )
        encode_tensor(out, "fp32", out=reply.output)
        return None, "", reply

    async def Status(  # type: ignore[override]
        self, request: peer_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.StatusReply:
        await self._authorize(context)
        return peer_pb2.StatusReply(json=json.dumps(self.s.status()))
