"""Degraded training on the server (issue 18): a household that trained without a failed node
counts with its survivors' shards, the missing node's shard keeps its previous value, malformed
degraded metadata is refused, and the wait for a round's replies is not cut short by the missing
node's error."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Message

from disco_fl.fl.federated import ModelSpec, shard_arrays, unpack_state
from disco_fl.fl.round_config import TrainConfig
from disco_fl.fl.server import DiscoStrategy, DPSettings
from disco_fl.fl.server.exchange import HouseholdGrid
from tests.test_disco_strategy import SPEC, _reply, _strategy


@pytest.fixture(autouse=True)
def _run_identity(flower_run_identity: None) -> None:
    """Every test here builds Flower Messages."""


def _weight_key(s: DiscoStrategy, k: int) -> str:
    return "ops." + next(n for n, _ in s.pm.shard(k).ops.named_parameters())


def _round(
    s: DiscoStrategy, missing_a: Any, *, b_ok: bool = True
) -> tuple[list[dict[str, torch.Tensor]], list[Message], list[Message]]:
    """Round 1: household ``a``'s shard 1 fails and its shard 0 reports ``missing_a`` (+1 to
    every weight); household ``b`` trains both shards (+100), or fails (``b_ok`` False).
    Returns the shards before, the train messages and the replies."""
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    before = [{k: v.clone() for k, v in s.pm.shard(j).state_dict().items()} for j in range(2)]
    replies = []
    for m in msgs:
        cfg = m.content.config_records["config"]
        h, k = str(cfg["household"]), int(cfg["shard"])  # type: ignore[call-overload]
        if (h == "a" and k == 1) or (h == "b" and not b_ok):
            replies.append(_reply(m, None, {}, error="StepAborted: the node died"))
            continue
        shard = SPEC.partition().shard(k)
        shard.load_state_dict(unpack_state(m.content.array_records["arrays"]))
        with torch.no_grad():
            for p in shard.ops.parameters():
                p.add_(1.0 if h == "a" else 100.0)
        metrics: dict[str, Any] = {"loss": 0.5, "owner-steps": 2 if k == 0 else 0}
        metrics["bytes-sent"] = 10.0
        metrics["missing-nodes"] = missing_a if h == "a" else []
        replies.append(_reply(m, shard_arrays(shard), metrics))
    return before, msgs, replies


def test_degraded_household_counts_with_its_survivors_shards(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = _strategy()
    s.degraded_training = True
    before, _, replies = _round(s, [1])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        agg, metrics = s.aggregate_train(1, replies)
    assert "degraded: household 'a' trained without node(s) [1]" in caplog.text
    assert agg is not None and metrics is not None
    assert metrics["households-ok"] == 2 and metrics["households-failed"] == 0
    assert metrics["households-degraded"] == 1 and metrics["missing/a"] == [1]
    k0, k1 = _weight_key(s, 0), _weight_key(s, 1)
    # shard 0: both households trained it (equal examples): +1 and +100 averaged
    assert torch.allclose(s.pm.shard(0).state_dict()[k0], before[0][k0] + 50.5)
    # shard 1: only household b trained it; a's missing node contributes nothing
    assert torch.allclose(s.pm.shard(1).state_dict()[k1], before[1][k1] + 100.0)


def test_a_shard_no_household_trained_keeps_its_value() -> None:
    s = _strategy()
    s.degraded_training = True
    before, _, replies = _round(s, [1], b_ok=False)
    agg, metrics = s.aggregate_train(1, replies)
    assert agg is not None and metrics is not None
    assert metrics["households-ok"] == 1 and metrics["households-failed"] == 1
    k0 = _weight_key(s, 0)
    assert torch.allclose(s.pm.shard(0).state_dict()[k0], before[0][k0] + 1.0)
    for key, v in before[1].items():  # the missing node's shard: exactly as before
        assert torch.equal(s.pm.shard(1).state_dict()[key], v), key


@pytest.mark.parametrize(
    ("missing", "why"),
    [
        ([0], "names the replying shard"),
        ([1, 1], "repeats a shard"),
        ([2], "is not a list of shard indices"),
        ([1.0], "is not a list of shard indices"),
    ],
)
def test_malformed_degraded_metadata_is_refused(missing: Any, why: str) -> None:
    s = _strategy()
    s.degraded_training = True
    _, _, replies = _round(s, missing)
    _, metrics = s.aggregate_train(1, replies)
    assert metrics is not None and metrics["households-failed"] == 1
    assert metrics["households-degraded"] == 0
    assert why in s._round_record["failed"]["a"]


def test_a_missing_batch_owner_is_refused() -> None:
    s = _strategy()
    s.degraded_training = True
    _, msgs, replies = _round(s, [1])
    # household a's shard 1 claims shard 0 (the batch owner, holding the data) was missing
    m = next(
        m for m in msgs if m.content.config_records["config"]["household"] == "a"
        and m.content.config_records["config"]["shard"] == 1
    )  # fmt: skip
    replies = [r for r in replies if r.metadata.src_node_id != m.metadata.dst_node_id]
    replies.append(_reply(m, m.content.array_records["arrays"], {"missing-nodes": [0]}))
    _, metrics = s.aggregate_train(1, replies)
    assert metrics is not None and metrics["households-failed"] == 1
    assert "names batch owner(s) [0]" in s._round_record["failed"]["a"]


def test_without_degraded_training_a_degraded_reply_fails_the_household() -> None:
    s = _strategy()
    _, _, replies = _round(s, [1])
    _, metrics = s.aggregate_train(1, replies)
    assert metrics is not None and metrics["households-failed"] == 1
    assert "households-degraded" not in metrics
    assert "degraded-training is off" in s._round_record["failed"]["a"]


def test_the_wait_is_decided_by_the_survivors_not_the_missing_nodes_error() -> None:
    s = _strategy()
    _, msgs, replies = _round(s, [1])
    grid = HouseholdGrid(None, s._household_of)  # type: ignore[arg-type]
    shard_of = {r.metadata.src_node_id: s._household_of(r.metadata.src_node_id) for r in replies}
    err_a1 = [r for r in replies if shard_of[r.metadata.src_node_id] == ("a", 1)]
    ok_a0 = [r for r in replies if shard_of[r.metadata.src_node_id] == ("a", 0)]
    ok_b = [r for r in replies if shard_of[r.metadata.src_node_id][0] == "b"]  # type: ignore[index]
    # without degraded training an error decides its household at once
    assert grid._all_decided(msgs, err_a1 + ok_b)
    grid.owners_of = lambda h: s.roster[h].owners if s.roster else []
    assert not grid._all_decided(msgs, err_a1 + ok_b)  # a's survivor may still reply
    assert grid._all_decided(msgs, err_a1 + ok_a0 + ok_b)
    assert grid._all_decided(msgs, ok_a0 + ok_b)  # the missing node need not reply at all
    owner_msg = next(m for m in msgs if s._household_of(m.metadata.dst_node_id) == ("a", 0))
    err_a0 = [_reply(owner_msg, None, {}, error="the owner died")]
    assert grid._all_decided(msgs, err_a0 + ok_b)  # an owner's error decides


def test_degraded_training_reaches_every_node_and_refuses_dp() -> None:
    s = _strategy()
    cfgs = [
        TrainConfig.from_config(m.content.config_records["config"])
        for m in s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None)  # type: ignore[arg-type]
    ]
    assert [c.degraded_training for c in cfgs] == [False] * 4
    s.degraded_training = True
    msgs = s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None)  # type: ignore[arg-type]
    assert all(
        TrainConfig.from_config(m.content.config_records["config"]).degraded_training for m in msgs
    )
    group = ModelSpec(num_nodes=2, norm="group")
    with pytest.raises(ValueError, match="degraded_training cannot go with dp"):
        DiscoStrategy(group, dp=DPSettings(), degraded_training=True)
