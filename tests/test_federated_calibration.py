"""Federated calibration of the BatchNorm statistics per missing node (issue 18, the Flower
path): what a household estimates over its peer channel, each node on its own data, equals the
emulation's ``calibrate_degraded`` on the same model and the same batches; the ClientApp's
handler replies with it as arrays; the server averages the households' replies into the
exported shards, which ``load_shard`` accepts and ``ExportedShard.context`` uses."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import disco_fl
from disco_fl.emulation.statistics import calibrate_degraded
from disco_fl.partition.plan import plan_of
from disco_fl.runtime.calibration import calibrate_node, calibration_batches
from disco_fl.runtime.transport import InProcessHub
from tests.conftest import run_nodes
from tests.test_shards import _random_masks
from tests.zoo import ZOO

BATCH = 8


def _model(n: int) -> disco_fl.PartitionedModel:
    """resnet_narrow over ``n`` nodes, random masks, BatchNorm statistics not the defaults."""
    build, shape = ZOO["resnet_narrow"]
    torch.manual_seed(0)
    pm = disco_fl.partition(build().eval(), n, torch.randn(*shape)).eval()
    _random_masks(pm, 0.4, seed=n)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k in range(n):
            for key, t in pm.shard(k).state_dict().items():
                if key.endswith("running_mean") or key.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return pm


def _data(rows: dict[int, int], shape: tuple[int, ...]) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f: torch.randn(r, *shape[1:], generator=g) for f, r in rows.items()}


def _federated(
    pm: disco_fl.PartitionedModel, data: dict[int, torch.Tensor], missing: list[int]
) -> list[dict[frozenset[int], Any]]:
    """Each node's :func:`calibrate_node`, the nodes as threads over in-process transports."""
    n = pm.num_nodes
    plan = plan_of(pm, "fp32")
    examples = {f: len(x) for f, x in data.items()}
    shards = [pm.shard(k) for k in range(n)]  # each node reads (never changes) its own
    with InProcessHub(n, num_layers=len(plan.program.ops)) as hub:
        return run_nodes(
            lambda k: calibrate_node(
                shards[k], plan, hub[k], data.get(k), examples, missing, batch_size=BATCH,
                max_batches=5, timeout=30.0,
            ),
            n,
        )  # fmt: skip


def _assert_equal_to_emulation(
    pm: disco_fl.PartitionedModel,
    got: list[dict[frozenset[int], Any]],
    data: dict[int, torch.Tensor],
    missing: list[int],
) -> None:
    examples = {f: len(x) for f, x in data.items()}
    for m in missing:
        s = frozenset({m})
        batches = calibration_batches(examples, s, BATCH, 5)
        # the emulation's x: the batches in the household's order (all full but the last)
        x = torch.cat([data[f][a:b] for f, a, b in batches])
        assert all(b - a == BATCH for _, a, b in batches[:-1])
        want = calibrate_degraded(pm, x, missing_sets=[s], batch_size=BATCH, max_batches=5)[s]
        for k in range(pm.num_nodes):
            if k == m:
                assert s not in got[k]
                continue
            assert got[k][s].keys() == want[k].keys() and want[k]
            for op, st in want[k].items():
                for name, t in st.items():
                    torch.testing.assert_close(got[k][s][op][name], t, atol=1e-5, rtol=1e-5)
            # different from the all-up statistics: the estimate did something
            own = pm.shard(k).op_tensors(next(iter(want[k])))["running_mean"]
            assert not torch.allclose(own, got[k][s][next(iter(want[k]))]["running_mean"])


@pytest.mark.parametrize("n", [3, 4])
def test_household_calibration_equals_the_emulation(n: int) -> None:
    """One feeder (the requester, 21 rows: a short last batch): the statistics of every
    surviving node for every missing node equal ``calibrate_degraded``'s within 1e-5."""
    pm = _model(n)
    own = {k: v.clone() for k, v in pm.state_dict().items()}
    data = _data({0: 21}, ZOO["resnet_narrow"][1])
    missing = list(range(1, n))
    got = _federated(pm, data, missing)
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in own.items())
    _assert_equal_to_emulation(pm, got, data, missing)


