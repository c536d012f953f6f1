"""Devices that differ in Flower: nodes report ``capacity`` / ``memory-bytes``, the roster
slices by capacity (one partition for every household; by channels, or by measured shard
compute with ``slices="compute"``) and refuses a node whose shard does not fit its memory,
before any training; a resumed run keeps its partition (old checkpoints too)."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from disco_fl.core.files import load_torch, save_torch
from disco_fl.emulation.balance import compute_shares
from disco_fl.emulation.capacity import channel_shares, training_memory
from disco_fl.fl.federated import ModelSpec, split_global_state, unpack_state
from disco_fl.fl.server import DiscoStrategy, NodeInfo, RosterError, build_roster, devices
from disco_fl.fl.server.checkpoint import RunState, load_run, save_run
from disco_fl.fl.server.devices import Slicing, fit_to_roster, fitted_arrays
from disco_fl.fl.server.roster import NodeMemoryError, check_memory, roster_capacities
from disco_fl.fl.server.server_app import strategy_from_config
from disco_fl.partition.plan import Plan
from tests.test_flower_contract import NODES, SimGrid

SPEC = ModelSpec(num_nodes=2)
MIB = 2**20


@pytest.fixture(autouse=True)
def _run_identity(flower_run_identity: None) -> None:
    """Every test here builds Flower Messages."""


def _info(nid: int, h: str, k: int, cap: float | None, mem: int | None = None) -> NodeInfo:
    return NodeInfo(nid, h, k, f"127.0.0.1:{nid}", 50 if k == 0 else 0, 0, cap, mem)


def _conv1_rows_sent(train: Any, s: Any) -> dict[int, int]:
    """Every node's training message carries the strategy's plan; its shard's conv1 rows."""
    rows: dict[int, int] = {}
    for m in train:
        cfg = m.content.config_records["config"]
        k = int(cfg["shard"])  # type: ignore[call-overload]
        plan = Plan.from_json(json.loads(str(cfg["plan"])))
        assert plan.program.to_json() == s.pm.program.to_json()
        rows[k] = int(unpack_state(m.content.array_records["arrays"])["ops.conv1.weight"].shape[0])
    return rows


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
    assert _conv1_rows_sent(train, s) == {0: 2, 1: 6}
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
    assert s2.slicing == Slicing("channels", s.capacities, s.capacities)
    # a checkpoint written before the rule and the shares were kept loads as the channels rule
    path = tmp_path / "checkpoint.pt"
    old = load_torch(path)
    assert old["slices"] == "channels" and old["shares"] == pytest.approx([0.25, 0.75])
    del old["slices"], old["shares"]
    save_torch(old, path)
    s3 = _strategy(tmp_path)
    assert s3.resume() is not None
    assert s3.slicing == Slicing("channels", s.capacities, s.capacities)
    assert s3.pm.program.to_json() == s.pm.program.to_json()


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


def _cost(nodes: Sequence[Any], x: torch.Tensor) -> list[float]:
    """A deterministic shard compute in place of the clock: 1 + 100 x share^2 (a sparse plan's
    growth), from the candidate partition's real channel shares."""
    return [1 + 100 * v * v for v in channel_shares(nodes[0].plan.program)]


def _timed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The strategy's compute rule timed by :func:`_cost`; returns the list of timed nodes
    counts (one entry per candidate partition timed)."""
    calls: list[int] = []

    def timer(nodes: Sequence[Any], x: torch.Tensor) -> list[float]:
        calls.append(len(nodes))
        return _cost(nodes, x)

    monkeypatch.setattr(devices, "compute_shares", functools.partial(compute_shares, timer=timer))
    return calls


def test_strategy_slices_by_compute_and_resume_keeps_the_shares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``slices="compute"`` with capacities 2:1: the partition follows the compute rule's
    shares (time / capacity equal under the cost), not the channels rule's 2/3; every node
    trains that plan; the checkpoint keeps rule, capacities and shares, and a resume keeps
    the partition without timing again, and without a warning while the nodes report the
    same capacities (reported compared with reported, not with the shares)."""
    calls = _timed(monkeypatch)
    caps = {101: 2.0, 102: 1.0, 103: 4.0, 104: 2.0}  # NODES: a = 101, 102; b = 103, 104
    grid = DeviceGrid({n: {"capacity": c} for n, c in caps.items()})
    s = _strategy(tmp_path, slices="compute")
    with caplog.at_level(logging.INFO, logger="flwr"):
        s.start(grid, s.initial_arrays(), num_rounds=1, timeout=30)
    assert calls == [2] * 11  # 3 candidates for the fit, then those and 5 more, on the server
    sl = s.slicing
    assert sl.rule == "compute" and sl.capacities == pytest.approx((2 / 3, 1 / 3))
    assert sl.shares is not None and sum(sl.shares) == pytest.approx(1.0)
    want, _ = compute_shares(SPEC.build_dense(), 2, SPEC.example()[:1], sl.capacities, 0.1,
                             timer=_cost)  # fmt: skip
    assert sl.shares == pytest.approx(want)
    c0, c1 = (1 + 100 * v * v for v in channel_shares(s.pm.program))
    assert c0 / 2 == pytest.approx(c1 / 1, rel=0.05)  # time / capacity about equal
    got = channel_shares(s.pm.program)
    assert got[0] == pytest.approx(sl.shares[0], abs=0.03)
    assert "slices by compute: capacities 0.667/0.333" in caplog.text
    program = s.pm.program.to_json()  # arrays of a dense model made now: the same partition
    assert fitted_arrays(s, again := s.initial_arrays(SPEC.build_dense(1))) is again
    assert s.pm.program.to_json() == program
    # the channels rule on the same roster gives node 0 about 2/3
    by_channels = _strategy(tmp_path / "channels")
    by_channels.start(grid, by_channels.initial_arrays(), num_rounds=1, timeout=30)
    assert by_channels.slicing.shares == pytest.approx((2 / 3, 1 / 3))
    other = channel_shares(by_channels.pm.program)
    assert other[0] == pytest.approx(2 / 3, abs=0.03) and other[0] - got[0] > 0.04
    # every node trained the compute partition: its plan and its shard
    train = [p for p in grid.pushes if p[0].metadata.message_type == MessageType.TRAIN][0]
    rows = _conv1_rows_sent(train, s)
    assert rows == {k: s.pm.shard(k).state_dict()["ops.conv1.weight"].shape[0] for k in rows}
    # resume: the checkpoint's rule, capacities and shares, no timing, no warning
    calls.clear()
    s2 = _strategy(tmp_path, slices="compute")
    arrays = s2.resume()
    assert arrays is not None and s2.slicing == s.slicing
    assert s2.pm.program.to_json() == s.pm.program.to_json()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        s2.start(grid, arrays, 1, timeout=30)
    assert calls == [] and s2.slicing == s.slicing and "now report" not in caplog.text
    # nodes that now report other capacities: warned, the partition stays
    s3 = _strategy(tmp_path, slices="compute")
    arrays = s3.resume()
    assert arrays is not None
    with caplog.at_level(logging.WARNING, logger="flwr"):
        s3.start(DeviceGrid({n: {"capacity": 1.0} for n in NODES}), arrays, 1, timeout=30)
    assert "keeps the partition of its checkpoint (slices by compute" in caplog.text
    assert "now report capacities 0.5/0.5" in caplog.text
    assert calls == [] and s3.slicing == s.slicing


