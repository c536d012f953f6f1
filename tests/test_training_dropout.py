"""Node dropout in the distributed training step (issue 18): N nodes as threads, each training its
shard over a real transport, with nodes sitting steps out at random, equal the emulation trained
with the same draw (``pm.dropped_nodes``); the draw is the same on every node and is the one of
the emulation's budget training; payload bytes equal the prediction with the dropped nodes left
out; rate 0 is today's training, bit for bit; bad rates are refused.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import disco_fl
from disco_fl.core.gates import dropped_nodes
from disco_fl.runtime.training import NodeTrainer, plan_of, plan_open_count, predict_step_bytes
from disco_fl.runtime.transport import InProcessHub, Transport
from tests.test_training_distributed import (
    BATCH,
    _assert_shards_equal,
    _emulate,
    _optimizer,
    _partition,
    _run,
    _same_snapshot,
    _snapshot,
    _trainers,
    grpc_transports,  # noqa: F401  (the fixture)
)

RATE = 0.5
SEED = 7  # _trainers' gate_seed and _emulate's: the seed of the shared draws
STEPS = 4  # with RATE and SEED at N = 3 (owner 0): {1, 2}, {1}, {}, {1}


def _dropout_equals_emulation(
    name: str,
    n: int,
    opt_kind: str,
    mode: str,
    make: Callable[[int, int], list[Transport]] | None = None,
    **kw: Any,
) -> None:
    pm, batches = _partition(name, n, 0.6)
    batches = [*batches, *batches]
    ref = copy.deepcopy(pm)
    before = _snapshot(pm)
    penalty = 0.5 if mode == "stochastic" else 0.0
    draws = _emulate(ref, batches, opt_kind, mode, range(STEPS), penalty, rate=RATE)
    assert any(draws) and not all(draws), draws  # nodes do drop, and not in every step
    if make is None:
        with InProcessHub(n, num_layers=len(pm.program.ops)) as hub:
            trainers = _trainers(pm, list(hub), opt_kind, mode, penalty, node_dropout=RATE, **kw)
            results, errors = _run(trainers, batches, range(STEPS))
    else:
        transports = make(n, len(pm.program.ops))
        trainers = _trainers(pm, transports, opt_kind, mode, penalty, node_dropout=RATE, **kw)
        results, errors = _run(trainers, batches, range(STEPS))
    assert errors == [None] * n
    # every node drew the emulation's set, and reports it
    for k in range(n):
        assert [r.dropped for r in results[k]] == draws
        assert [trainers[k].dropped(t) for t in range(STEPS)] == draws
    for tr in trainers:
        tr.expand()  # compact trainers: full-width shards back in pm
    assert not _same_snapshot(before, _snapshot(pm))  # it trained
    _assert_shards_equal(pm, ref)
    if mode == "hard":  # payload bytes: nothing to or from a dropped node, as predicted
        plan = plan_of(pm)
        for t, gone in enumerate(draws):
            pred = predict_step_bytes(pm.program, plan_open_count(plan), BATCH, dropped=gone)
            for k in range(n):
                r = results[k][t]
                assert (r.forward_bytes, r.backward_bytes) == pred.per_sender.get(k, (0, 0))
                if k in gone:
                    assert r.forward_bytes == r.backward_bytes == 0
                    assert r.control_bytes == 4  # it still votes
            all_up = predict_step_bytes(pm.program, plan_open_count(plan), BATCH)
            assert (pred.forward < all_up.forward) == bool(gone)


@pytest.mark.parametrize(
    ("name", "n", "opt_kind", "mode"),
    [
        ("resnet_narrow", 3, "sgd", "hard"),
        ("resnet_narrow", 3, "adam", "hard"),
        ("resnet_narrow", 3, "sgd", "stochastic"),
        ("user", 3, "sgd", "hard"),  # GroupNorm / LayerNorm statistics shared across nodes
    ],
)
def test_node_dropout_training_equals_emulation(
    name: str, n: int, opt_kind: str, mode: str
) -> None:
    _dropout_equals_emulation(name, n, opt_kind, mode)


def test_node_dropout_compact_training_equals_emulation() -> None:
    """Compact weights (the ClientApp's hard rounds): a dropped peer's open columns read zeros."""
    _dropout_equals_emulation("resnet_narrow", 3, "adam", "hard", compact=True)


def test_node_dropout_training_over_grpc_equals_emulation(
    grpc_transports: Callable[[int, int], list[Transport]],  # noqa: F811
) -> None:
    _dropout_equals_emulation("resnet_narrow", 3, "sgd", "hard", grpc_transports)


def test_the_comparison_sees_the_dropout() -> None:
    """Training with node dropout does not equal the emulation trained without it (so the
    equality above tests the dropout), nor with another draw."""
    pm, batches = _partition("resnet_narrow", 3, 0.6)
    all_up, other = copy.deepcopy(pm), copy.deepcopy(pm)
    _emulate(all_up, batches, "sgd", "hard", range(2), 0.0)
    draws = _emulate(other, batches, "sgd", "hard", range(2), 0.0, rate=0.2)
    assert draws != [dropped_nodes(SEED, t, 3, RATE, 0) for t in range(2)]
    with InProcessHub(3, num_layers=len(pm.program.ops)) as hub:
        trainers = _trainers(pm, list(hub), "sgd", "hard", 0.0, node_dropout=RATE)
        _, errors = _run(trainers, batches, range(2))
    assert errors == [None] * 3
    for ref in (all_up, other):
        with pytest.raises(AssertionError, match="node"):
            _assert_shards_equal(pm, ref)


def test_the_draw_is_shared_and_is_the_budget_trainings() -> None:
    """Every node derives the same set from the seed and the step (owners taking turns: the
    step's owner is never dropped); it is the set the emulation's budget training draws
    (``fit_budget`` with ``node_dropout``, seed = the trainer's ``gate_seed``); each other node
    is dropped at about the rate."""
    from disco_fl.emulation.budget import BudgetConfig, fit_budget
    from tests.zoo import ZOO

    n, rate, seed = 3, 0.4, 11
    pm, _ = _partition("resnet_narrow", n, 0.6)
    plan = plan_of(pm)
    with InProcessHub(n) as hub:
        trainers = [
            NodeTrainer(
                pm.shard(k),
                plan,
                hub[k],
                _optimizer("sgd", [pm.shard(k)]),
                gate_seed=seed,
                owners=[0, 2],
                node_dropout=rate,
            )
            for k in range(n)
        ]
        steps = range(2000)
        sets = [[tr.dropped(t) for t in steps] for tr in trainers]
    assert sets[0] == sets[1] == sets[2]
    for t in steps:
        owner = trainers[0].owner_of(t)
        assert sets[0][t] == dropped_nodes(seed, t, n, rate, owner)
        assert owner not in sets[0][t]
    for k in range(n):  # node k is dropped in about `rate` of the steps it does not own
        theirs = [t for t in steps if trainers[0].owner_of(t) != k]
        share = sum(k in sets[0][t] for t in theirs) / len(theirs)
        assert abs(share - rate) < 0.05, (k, share)

    # the emulation's budget training draws the same sets, step by step
    build, _ = ZOO["resnet_narrow"]
    torch.manual_seed(0)
    emu = disco_fl.partition(build(), n, torch.randn(2, 1, 28, 28), head="requester")
    seen: list[frozenset[int]] = []

    def record(module: Any, args: Any) -> None:
        if module.training:
            seen.append(module.dropped_nodes)

    emu.register_forward_pre_hook(record)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    cfg = BudgetConfig(
        budget=0.3, gate_epochs=1, finetune_epochs=1, batch_size=8, node_dropout=rate, seed=seed
    )
    fit_budget(emu, x, y, cfg)
    seen = seen[:8]  # the training steps (then a BatchNorm recalibration, all up)
    assert len(seen) == 8 and any(seen)
    with InProcessHub(n) as hub:
        alone = NodeTrainer(
            emu.shard(0),
            plan_of(emu),
            hub[0],
            _optimizer("sgd", [emu.shard(0)]),
            gate_seed=seed,
            node_dropout=rate,
        )
        assert seen == [alone.dropped(t) for t in range(len(seen))]


def test_rate_zero_is_todays_training() -> None:
    """``node_dropout=0`` (the default) draws nothing: bit-identical shards and bytes."""
    pm, batches = _partition("resnet_narrow", 3, 0.6)
    twin = copy.deepcopy(pm)
    runs = []
    for model, kw in ((pm, {}), (twin, {"node_dropout": 0.0})):
        with InProcessHub(3, num_layers=len(model.program.ops)) as hub:
            trainers = _trainers(model, list(hub), "adam", "hard", 0.0, **kw)
            results, errors = _run(trainers, batches, range(3))
        assert errors == [None] * 3
        runs.append(results)
        assert all(r.dropped == frozenset() for res in results for r in res)
    assert _same_snapshot(_snapshot(pm), _snapshot(twin))
    bytes_ = [[[(r.forward_bytes, r.backward_bytes) for r in res] for res in run] for run in runs]
    assert bytes_[0] == bytes_[1]


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, math.nan, "0.5", True, None])
def test_invalid_rates_are_refused(rate: Any) -> None:
    from disco_fl.emulation.budget import BudgetConfig

    pm, _ = _partition("resnet_narrow", 2, 0.6)
    match = r"node_dropout must be a number in \[0, 1\)"
    with InProcessHub(2) as hub, pytest.raises(ValueError, match=match):
        _trainers(pm, list(hub), "sgd", "hard", 0.0, node_dropout=rate)
    with pytest.raises(ValueError, match=match):
        dropped_nodes(0, 0, 2, rate, 0)
    with pytest.raises(ValueError, match=match):
        BudgetConfig(budget=0.1, node_dropout=rate)


def test_what_cannot_drop_nodes_is_refused() -> None:
    """DP-SGD and a program whose messages have no substitute (a pixel shuffle gathered on the
    requester) refuse ``node_dropout > 0`` when the trainer is built; with 0 they train."""
    from disco_fl.models import build_model
    from disco_fl.runtime.training.dp import DPConfig

    pm, _ = _partition("resnet_narrow", 2, 0.6)
    dp = DPConfig(dataset_sizes={0: 100}, max_grad_norm=1.0, noise_multiplier=1.0)
    with InProcessHub(2) as hub, pytest.raises(ValueError, match="DP-SGD"):
        _trainers(pm, list(hub), "sgd", "hard", 0.0, node_dropout=0.2, dp=dp)
    torch.manual_seed(0)
    sr = disco_fl.partition(
        build_model("espcn"), 2, torch.randn(2, 1, 14, 14), capture="auto"
    ).train()
    with InProcessHub(2) as hub:
        with pytest.raises(ValueError, match="pixel_shuffle"):
            _trainers(sr, list(hub), "sgd", "hard", 0.0, node_dropout=0.2)
        assert len(_trainers(sr, list(hub), "sgd", "hard", 0.0)) == 2
