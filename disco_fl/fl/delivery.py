"""Shards delivered to the nodes at the end of a run (the node's side).

After the last round the ServerApp exports the final plan and the compact shards
(``run-dir/plan/``) and sends every node of every household a ``query.deliver`` message
(:data:`DELIVER_TYPE`; :mod:`disco_fl.fl.server.delivery`) holding the plan (JSON) and the
bytes of its own shard file ``node_<k>.pt``. The node (:func:`deliver`):

1. checks that the message is for its household and shard, that the plan is well formed and
   matches its hash, and that the shard's sha256 is the one the plan's manifest names;
2. writes, each atomically (:func:`disco_fl.core.files.atomic_write_bytes`), ``node_<k>.pt``,
   then ``plan.json``, then ``node.json`` (its index, household, the household's peer
   addresses and the plan hash) into its **data folder**;
3. loads its shard back from that folder with every check of
   :func:`disco_fl.emulation.export.load_shard` (plan hash, sha256, tensor names and shapes),
   and answers with the plan hash.

The data folder is the node setting ``data-dir``; default
``$XDG_DATA_HOME/disco_fl/<household>/node<k>`` (``~/.local/share/...`` when unset).
``disco-fl serve <data folder>`` then starts from it: ``--node`` and ``--peers`` default to
``node.json``'s. Nothing is unpickled (``weights_only=True``), and no file name comes from
the message: the shard is written as ``node_<k>.pt`` for the node's own ``k``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from disco_fl.core.files import atomic_write_bytes
from disco_fl.partition.plan import Plan, PlanError

DELIVER_ACTION = "deliver"
DELIVER_TYPE = f"{MessageType.QUERY}.{DELIVER_ACTION}"
NODE_FILE = "node.json"  # what `disco-fl serve <folder>` reads: node index, peers, plan hash
PLAN_FILE = "plan.json"


def shard_file(k: int) -> str:
    return f"node_{k}.pt"


def default_data_dir(household: str, k: int) -> Path:
    """``$XDG_DATA_HOME/disco_fl/<household>/node<k>`` (``~/.local/share`` when unset); the
    household name with anything but letters, digits, ``._-`` replaced by ``_``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", household).lstrip(".") or "_"
    return Path(base) / "disco_fl" / safe / f"node{k}"


def data_dir(context: Context, household: str, k: int) -> Path:
    """This node's data folder: the node setting ``data-dir``, else :func:`default_data_dir`."""
    v = str(context.node_config.get("data-dir", "") or "")
    return Path(v).expanduser() if v.strip() else default_data_dir(household, k)


def deliver(msg: Message, context: Context) -> Message:
    """Store the final plan and this node's shard in its data folder (module docstring)."""
    from disco_fl.emulation.export import load_shard

    hh = str(context.node_config.get("household", ""))
    k = int(context.node_config.get("shard", -1))
    cfg = msg.content.config_records["config"]
    if str(cfg.get("household")) != hh or cfg.get("shard") != k:
        raise ValueError(
            f"delivery for household {cfg.get('household')!r} shard {cfg.get('shard')!r} "
            f"reached household {hh!r} shard {k}"
        )
    try:
        plan = Plan.from_json(json.loads(str(cfg["plan"])))
    except (KeyError, json.JSONDecodeError) as e:
        raise PlanError(f"delivery: no readable plan ({e})") from e
    if cfg.get("plan-hash") != plan.hash:
        raise PlanError("delivery: the plan does not match the hash the server sent")
    if not 0 <= k < plan.num_nodes or len(plan.shards) != plan.num_nodes:
        raise PlanError(f"delivery: a {plan.num_nodes}-node plan has no shard {k}")
    if plan.shards[k].file != shard_file(k):
        raise PlanError(f"delivery: the plan names shard file {plan.shards[k].file!r}")
    data = msg.content.array_records["shard"]["file"].numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != plan.shards[k].sha256:
        raise PlanError(f"delivery: shard {k} does not match the plan (sha256 differs)")
    raw_peers = cfg.get("peers", [])
    peers = [str(p) for p in raw_peers] if isinstance(raw_peers, list) else []
    if len(peers) != plan.num_nodes:
        raise ValueError(f"delivery: {len(peers)} peers for a {plan.num_nodes}-node plan")
    folder = data_dir(context, hh, k)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / shard_file(k), data)  # the plan last: it names the shard
    plan.save(folder / PLAN_FILE)
    node = {"node": k, "household": hh, "peers": peers, "plan_hash": plan.hash}
    atomic_write_bytes(folder / NODE_FILE, json.dumps(node, indent=1).encode())
    loaded = load_shard(folder / PLAN_FILE, k)  # every check of a served shard
    reply: dict[str, Any] = {
        "plan-hash": loaded.plan.hash,
        "data-dir": str(folder),
        "bytes": len(data),
    }
    return Message(RecordDict({"delivered": ConfigRecord(reply)}), reply_to=msg)


__all__ = [
    "DELIVER_ACTION",
    "DELIVER_TYPE",
    "NODE_FILE",
    "PLAN_FILE",
    "data_dir",
    "default_data_dir",
    "deliver",
    "shard_file",
]
