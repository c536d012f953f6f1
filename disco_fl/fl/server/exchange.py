"""How the server waits for a round's replies: the one thing Flower's ``Strategy.start`` cannot
be told, so :class:`HouseholdGrid` wraps the ``Grid`` it is given.

Flower's loop calls ``grid.send_and_receive(messages, timeout=...)``, which returns when every
reply came or ``timeout`` passed (Flower 1.41's ``GrpcGrid`` polls every 3 s). A DISCO round
is decided earlier: the nodes of a household train *jointly*, so once one of them failed the
others cannot finish the round (they fail at their next step deadline, or never answer if
their device died with it), and the household keeps its previous shards whatever comes
later. :meth:`HouseholdGrid.send_and_receive` therefore stops as soon as every household is
decided (all its replies came, or one of them is an error; with degraded training, an error of
a batch owner, or replies of every node its survivors did not name missing), polling every
:data:`POLL_S`; with no household map (the roster query) it waits for all replies, as
Flower's does. Everything else goes to the wrapped grid unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

POLL_S = 0.5  # seconds between two pulls of replies

HouseholdOf = Callable[[int], tuple[str, int] | None]  # node id -> (household, shard)
# in a train reply's metrics: the shards its household trained without (degraded training)
MISSING_KEY = "missing-nodes"


def missing_of(msg: Message, k: int, num_nodes: int, owners: Iterable[int]) -> frozenset[int]:
    """The missing set shard ``k``'s train reply reports (empty when none is reported);
    ``ValueError`` naming what is wrong with it."""
    rec: Mapping[str, Any] = msg.content.metric_records.get("metrics", {})
    if MISSING_KEY not in rec:
        return frozenset()
    v: Any = rec[MISSING_KEY]
    if not isinstance(v, list) or any(
        not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < num_nodes for j in v
    ):
        raise ValueError(f"shard {k}: {MISSING_KEY} {v!r} is not a list of shard indices")
    gone = frozenset(v)
    if len(gone) != len(v):
        raise ValueError(f"shard {k}: {MISSING_KEY} {v!r} repeats a shard")
    if k in gone:
        raise ValueError(f"shard {k}: {MISSING_KEY} {v!r} names the replying shard")
    if lost := sorted(gone & set(owners)):
        raise ValueError(f"shard {k}: {MISSING_KEY} {v!r} names batch owner(s) {lost}")
    return gone


class HouseholdGrid(Grid):
    """``grid`` whose :meth:`send_and_receive` stops once every household is decided.

    Parameters
    ----------
    grid : Grid
        The grid Flower gave the ServerApp; every call but :meth:`send_and_receive` goes to it.
    household_of : callable or None (default: None)
        Node id -> ``(household, shard)`` or None for a node of no household. None: wait for
        every reply (or the timeout), like Flower's own ``send_and_receive``.
    """

    def __init__(self, grid: Grid, household_of: HouseholdOf | None = None) -> None:
        self.grid = grid
        self.household_of = household_of
        # degraded training: a household's batch owners (its survivors may go on without a
        # failed node, so only an owner's error decides it); None: any error decides
        self.owners_of: Callable[[str], list[int]] | None = None
        # shards per household (a degraded round may address only some of them); None: as
        # many as the messages address
        self.num_nodes: int | None = None
        self.sent_to: dict[str, int] = {}  # message id -> destination node (last push)

    # ---- delegated --------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    # ---- the DISCO wait ---------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; pull replies until all came, ``timeout`` passed (None: no
        limit) or every household of the destinations is decided."""
        messages = list(messages)
        if not messages:
            return []
        pushed = list(self.grid.push_messages(messages))
        self.sent_to = {
            mid: m.metadata.dst_node_id for mid, m in zip(pushed, messages, strict=True)
        }
        ids = set(pushed)
        end = None if timeout is None else time.monotonic() + timeout
        got: list[Message] = []
        while ids:
            replies = list(self.grid.pull_messages(ids))
            got.extend(replies)
            ids.difference_update(m.metadata.reply_to_message_id for m in replies)
            if not ids or (end is not None and time.monotonic() >= end):
                break
            if self._all_decided(messages, got):
                break
            time.sleep(POLL_S)
        if ids:
            log(WARNING, "%d repl%s did not arrive", len(ids), "y" if len(ids) == 1 else "ies")
        return got

    def origin_of(self, reply: Message) -> int:
        """The node a reply is about: the destination of the message it answers (an error
        the SuperLink wrote for an unreachable node may not name it as its source)."""
        return self.sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _all_decided(self, messages: list[Message], got: list[Message]) -> bool:
        """Every household addressed by ``messages`` has all its replies or an error."""
        if self.household_of is None:
            return False
        want: dict[str, set[int]] = {}
        for m in messages:
            who = self.household_of(m.metadata.dst_node_id)
            if who is not None:
                want.setdefault(who[0], set()).add(who[1])
        if not want:  # no household known yet (the roster query): wait for every reply
            return False
        seen: dict[str, set[int]] = {h: set() for h in want}
        gone: dict[str, set[int]] = {h: set() for h in want}  # named missing by a survivor
        bad: set[str] = set()
        for m in got:
            who = self.household_of(self.origin_of(m))
            if who is None or who[0] not in want:
                continue
            h, k = who
            seen[h].add(k)
            if self.owners_of is None:
                bad.update([h] if m.has_error() else [])
            elif m.has_error():
                bad.update([h] if k in self.owners_of(h) else [])
            else:
                try:
                    n = self.num_nodes or len(want[h])
                    gone[h] |= missing_of(m, k, n, self.owners_of(h))
                except ValueError:
                    bad.add(h)  # refused when aggregated
        return all(h in bad or seen[h] | gone[h] >= shards for h, shards in want.items())


def shift_rounds(result: Result, offset: int) -> Result:
    """``result`` of Flower's loop with its rounds counted from the start of the run (after a
    resume, Flower counts the rounds of this start)."""
    for name in (
        "train_metrics_clientapp",
        "evaluate_metrics_clientapp",
        "evaluate_metrics_serverapp",
    ):
        setattr(result, name, {r + offset: m for r, m in getattr(result, name).items()})
    return result


__all__ = ["MISSING_KEY", "POLL_S", "HouseholdGrid", "missing_of", "shift_rounds"]
