"""Devices that differ in Flower: nodes report ``capacity`` / ``memory-bytes``, the roster
slices by capacity (one partition for every household) and refuses a node whose shard does
not fit its memory, before any training; a resumed run keeps its partition."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from disco_fl.emulation.capacity import channel_shares, training_memory
from disco_fl.fl.federated import ModelSpec, split_global_state, unpack_state
from disco_fl.fl.server import DiscoStrategy, NodeInfo, RosterError, build_roster
from disco_fl.fl.server.roster import NodeMemoryError, check_memory, roster_capacities
from disco_fl.partition.plan import Plan
from tests.test_flower_contract import NODES, SimGrid

SPEC = ModelSpec(num_nodes=2)
MIB = 2**20


@pytest.fixture(autouse=True)
def _run_identity(flower_run_identity: None) -> None:
    """Every test here builds Flower Messages."""


def _info(nid: int, h: str, k: int, cap: float | None, mem: int | None = None) -> NodeInfo:
    return NodeInfo(nid, h, k, f"127.0.0.1:{nid}", 50 if k == 0 else 0, 0, cap, mem)


def test_roster_capacities_one_partition_for_all_households() -> None:
    roster = build_roster([_info(1, "a", 0, None), _info(2, "a", 1, None)], 2)
    assert roster_capacities(roster, 2) is None  # nobody reports: equal slices
    roster = build_roster(
        [
            _info(1, "a", 0, 1.0),
            _info(2, "a", 1, 3.0),
            _info(3, "b", 1, 600),
            _info(4, "b", 0, 200),
        ],
        2,
    )
    assert roster_capacities(roster, 2) == pytest.approx((0.25, 0.75))
    mixed = build_roster([_info(1, "a", 0, 2.0), _info(2, "a", 1, None)], 2)
    with pytest.raises(RosterError, match=r"node 2 \(household 'a', shard 1\) report no capacity"):
        roster_capacities(mixed, 2)
    with pytest.raises(RosterError, match="node 2: capacity must be a positive number"):
        build_roster([_info(1, "a", 0, 2.0), _info(2, "a", 1, 0.0)], 2)


def test_memory_check_names_the_node_its_memory_and_the_need() -> None:
    pm = SPEC.partition(capacities=(1.0, 3.0))
    needs = [training_memory(pm, k, 32) for k in range(2)]
    big = needs[1].total
    ok = build_roster([_info(1, "a", 0, 1.0, needs[0].total), _info(2, "a", 1, 3.0, big)], 2)
    check_memory(ok, needs)  # exactly enough passes
    short = build_roster([_info(1, "a", 0, 1.0, needs[0].total), _info(2, "a", 1, 3.0, big - 1)], 2)
    with pytest.raises(NodeMemoryError) as e:
        check_memory(short, needs)
    msg = str(e.value)
    assert "no training started" in msg and "node 1 " not in msg
    assert f"node 2 (household 'a', shard 1, 127.0.0.1:2) reports {big - 1:,} bytes" in msg
    assert f"needs about {big:,} to train" in msg and "Adam moments" in msg
    # nodes that report no memory are not checked
    check_memory(build_roster([_info(1, "a", 0, 1.0), _info(2, "a", 1, 3.0)], 2), needs)


class DeviceGrid(SimGrid):
    """:class:`SimGrid` whose nodes also report ``device[node]`` (capacity, memory)."""

    def __init__(self, device: dict[int, dict[str, Any]]) -> None:
        super().__init__()
        self.device = device

    def _answer(self, m: Message) -> RecordDict:
        out = super()._answer(m)
        if m.metadata.message_type == MessageType.QUERY:
            info = dict(out.config_records["node"])
            info.update(self.device.get(m.metadata.dst_node_id, {}))
            return RecordDict({"node": ConfigRecord(info)})
        return out


def _strategy(tmp_path: Path, **kw: Any) -> DiscoStrategy:
    kw = {"steps": 2, "batch_size": 4, "checkpoint_dir": tmp_path, "query_timeout": 5, **kw}
    return DiscoStrategy(SPEC, evaluate=False, **kw)


def test_strategy_slices_by_reported_capacity_and_resume_keeps_it(tmp_path: Path) -> None:
    caps = {101: 1.0, 102: 3.0, 103: 10.0, 104: 30.0}  # NODES: a = 101, 102; b = 103, 104
    grid = DeviceGrid({n: {"capacity": c, "memory-bytes": 8 * 2**30} for n, c in caps.items()})
    s = _strategy(tmp_path)
    dense_weight = s.dense.state_dict()["conv1.weight"].clone()
    init = s.initial_arrays()  # made before the roster: equal slices
    result = s.start(grid, init, num_rounds=1, timeout=30)
    assert s.capacities == pytest.approx((0.25, 0.75))
    conv1 = s.pm.program.infos["conv1"].layout
    assert conv1 is not None and (conv1.count(0), conv1.count(1)) == (2, 6)
    assert channel_shares(s.pm.program)[0] == pytest.approx(0.25, abs=0.03)
    # every node trained the uneven partition: its plan and its shard
    (train,) = [p for p in grid.pushes if p[0].metadata.message_type == MessageType.TRAIN]
    for m in train:
        cfg = m.content.config_records["config"]
        k = int(cfg["shard"])  # type: ignore[call-overload]
        plan = Plan.from_json(json.loads(str(cfg["plan"])))
        assert plan.program.to_json() == s.pm.program.to_json()
        sent = unpack_state(m.content.array_records["arrays"])
        assert sent["ops.conv1.weight"].shape[0] == (2, 6)[k]
    # the initial arrays were made again from the same dense model (not a fresh one)
    first = split_global_state(result.arrays.to_torch_state_dict(), 2)
    got = first[0]["ops.conv1.weight"] - 1.0  # SimGrid adds 1 to every weight per round
    assert got.shape[0] == 2 and (got - dense_weight[:2]).abs().max() < 1e-6
    # resume: the checkpoint's partition stays, even if the nodes now report other numbers
    s2 = _strategy(tmp_path)
    arrays = s2.resume()
    assert arrays is not None and s2.capacities == s.capacities
    s2.start(DeviceGrid({n: {"capacity": 1.0} for n in NODES}), arrays, 1, timeout=30)
    assert s2.capacities == s.capacities and s2.round_offset == 1


def test_strategy_refuses_a_node_without_memory_before_training(tmp_path: Path) -> None:
    grid = DeviceGrid({104: {"memory-bytes": 1000}})
    s = _strategy(tmp_path)
    want = r"node 104 \(household 'b', shard 1, .*\) reports 1,000 bytes of memory, its shard"
    with pytest.raises(NodeMemoryError, match=want + r" needs about [\d,]+ to train"):
        s.start(grid, s.initial_arrays(), num_rounds=1, timeout=30)
    assert [p[0].metadata.message_type for p in grid.pushes] == [MessageType.QUERY]
    assert not (tmp_path / "checkpoint.pt").exists()


def test_client_reports_capacity_and_memory() -> None:
    from disco_fl.fl.node_settings import device_report as _device

    def ctx(**cfg: Any) -> Any:
        return SimpleNamespace(node_config=cfg)

    assert _device(ctx(capacity=2, **{"memory-bytes": 5 * MIB})) == {
        "capacity": 2.0,
        "memory-bytes": 5 * MIB,
    }
    measured = _device(ctx(capacity="probe"))
    assert measured["capacity"] > 0 and measured["memory-bytes"] > 0
    assert "capacity" not in _device(ctx())  # not configured: not reported (equal slices)
    with pytest.raises(ValueError, match="capacity='fast'"):
        _device(ctx(capacity="fast"))
    with pytest.raises(ValueError, match="memory-bytes='lots'"):
        _device(ctx(**{"memory-bytes": "lots"}))
