"""The control side of a training step: frames with pushed aborts, the commit vote.

:class:`StepIO` sends and receives the frames of one step on one node, all in one session
(``<run>/g<generation>/s<step>``); the parts of a step are typed sub-channels of it
(``Frame.sub_channel``): DATA (activations, statistics, gradients), SELECTION (stochastic
gates: which channels an exchange message carries, a ``ChannelSelection``), NORMS (DP's
per-sample norms), COMMIT (``Vote`` messages), ABORT (``Abort`` messages) and MEMBERSHIP
(degraded training's ``MissingSet`` messages, :mod:`disco_fl.runtime.training.degraded`).
Control messages are typed protobuf (``disco.v1.Control``), checked on arrival
(:func:`~disco_fl.core.wire.check_control`).

**Aborts are pushed.** A node waiting for a frame waits, in one wait, for that frame and for an
abort from any peer (:meth:`~disco_fl.runtime.transport.base.Transport.recv_first`): an abort wakes
it the moment it arrives, and it fails naming the node the abort names (``failed_node``, a typed
field). :meth:`StepIO.broadcast_abort` tells every peer, once.

:func:`commit` is the vote: every node sends a vote to the step's owner (layer 0), the owner
answers every node once it holds every vote (layer 1), and only then does a node apply the
step.
"""

from __future__ import annotations

import contextlib
import time

import torch

from disco_fl.core.wire import (
    WireError,
    abort_message,
    codec_enum,
    decode_selection,
    encode_tensor,
    frame_kind_problem,
    selection_message,
    vote_message,
)
from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.training.errors import PeerFailure
from disco_fl.runtime.transport.base import FrameKey, PeerDownError, Transport

Frame = peer_pb2.Frame
ABORT_GRACE_S = 1.0  # after the deadline, how long a node still listens for peers' aborts
DATA = Frame.SUB_CHANNEL_DATA
SELECTION = Frame.SUB_CHANNEL_SELECTION
NORMS = Frame.SUB_CHANNEL_NORMS
COMMIT = Frame.SUB_CHANNEL_COMMIT
ABORT = Frame.SUB_CHANNEL_ABORT
MEMBERSHIP = Frame.SUB_CHANNEL_MEMBERSHIP