def test_slices_by_compute_times_nothing_for_equal_or_missing_capacities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _timed(monkeypatch)
    s = _strategy(tmp_path, slices="compute")
    s.roster = build_roster([_info(1, "a", 0, 3.0), _info(2, "a", 1, 3.0)], 2)
    fit_to_roster(s)
    assert calls == [] and s.slicing == Slicing("compute", (0.5, 0.5), (0.5, 0.5))
    assert (s.pm.program.infos["conv1"].layout or []).count(0) == 4  # conv1: 4 + 4 channels
    s = _strategy(tmp_path, slices="compute")
    s.roster = build_roster([_info(1, "a", 0, None), _info(2, "a", 1, None)], 2)
    fit_to_roster(s)
    assert calls == [] and s.slicing == Slicing("compute")


def test_checkpoint_round_trip_keeps_the_slicing_and_old_ones_load(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    sl = Slicing("compute", (2 / 3, 1 / 3), (0.58, 0.42))
    save_run(path, RunState(1, 3, {"x": 1}, {"w": torch.zeros(2)}, 1.0, slicing=sl))
    got = load_run(path, {"x": 1})
    assert got is not None and got.slicing == sl
    state = load_torch(path)
    del state["slices"], state["shares"]  # the format before this change
    save_torch(state, path)
    got = load_run(path, {"x": 1})
    assert got is not None and got.slicing == Slicing("channels", sl.capacities, sl.capacities)
    state["capacities"] = None  # an old checkpoint of equal slices
    save_torch(state, path)
    got = load_run(path, {"x": 1})
    assert got is not None and got.slicing == Slicing()
    state.update(slices="flops", shares=[0.5, 0.5])
    save_torch(state, path)
    with pytest.raises(ValueError, match=r"checkpoint\.pt: slices must be one of 'channels'"):
        load_run(path, {"x": 1})


def test_invalid_slices_are_refused_clearly() -> None:
    want = r"slices must be one of 'channels', 'compute' .*got 'flops'"
    with pytest.raises(ValueError, match=want):
        DiscoStrategy(SPEC, slices="flops")
    with pytest.raises(ValueError, match=want):
        strategy_from_config({"slices": "flops"})
    with pytest.raises(ValueError, match=want):
        Slicing("flops")


def test_run_config_and_demo_pass_slices(tmp_path: Path) -> None:
    """The ``slices`` run config key reaches the strategy (default "channels", as in
    ``pyproject.toml``); ``disco-fl demo --slices compute`` writes it into its run config."""
    import tomllib

    from disco_fl.cli.demo import DEMO_DEFAULTS, demo_run_config
    from disco_fl.cli.main import build_parser

    root = Path(__file__).resolve().parents[1]
    app_cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app_cfg["config"]["slices"] == "channels"
    assert strategy_from_config(app_cfg["config"]).slices == "channels"
    assert strategy_from_config({}).slices == "channels"
    assert strategy_from_config({"slices": "compute"}).slices == "compute"
    parser = build_parser()
    for argv, want in (([], "channels"), (["--slices", "compute"], "compute")):
        args = parser.parse_args(["demo", "--capacities", "2,1", *argv])
        for name, v in DEMO_DEFAULTS["classification"].items():  # as run_demo fills them
            if getattr(args, name) is None:
                setattr(args, name, v)
        cfg = demo_run_config(args, SPEC, tmp_path / "dense.pth", tmp_path / "run")
        assert cfg["slices"] == want and strategy_from_config(cfg).slices == want
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--slices", "flops"])
