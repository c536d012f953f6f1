"""Degraded mode (issue 18): a household that still answers with a device missing, its
channels closed; the reply says which nodes were missing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from disco_fl.emulation.export import run_shards
from disco_fl.runtime.inference import PeerError, run_node
from disco_fl.runtime.transport.grpc_transport import GrpcTransport
from disco_fl.runtime.transport.inprocess import InProcessHub
from tests.test_runtime_local import Household, grpc_household, household  # noqa: F401

JOIN_S = 60.0


def _run(
    hh: Household, transports: list[Any], run: list[int], session: str, **kw: Any
) -> tuple[list[Any], list[set[int]], list[BaseException | None]]:
    """Run the nodes ``run`` (each in a thread); the others never start."""
    n = len(hh.nodes)
    out: list[Any] = [None] * n
    missing: list[set[int]] = [set() for _ in range(n)]
    errors: list[BaseException | None] = [None] * n

    def go(k: int) -> None:
        try:
            out[k] = run_node(
                hh.nodes[k],
                transports[k],
                hh.x if k == 0 else None,
                session_id=session,
                timeout=20.0,
                missing=missing[k],
                **kw,
            )
        except BaseException as e:
            errors[k] = e

    threads = [threading.Thread(target=go, args=(k,), daemon=True) for k in run]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads)
    return out, missing, errors


@pytest.mark.parametrize("name", ["resnet_narrow", "user"])
@pytest.mark.parametrize("gone", [1, 2])
def test_a_silent_node_is_left_out_after_the_wait(
    household: Callable[..., Household],  # noqa: F811
    name: str,
    gone: int,
) -> None:
    hh = household(name, 3)
    expected = run_shards(hh.nodes, hh.x, missing={gone})
    assert not torch.allclose(expected, hh.ref, atol=1e-3)  # its channels mattered
    present = [k for k in range(3) if k != gone]
    with InProcessHub(3, num_layers=hh.num_layers) as hub:
        t0 = time.monotonic()
        out, missing, errors = _run(hh, list(hub), present, f"s-{gone}", degraded_wait=0.5)
        took = time.monotonic() - t0
    assert errors == [None] * 3
    assert torch.equal(out[0], expected)
    assert missing[0] == {gone}
    assert took < 10.0  # one wait of 0.5 s per node that waited (not one per message)


def test_without_degraded_mode_a_silent_node_fails_the_request(
    household: Callable[..., Household],  # noqa: F811
) -> None:
    hh = household("resnet_narrow", 2)
    with InProcessHub(2, num_layers=hh.num_layers) as hub:
        out, missing, errors = _run(hh, list(hub), [0], "s-strict")
    assert isinstance(errors[0], TimeoutError) and "node 1 stalled" in str(errors[0])


def test_a_dead_peer_over_grpc_is_left_out_at_once(
    household: Callable[..., Household],  # noqa: F811
    grpc_household: Callable[..., list[GrpcTransport]],  # noqa: F811
) -> None:
    hh = household("user", 3)
    ts = grpc_household(3, hh.nodes[0].plan.hash, hh.num_layers)
    out, _, errors = _run(hh, ts, [0, 1, 2], "s-all", degraded_wait=5.0)
    assert errors == [None] * 3 and torch.equal(out[0], hh.ref)  # all up: the full answer
    ts[2].close(1.0)  # node 2's device is gone
    t0 = time.monotonic()
    out, missing, errors = _run(hh, ts, [0, 1], "s-dead", degraded_wait=5.0)
    took = time.monotonic() - t0
    assert errors[0] is None and errors[1] is None, errors
    assert missing[0] == {2}
    assert torch.equal(out[0], run_shards(hh.nodes, hh.x, missing={2}))
    assert took < 5.0  # an unreachable peer is not waited for


def test_the_requester_cannot_be_missing(household: Callable[..., Household]) -> None:  # noqa: F811
    hh = household("resnet_narrow", 2)
    with pytest.raises(ValueError, match="requester"):
        run_shards(hh.nodes, hh.x, missing={0})
    with InProcessHub(2, num_layers=hh.num_layers) as hub:
        _, _, errors = _run(hh, list(hub), [1], "s-no-requester", degraded_wait=0.3)
    # a node without the requester's input cannot compute anything: it fails, clearly
    assert isinstance(errors[1], PeerError)
    assert "cannot go on without node 0's message" in str(errors[1])


def test_head_on_the_requester_keeps_the_whole_output(tmp_path) -> None:  # noqa: ANN001
    """``head="requester"``: the requester owns every output channel of the last mixing
    layer, so without a node the output is complete; with a split head, the missing node's
    slice of the output (here: its classes' logits) is all zeros."""
    import disco_fl
    from disco_fl.emulation.export import load_shard
    from disco_fl.partition.head import head_op
    from tests.zoo import ZOO

    build, shape = ZOO["resnet_narrow"]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    outs = {}
    for head in ("split", "requester"):
        pm = disco_fl.partition(model, 3, x, head=head).eval()
        with torch.no_grad():
            assert (pm(x) - model(x)).abs().max().item() <= 1e-5  # gates open == original
        fc = pm.program.infos[head_op(pm.program)].layout
        assert fc is not None
        assert (set(fc.owners) == {0}) == (head == "requester")
        pm.export(tmp_path / head)
        nodes = [load_shard(tmp_path / head / "plan.json", k) for k in range(3)]
        assert (run_shards(nodes, x) - model(x)).abs().max().item() <= 1e-5
        outs[head] = (run_shards(nodes, x, missing={2}), fc)
    split, fc = outs["split"]
    mine = torch.tensor([o == 2 for o in fc.owners])
    assert torch.equal(split[:, mine], torch.zeros_like(split[:, mine]))
    whole, _ = outs["requester"]
    assert bool((whole[:, mine] != 0).all())
    with pytest.raises(disco_fl.PartitionError, match="head"):
        disco_fl.partition(model, 3, x, head="everywhere")


@pytest.mark.parametrize("head", ["split", "requester"])
def test_node_dropout_in_the_emulation_equals_a_missing_node(tmp_path, head: str) -> None:  # noqa: ANN001
    """``pm.dropped_nodes`` (node dropout while training) computes what a household computes
    without those nodes: fused == lock step == shards with the node missing (BatchNorm
    model: channel-local normalization)."""
    import disco_fl
    from disco_fl.emulation.export import load_shard
    from tests.test_shards import _random_masks
    from tests.zoo import ZOO

    build, shape = ZOO["resnet_narrow"]
    torch.manual_seed(1)
    model = build().eval()
    x = torch.randn(*shape)
    pm = disco_fl.partition(model, 3, x, head=head).eval()
    _random_masks(pm, 0.5, seed=3)
    pm.export(tmp_path)
    nodes = [load_shard(tmp_path / "plan.json", k) for k in range(3)]
    expected = run_shards(nodes, x, missing={1}, overlap=False)
    pm.dropped_nodes = frozenset({1})
    with torch.no_grad():
        pm.execution = "fused"
        fused = pm(x)
        pm.execution = "lockstep"
        lock = pm(x)
    pm.dropped_nodes = frozenset()
    assert (fused - expected).abs().max().item() <= 1e-5
    assert (lock - expected).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert (pm(x) - run_shards(nodes, x)).abs().max().item() <= 1e-5  # reset: all up


def test_fit_budget_with_node_dropout_runs_and_resets() -> None:
    import disco_fl
    from disco_fl.emulation.budget import BudgetConfig, fit_budget
    from tests.zoo import ZOO

    build, _ = ZOO["resnet_narrow"]
    torch.manual_seed(0)
    pm = disco_fl.partition(build(), 3, torch.randn(2, 1, 28, 28), head="requester")
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    cfg = BudgetConfig(budget=0.2, gate_epochs=1, finetune_epochs=1, node_dropout=0.5)
    fit_budget(pm, x, y, cfg)
    assert pm.dropped_nodes == frozenset()
    with pytest.raises(ValueError, match="node_dropout"):
        BudgetConfig(budget=0.1, node_dropout=1.0)
