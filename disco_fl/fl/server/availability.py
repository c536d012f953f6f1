"""Degraded training from a round's start: the nodes of the roster that cannot take part.

With ``degraded-training`` the strategy asks, before it builds a train round's messages
(:meth:`Availability.round_start`), which nodes of the roster are there:

1. **The SuperLink's node list** (``grid.get_node_ids()``). Flower 1.41 lists the nodes whose
   heartbeat is current: a SuperNode that stopped cleanly is gone from it at once, a killed one
   after two heartbeat intervals (about a minute). A roster node not in it is unavailable.
2. **A node found missing in the previous round** (silent at its start, or named missing by
   its survivors) and not heard from since stays unavailable without a wait; it gets a ping
   (``query.ping``, :mod:`disco_fl.fl.availability`) that is not waited for: its answer,
   collected at a later round's start, brings it back (it is then invited again). One back
   on the node list after being off it is asked as in 3 (the SuperLink heard from it).
3. **A ping, waited for**, to each other listed node the strategy has not heard from lately:
   no good reply to the last message it was sent (e.g. its household failed the previous
   round) or none within ``timeout`` seconds. A node that does not answer within
   ``timeout``, or answers with an error, is unavailable.

The strategy passes ``rendezvous-timeout`` as ``timeout``: a ping waits as long as the node's
peers would have waited for it at the rendezvous, and a good reply that recent proves as much
as a ping would (a node may die right after either). So a healthy run pings nobody (a ping
costs every device a ClientApp start), a node killed during a round (which the SuperLink lists
for a while yet) costs the next round no wait, and a wait happens only for a node gone between
rounds, once.

The decision per household: all there, it trains as usual; a batch owner unavailable (it holds
the data and the loss), it fails the round at its start (:attr:`Availability.refused`; no
message is sent to it); else its survivors are invited with the unavailable shards as
``missing-nodes`` in their :class:`~disco_fl.fl.round_config.TrainConfig` and train without
them from step 0, neither connecting to nor waiting for them
(:mod:`disco_fl.runtime.training.degraded`). They reply ``missing-nodes`` as after a failure
mid-round, so aggregation is the same (:mod:`disco_fl.fl.server.degraded`). Every round asks
again: a node that came back is invited again.

After the round (:meth:`Availability.skipped`): evaluation and the BatchNorm calibration
**skip** a household whose node was unavailable at the round's start or went missing during it
(they run on every node of a household, so they would wait for a node that is gone until the
rendezvous timeout and fail), and the delivery of the final shards skips that node
(:attr:`Availability.missing`); the skip is logged and counted with the failed households
(``households-failed`` of the evaluation, ``failed`` of the calibration; ``delivered`` says
``unavailable``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from logging import WARNING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from disco_fl.fl.availability import PING_TYPE
from disco_fl.fl.server.exchange import HouseholdGrid
from disco_fl.fl.server.roster import Household

Unavailable = dict[str, dict[int, str]]  # household -> shard -> why it is unavailable


def ping_nodes(grid: Grid, node_ids: Iterable[int], timeout: float) -> dict[int, str | None]:
    """Ping ``node_ids``; per node ``None`` (answered within ``timeout``) or why not."""
    inner = grid.grid if isinstance(grid, HouseholdGrid) else grid
    pgrid = HouseholdGrid(inner)  # no household map: waits for every reply or the timeout
    ids = sorted(set(node_ids))
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=PING_TYPE) for n in ids]
    out: dict[int, str | None] = dict.fromkeys(ids, f"no answer to a ping within {timeout:g} s")
    for reply in pgrid.send_and_receive(msgs, timeout=timeout):
        src = pgrid.origin_of(reply)
        if src in out and reply.has_error():
            lines = (reply.error.reason or "").strip().splitlines()
            out[src] = f"ping failed: {lines[-1] if lines else f'error {reply.error.code}'}"
        elif src in out:
            out[src] = None
    return out


class Availability:
    """What the strategy knows of which nodes can take part (see the module's docstring).

    Parameters
    ----------
    timeout : float
        How long a ping waits for its answer; a node heard from (a good reply) within this
        many seconds is not pinged (the strategy's ``rendezvous_timeout``).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = float(timeout)
        self.heard: dict[int, float] = {}  # node id -> monotonic time of its last good reply
        self.sent: list[int] = []  # the nodes of the last push (of configure_train/evaluate)
        self.missing: dict[str, frozenset[int]] = {}  # the last train round's missing shards
        self.refused: dict[str, str] = {}  # households failed at the last round's start
        self.skipping: dict[str, str] = {}  # the households the last skipped() named
        self.pings: dict[str, int] = {}  # message id -> node: pings in flight, not waited for
        self.offlist: set[int] = set()  # the nodes off the node list at the last round's start

    # ---- what the strategy hears ----------------------------------------------------------
    def answered(self, node_ids: Iterable[int]) -> None:
        """``node_ids`` replied just now (e.g. to the roster query)."""
        now = time.monotonic()
        self.heard.update(dict.fromkeys(node_ids, now))

    def answered_roster(self, roster: Mapping[str, Household]) -> None:
        """Every node of ``roster`` answered the roster query just now."""
        self.answered(n.node_id for hh in roster.values() for n in hh.nodes.values())

    def pushed(self, messages: list[Message]) -> list[Message]:
        """``messages``, a push whose nodes are expected to reply (:meth:`replied`)."""
        self.sent = [m.metadata.dst_node_id for m in messages]
        return messages

    def replied(self, replies: Iterable[Message]) -> list[Message]:
        """``replies`` of the last push (as a list): a node with a good one was heard from now;
        one without was not heard from since (it is pinged before its next round)."""
        replies = list(replies)
        good = {m.metadata.src_node_id for m in replies if not m.has_error()}
        for n in self.sent:
            if n not in good:
                self.heard.pop(n, None)
        self.answered(n for n in self.sent if n in good)
        self.sent = []
        return replies

    # ---- a round's start --------------------------------------------------------------
    def unavailable(self, grid: Grid, roster: Mapping[str, Household]) -> Unavailable:
        """Per household, its unavailable shards and why (steps 1 to 3 of the docstring)."""
        inner = grid.grid if isinstance(grid, HouseholdGrid) else grid
        self._collect(inner)
        online = set(grid.get_node_ids())
        out: Unavailable = {}
        now, ask, later = time.monotonic(), {}, []
        for h, hh in sorted(roster.items()):
            for k, node in sorted(hh.nodes.items()):
                if node.node_id not in online:
                    out.setdefault(h, {})[k] = "not in the SuperLink's node list"
                elif now - self.heard.get(node.node_id, -math.inf) <= self.timeout:
                    continue
                elif k in self.missing.get(h, ()) and node.node_id not in self.offlist:
                    out.setdefault(h, {})[k] = "missing in the last round, not heard from since"
                    later.append(node.node_id)
                else:
                    ask[node.node_id] = (h, k)
        self._ping_later(inner, later)
        self.offlist = {n.node_id for hh in roster.values() for n in hh.nodes.values()} - online
        pinged = ping_nodes(grid, ask, self.timeout) if ask else {}
        for n, why in pinged.items():
            if why is None:
                self.answered([n])
            else:
                out.setdefault(ask[n][0], {})[ask[n][1]] = why
        for h, shards in out.items():  # not heard from until it answers a ping again
            for j in shards:
                self.heard.pop(roster[h].nodes[j].node_id, None)
        return out

    def _ping_later(self, grid: Grid, node_ids: list[int]) -> None:
        """A ping, not waited for, to each of ``node_ids`` without one in flight."""
        flying = set(self.pings.values())
        msgs = [
            Message(RecordDict(), dst_node_id=n, message_type=PING_TYPE)
            for n in node_ids
            if n not in flying
        ]
        for mid, m in zip(grid.push_messages(msgs) if msgs else [], msgs, strict=True):
            if mid:
                self.pings[mid] = m.metadata.dst_node_id

    def _collect(self, grid: Grid) -> None:
        """The answers to the pings in flight: a good one, the node was heard from now; an
        error (e.g. the SuperLink's "node unavailable") ends that ping."""
        if not self.pings:
            return
        for reply in grid.pull_messages(list(self.pings)):
            n = self.pings.pop(reply.metadata.reply_to_message_id, None)
            if n is not None and not reply.has_error():
                self.answered([n])

    def round_start(
        self, grid: Grid, roster: Mapping[str, Household], what: str
    ) -> dict[str, frozenset[int]]:
        """The households to invite and each one's missing shards (empty: all there); the
        others (a batch owner unavailable) are in :attr:`refused` with the reason (logged).
        :attr:`missing` holds every household's unavailable shards."""
        gone = self.unavailable(grid, roster)
        self.missing = {h: frozenset(why) for h, why in gone.items()}
        self.refused = {}
        invite: dict[str, frozenset[int]] = {}
        for h, hh in roster.items():
            why = gone.get(h, {})
            text = "; ".join(f"shard {k} (node {hh.nodes[k].node_id}): {w}" for k, w in why.items())
            if lost := sorted(set(why) & set(hh.owners)):
                self.refused[h] = f"batch owner(s) {lost} unavailable at the round's start: {text}"
                log(WARNING, "%s: household %r not invited: %s", what, h, self.refused[h])
                continue
            invite[h] = frozenset(why)
            if why:
                log(WARNING, "%s: degraded from the start: household %r trains without "
                    "node(s) %s: %s", what, h, sorted(why), text)  # fmt: skip
        return invite

    # ---- after the round's training ---------------------------------------------------
    def went_missing(self, gone: Mapping[str, frozenset[int]]) -> None:
        """The shards the survivors named missing in the round's replies."""
        for h, m in gone.items():
            self.missing[h] = self.missing.get(h, frozenset()) | m

    def skipped(self, roster: Mapping[str, Household], what: str) -> dict[str, str]:
        """The households a phase after the last train round skips (a node unavailable at its
        start or missing in it), with the reason (logged); also kept in :attr:`skipping`."""
        self.skipping = {
            h: f"skipped: node(s) {sorted(m)} unavailable in the last train round"
            for h, m in sorted(self.missing.items())
            if m and h in roster
        }
        for h, why in self.skipping.items():
            log(WARNING, "%s: household %r %s", what, h, why)
        return self.skipping


__all__ = ["Availability", "Unavailable", "ping_nodes"]