def test_feeders_take_turns_and_never_feed_their_own_missing_set() -> None:
    """Two nodes hold data (0 and 2 of 3): the batches alternate between them; with node 2
    missing, node 0 alone feeds. Equal to the emulation on the batches in that order."""
    pm = _model(3)
    data = _data({0: 16, 2: 24}, ZOO["resnet_narrow"][1])
    assert calibration_batches({0: 16, 2: 24}, {1}, BATCH, 5) == [
        (0, 0, 8), (2, 0, 8), (0, 8, 16), (2, 8, 16), (2, 16, 24),
    ]  # fmt: skip
    assert calibration_batches({0: 16, 2: 24}, {2}, BATCH, 5) == [(0, 0, 8), (0, 8, 16)]
    assert calibration_batches({2: 24}, {2}, BATCH, 5) == []
    got = _federated(pm, data, [1, 2])
    _assert_equal_to_emulation(pm, got, data, [1, 2])


def test_a_set_without_data_gets_no_statistics_and_bad_sets_are_refused() -> None:
    """N = 2: the only set is node 1 missing, the requester alone; with node 1 the only
    feeder, no batch: no statistics (serving then keeps the all-up ones). Sets that name the
    requester or a node twice are refused."""
    pm = _model(2)
    data = _data({0: 10}, ZOO["resnet_narrow"][1])
    got = _federated(pm, data, [1])
    assert set(got[0]) == {frozenset({1})} and got[1] == {}
    _assert_equal_to_emulation(pm, got, data, [1])
    assert _federated(pm, _data({1: 10}, ZOO["resnet_narrow"][1]), [1]) == [{}, {}]
    plan = plan_of(pm, "fp32")
    with InProcessHub(2) as hub:
        for bad in ([0], [1, 1], [2]):
            with pytest.raises(ValueError, match="missing nodes"):
                calibrate_node(pm.shard(0), plan, hub[0], None, {}, bad)


def test_over_grpc_a_node_with_nothing_to_do_waits_for_its_peers() -> None:
    """N = 2 over loopback gRPC: node 1 (the only missing node) feeds and computes nothing,
    yet it keeps its endpoint up until node 0, which connects late (as a ClientApp process
    started later does), is done: the end is a barrier. Node 0's statistics are the
    emulation's."""
    import time

    from disco_fl.runtime.transport.grpc_transport import GrpcTransport

    pm = _model(2)
    plan = plan_of(pm, "fp32")
    data = _data({0: 12}, ZOO["resnet_narrow"][1])
    ts = [GrpcTransport(k, 2, plan_hash="cal", num_layers=len(plan.program.ops),
                        connect_timeout=5.0) for k in range(2)]  # fmt: skip
    for t in ts:
        t.set_peers([u.address for u in ts])

    def node(k: int) -> Any:
        if k == 0:
            time.sleep(1.5)  # node 1 is done with its own part by then
        ts[k].connect()
        try:
            return calibrate_node(pm.shard(k), plan, ts[k], data.get(k), {0: 12}, [1],
                                  batch_size=BATCH, max_batches=5, timeout=30.0)  # fmt: skip
        finally:
            ts[k].close(2.0)

    got = run_nodes(node, 2, timeout=60.0)
    assert got[1] == {}
    _assert_equal_to_emulation(pm, got, data, [1])


# ---- the Flower path: ClientApp handler, server phase, exported shards ----------------------

# node id -> (household, shard, training examples)
NODES = {101: ("a", 0, 20), 102: ("a", 1, 0), 103: ("a", 2, 12),
         201: ("b", 0, 16), 202: ("b", 1, 0), 203: ("b", 2, 0)}  # fmt: skip


