"""The control side of a training step: frames with abort handling, aborts, the commit.

:class:`StepIO` sends and receives the frames of one step on one node. A node waiting for a
frame also learns of a peer's abort (and then fails naming the node where the failure
started); :meth:`StepIO.broadcast_abort` tells every peer once. :func:`commit` is the vote:
every node sends a vote to the step's owner, the owner answers every node once it holds every
vote, and only then does a node apply the step.
"""

from __future__ import annotations

import contextlib
import re
import time

import torch

from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.training.errors import PeerFailure
from disco_fl.transport.base import MAX_ERROR_TEXT, PeerDownError, Transport
from disco_fl.wire import CODECS, encode_tensor

Frame = peer_pb2.Frame
POLL_S = 0.05  # how often a waiting node looks for peers' abort frames
ABORT_GRACE_S = 1.0  # after the deadline, how long a node still listens for peers' aborts
_ABORT_RE = re.compile(r"\[failed node (\d+)\] (.*)", re.DOTALL)


class StepIO:
    """Frames of one step: sending, receiving with abort polling, abort broadcast."""

    def __init__(
        self, transport: Transport, sid: str, step: int, deadline: float, timeout: float
    ) -> None:
        self.transport = transport
        self.k = transport.index
        self.n = transport.num_nodes
        self.timeout = timeout
        self.sid = sid
        self.sel_sid = sid + "/sel"
        self.norms_sid = sid + "/norms"
        self.commit_sid = sid + "/commit"
        self.abort_sid = sid + "/abort"
        self.step = step
        self.deadline = deadline
        self.abort_sent = False

    def send(
        self,
        session: str,
        layer: int,
        dest: int,
        t: torch.Tensor,
        direction: int,
        *,
        codec: str = "fp32",
    ) -> None:
        frame = Frame(
            session_id=session,
            step=self.step,
            layer=layer,
            direction=direction,  # type: ignore[arg-type]
            src=self.k,
            dst=dest,
        )
        encode_tensor(t.detach(), codec, out=frame.tensor)
        try:
            self.transport.send(frame)
        except Exception as e:
            if self.transport.closed:  # this node's own transport is gone
                raise
            raise PeerFailure(
                dest, f"cannot send to node {dest} (layer {layer}): {type(e).__name__}: {e}"
            ) from e

    def recv(
        self,
        session: str,
        layer: int,
        src: int,
        *,
        direction: int,
        codec: str,
        backward: bool = False,
    ) -> peer_pb2.Frame:
        tr = self.transport
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                why = (
                    f"TimeoutError: no {'gradient' if backward else 'message'} from node {src} "
                    f"for layer {layer} within the step deadline of {self.timeout:g} s"
                )
                # tell the peers at once, then listen a little: ``src`` may itself be waiting
                # for the node that really failed, and its abort names that node
                self.broadcast_abort(src, why)
                end = time.monotonic() + ABORT_GRACE_S
                while time.monotonic() < end:
                    self.check_abort(ignore_root=self.k)
                    time.sleep(POLL_S)
                raise PeerFailure(src, why)
            try:
                f = tr.recv(
                    session, layer, src, min(POLL_S, left), step=self.step, backward=backward
                )
            except TimeoutError:
                self.check_abort()
                continue
            except PeerDownError as e:
                raise PeerFailure(src, f"node {src} is unreachable: {e}") from e
            if f.error:
                raise PeerFailure(src, f.error)
            if f.direction != direction or f.tensor.codec != CODECS[codec]:
                raise PeerFailure(
                    src,
                    f"layer {layer}: frame direction {f.direction} / codec {f.tensor.codec}, "
                    f"expected {direction} / {CODECS[codec]}",
                )
            return f

    def check_abort(self, ignore_root: int | None = None) -> None:
        """Raise :class:`PeerFailure` if a peer's abort frame arrived (except one naming
        ``ignore_root`` as the failed node)."""
        for j in range(self.n):
            if j == self.k:
                continue
            try:
                f = self.transport.recv(self.abort_sid, 0, j, 0.0, step=self.step)
            except TimeoutError:
                continue
            except PeerDownError as e:
                raise PeerFailure(j, f"node {j} is unreachable: {e}") from e
            m = _ABORT_RE.fullmatch(f.error)
            root = j
            cause = f.error or f"node {j} aborted the step"
            if m is not None and 0 <= int(m.group(1)) < self.n:
                root, cause = int(m.group(1)), m.group(2)
            if root != ignore_root:
                raise PeerFailure(root, cause)

    def broadcast_abort(self, root: int, cause: str) -> None:
        """Tell every peer (best effort, once) that the step failed, starting at ``root``."""
        if self.abort_sent:
            return
        self.abort_sent = True
        text = f"[failed node {root}] {cause}"[:MAX_ERROR_TEXT]
        for j in range(self.n):
            if j == self.k:
                continue
            frame = Frame(
                session_id=self.abort_sid,
                step=self.step,
                layer=0,
                direction=Frame.NORMS,
                src=self.k,
                dst=j,
                error=text,
            )
            # best effort: the peer may be gone or this transport closed
            with contextlib.suppress(Exception):
                self.transport.send(frame)

    def exchange_norms(self, local: torch.Tensor) -> dict[int, peer_pb2.Tensor]:
        """Send ``local`` (fp32) to every peer; each peer's message, not yet decoded."""
        peers = [j for j in range(self.n) if j != self.k]
        for j in peers:
            self.send(self.norms_sid, 0, j, local, Frame.NORMS)
        out: dict[int, peer_pb2.Tensor] = {}
        for j in peers:
            out[j] = self.recv(self.norms_sid, 0, j, direction=Frame.NORMS, codec="fp32").tensor
        return out

    def end(self) -> None:
        for s in (self.sid, self.sel_sid, self.norms_sid, self.commit_sid, self.abort_sid):
            with contextlib.suppress(Exception):  # a closed transport has nothing to drop
                self.transport.end_session(s)


def commit(io_: StepIO, owner: int) -> None:
    one = torch.ones(1)
    peers = [j for j in range(io_.n) if j != io_.k]
    if io_.k == owner:
        for j in peers:
            io_.recv(io_.commit_sid, 0, j, direction=Frame.NORMS, codec="fp32")
        for j in peers:
            io_.send(io_.commit_sid, 1, j, one, Frame.NORMS)
    else:
        io_.send(io_.commit_sid, 0, owner, one, Frame.NORMS)
        io_.recv(io_.commit_sid, 1, owner, direction=Frame.NORMS, codec="fp32")
