"""The roster: which nodes form which household, checked before any training.

Every connected node gets a ``query`` message and answers with its ``household``, ``shard``
index, ``peer-address`` (its peer endpoint for activations), ``num-examples`` (local training
examples, 0 if it holds none), ``num-eval`` (held-out examples) and optionally its
``capacity`` (relative throughput, e.g. ``disco-fl probe``'s GFLOP/s) and ``memory-bytes``
(memory it can give to the model). :func:`build_roster` checks that every household has all
N shards exactly once (and, if configured, that the expected number of households came);
otherwise the run stops with a :class:`RosterError` naming what is missing.
:func:`roster_capacities` turns the capacities into the one partition all households train;
:func:`check_memory` refuses a node whose shard does not fit the memory it reports
(:class:`NodeMemoryError`), before any training.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from disco_fl.emulation.capacity import MemoryNeed, shared_capacities
from disco_fl.fl.federated import rec_float, rec_int
from disco_fl.fl.server.exchange import POLL_S, HouseholdGrid


class RosterError(ValueError):
    """The nodes do not form complete households (checked before any training)."""


class NodeMemoryError(RosterError):
    """A node reports less memory than its shard needs to train (checked before training)."""


@dataclass(frozen=True)
class NodeInfo:
    """One node, as it answered the roster query."""

    node_id: int
    household: str
    shard: int
    address: str
    num_examples: int = 0
    num_eval: int = 0
    capacity: float | None = None  # relative throughput; None: not reported
    memory_bytes: int | None = None  # memory it can give to the model; None: not reported


@dataclass
class Household:
    """The N nodes holding one full model."""

    name: str
    nodes: dict[int, NodeInfo]  # shard -> node
    token: str = ""

    @property
    def owners(self) -> list[int]:
        """Shards holding training data (batch owners), ascending."""
        return sorted(k for k, n in self.nodes.items() if n.num_examples > 0)

    @property
    def num_examples(self) -> int:
        return sum(n.num_examples for n in self.nodes.values())

    @property
    def eval_owner(self) -> int | None:
        """The shard that runs federated evaluation (first one with held-out data)."""
        have = sorted(k for k, n in self.nodes.items() if n.num_eval > 0)
        return have[0] if have else None

    def peers(self) -> list[str]:
        return [self.nodes[k].address for k in sorted(self.nodes)]


def build_roster(
    infos: Sequence[NodeInfo],
    num_nodes: int,
    *,
    expected_households: int | None = None,
    unanswered: Sequence[int] = (),
) -> dict[str, Household]:
    """Group nodes into households and check that each has shards ``0..N-1`` exactly once.

    Raises
    ------
    RosterError
        Naming every household with a missing, duplicate or out-of-range shard, a household
        without training data, nodes that did not answer the query, a peer address used twice
        and a wrong number of households.
    """
    problems: list[str] = []
    if unanswered:
        problems.append(
            f"nodes {', '.join(str(n) for n in sorted(unanswered))} did not answer the roster query"
        )
    by_hh: dict[str, list[NodeInfo]] = {}
    for info in infos:
        by_hh.setdefault(info.household, []).append(info)
    households: dict[str, Household] = {}
    for name in sorted(by_hh):
        members = by_hh[name]
        shards = [m.shard for m in members]
        bad = sorted({s for s in shards if not 0 <= s < num_nodes})
        dup = sorted({s for s in shards if shards.count(s) > 1 and 0 <= s < num_nodes})
        missing = sorted(set(range(num_nodes)) - set(shards))
        if bad:
            problems.append(
                f"household {name!r}: shard index {bad} out of range for {num_nodes} nodes"
            )
        if dup:
            nodes = ", ".join(
                f"shard {s} on nodes {[m.node_id for m in members if m.shard == s]}" for s in dup
            )
            problems.append(f"household {name!r}: duplicate {nodes}")
        if missing:
            problems.append(
                f"household {name!r}: missing shard{'s' if len(missing) > 1 else ''} "
                f"{', '.join(str(s) for s in missing)} of {num_nodes}"
            )
        if bad or dup or missing:
            continue
        hh = Household(name, {m.shard: m for m in members})
        if not hh.owners:
            problems.append(f"household {name!r}: no node holds training data")
            continue
        households[name] = hh
    for i in infos:
        if i.capacity is not None and not (math.isfinite(i.capacity) and i.capacity > 0):
            problems.append(
                f"node {i.node_id}: capacity must be a positive number, got {i.capacity}"
            )
        if i.memory_bytes is not None and i.memory_bytes < 0:
            problems.append(f"node {i.node_id}: memory-bytes must be >= 0, got {i.memory_bytes}")
    addrs = [i.address for i in infos]
    for a in sorted({a for a in addrs if addrs.count(a) > 1}):
        problems.append(f"peer address {a} is used by several nodes")
    if expected_households is not None and len(by_hh) != expected_households:
        problems.append(
            f"expected {expected_households} households, found {len(by_hh)} "
            f"({', '.join(sorted(by_hh)) or 'none'})"
        )
    if problems:
        raise RosterError("incomplete households, no training started: " + "; ".join(problems))
    return households


def roster_capacities(roster: Mapping[str, Household], num_nodes: int) -> tuple[float, ...] | None:
    """The capacity of each shard the partition follows, or None (equal slices) when no node
    reports one. Every household trains the same partition (shard ``k`` is averaged across
    households): :func:`~disco_fl.emulation.capacity.shared_capacities` of the households' reports.
    A :class:`RosterError` names the nodes without a capacity when others report one."""
    nodes = [(h, n) for h, hh in sorted(roster.items()) for _, n in sorted(hh.nodes.items())]
    if all(n.capacity is None for _, n in nodes):
        return None
    missing = [
        f"node {n.node_id} (household {h!r}, shard {n.shard})"
        for h, n in nodes
        if n.capacity is None
    ]
    if missing:
        raise RosterError(
            f"{', '.join(missing)} report no capacity while other nodes do: set capacity=... "
            "(or capacity='probe') in the node config of every node, or of none"
        )
    return shared_capacities(
        [
            [float(hh.nodes[k].capacity or 0) for k in range(num_nodes)]
            for _, hh in sorted(roster.items())
        ]
    )


def check_memory(roster: Mapping[str, Household], needs: Sequence[MemoryNeed]) -> None:
    """Refuse (:class:`NodeMemoryError`) every node whose reported ``memory-bytes`` is below
    the estimated need of its shard ``needs[k]``
    (:func:`disco_fl.emulation.capacity.training_memory`),
    naming the node, its memory and the need. Nodes that report no memory are not checked."""
    problems = []
    for h, hh in sorted(roster.items()):
        for k, n in sorted(hh.nodes.items()):
            if n.memory_bytes is not None and n.memory_bytes < needs[k].total:
                problems.append(
                    f"node {n.node_id} (household {h!r}, shard {k}, {n.address}) reports "
                    f"{n.memory_bytes:,} bytes of memory, its shard needs about "
                    f"{needs[k].total:,} to train ({needs[k].explain()})"
                )
    if problems:
        raise NodeMemoryError(
            "not enough memory, no training started: " + "; ".join(problems) + ". Give the "
            "node a smaller capacity (a smaller slice), a smaller batch-size, or more memory"
        )


def _optional(c: Mapping[str, object], key: str, src: int) -> float | None:
    """``c[key]`` as a number, None when absent; a :class:`RosterError` naming the node."""
    if c.get(key) is None:
        return None
    try:
        return rec_float(c, key)
    except ValueError as e:
        raise RosterError(f"node {src}: {e}") from e


def _device(n: NodeInfo) -> str:
    parts = [f"capacity {n.capacity:g}" if n.capacity is not None else ""]
    parts.append(f"{n.memory_bytes / 2**20:,.0f} MiB" if n.memory_bytes is not None else "")
    got = ", ".join(p for p in parts if p)
    return f" ({got})" if got else ""


def household_of(roster: dict[str, Household], node_id: int) -> tuple[str, int] | None:
    """``(household, shard)`` of node ``node_id`` in ``roster``, or None."""
    for name, hh in roster.items():
        for k, n in hh.nodes.items():
            if n.node_id == node_id:
                return name, k
    return None


def query_roster(
    grid: HouseholdGrid,
    num_nodes: int,
    *,
    num_households: int | None = None,
    query_timeout: float = 120.0,
    connect_timeout: float | None = None,
) -> dict[str, Household]:
    """Ask every connected node who it is and build the roster (:func:`build_roster`),
    with a fresh per-household token.

    Waits up to ``connect_timeout`` (None: ``query_timeout``) for the expected nodes
    (``num_households * num_nodes``, or ``num_nodes`` when None) to connect, then up to
    ``query_timeout`` for their answers (each node starts a ClientApp process to answer). A
    node the SuperLink reports unavailable is left out with a warning.
    """
    end = time.monotonic() + (query_timeout if connect_timeout is None else connect_timeout)
    want = num_households * num_nodes if num_households else None
    node_ids: list[int] = []
    while True:
        node_ids = sorted(grid.get_node_ids())
        enough = len(node_ids) >= want if want else len(node_ids) >= num_nodes
        if enough or time.monotonic() >= end:
            break
        time.sleep(POLL_S)
    log(INFO, "roster: querying %d connected nodes", len(node_ids))
    msgs = [
        Message(
            content=RecordDict({"config": ConfigRecord({"action": "roster"})}),
            message_type=MessageType.QUERY,
            dst_node_id=nid,
        )
        for nid in node_ids
    ]
    # the replies get their own window: each node starts a ClientApp process to answer
    replies = grid.send_and_receive(msgs, timeout=query_timeout)
    infos: list[NodeInfo] = []
    answered: set[int] = set()
    offline: set[int] = set()
    for msg in replies:
        src = grid.origin_of(msg)
        if msg.has_error():
            if msg.error.code == ErrorCode.NODE_UNAVAILABLE:
                # registered once but gone (e.g. a SuperNode of an earlier deployment)
                offline.add(src)
                log(WARNING, "roster: node %d is offline, left out", src)
            else:
                log(WARNING, "roster: node %d failed: %s", src, msg.error.reason)
            continue
        c = msg.content.config_records.get("node")
        if c is None:
            log(WARNING, "roster: node %d sent no 'node' record", src)
            continue
        answered.add(src)
        infos.append(
            NodeInfo(
                src,
                str(c["household"]),
                rec_int(c, "shard"),
                str(c["peer-address"]),
                rec_int(c, "num-examples", 0),
                rec_int(c, "num-eval", 0),
                _optional(c, "capacity", src),
                None if (mem := _optional(c, "memory-bytes", src)) is None else int(mem),
            )
        )
    roster = build_roster(
        infos,
        num_nodes,
        expected_households=num_households,
        unanswered=[n for n in node_ids if n not in answered and n not in offline],
    )
    if not roster:
        raise RosterError(
            f"no household connected within {query_timeout:g} s ({len(node_ids)} nodes seen)"
        )
    for hh in roster.values():
        hh.token = secrets.token_hex(16)
        log(
            INFO,
            "roster: household %r: %s (data on shards %s, %d examples)",
            hh.name,
            ", ".join(f"{k}@{n.address}{_device(n)}" for k, n in sorted(hh.nodes.items())),
            hh.owners,
            hh.num_examples,
        )
    return roster


__all__ = [
    "Household",
    "NodeInfo",
    "NodeMemoryError",
    "RosterError",
    "build_roster",
    "check_memory",
    "household_of",
    "query_roster",
    "roster_capacities",
]