class _HouseholdsGrid:
    """A grid whose nodes are ClientApp ``calibrate`` handlers: each household's nodes run
    as threads over in-process transports, on their own data."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, data: dict[int, torch.Tensor]) -> None:
        import disco_fl.fl.client_app as ca
        from disco_fl.fl.federated import NodeData

        self.ca = ca
        self.replies: dict[str, Any] = {}
        self.hubs: dict[str, InProcessHub] = {}
        by = {(h, k): nid for nid, (h, k, _) in NODES.items()}
        empty = torch.zeros(0, dtype=torch.long)

        def node_data(ctx: Any, *_: Any) -> NodeData:
            x = data.get(by[(ctx.node_config["household"], ctx.node_config["shard"])])
            x = x if x is not None else torch.zeros(0, 1, 28, 28)
            return NodeData(x, torch.zeros(len(x), dtype=torch.long), x[:0], empty)

        monkeypatch.setattr(ca, "_data", node_data)
        monkeypatch.setattr(ca, "_transport", lambda cfg, plan, k, *a: self.hubs[cfg.household][k])

    def push_messages(self, messages: Any) -> list[str]:
        from flwr.app import Context, RecordDict

        from tests.test_flower_contract import _reply

        msgs = list(messages)
        ids = [f"m{i}" for i in range(len(msgs))]
        for h in sorted({NODES[m.metadata.dst_node_id][0] for m in msgs}):
            pairs = zip(ids, msgs, strict=True)
            mine = [(mid, m) for mid, m in pairs if NODES[m.metadata.dst_node_id][0] == h]
            self.hubs[h] = InProcessHub(len(mine))
            for t in self.hubs[h]:
                t.close = lambda *a, **kw: None  # type: ignore[method-assign]

            def go(k: int, mine: list[Any] = mine, h: str = h) -> Any:
                mid, m = mine[k]
                conf = {"household": h, "shard": k, "peer-address": f"x:{k}"}
                ctx = Context(run_id=1, node_id=k, node_config=conf, state=RecordDict(),
                              run_config={})  # fmt: skip
                return _reply(m, mid, self.ca.calibrate(m, ctx).content)

            for mid, reply in zip([mid for mid, _ in mine], run_nodes(go, len(mine)), strict=True):
                self.replies[mid] = reply
        return ids

    def pull_messages(self, ids: Any) -> list[Any]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _flower_setup(n: int = 3) -> Any:
    from disco_fl.fl.federated import ModelSpec
    from disco_fl.fl.server import NodeInfo, build_roster
    from disco_fl.fl.server.strategy import DiscoStrategy

    # fp32 (not the int8 default): the statistics must equal the fp32 emulation's within 1e-5
    s = DiscoStrategy(ModelSpec(num_nodes=n), node_dropout=0.3, codec="fp32")
    _random_masks(s.pm, 0.4, seed=2)
    infos = [NodeInfo(nid, h, k, f"x:{nid}", rows, 0) for nid, (h, k, rows) in NODES.items()]
    s.roster = build_roster(infos, n)
    for hh in s.roster.values():
        hh.token = "t"
    s.num_rounds = 2
    g = torch.Generator().manual_seed(9)
    data = {nid: torch.randn(rows, 1, 28, 28, generator=g) for nid, (_, _, rows) in NODES.items()
            if rows}  # fmt: skip
    return s, data


def test_flower_phase_averages_household_statistics_into_the_exported_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flower_run_identity: None
) -> None:
    """Two households of 3 nodes (a: nodes 0 and 2 hold data; b: node 0) through the
    ClientApp's ``calibrate`` handler: the server's statistics for each missing node are the
    emulation's (``calibrate_degraded`` on each household's batches, in their order, from the
    same shuffled rows) averaged with the rows each household fed; the exported shards
    carry them, ``load_shard`` accepts them and ``context({m})`` normalizes with them."""
    from disco_fl.emulation.export import load_shard
    from disco_fl.fl.calibration import calibration_data
    from disco_fl.fl.round_config import CalibrationConfig
    from disco_fl.fl.server.calibration import calibrate_households, calibration_messages

    s, data = _flower_setup()
    kw = {"batch_size": BATCH, "max_batches": 3}
    summary = calibrate_households(
        _HouseholdsGrid(monkeypatch, data), s.pm, s.roster, s._common(3), s._household_of,
        timeout=60.0, **kw,
    )  # fmt: skip
    assert summary == {"missing_sets": [[1], [2]], "households": ["a", "b"], "failed": {}}
    got = s.pm.degraded_statistics
    # the oracle: per household and missing node, the emulation on that household's batches
    msgs = calibration_messages(s.pm, s.roster, s._common(3), **kw)
    ref = copy.deepcopy(s.pm)
    for m in (1, 2):
        sets, want, rows = frozenset({m}), [], []
        for h in ("a", "b"):
            xs = {}
            for msg in msgs:
                nid = msg.metadata.dst_node_id
                cfg = CalibrationConfig.from_config(msg.content.config_records["config"])
                if NODES[nid][0] == h and nid in data:
                    xs[cfg.shard] = calibration_data(cfg, data[nid], cfg.shard)
            batches = calibration_batches({f: len(x) for f, x in xs.items()}, sets, BATCH, 3)
            x = torch.cat([xs[f][a:b] for f, a, b in batches])
            want.append(calibrate_degraded(ref, x, [sets], batch_size=BATCH, max_batches=3)[sets])
            rows.append(len(x))
        assert len(want) == 2  # both households fed every set
        for k in set(range(3)) - {m}:
            for op, st in want[0][k].items():
                for name in st:
                    terms = [w[k][op][name].double() * r for w, r in zip(want, rows, strict=True)]
                    avg = (sum(terms) / sum(rows)).float()
                    torch.testing.assert_close(got[sets][k][op][name], avg, atol=1e-5, rtol=1e-5)
    s.pm.export(tmp_path)
    nodes = [load_shard(tmp_path / "plan.json", k) for k in range(3)]
    assert nodes[0].degraded_sets == [frozenset({1}), frozenset({2})]
    assert nodes[1].degraded_sets == [frozenset({2})] and nodes[2].degraded_sets == [frozenset({1})]
    bn = next(op for op in nodes[0].program.ops if op.kind == "batch_norm")
    for m in (1, 2):
        view = nodes[0].context({m}).state(bn)["running_mean"]
        assert torch.equal(view, got[frozenset({m})][0][bn.name]["running_mean"])
        assert not torch.equal(view, nodes[0].state(bn)["running_mean"])


def test_a_household_with_a_node_gone_is_skipped_not_waited_for(
    monkeypatch: pytest.MonkeyPatch, flower_run_identity: None
) -> None:
    """Degraded training: household b lost a node in the last round; the phase sends it
    nothing and reports it failed with the reason, household a is calibrated as usual."""
    from disco_fl.fl.server.calibration import calibrate_households

    s, data = _flower_setup()
    grid = _HouseholdsGrid(monkeypatch, data)
    why = "skipped: node(s) [1] unavailable in the last train round"
    summary = calibrate_households(
        grid, s.pm, s.roster, s._common(3), s._household_of, timeout=60.0,
        batch_size=BATCH, max_batches=3, skip={"b": why},
    )  # fmt: skip
    assert summary["households"] == ["a"] and summary["failed"] == {"b": why}
    assert sorted(grid.hubs) == ["a"]  # no message reached household b
    assert summary["missing_sets"] == [[1], [2]]


def test_bad_statistics_are_refused_and_the_setting_decides() -> None:
    """A reply's statistics with a name not asked for, a wrong shape, a NaN or a negative
    variance is refused (``ValueError``); "auto" calibrates with node dropout only, "on"
    any model with BatchNorm, "off" never, a GroupNorm model never."""
    from flwr.app import Array, ArrayRecord

    from disco_fl.fl.calibration import statistics_of_record, statistics_record
    from disco_fl.fl.federated import ModelSpec
    from disco_fl.fl.server.calibration import wants_calibration

    pm = _model(3)
    bn = [op.name for op in pm.program.ops if op.kind == "batch_norm"]
    own = {op: {n: pm.shard(0).op_tensors(op)[n] for n in ("running_mean", "running_var")}
           for op in bn}  # fmt: skip
    sets = [frozenset({1}), frozenset({2})]
    good = {s: {op: {n: t.clone() for n, t in st.items()} for op, st in own.items()} for s in sets}
    rec = statistics_record(good)
    back = statistics_of_record(rec, pm.program, 0, own, sets)
    assert all(torch.equal(back[s][op][n], good[s][op][n]) for s in sets for op in bn
               for n in own[bn[0]])  # fmt: skip
    key = f"@missing=1/{bn[0]}.running_var"
    t = own[bn[0]]["running_var"]
    cases = {
        "@missing=0/" + key.split("/", 1)[1]: t,  # the node itself (not asked)
        key: t[:-1],  # wrong shape
    }
    for k2, v in cases.items():
        bad = {kk: a for kk, a in rec.items()}
        if k2 != key:
            del bad[key]
        bad[k2] = Array(v.numpy())
        with pytest.raises(ValueError):
            statistics_of_record(ArrayRecord(bad), pm.program, 0, own, sets)
    for v in (torch.full_like(t, float("nan")), -torch.ones_like(t)):
        bad = dict(rec.items())
        bad[key] = Array(v.numpy())
        with pytest.raises(ValueError, match="values no statistic has"):
            statistics_of_record(ArrayRecord(bad), pm.program, 0, own, sets)
    with pytest.raises(ValueError, match="missing"):
        statistics_of_record(rec, pm.program, 0, own, sets[:1])  # a set not asked for
    assert wants_calibration("auto", 0.3, pm) and not wants_calibration("auto", 0.0, pm)
    assert wants_calibration("on", 0.0, pm) and not wants_calibration("off", 0.3, pm)
    group = ModelSpec(num_nodes=3, norm="group").partition()
    assert not wants_calibration("on", 0.3, group)
    with pytest.raises(ValueError, match="degraded-statistics"):
        wants_calibration("yes", 0.3, pm)