class StepIO:
    """Frames of one step on one node: sending, receiving (woken by peers' aborts), aborts."""

    def __init__(
        self,
        transport: Transport,
        sid: str,
        step: int,
        deadline: float,
        timeout: float,
        absent: frozenset[int] = frozenset(),
    ) -> None:
        """``absent``: nodes gone for the rest of the round (degraded training): no frame,
        vote or abort goes to them or is awaited from them."""
        self.transport = transport
        self.k = transport.index
        self.n = transport.num_nodes
        self.timeout = timeout
        self.sid = sid
        self.step = step
        self.deadline = deadline
        self.abort_sent = False
        self.peers = [j for j in range(self.n) if j != self.k and j not in absent]
        # every peer's abort frame: waited for together with every frame this node awaits
        self._aborts: list[FrameKey] = [(sid, step, 0, j, False, ABORT) for j in self.peers]

    # ---- sending ---------------------------------------------------------------------------
    def _frame(self, layer: int, dest: int, direction: int, sub_channel: int) -> peer_pb2.Frame:
        return Frame(
            session_id=self.sid,
            step=self.step,
            layer=layer,
            direction=direction,  # type: ignore[arg-type]
            src=self.k,
            dst=dest,
            sub_channel=sub_channel,  # type: ignore[arg-type]
        )

    def send(
        self,
        layer: int,
        dest: int,
        t: torch.Tensor,
        direction: int,
        *,
        codec: str = "fp32",
        sub_channel: int = DATA,
    ) -> None:
        """Send tensor ``t`` (encoded with ``codec``) to ``dest``."""
        frame = self._frame(layer, dest, direction, sub_channel)
        encode_tensor(t.detach(), codec, out=frame.tensor)
        self._transmit(frame)

    def send_control(
        self, layer: int, dest: int, control: peer_pb2.Control, sub_channel: int
    ) -> None:
        """Send a typed control message to ``dest``."""
        frame = self._frame(layer, dest, Frame.CONTROL, sub_channel)
        frame.control.CopyFrom(control)
        self._transmit(frame)

    def send_selection(self, layer: int, dest: int, idx: torch.Tensor) -> None:
        """Stochastic gates: the local channel indices of this layer's message to ``dest``."""
        self.send_control(layer, dest, selection_message(idx), SELECTION)

    def _transmit(self, frame: peer_pb2.Frame) -> None:
        try:
            self.transport.send(frame)
        except Exception as e:
            if self.transport.closed:  # this node's own transport is gone
                raise
            dest = int(frame.dst)
            raise PeerFailure(
                dest,
                f"cannot send to node {dest} (layer {frame.layer}): {type(e).__name__}: {e}",
            ) from e

    # ---- receiving -------------------------------------------------------------------------
    def recv(
        self,
        layer: int,
        src: int,
        *,
        direction: int,
        codec: str = "fp32",
        backward: bool = False,
        sub_channel: int = DATA,
        body: str | None = None,
    ) -> peer_pb2.Frame:
        """The frame of ``layer`` from ``src``; raises :class:`PeerFailure` at once when a
        peer's abort arrives first (naming the node it names), on ``src``'s error frame, on a
        frame of another direction / codec (``body``: of another control body), on a peer
        found down, and at the step's deadline (after telling the peers and listening
        :data:`ABORT_GRACE_S` for an abort naming the node that really failed)."""
        key: FrameKey = (self.sid, self.step, layer, src, backward, sub_channel)
        got = self._wait([key, *self._aborts], self.deadline - time.monotonic())
        if got is None or isinstance(got, str):
            what = "gradient" if backward else "message"
            if got is None:
                why = (
                    f"TimeoutError: no {what} from node {src} for layer {layer} within the "
                    f"step deadline of {self.timeout:g} s"
                )
            else:  # a peer blamed this node, which is alive and waiting for ``src``
                why = f"no {what} from node {src} for layer {layer} ({got})"
            # tell the peers at once, then listen a little: ``src`` may itself be waiting for
            # the node that really failed, and its abort names that node
            self.broadcast_abort(src, why)
            self._listen_for_aborts(ABORT_GRACE_S)
            raise PeerFailure(src, why)
        f = got
        if f.error:
            raise PeerFailure(src, f.error)
        if body is not None:
            if f.direction != Frame.CONTROL or f.control.WhichOneof("body") != body:
                raise PeerFailure(
                    src,
                    f"layer {layer}: expected a {body} control message, got frame direction "
                    f"{f.direction} with {f.control.WhichOneof('body') or 'no control body'}",
                )
            return f
        problem = frame_kind_problem(f, direction, codec_enum(codec))
        if problem:
            raise PeerFailure(src, f"layer {layer}: {problem}")
        return f

    def _wait(self, keys: list[FrameKey], timeout: float) -> peer_pb2.Frame | str | None:
        """The first of ``keys`` to arrive (``None`` at the timeout); raises
        :class:`PeerFailure` on a peer's abort naming another node, or a peer found down.
        An abort naming this node (a peer gave up waiting for it while it waits itself)
        returns the abort's cause: the failure is upstream of what this node waits for."""
        try:
            got = self.transport.recv_first(keys, max(0.0, timeout))
        except PeerDownError as e:
            j = e.peer if e.peer is not None else keys[0][3]
            raise PeerFailure(j, f"node {j} is unreachable: {e}") from e
        if got is None:
            return None
        key, f = got
        if key[5] == ABORT:
            a = f.control.abort  # checked on arrival: failed_node is a node index
            cause = a.cause or f"node {key[3]} aborted the step"
            if int(a.failed_node) == self.k:
                return f"node {key[3]} aborted the step naming this node: {cause}"
            raise PeerFailure(int(a.failed_node), cause)
        return f

    def _listen_for_aborts(self, seconds: float) -> None:
        """Wait up to ``seconds`` for a peer's abort naming another node (raised)."""
        end = time.monotonic() + seconds
        keys = list(self._aborts)
        while keys:
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                got = self.transport.recv_first(keys, left)
            except PeerDownError:
                return  # a peer down tells nothing about which node failed first
            if got is None:
                return
            key, f = got
            keys.remove(key)
            root = int(f.control.abort.failed_node)
            if root != self.k:
                raise PeerFailure(root, f.control.abort.cause or f"node {key[3]} aborted")

    def recv_selection(self, layer: int, src: int, channels: int) -> torch.Tensor:
        """Stochastic gates: the channel indices (in ``src``'s slice of ``channels``) that
        ``src``'s exchange message of ``layer`` carries."""
        f = self.recv(layer, src, direction=Frame.CONTROL, sub_channel=SELECTION, body="selection")
        try:
            return decode_selection(f.control, channels=channels)
        except WireError as e:
            raise PeerFailure(src, f"bad channel selection at layer {layer}: {e}") from e

    # ---- aborts, DP norms, the end ----------------------------------------------------------
    def broadcast_abort(self, root: int, cause: str) -> None:
        """Tell every peer (best effort, once) that the step failed, starting at ``root``."""
        if self.abort_sent:
            return
        self.abort_sent = True
        msg = abort_message(root, cause)
        for j in self.peers:
            frame = self._frame(0, j, Frame.CONTROL, ABORT)
            frame.control.CopyFrom(msg)
            # best effort: the peer may be gone or this transport closed
            with contextlib.suppress(Exception):
                self.transport.send(frame)

    def exchange_norms(self, local: torch.Tensor) -> dict[int, peer_pb2.Tensor]:
        """Send ``local`` (fp32) to every peer; each peer's message, not yet decoded."""
        for j in self.peers:
            self.send(0, j, local, Frame.NORMS, sub_channel=NORMS)
        return {
            j: self.recv(0, j, direction=Frame.NORMS, sub_channel=NORMS).tensor for j in self.peers
        }

    def end(self) -> None:
        with contextlib.suppress(Exception):  # a closed transport has nothing to drop
            self.transport.end_session(self.sid)


def commit(io_: StepIO, owner: int) -> None:
    """Every node votes to the owner (layer 0); the owner, holding every vote, answers every
    node (layer 1). Returns once this node may apply the step. Holding every vote, the owner
    has decided: an answer it cannot deliver (the peer died after voting) does not undo it
    (the peer, if alive, fails at its deadline; the next step finds it gone)."""
    ok = vote_message(True)
    if io_.k == owner:
        for j in io_.peers:
            _vote(io_, 0, j)
        for j in io_.peers:
            with contextlib.suppress(PeerFailure):
                io_.send_control(1, j, ok, COMMIT)
    else:
        io_.send_control(0, owner, ok, COMMIT)
        # voted: the owner alone decides now. Another peer's abort, or a peer found down,
        # reaches the owner too, who then aborts (and says so); a peer that dies after its
        # vote must not make this node abort a step the owner commits
        io_._aborts = [key for key in io_._aborts if key[3] == owner]
        _vote(io_, 1, owner)


def _vote(io_: StepIO, layer: int, src: int) -> None:
    """Receive ``src``'s vote; a vote against is a failure of ``src``."""
    f = io_.recv(layer, src, direction=Frame.CONTROL, sub_channel=COMMIT, body="vote")
    if not f.control.vote.ok:
        raise PeerFailure(src, f"node {src} voted against committing step {io_.step}")
