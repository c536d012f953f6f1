"""Degraded training: a household goes on with the round's steps without a node that failed.

Opt-in (:func:`enable_degraded`; in Flower the run config's ``degraded-training``). Without it a
node that dies or stalls past the step deadline fails the step and the round (every node raises
:class:`~disco_fl.runtime.training.StepAborted`). With it, :func:`degraded_step` runs a step
and, when the step aborted naming a peer ``m`` (``StepAborted.failed_node``) that is neither
this node nor a batch owner, the survivors agree on the missing set and run the step again
without it; every later step of the round runs without it too. The decisions:

- **One way of leaving a node out.** The missing set ``NodeTrainer.missing`` joins the step's
  node-dropout draw (``ctx.dropped``, :mod:`disco_fl.runtime.training.dropout`): nothing goes to
  a missing node or comes from it, its channels are zeros for its peers, no gradient crosses to
  it. Unlike a dropped node it does not vote either (``StepIO(absent=...)``): it is gone. The
  emulation computes the same with ``pm.dropped_nodes`` set from that step on.
- **The agreement** (session ``<run>/g<generation>/m<step>``, sub-channel MEMBERSHIP, typed
  ``MissingSet`` messages): the aborted step was applied by no node (the owner commits only with
  every vote), so every survivor stands at the same step. Each survivor sends its proposal (the
  missing set so far plus the node its abort named) to the step's owner (layer 0). The owner
  waits, until one step deadline, for a proposal of every node not yet named missing; the
  decided set is the union of the proposals and of the nodes that sent none (or are found down).
  The owner sends the decided set to every proposer (layer 1); a proposer waits for it (and for
  nothing else) at most two step deadlines. Every survivor thus ends with the same missing set
  and retries the same step. Each retry names at least one more node missing, so the loop ends.
- **Gone from the start.** A node the server found unavailable before the round (Flower:
  :mod:`disco_fl.fl.server.availability`) is in ``trainer.missing`` from step 0
  (``enable_degraded(trainer, missing)``): the survivors never connect to it nor wait for it, and
  a step of theirs equals the emulation's with that node dropped from the first step.
- **What still fails the round**: a failure of this node itself, a batch owner missing (it holds
  the data and the loss; the requester is one), the owner's answer not coming, and a node
  finding itself in the decided set (a stalled node the others went on without).
- **The missing node's shard is not updated** by the survivors (they never hold it); in Flower
  its previous value is kept by the strategy (:mod:`disco_fl.fl.server.aggregation`).

Not with DP-SGD (its norms and noise assume every node) nor with programs whose messages have no
substitute (:func:`~disco_fl.runtime.training.dropout.dropout_problem`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from disco_fl.core.wire import missing_message
from disco_fl.runtime.training.commit import MEMBERSHIP, Frame, StepIO
from disco_fl.runtime.training.dropout import dropout_problem
from disco_fl.runtime.training.errors import PeerFailure, StepAborted
from disco_fl.runtime.transport.base import FrameKey, PeerDownError

if TYPE_CHECKING:
    from disco_fl.runtime.training.step import NodeTrainer, StepResult


def degraded_problem(trainer: NodeTrainer) -> str | None:
    """Why ``trainer`` cannot train degraded, or ``None``."""
    if trainer.dp_state is not None:
        return "DP-SGD (its norms and noise assume every node in every step)"
    return dropout_problem(trainer.plan.program)


def enable_degraded(trainer: NodeTrainer, missing: Iterable[int] = ()) -> None:
    """Check that ``trainer`` can go on without a failed node; ``ValueError`` if not.
    ``missing``: the nodes already gone at the round's start (``trainer.missing`` from step 0;
    neither this node nor a batch owner)."""
    if problem := degraded_problem(trainer):
        raise ValueError(f"degraded training is not supported here: {problem}")
    gone = frozenset(missing)
    n = trainer.plan.program.num_nodes
    if any(not 0 <= j < n for j in gone) or trainer.index in gone or gone & set(trainer.owners):
        raise ValueError(
            f"node {trainer.index}: cannot start without nodes {sorted(gone)} (out of range, "
            f"this node, or a batch owner of {trainer.owners})"
        )
    trainer.missing = gone


def degraded_step(
    trainer: NodeTrainer, step: int, x: Any = None, y: Any = None, **kw: Any
) -> StepResult:
    """:meth:`NodeTrainer.step` (``kw`` passed on) that survives a failed peer: on an abort
    naming a peer that is not a batch owner, agree on the missing set with the survivors
    (:func:`agree_missing`) and run ``step`` again without it. Raises
    :class:`StepAborted` when the round cannot go on (see the module's docstring)."""
    while True:
        try:
            return trainer.step(step, x, y, **kw)
        except StepAborted as e:
            m = e.failed_node
            if m == trainer.index or m in trainer.owners or m in trainer.missing:
                raise
            trainer.missing = agree_missing(trainer, step, m, str(kw.get("run_id", "train")))


def agree_missing(trainer: NodeTrainer, step: int, suspect: int, run_id: str) -> frozenset[int]:
    """The missing set every survivor of aborted ``step`` agrees on (this node proposes
    ``trainer.missing | {suspect}``); :class:`StepAborted` when the round cannot go on."""
    tr, owner = trainer, trainer.owner_of(step)
    sid = f"{run_id}/g{tr.generation}/m{step}"
    proposal = tr.missing | {suspect}
    io_ = StepIO(tr.transport, sid, step, time.monotonic() + tr.timeout, tr.timeout, proposal)
    try:
        if tr.index == owner:
            decided = _decide(io_, proposal)
        else:
            io_.send_control(0, owner, missing_message(proposal), MEMBERSHIP)
            decided = _follow(io_, owner, 2 * tr.timeout)
    except PeerFailure as e:
        raise StepAborted(tr.index, step, e.peer, f"degraded training: {e}") from e
    finally:
        io_.end()
    if tr.index in decided:
        cause = f"the household went on without this node (missing {sorted(decided)})"
        raise StepAborted(tr.index, step, tr.index, cause)
    if lost := sorted(decided & set(tr.owners)):
        raise StepAborted(tr.index, step, lost[0], f"batch owner {lost[0]} is missing")
    if not proposal <= decided:
        raise StepAborted(tr.index, step, owner, f"owner decided {sorted(decided)}")
    return decided


def _follow(io_: StepIO, owner: int, timeout: float) -> frozenset[int]:
    """A proposer's side: the owner's decided set (only the owner's frame is awaited: another
    peer found down tells nothing here); :class:`PeerFailure` naming the owner without it."""
    key: FrameKey = (io_.sid, io_.step, 1, owner, False, MEMBERSHIP)
    try:
        got = io_.transport.recv_first([key], timeout)
    except PeerDownError as e:
        raise PeerFailure(owner, f"node {owner} is unreachable: {e}") from e
    if got is None:
        raise PeerFailure(owner, f"no missing set from node {owner} within {timeout:g} s")
    f = got[1]
    if f.direction != Frame.CONTROL or f.control.WhichOneof("body") != "missing":
        raise PeerFailure(owner, "expected the decided missing set")
    return frozenset(int(j) for j in f.control.missing.nodes)


def _decide(io_: StepIO, proposal: frozenset[int]) -> frozenset[int]:
    """The step owner's side: proposals of every node not yet named, until the deadline; the
    decided set goes to every proposer (best effort: one gone fails at its own deadline)."""
    decided = set(proposal)
    pending = set(io_.peers)  # the peers not in the proposal
    proposers: list[int] = []
    while pending:
        keys: list[FrameKey] = [(io_.sid, io_.step, 0, j, False, MEMBERSHIP) for j in pending]
        try:
            got = io_.transport.recv_first(keys, max(0.0, io_.deadline - time.monotonic()))
        except PeerDownError as e:
            gone = e.peer if e.peer is not None else min(pending)
            decided.add(gone)
            pending.discard(gone)
            continue
        if got is None:  # the deadline: who did not propose is missing
            decided |= pending
            break
        (_, _, _, j, _, _), f = got
        pending.discard(j)
        if f.direction != Frame.CONTROL or f.control.WhichOneof("body") != "missing":
            decided.add(j)  # not a proposal: that node is out
            continue
        proposers.append(j)
        decided |= {int(m) for m in f.control.missing.nodes}
        pending -= decided
    answer = missing_message(decided)
    for j in proposers:
        try:
            io_.send_control(1, j, answer, MEMBERSHIP)
        except PeerFailure:
            continue
    return frozenset(decided)


__all__ = ["agree_missing", "degraded_problem", "degraded_step", "enable_degraded"]
