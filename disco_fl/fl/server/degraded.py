"""Degraded training on the server: a household that trained a round without a failed node.

With the run config's ``degraded-training`` the nodes of a household go on without a node that
failed mid-round (not a batch owner; :mod:`disco_fl.runtime.training.degraded`). The survivors
reply as usual, each with ``missing-nodes`` in its metrics
(:data:`~disco_fl.fl.server.exchange.MISSING_KEY`, read by
:func:`~disco_fl.fl.server.exchange.missing_of`) (a list of shard indices, empty when
nobody was missing); the missing node replies with an error, or not at all.

:func:`sort_train_replies` decides per household: without a missing set it counts only with all
its N replies (:func:`~disco_fl.fl.server.aggregation.complete_households`, as without
degraded training). With one (``M``) it counts, *degraded*, when every survivor (the shards not
in ``M``) replied without error and named the same ``M``, and ``M`` names no batch owner and
no survivor; the errors of the nodes in ``M`` are then expected. Anything else fails the
household (it keeps its previous shards): a malformed ``missing-nodes`` (not a list of distinct
shard indices), survivors that disagree, a missing set with degraded training off.

The strategy then averages shard ``k`` over the households that trained it
(:func:`~disco_fl.fl.server.aggregation.average_shards` with ``missing``); a shard no household
trained keeps its previous value, as a failed household's shards do.

A node still gone at the next round is found before it (:mod:`disco_fl.fl.server.availability`):
its household's survivors are invited with it in ``missing-nodes`` and train without it from
step 0 (their replies name it as above), or, a batch owner gone, the household fails the round
at its start (``refused``). A node that came back is invited again and trains normally.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.supercore import log

from disco_fl.fl.server.aggregation import Failed, Good, complete_households, sort_replies
from disco_fl.fl.server.exchange import missing_of
from disco_fl.fl.server.roster import Household


def household_missing(
    replies: Mapping[int, Message], num_nodes: int, owners: Iterable[int], *, degraded: bool
) -> frozenset[int]:
    """The missing set of one household's good ``replies`` (shard -> reply), empty when it
    trained with every node; ``ValueError`` when the replies cannot be a degraded round."""
    owners = list(owners)
    sets = {k: missing_of(m, k, num_nodes, owners) for k, m in replies.items()}
    gone = frozenset().union(*sets.values())
    if not gone:
        return gone
    if not degraded:
        raise ValueError(f"a reply names missing shards {sorted(gone)}: degraded-training is off")
    if any(s != gone for s in sets.values()):
        raise ValueError(
            f"the survivors disagree on the missing shards: {dict(sorted(sets.items()))}"
        )
    survivors = set(range(num_nodes)) - gone
    if set(replies) != survivors:
        raise ValueError(f"no good reply from survivor(s) {sorted(survivors - set(replies))}")
    return gone


def sort_train_replies(
    replies: Iterable[Message],
    roster: Mapping[str, Household],
    household_of: Callable[[int], tuple[str, int] | None],
    num_nodes: int,
    what: str,
    *,
    degraded: bool,
    refused: Mapping[str, str] | None = None,
) -> tuple[Good, list[str], Failed, dict[str, frozenset[int]]]:
    """A train round's replies: good replies by household and shard, the households that
    count (complete or degraded), the failed ones with a reason (logged: they keep their
    previous shards), and each degraded household's missing shards (logged: "degraded:
    household H trained without node(s) M"). ``refused``: households failed at the round's
    start, with the reason (:mod:`disco_fl.fl.server.availability`; they were sent nothing)."""
    refused = refused or {}
    good, failed = sort_replies(
        replies, [h for h in roster if h not in refused], household_of, what
    )
    missing: dict[str, frozenset[int]] = {}
    for h, got in good.items():
        try:
            gone = household_missing(got, num_nodes, roster[h].owners, degraded=degraded)
        except ValueError as e:
            failed[h] = f"degraded reply refused: {e}"
            log(WARNING, "%s: household %r: %s", what, h, failed[h])
            continue
        if gone:
            failed.pop(h, None)  # the errors (if any) are the missing nodes'
            missing[h] = gone
            log(WARNING, "%s: degraded: household %r trained without node(s) %s", what, h,
                sorted(gone))  # fmt: skip
    complete, failed = complete_households(good, failed, num_nodes, what, missing)
    failed.update(refused)
    for h in failed:
        log(WARNING, "%s: household %r failed (%s); it keeps its previous shards this round",
            what, h, failed[h])  # fmt: skip
    return good, complete, failed, missing


def degraded_metrics(missing: Mapping[str, frozenset[int]]) -> dict[str, Any]:
    """``households-degraded`` and, per degraded household, ``missing/<household>``."""
    out: dict[str, Any] = {"households-degraded": len(missing)}
    out.update({f"missing/{h}": sorted(m) for h, m in missing.items()})
    return out


__all__ = ["degraded_metrics", "household_missing", "sort_train_replies"]
