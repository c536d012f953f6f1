"""Slices by compute (disco_fl.emulation.balance): the solver on known cost curves, the per-node
timing of shard programs, and the rule end to end with a deterministic cost in place of the
clock; ``disco-fl train --slices compute`` partitions by the rule's shares."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from disco_fl.emulation.balance import (
    REFINE,
    check_slice_rule,
    compute_shares,
    fit_costs,
    random_plan,
    shard_compute_ms,
    solve_shares,
)
from disco_fl.emulation.capacity import channel_shares
from disco_fl.emulation.export import ExportedShard, load_shard, run_shards
from disco_fl.models import build_model


def _samples(cost, shares_list):  # type: ignore[no-untyped-def]
    return [(s, [cost(k, v) for k, v in enumerate(s)]) for s in shares_list]


def test_solve_shares_linear_cost_gives_proportional_shares() -> None:
    """Compute that grows like the share (dense exchange): the channels rule is right."""
    got = solve_shares(_samples(lambda k, s: 100 * s, [[0.5, 0.5], [0.6, 0.4], [0.7, 0.3]]), [2, 1])
    assert got == pytest.approx((2 / 3, 1 / 3), abs=1e-6)


def test_solve_shares_quadratic_cost_balances_time_over_capacity() -> None:
    """Compute that grows like the share squared (sparse exchange) plus a fixed cost: the
    shares make time / capacity equal, far from the channels rule."""

    def cost(k: int, s: float) -> float:
        return 5 + (8 if k == 0 else 0) + 100 * s * s  # node 0 (the requester) does a bit more

    cands = [[0.5, 0.5], [0.583, 0.417], [0.667, 0.333]]
    got = solve_shares(_samples(cost, cands), [2, 1])
    assert sum(got) == pytest.approx(1.0)
    assert cost(0, got[0]) / 2 == pytest.approx(cost(1, got[1]) / 1, rel=1e-6)
    assert 0.55 < got[0] < 0.62  # sqrt(2)/(1+sqrt(2)) = 0.586 without the fixed costs
    # three nodes
    offsets = [10.0, 2.0, 0.0]
    cands3 = [[1 / 3] * 3, [0.4, 0.35, 0.25], [0.5, 0.3, 0.2]]
    got3 = solve_shares(_samples(lambda k, s: offsets[k] + 30 * s + 40 * s * s, cands3), [3, 2, 1])
    ratios = [
        (offsets[k] + 30 * s + 40 * s * s) / c
        for k, (s, c) in enumerate(zip(got3, [3, 2, 1], strict=True))
    ]
    assert sum(got3) == pytest.approx(1.0)
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-6)


def test_fit_costs_is_robust_to_a_noisy_point() -> None:
    """One disturbed timing (the slow node's halfway candidate measured 40% high) must not bend
    a node's curve downwards and send the solution to an extreme share (it did with a free
    quadratic per node: 0.90 / 0.10 from real timings)."""

    def cost(k: int, s: float) -> float:
        return 100 * s * s + 60 * s

    cands = [[0.5, 0.5], [0.589, 0.411], [0.676, 0.324]]
    samples = _samples(cost, cands)
    samples[1][1][1] *= 1.4
    got = solve_shares(samples, [2, 1])
    exact = solve_shares(_samples(cost, cands), [2, 1])
    assert abs(got[0] - exact[0]) < 0.06 and 0.5 < got[0] < 0.7
    curves = fit_costs(samples)
    assert curves is not None and all(c.b >= 0 and c.c >= 0 for c in curves)
    # nothing grows with the share: no curve, the capacities' proportions
    flat = [([0.5, 0.5], [10.0, 10.0]), ([0.6, 0.4], [10.0, 10.0]), ([0.7, 0.3], [10.0, 10.0])]
    assert fit_costs(flat) is None
    assert solve_shares(flat, [3, 1]) == pytest.approx((0.75, 0.25))


def _small_resnet() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("resnet", in_channels=3).eval(), torch.randn(2, 3, 16, 16)


def _nodes(pm, tmp_path: Path):  # type: ignore[no-untyped-def]
    pm.export(tmp_path)
    return [load_shard(tmp_path / "plan.json", k) for k in range(pm.program.num_nodes)]


@pytest.mark.exclusive  # compares two nodes' timed compute (3 runs each)
def test_shard_compute_ms_times_each_node(tmp_path: Path) -> None:
    """The node holding 80% of the channels computes longer than the one holding 20%, and the
    meter changes nothing in the result."""
    model, x = _small_resnet()
    pm, fraction = random_plan(model, 2, x, [0.8, 0.2], 0.1, seed=3)
    assert 0 < fraction <= 0.1
    nodes = _nodes(pm, tmp_path)
    t = shard_compute_ms(nodes, x, reps=3)
    assert len(t) == 2 and t[0] > t[1] > 0
    seen: list[int] = []

    class Meter:
        def __init__(self, k: int) -> None:
            seen.append(k)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            return None

    with torch.no_grad():
        assert torch.equal(run_shards(nodes, x, meter=Meter), run_shards(nodes, x))
    assert set(seen) == {0, 1}


def test_compute_shares_end_to_end_with_a_deterministic_cost() -> None:
    """The rule on real partitions of the small ResNet: candidates equal, halfway and
    channel-proportional, each timed (here: ``timer``, a cost of 1 + 100 x share^2 from the
    partition's real channel shares, in place of the clock), the solve on the shares as
    partitioned, then all of them again with the partitions at and around the solution (in
    turns); the shares kept are those of the measured best partition; the model keeps its
    train / eval mode."""
    model, x = _small_resnet()
    timed: list[int] = []

    def cost(shares: Sequence[float]) -> list[float]:
        return [1 + 100 * s * s for s in shares]

    def fake_time(nodes: Sequence[ExportedShard], x: torch.Tensor) -> list[float]:
        timed.append(len(nodes))
        return cost(channel_shares(nodes[0].plan.program))

    model.train()
    shares, trials = compute_shares(model, 2, x[:1], [2.0, 1.0], 0.1, timer=fake_time)
    assert model.training and timed == [2] * 11  # 3 for the fit, then 3 + 5 around it
    assert [t["shares"][0] for t in trials[:3]] == pytest.approx([0.5, 0.583, 0.667], abs=0.02)
    fitted, _ = compute_shares(model, 2, x[:1], [2.0, 1.0], 0.1, timer=fake_time, refine=())
    assert timed == [2] * 14  # without refinement: the 3 candidates only
    c0, c1 = cost(fitted)
    assert c0 / 2 == pytest.approx(c1 / 1, rel=1e-3)  # the fit balances time / capacity
    assert fitted[0] < 0.62 < 2 / 3  # the channels rule would give node 0 two thirds
    around = [t["requested"][0] for t in trials[3:]]
    assert around == pytest.approx([0.5 + a * (fitted[0] - 0.5) for a in REFINE])
    best = min(trials, key=lambda t: t["bottleneck"])
    assert shares == tuple(best["requested"]) and sum(shares) == pytest.approx(1.0)
    for t in trials:  # the bottleneck is the slowest node's time over its capacity
        assert t["bottleneck"] == pytest.approx(max(v / c for v, c in zip(
            t["node_compute_ms"], (2 / 3, 1 / 3), strict=True)))  # fmt: skip
    # equal capacities: equal shares, nothing measured
    assert compute_shares(model, 2, x[:1], [1.5, 1.5], 0.1, timer=fake_time) == ((0.5, 0.5), [])
    assert timed == [2] * 14


def test_compute_shares_keeps_the_measured_best_not_the_fit() -> None:
    """A bump the curve cannot see: the partition at the fitted solution computes slowly
    (a kernel slow at its channel counts). The rule keeps the fastest partition it timed,
    and that partition reproduces from the returned shares."""
    model, x = _small_resnet()
    calls: list[list[float]] = []

    def bumpy(nodes: Sequence[ExportedShard], x: torch.Tensor) -> list[float]:
        s = channel_shares(nodes[0].plan.program)
        t = [1 + 100 * v * v for v in s]
        calls.append(s)
        if len(calls) == 9:  # final timing, REFINE[2] == 1.0: the fitted solution itself
            t[0] *= 3
        return t

    shares, trials = compute_shares(model, 2, x[:1], [2.0, 1.0], 0.1, timer=bumpy)
    assert REFINE[2] == 1.0 and len(trials) == 8
    assert [t["shares"] for t in trials[:3]] == calls[:3] == calls[3:6]  # re-timed in turns
    assert all("fit_node_compute_ms" in t for t in trials[:3])
    fitted = trials[5]["requested"]
    assert tuple(shares) != tuple(fitted)
    best = min(range(8), key=lambda i: trials[i]["bottleneck"])
    assert best != 5 and shares == tuple(trials[best]["requested"])
    assert trials[best]["bottleneck"] < trials[5]["bottleneck"] / 2
    again, _ = random_plan(model, 2, x[:1], shares, 0.1)
    assert channel_shares(again.program) == pytest.approx(trials[best]["shares"])


def test_slice_rules_are_checked() -> None:
    assert check_slice_rule("compute") == "compute"
    with pytest.raises(ValueError, match=r"one of 'channels', 'compute' .*got 'flops'"):
        check_slice_rule("flops")


def test_train_slices_compute_partitions_by_the_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`disco-fl train --capacities 2,1 --slices compute`: the plan is partitioned by the
    compute rule's shares (the rule's timing replaced by fixed shares: unit isolation), with
    the budget of the run, and the summary says so."""
    import numpy as np

    from disco_fl.cli import main as cli
    from disco_fl.data import load_builtin
    from disco_fl.partition.plan import Plan

    calls: list[tuple[object, ...]] = []

    def rule(model, n, example, caps, budget, max_sync, **kw):  # type: ignore[no-untyped-def]
        calls.append((n, tuple(caps), budget, max_sync, tuple(example.shape)))
        return (0.6, 0.4), []

    monkeypatch.setattr(cli, "compute_shares", rule)
    images, labels = load_builtin()
    data = tmp_path / "small.npz"
    pick = np.random.default_rng(0).choice(len(labels), 200, replace=False)
    np.savez(data, images=images[pick], labels=labels[pick])
    out = tmp_path / "s.json"
    rc = cli.main(
        [
            "train", "--data", str(data), "--nodes", "2", "--capacities", "2,1",
            "--slices", "compute", "--budget", "0.3", "--max-sync-points", "3",
            "--dense-epochs", "1", "--gate-epochs", "1", "--finetune-epochs", "1",
            "--out", str(tmp_path / "run"), "--json", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    assert calls == [(2, (2.0, 1.0), 0.3, 3, (1, 1, 28, 28))]
    summary = json.loads(out.read_text())
    assert summary["slices"] == "compute" and summary["capacities"] == [2.0, 1.0]
    shares = channel_shares(Plan.load(tmp_path / "run" / "plan" / "plan.json").program)
    assert shares == pytest.approx(summary["channel_shares"])
    assert math.isclose(shares[0], 0.6, abs_tol=0.05)  # 0.6 : 0.4, not the channels rule's 2/3
