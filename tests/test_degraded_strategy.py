"""Degraded training on the server (issue 18): a household that trained without a failed node
counts with its survivors' shards, the missing node's shard keeps its previous value, malformed
degraded metadata is refused, and the wait for a round's replies is not cut short by the missing
node's error. A node gone at a round's start (not in the SuperLink's node list, or silent to a
ping): its household's survivors are invited with it in ``missing-nodes``, or the household fails
at the start when it is a batch owner; evaluation skips that household; without degraded
training nothing changes."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from disco_fl.fl.federated import ModelSpec, shard_arrays, unpack_state
from disco_fl.fl.round_config import EvalConfig, TrainConfig
from disco_fl.fl.server import DiscoStrategy, DPSettings
from disco_fl.fl.server.exchange import HouseholdGrid
from tests.test_disco_strategy import SPEC, _reply, _strategy
from tests.test_flower_contract import StubGrid
from tests.test_flower_contract import _reply as pong

NODES = {"a": (101, 102), "b": (103, 104)}  # household -> node id of shard 0, shard 1


@pytest.fixture(autouse=True)
def _run_identity(flower_run_identity: None) -> None:
    """Every test here builds Flower Messages."""


class NodeList(StubGrid):
    """The SuperLink as the strategy sees it: ``online`` is its node list; a ping is answered
    once its node is in ``answers`` (at once, or at a later pull: a node that comes back
    answers the ping waiting for it), never otherwise (a SuperNode killed moments ago is still
    listed). ``pinged`` records who was pinged."""

    def __init__(self, online: Iterable[int], answers: Iterable[int] | None = None) -> None:
        self.online = list(online)
        self.answers = set(self.online if answers is None else answers)
        self.pinged: list[int] = []
        self._pings: dict[str, Message] = {}
        self._ids = itertools.count()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.online)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            assert m.metadata.message_type == "query.ping", m.metadata.message_type
            ids.append(f"p{next(self._ids)}")
            self.pinged.append(m.metadata.dst_node_id)
            self._pings[ids[-1]] = m
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for i in list(message_ids):
            if i in self._pings and self._pings[i].metadata.dst_node_id in self.answers:
                out.append(pong(self._pings.pop(i), i, RecordDict()))
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("the strategy waits through HouseholdGrid")


ALL = NodeList([101, 102, 103, 104])


def _weight_key(s: DiscoStrategy, k: int) -> str:
    return "ops." + next(n for n, _ in s.pm.shard(k).ops.named_parameters())


def _round(
    s: DiscoStrategy, missing_a: Any, *, b_ok: bool = True
) -> tuple[list[dict[str, torch.Tensor]], list[Message], list[Message]]:
    """Round 1: household ``a``'s shard 1 fails and its shard 0 reports ``missing_a`` (+1 to
    every weight); household ``b`` trains both shards (+100), or fails (``b_ok`` False).
    Returns the shards before, the train messages and the replies."""
    s.availability.answered_roster(s.roster or {})  # as after the roster query
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=ALL))
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
    s.availability.answered_roster(s.roster or {})
    msgs = s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=ALL)
    assert all(
        TrainConfig.from_config(m.content.config_records["config"]).degraded_training for m in msgs
    )
    group = ModelSpec(num_nodes=2, norm="group")
    with pytest.raises(ValueError, match="degraded_training cannot go with dp"):
        DiscoStrategy(group, dp=DPSettings(), degraded_training=True)


# ---- a node gone at a round's start ---------------------------------------------------------


def _configs(msgs: Iterable[Message]) -> dict[tuple[str, int], TrainConfig]:
    cfgs = [TrainConfig.from_config(m.content.config_records["config"]) for m in msgs]
    return {(c.household, c.shard): c for c in cfgs}


def _train_replies(msgs: Iterable[Message], missing: dict[str, list[int]]) -> list[Message]:
    """Every invited node replies with its shard, naming its household's ``missing`` shards
    (what a survivor started with them missing reports)."""
    out = []
    for m in msgs:
        h = str(m.content.config_records["config"]["household"])
        metrics = {
            "loss": 0.5,
            "owner-steps": 1,
            "bytes-sent": 1.0,
            "missing-nodes": missing.get(h, []),
        }
        out.append(_reply(m, m.content.array_records["arrays"], metrics))
    return out


def _degraded(rounds: int = 2) -> DiscoStrategy:
    s = _strategy()
    s.degraded_training, s.num_rounds = True, rounds
    s.availability.answered_roster(s.roster or {})  # as after the roster query
    return s


def test_a_node_gone_from_the_node_list_leaves_its_household_degraded_from_the_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = _degraded()
    grid = NodeList([101, 103, 104])  # household a's shard 1 (node 102) left
    with caplog.at_level(logging.WARNING, logger="flwr"):
        msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=grid))
    cfgs = _configs(msgs)
    assert sorted(cfgs) == [("a", 0), ("b", 0), ("b", 1)]  # nothing goes to node 102
    assert cfgs[("a", 0)].missing_nodes == (1,) and cfgs[("a", 0)].degraded_training
    assert cfgs[("b", 0)].missing_nodes == () == cfgs[("b", 1)].missing_nodes
    assert "household 'a' trains without node(s) [1]" in caplog.text
    assert "not in the SuperLink's node list" in caplog.text
    assert grid.pinged == []  # every listed node was heard from just now
    arrays, metrics = s.aggregate_train(1, _train_replies(msgs, {"a": [1]}))
    assert metrics is not None and metrics["households-failed"] == 0
    assert metrics["households-ok"] == 2 and metrics["households-degraded"] == 1
    assert metrics["missing/a"] == [1]
    # round 2: it is back on the node list: asked (a ping, waited for), it answers: invited
    grid = NodeList([101, 102, 103, 104])
    assert arrays is not None
    msgs = list(s.configure_train(2, arrays, ConfigRecord(), grid=grid))
    assert grid.pinged == [102]
    assert len(msgs) == 4 and all(c.missing_nodes == () for c in _configs(msgs).values())


def test_a_node_that_died_mid_round_is_left_out_without_a_wait_and_invited_once_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = _degraded(rounds=4)
    grid = NodeList([101, 102, 103, 104])
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=grid))
    assert len(msgs) == 4 and grid.pinged == []
    # round 1: node 102 dies mid-round; its survivor names it missing, it never replies
    replies = [r for r in _train_replies(msgs, {"a": [1]}) if r.metadata.src_node_id != 102]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    # round 2: the SuperLink still lists it (its heartbeat has not expired), it is silent
    grid.answers.discard(102)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        msgs = list(s.configure_train(2, arrays, ConfigRecord(), grid=grid))
    assert time.monotonic() - t0 < 1.0  # left out at once: its ping is not waited for
    assert grid.pinged == [102]  # the nodes heard from in round 1 are not asked
    assert "missing in the last round, not heard from since" in caplog.text
    cfgs = _configs(msgs)
    assert ("a", 1) not in cfgs and cfgs[("a", 0)].missing_nodes == (1,)
    arrays, metrics = s.aggregate_train(2, _train_replies(msgs, {"a": [1]}))
    assert metrics is not None and metrics["missing/a"] == [1] and metrics["households-ok"] == 2
    # round 3: still gone; its ping is still out, no second one
    assert arrays is not None
    msgs = list(s.configure_train(3, arrays, ConfigRecord(), grid=grid))
    assert grid.pinged == [102] and ("a", 1) not in _configs(msgs)
    arrays, _ = s.aggregate_train(3, _train_replies(msgs, {"a": [1]}))
    # round 4: it came back and answered that ping: invited again, the household trains whole
    grid.answers.add(102)
    assert arrays is not None
    msgs = list(s.configure_train(4, arrays, ConfigRecord(), grid=grid))
    cfgs = _configs(msgs)
    assert len(cfgs) == 4 and all(c.missing_nodes == () for c in cfgs.values())
    assert grid.pinged == [102]


def test_a_node_not_heard_from_lately_gets_a_ping_with_a_bounded_wait() -> None:
    """Node 102 was last heard from long ago (not named missing): it is pinged and waited for
    at most the timeout (the run's rendezvous-timeout); silent, it is left out; answering,
    it is invited."""
    for answers, invited in (([101, 103, 104], False), ([101, 102, 103, 104], True)):
        s = _degraded()
        s.availability.timeout = 1.0
        s.availability.heard[102] = time.monotonic() - 100.0
        grid = NodeList([101, 102, 103, 104], answers=answers)
        t0 = time.monotonic()
        msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=grid))
        took = time.monotonic() - t0
        assert grid.pinged == [102]
        cfgs = _configs(msgs)
        assert (("a", 1) in cfgs) == invited
        assert cfgs[("a", 0)].missing_nodes == (() if invited else (1,))
        assert took < 5.0 and (invited or took >= 1.0), took


def test_a_batch_owner_gone_at_the_start_fails_its_household_before_any_message() -> None:
    s = _degraded()
    grid = NodeList([102, 103, 104])  # node 101: household a's batch owner (shard 0)
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=grid))
    assert sorted(_configs(msgs)) == [("b", 0), ("b", 1)]  # nothing to household a
    _, metrics = s.aggregate_train(1, _train_replies(msgs, {}))
    assert metrics is not None
    assert metrics["households-ok"] == 1 and metrics["households-failed"] == 1
    assert metrics["households-degraded"] == 0
    assert "batch owner(s) [0] unavailable at the round's start" in s._round_record["failed"]["a"]


def test_without_degraded_training_a_gone_node_is_invited_and_its_household_fails() -> None:
    """As before degraded training from the start: every node is invited (the grid is not
    even asked), the survivor fails at the rendezvous, the household keeps its shards."""
    s = _strategy()
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    cfgs = _configs(msgs)
    assert len(cfgs) == 4
    assert all(c.missing_nodes == () and not c.degraded_training for c in cfgs.values())
    replies = [
        _reply(m, None, {}, error="TimeoutError: rendezvous: peer 1 is not listening")
        if m.metadata.dst_node_id == 101
        else r
        for m, r in zip(msgs, _train_replies(msgs, {}), strict=True)
        if m.metadata.dst_node_id != 102  # node 102 is gone: no reply
    ]
    _, metrics = s.aggregate_train(1, replies)
    assert metrics is not None and metrics["households-failed"] == 1
    assert "rendezvous" in s._round_record["failed"]["a"]


def test_evaluation_skips_a_household_with_a_node_gone() -> None:
    s = _degraded(rounds=1)
    msgs = list(
        s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=NodeList([101, 103, 104]))
    )
    arrays, _ = s.aggregate_train(1, _train_replies(msgs, {"a": [1]}))
    assert arrays is not None
    evals = list(s.configure_evaluate(1, arrays, ConfigRecord(), grid=ALL))
    assert {
        EvalConfig.from_config(m.content.config_records["config"]).household for m in evals
    } == {"b"}
    replies = [
        _reply(m, None, {"correct": 7 if m.metadata.dst_node_id == 103 else 0, "num-examples": 10})
        for m in evals
    ]
    out = s.aggregate_evaluate(1, replies)
    assert out is not None and out["households-failed"] == 1 and "accuracy/b" in out
    assert "accuracy/a" not in out


def test_the_client_app_answers_a_ping_without_its_node_config() -> None:
    """A live node answers the availability ping at once: no data, no peer endpoint, not
    even its node config is needed."""
    from flwr.app import Context

    from disco_fl.fl.availability import PING_TYPE
    from disco_fl.fl.client_app import make_client_app

    ping = Message(RecordDict(), dst_node_id=5, message_type=PING_TYPE)
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    reply = make_client_app()(ping, ctx)
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == ping.metadata.message_id


def test_delivery_skips_the_nodes_gone_in_the_last_round(tmp_path: Path) -> None:
    """The final shards go to every node but the ones gone in the last train round (reported
    ``unavailable``, not waited for)."""
    from disco_fl.fl.server.delivery import deliver_shards

    s = _strategy()
    s.pm.export(tmp_path)
    grid = NodeList([101, 102, 103, 104], answers=[])
    pushed: list[int] = []

    def push(msgs: Iterable[Message]) -> list[str]:  # the delivery: never answered
        ids = [m.metadata.dst_node_id for m in msgs]
        pushed.extend(ids)
        return [f"d{n}" for n in ids]

    grid.push_messages = push  # type: ignore[method-assign]
    out = deliver_shards(grid, s.roster or {}, tmp_path, 0.2, {"a": frozenset({1})})
    assert out["a/1"] == "unavailable" and out["a/0"] == "no answer"
    assert sorted(pushed) == [101, 103, 104]
