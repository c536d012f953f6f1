"""BatchNorm statistics per missing node (issue 18, degraded mode): calibration, export,
shard-only execution and the runtime agree; malformed statistics and frames are refused."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import disco_fl
from disco_fl.core.wire import encode_tensor
from disco_fl.emulation.export import load_shard, run_shards
from disco_fl.emulation.statistics import calibrate_degraded
from disco_fl.partition.plan import Plan, PlanError
from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.inference import run_node
from disco_fl.runtime.transport.frames import check_incoming
from disco_fl.runtime.transport.inprocess import InProcessHub
from tests.test_runtime_local import _random_masks
from tests.zoo import ZOO

N = 3


def _plans(tmp: Path) -> tuple[Any, torch.Tensor, list[Any], list[Any]]:
    """resnet_narrow over 3 nodes with random masks, exported with statistics per missing
    node (``stats``) and without (``plain``): the same weights otherwise."""
    build, shape = ZOO["resnet_narrow"]
    torch.manual_seed(0)
    pm = disco_fl.partition(build().eval(), N, torch.randn(*shape)).eval()
    _random_masks(pm, 0.35, seed=1)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    pm.export(tmp / "plain")
    own = {k: v.clone() for k, v in pm.state_dict().items() if "running" in k}
    stats = calibrate_degraded(pm, torch.randn(96, *shape[1:]), batch_size=32)
    assert set(stats) == {frozenset({1}), frozenset({2})}
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in own.items())  # own ones kept
    pm.export(tmp / "stats")
    load = lambda d: [load_shard(tmp / d / "plan.json", k) for k in range(N)]  # noqa: E731
    return pm, x, load("stats"), load("plain")


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, torch.Tensor, list, list]:
    return _plans(tmp_path_factory.mktemp("degraded_stats"))


def test_statistics_are_per_surviving_node_and_used_only_for_their_set(plans: Any) -> None:
    pm, x, nodes, plain = plans
    assert nodes[0].degraded_sets == [frozenset({1}), frozenset({2})]
    assert nodes[1].degraded_sets == [frozenset({2})]  # node 1 has none for itself missing
    assert plain[0].degraded_sets == []
    assert nodes[0].context(()) is nodes[0] and nodes[0].context({1, 2}) is nodes[0]
    assert nodes[0].context({1}) is nodes[0].context([1])  # one view per set
    # all up: the statistics change nothing
    assert torch.equal(run_shards(nodes, x), run_shards(plain, x))
    for gone in (1, 2):
        with_stats = run_shards(nodes, x, missing={gone})
        without = run_shards(plain, x, missing={gone})
        assert not torch.allclose(with_stats, without, atol=1e-4)
        bn = next(op for op in nodes[0].program.ops if op.kind == "batch_norm")
        view = nodes[0].context({gone}).state(bn)["running_mean"]
        assert torch.equal(
            view, pm.degraded_statistics[frozenset({gone})][0][bn.name]["running_mean"]
        )


def test_runtime_starting_without_a_node_equals_run_shards(plans: Any) -> None:
    """Nodes 0 and 2 start the session with node 1 missing (as the INPUT frames tell them in
    serving): no wait for node 1 at all (no degraded_wait), the statistics for {1}."""
    _, x, nodes, _ = plans
    expected = run_shards(nodes, x, missing={1})
    out: list[Any] = [None] * N
    errors: list[BaseException | None] = [None] * N
    with InProcessHub(N, num_layers=len(nodes[0].program.ops)) as hub:
        ts = list(hub)

        def go(k: int) -> None:
            try:
                out[k] = run_node(
                    nodes[k], ts[k], x if k == 0 else None, session_id="s", timeout=20.0,
                    missing={1},
                )  # fmt: skip
            except BaseException as e:
                errors[k] = e

        threads = [threading.Thread(target=go, args=(k,), daemon=True) for k in (0, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == [None] * N
    assert torch.equal(out[0], expected)


def test_malformed_statistics_are_refused(tmp_path: Path, plans: Any) -> None:
    pm, _, _, _ = plans
    pm.export(tmp_path)
    plan = Plan.load(tmp_path / "plan.json")
    state = torch.load(tmp_path / "node_0.pt", weights_only=True)
    conv = next(op.name for op in plan.program.ops if op.kind == "conv2d")
    bn_key = next(k for k in state if k.startswith("@missing=1/"))
    cases = {
        f"@missing=1/{conv}.weight": state[bn_key],  # not a BatchNorm op
        "@missing=x/" + bn_key.split("/", 1)[1]: state[bn_key],  # not node numbers
        "@missing=9/" + bn_key.split("/", 1)[1]: state[bn_key],  # out of range
        "@missing=0/" + bn_key.split("/", 1)[1]: state[bn_key],  # the node itself
        bn_key: state[bn_key][:-1],  # wrong shape
    }
    from disco_fl.emulation.export import ExportedShard

    for key, t in cases.items():
        bad = {**state, key: t}
        with pytest.raises(PlanError):
            ExportedShard(plan, 0, bad)
    assert ExportedShard(plan, 0, state).degraded_sets  # the untouched state loads


def test_calibration_refuses_impossible_sets(plans: Any) -> None:
    pm = plans[0]
    for bad in ([0], [], [1, 2, 0], [5]):
        with pytest.raises(ValueError, match="missing set"):
            calibrate_degraded(pm, torch.randn(8, 1, 28, 28), missing_sets=[bad])


def test_frames_name_missing_nodes_only_in_input_frames() -> None:
    f = peer_pb2.Frame(session_id="s", layer=0, direction=peer_pb2.Frame.INPUT, src=0, dst=1)
    encode_tensor(torch.zeros(1, 2), "fp32", out=f.tensor)
    f.missing_nodes.extend([2])
    assert check_incoming(f, 1, 3, 10) is None
    for bad in ([1], [0], [2, 2], [7]):  # the receiver, the sender, twice, out of range
        g = peer_pb2.Frame()
        g.CopyFrom(f)
        del g.missing_nodes[:]
        g.missing_nodes.extend(bad)
        assert "missing_nodes" in (check_incoming(g, 1, 3, 10) or "")
    g = peer_pb2.Frame()
    g.CopyFrom(f)
    g.direction = peer_pb2.Frame.FORWARD
    assert "INPUT" in (check_incoming(g, 1, 3, 10) or "")
