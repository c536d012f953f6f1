"""Shards delivered to the nodes at the end of a run (the server's side).

After the last round the ServerApp exports the final plan and shards (``run-dir/plan/``) and
:func:`deliver_shards` sends node ``k`` of every household of the roster one
``query.deliver`` message (:data:`disco_fl.fl.delivery.DELIVER_TYPE`): the plan's JSON, its
hash, the household's peer addresses and the bytes of ``node_<k>.pt`` (one ``uint8`` array).
The node checks and stores them in its data folder (:func:`disco_fl.fl.delivery.deliver`),
from which ``disco-fl serve`` starts. A node that fails or does not answer within the timeout
is reported (``summary.json``'s ``delivered``, and a warning), never fatal: its files are in
``run-dir/plan/`` to copy by hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from disco_fl.fl.delivery import DELIVER_TYPE, PLAN_FILE
from disco_fl.fl.server.exchange import HouseholdGrid
from disco_fl.fl.server.roster import Household, household_of
from disco_fl.partition.plan import Plan


def delivery_messages(
    plan_dir: Path,
    roster: Mapping[str, Household],
    skip: Mapping[str, frozenset[int]] | None = None,
) -> list[Message]:
    """One ``query.deliver`` message per node of ``roster`` (but the shards ``skip[h]``): the
    plan of ``plan_dir`` and the node's own shard file."""
    text = (plan_dir / PLAN_FILE).read_text()
    plan = Plan.from_json(json.loads(text))
    msgs = []
    for h, hh in roster.items():
        for k, node in sorted(hh.nodes.items()):
            if k in (skip or {}).get(h, ()):
                continue
            data = (plan_dir / plan.shards[k].file).read_bytes()
            cfg: dict[str, Any] = {
                "household": hh.name,
                "shard": k,
                "peers": hh.peers(),
                "plan": text,
                "plan-hash": plan.hash,
            }
            arrays = ArrayRecord({"file": Array(np.frombuffer(data, dtype=np.uint8).copy())})
            content = RecordDict({"config": ConfigRecord(cfg), "shard": arrays})
            msgs.append(
                Message(content=content, message_type=DELIVER_TYPE, dst_node_id=node.node_id)
            )
    return msgs


def deliver_shards(
    grid: Grid,
    roster: Mapping[str, Household],
    plan_dir: Path,
    timeout: float,
    skip: Mapping[str, frozenset[int]] | None = None,
) -> dict[str, str]:
    """Send every node its shard and the plan; per node (``"<household>/<shard>"``) ``"ok"``
    or why not (an error reply, a plan hash other than the exported one, no answer).
    ``skip``: per household, the shards unavailable in the last round (degraded training,
    :mod:`disco_fl.fl.server.availability`): sent nothing (not waited for), ``"unavailable"``."""
    plan_hash = Plan.load(plan_dir / PLAN_FILE).hash
    hgrid = grid if isinstance(grid, HouseholdGrid) else HouseholdGrid(grid)
    msgs = delivery_messages(plan_dir, roster, skip)
    replies = hgrid.send_and_receive(msgs, timeout=timeout)
    roster_ = dict(roster)
    out = {f"{h}/{k}": "no answer" for h, hh in roster.items() for k in hh.nodes}
    out.update({f"{h}/{k}": "unavailable" for h, ks in (skip or {}).items() for k in ks})
    for m in replies:
        who = household_of(roster_, hgrid.origin_of(m))
        if who is None:
            continue
        key = f"{who[0]}/{who[1]}"
        if m.has_error():
            out[key] = f"failed: {m.error.reason}"
            continue
        rec = m.content.config_records.get("delivered")
        got = rec.get("plan-hash") if rec is not None else None
        out[key] = "ok" if got == plan_hash else f"stored plan {got!r}, not {plan_hash[:12]}"
    bad = {k: v for k, v in out.items() if v != "ok"}
    for key, why in sorted(bad.items()):
        log(WARNING, "delivery to node %s: %s (its files are in %s)", key, why, plan_dir)
    log(INFO, "delivered plan %s to %d of %d nodes", plan_hash[:12], len(out) - len(bad), len(out))
    return out


__all__ = ["deliver_shards", "delivery_messages"]
