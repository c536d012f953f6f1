"""Flower's contract: ``Strategy.start`` runs DiscoStrategy's rounds over a simulated grid
(roster, joint households, failed households kept, checkpoints, resume, ``evaluate_fn`` with
the assembled model); the typed round config; the ClientApp holds only its own shard."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.serverapp import Grid

from disco_fl.fl.federated import ModelSpec, pack_state, split_global_state, unpack_state
from disco_fl.fl.round_config import EvalConfig, TrainConfig
from disco_fl.fl.server import DiscoStrategy
from disco_fl.fl.server.exchange import HouseholdGrid
from tests.conftest import run_nodes

SPEC = ModelSpec(num_nodes=2)


@pytest.fixture(autouse=True)
def _run_identity(flower_run_identity: None) -> None:
    """Every test here builds Flower Messages."""


# ---- a simulated deployment -------------------------------------------------------------

# node id -> (household, shard, training examples, held-out examples)
NODES = {101: ("a", 0, 50, 10), 102: ("a", 1, 0, 0), 103: ("b", 0, 30, 10), 104: ("b", 1, 0, 0)}


def _reply(msg: Message, mid: str, content: RecordDict | None, error: str = "") -> Message:
    md = Metadata(
        run_id=1,
        message_id="",
        src_node_id=msg.metadata.dst_node_id,
        dst_node_id=0,
        reply_to_message_id=mid,
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type=msg.metadata.message_type,
    )
    if error:
        return make_message(md, error=Error(code=0, reason=error))
    return make_message(md, content=content)


class StubGrid(Grid):
    """What every fake SuperLink here shares: no run, no message factory (the strategy builds
    its messages with Flower's ``Message`` itself)."""

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(self, *a: Any, **kw: Any) -> Message:
        raise NotImplementedError("the strategy never asks a grid to create a message")


class SimGrid(StubGrid):
    """Nodes answering at once: the query with ``NODES``, a train message with their shard
    plus ``delta`` on every float weight, an evaluation with fixed counts. ``fail(node, msg)``
    returns an error text, "" (answer) or None (never answer: a dead device)."""

    def __init__(self, fail: Callable[[int, Message], str | None] = lambda n, m: "") -> None:
        self.fail = fail
        self.replies: dict[str, Message] = {}
        self.pushes: list[list[Message]] = []
        self._ids = itertools.count()

    def get_node_ids(self) -> Iterable[int]:
        return list(NODES)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.pushes.append(messages)
        ids = []
        for m in messages:
            mid = f"m{next(self._ids)}"
            ids.append(mid)
            why = self.fail(m.metadata.dst_node_id, m)
            if why is None:
                continue
            self.replies[mid] = _reply(m, mid, None if why else self._answer(m), why)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("DiscoStrategy waits through HouseholdGrid")

    def _answer(self, m: Message) -> RecordDict:
        h, k, n_train, n_eval = NODES[m.metadata.dst_node_id]
        if m.metadata.message_type == MessageType.QUERY:
            info = {
                "household": h,
                "shard": k,
                "peer-address": f"127.0.0.1:{m.metadata.dst_node_id}",
            }
            info.update({"num-examples": n_train, "num-eval": n_eval})
            return RecordDict({"node": ConfigRecord(info)})
        if m.metadata.message_type == MessageType.EVALUATE:
            metrics = {"correct": 7 if k == 0 else 0, "num-examples": n_eval}
            return RecordDict({"metrics": MetricRecord(metrics)})
        cfg = TrainConfig.from_config(m.content.config_records["config"])
        state = unpack_state(m.content.array_records["arrays"])
        for key, v in state.items():
            if v.is_floating_point() and key.startswith("ops."):
                v.add_(1.0)
        metrics = {"loss": 0.5, "owner-steps": cfg.steps if k == 0 else 0, "bytes-sent": 8.0}
        return RecordDict({"arrays": pack_state(state), "metrics": MetricRecord(metrics)})


def _strategy(tmp_path: Path, **kw: Any) -> DiscoStrategy:
    kw = {"steps": 2, "batch_size": 4, "checkpoint_dir": tmp_path, "query_timeout": 5, **kw}
    return DiscoStrategy(SPEC, **kw)


def _weight(arrays: ArrayRecord) -> torch.Tensor:
    state = split_global_state(arrays.to_torch_state_dict(), 2)[0]
    return next(v for key, v in state.items() if key.endswith(".weight") and "gates" not in key)


def test_start_runs_rounds_through_flowers_loop_and_calls_evaluate_fn(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    init = s.initial_arrays()
    w0 = _weight(init).clone()
    calls: list[tuple[int, torch.Tensor, float]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        pm = s.assembled_model(arrays)  # the assembled model: every household's shards merged
        pm.eval()
        with torch.no_grad():
            out = pm(torch.zeros(2, 1, 28, 28))
        calls.append((server_round, _weight(arrays).clone(), float(out.abs().sum())))
        return MetricRecord({"server-score": float(server_round)})

    grid = SimGrid()
    result = s.start(grid, init, num_rounds=2, timeout=30, evaluate_fn=evaluate_fn)
    # called before the first round and after each, with the aggregated model of that round
    assert [c[0] for c in calls] == [0, 1, 2]
    for r, w, out in calls:
        assert torch.allclose(w, w0 + r) and out > 0
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert torch.allclose(_weight(result.arrays), w0 + 2)
    # both households' nodes got their messages in the same push (joint rounds)
    train_pushes = [p for p in grid.pushes if p[0].metadata.message_type == MessageType.TRAIN]
    assert [len(p) for p in train_pushes] == [4, 4]
    # history and checkpoint after each round, the server-side evaluation in the record
    assert [h["round"] for h in s.history] == [1, 2]
    assert s.history[1]["evaluate-server"] == {"server-score": 2.0}
    assert "evaluate" in s.history[1] and "evaluate" not in s.history[0]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["rounds_done"] == 2 and len(ckpt["history"]) == 2
    # resume: a new strategy continues after round 2; the Result counts the run's rounds
    s2 = _strategy(tmp_path)
    arrays = s2.resume()
    assert arrays is not None and s2.round_offset == 2
    seen: list[int] = []
    res2 = s2.start(SimGrid(), arrays, 1, timeout=30, evaluate_fn=lambda r, a: seen.append(r))
    assert seen == [2, 3] and sorted(res2.train_metrics_clientapp) == [3]
    assert [h["round"] for h in s2.history] == [1, 2, 3]
    assert torch.allclose(_weight(res2.arrays), w0 + 3)


def test_failed_household_is_decided_without_waiting_and_keeps_its_shards(
    tmp_path: Path,
) -> None:
    """Household b: node 104 fails, node 103 never answers (its device died). The round does
    not wait for the timeout; household a's update counts alone."""

    def fail(node: int, m: Message) -> str | None:
        if m.metadata.message_type != MessageType.TRAIN:
            return ""
        return {104: "StepAborted: node 1 died", 103: None}.get(node, "")

    s = _strategy(tmp_path, evaluate=False)
    init = s.initial_arrays()
    t0 = time.monotonic()
    result = s.start(SimGrid(fail), init, num_rounds=1, timeout=60)
    assert time.monotonic() - t0 < 20
    assert s.history[0]["failed"]["b"].startswith("shard 1: StepAborted")
    assert result.train_metrics_clientapp[1]["households-ok"] == 1
    assert torch.allclose(_weight(result.arrays), _weight(init) + 1)


def test_no_evaluate_fn_means_none_is_called_and_round_still_checkpointed(tmp_path: Path) -> None:
    s = _strategy(tmp_path, evaluate=False)
    result = s.start(SimGrid(), s.initial_arrays(), num_rounds=1, timeout=30)
    assert result.evaluate_metrics_serverapp == {} and s.history[0]["round"] == 1
    assert (tmp_path / "checkpoint.pt").exists()


def test_household_grid_waits_for_all_without_a_roster() -> None:
    """Before the roster is known (its query), every reply is waited for."""

    def slow(node: int, m: Message) -> str | None:
        return None if node == 104 else ""

    sim = SimGrid(slow)
    g = HouseholdGrid(sim, household_of=lambda n: None)
    msgs = [
        Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query")
        for n in NODES
    ]
    t0 = time.monotonic()
    assert len(list(g.send_and_receive(msgs, timeout=1.5))) == 3
    assert time.monotonic() - t0 >= 1.5  # not cut short: no household is decided
    g = HouseholdGrid(SimGrid(), household_of=lambda n: None)
    msgs = [
        Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query")
        for n in NODES
    ]
    assert len(list(g.send_and_receive(msgs, timeout=5))) == 4
    assert list(g.send_and_receive([], timeout=5)) == []


# ---- the typed round config ---------------------------------------------------------------


def _train_config(**over: Any) -> TrainConfig:
    kw: dict[str, Any] = dict(
        server_round=3, household="a", shard=1, peers=("h:1", "h:2"), token="t", plan="{}",
        owners=(0,), owner_examples=(40,), steps=5, batch_size=8, lr=1e-3, gate_lr=0.5,
        gate_mode="stochastic", gate_penalty=2.0, budget=0.3,
    )  # fmt: skip
    kw.update(over)
    return TrainConfig(**kw)


def test_round_config_round_trips_through_a_config_record() -> None:
    dp = _train_config(dp=True, dp_noise=1.0, dp_clip=2.0, dp_delta=1e-5)
    for cfg in (_train_config(), dp, _train_config(node_dropout=0.3)):
        rec = ConfigRecord(cfg.to_config())
        assert TrainConfig.from_config(rec) == cfg
    ev = EvalConfig(
        server_round=1, household="a", shard=0, peers=("h:1",), token="t", plan="{}",
        requester=0, eval_batches=2, eval_batch_size=100,
    )  # fmt: skip
    assert EvalConfig.from_config(ConfigRecord(ev.to_config())) == ev
    # keys of no field are ignored (a newer server may add some)
    assert TrainConfig.from_config({**_train_config().to_config(), "extra": 1}) == _train_config()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"steps": None}, r"round config lacks 'steps'"),
        ({"steps": "5"}, r"'steps' must be int, got '5'"),
        ({"steps": True}, r"'steps' must be int"),
        ({"lr": "fast"}, r"'lr' must be float"),
        ({"peers": "h:1"}, r"'peers' must be a list"),
        ({"owners": [0.5]}, r"'owners\[0\]' must be int"),
        ({"gate-mode": "soft"}, r"'gate-mode' must be one of \['hard', 'stochastic'\]"),
        ({"dp": True}, r"dp needs dp-noise, dp-clip and dp-delta"),
        ({"owner-examples": [1, 2]}, r"1 owners but 2 owner-examples"),
        ({"household": 3}, r"'household' must be str"),
        ({"node-dropout": "0.1"}, r"'node-dropout' must be float"),
        ({"node-dropout": 1.0}, r"node_dropout must be a number in \[0, 1\)"),
        (
            {"node-dropout": 0.1, "dp": True, "dp-noise": 1.0, "dp-clip": 1.0, "dp-delta": 1e-5},
            r"node-dropout cannot go with dp",
        ),
    ],
)
def test_round_config_refuses_missing_and_ill_typed_keys(
    change: dict[str, Any], match: str
) -> None:
    cfg = _train_config().to_config()
    for key, v in change.items():
        if v is None:
            del cfg[key]
        else:
            cfg[key] = v
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_config(cfg)


# ---- the ClientApp holds only its shard ---------------------------------------------------


def _no_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any whole-model build, capture or partition on the node raises."""
    import disco_fl.emulation.model as emulation
    import disco_fl.fl.federated as federated

    def boom(*a: Any, **kw: Any) -> Any:
        raise AssertionError("the ClientApp built or partitioned the whole model")

    monkeypatch.setattr(federated, "partition", boom)
    monkeypatch.setattr(federated, "build_model", boom)
    monkeypatch.setattr(emulation, "fx_capture", boom)
    monkeypatch.setattr(emulation, "capture_export", boom)
    monkeypatch.setattr(ModelSpec, "partition", boom)
    monkeypatch.setattr(ModelSpec, "build_dense", boom)


def _messages(s: DiscoStrategy) -> list[Message]:
    from disco_fl.fl.server import NodeInfo, build_roster

    infos = [NodeInfo(101, "a", 0, "127.0.0.1:7100", 40, 0), NodeInfo(102, "a", 1, "x:1", 0, 0)]
    s.roster = build_roster(infos, 2)
    s.roster["a"].token = "t"
    s.num_rounds = 2
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    return sorted(msgs, key=lambda m: int(m.content.config_records["config"]["shard"]))  # type: ignore[arg-type]


def _context(k: int) -> Any:
    from flwr.app import Context

    node_config = {"household": "a", "shard": k, "peer-address": f"127.0.0.1:{7100 + k}"}
    return Context(run_id=1, node_id=k, node_config=node_config, state=RecordDict(), run_config={})


def test_client_setup_builds_only_its_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    import disco_fl.fl.client_app as ca

    s = DiscoStrategy(ModelSpec(name="vit_tiny_mnist", num_nodes=2), steps=1, batch_size=4)
    msgs = _messages(s)
    _no_partition(monkeypatch)
    for k, m in enumerate(msgs):
        cfg, shard, plan, _, kk = ca._setup(m, _context(k))
        assert kk == k == shard.index == cfg.shard and plan.num_nodes == 2
        # exactly shard k's tensors, equal to the server's; names and kinds (parameter or
        # buffer) as the partitioned shard has them
        want = s.pm.shard(k)
        got = shard.state_dict()
        assert got.keys() == want.state_dict().keys()
        assert all(torch.equal(got[key], v) for key, v in want.state_dict().items())
        assert {n for n, _ in shard.named_parameters()} == {n for n, _ in want.named_parameters()}
        assert {n for n, _ in shard.named_buffers()} == {n for n, _ in want.named_buffers()}
        held = sum(t.numel() for t in got.values())
        whole = sum(t.numel() for j in range(2) for t in s.pm.shard(j).state_dict().values())
        assert held < 0.6 * whole
        assert "arrays" not in m.content.array_records  # the packed copy is released


@pytest.mark.parametrize("node_dropout", [0.0, 0.99])
def test_client_train_round_never_partitions_the_model(
    monkeypatch: pytest.MonkeyPatch, node_dropout: float
) -> None:
    """Both nodes of a household through ``train`` (threads, in-process peer channel) with
    every whole-model path raising: the replies are their trained shards. With the round's
    node dropout, node 1 sits out both steps: its weights come back as they were sent."""
    import disco_fl.fl.client_app as ca
    from disco_fl.core.gates import dropped_nodes
    from disco_fl.fl.federated import NodeData, derive_seed
    from disco_fl.runtime.transport import InProcessHub

    s = DiscoStrategy(SPEC, steps=2, batch_size=4, node_dropout=node_dropout)
    msgs = _messages(s)
    seed = derive_seed(s.seed, "a", 1, "gates")  # the ClientApp's gate_seed of round 1
    sits_out = [1 in dropped_nodes(seed, t, 2, node_dropout, 0) for t in range(2)]
    assert sits_out == [node_dropout > 0] * 2
    sent = {k: s.pm.shard(k).state_dict() for k in range(2)}
    _no_partition(monkeypatch)
    g = torch.Generator().manual_seed(0)
    owner = NodeData(
        torch.randn(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g),
        torch.zeros(0), torch.zeros(0, dtype=torch.long),
    )  # fmt: skip
    none = NodeData(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                    torch.zeros(0, dtype=torch.long))  # fmt: skip
    hub = InProcessHub(2)
    for k in range(2):
        hub[k].close = lambda *a, **kw: None  # type: ignore[method-assign]
    monkeypatch.setattr(ca, "_transport", lambda cfg, plan, k, *a: hub[k])
    monkeypatch.setattr(
        ca, "_data", lambda ctx, *_: owner if ctx.node_config["shard"] == 0 else none
    )
    try:
        replies = run_nodes(lambda k: ca.train(msgs[k], _context(k)), 2)
    finally:
        hub.close()
    for k in range(2):
        got = unpack_state(replies[k].content.array_records["arrays"])
        assert got.keys() == s.pm.shard(k).state_dict().keys()
        assert replies[k].content["metrics"]["owner-steps"] == (2 if k == 0 else 0)
        weights = [key for key in got if key.startswith("ops.") and key.endswith("weight")]
        kept = all(torch.equal(got[key], sent[k][key]) for key in weights)
        assert kept == (k == 1 and node_dropout > 0), k


def test_roster_waits_connect_timeout_for_missing_nodes_and_query_timeout_for_answers() -> None:
    """``connect-timeout``: how long the roster waits for expected nodes that never connect;
    the answers of those connected keep ``query_timeout``."""
    from disco_fl.fl.server.roster import RosterError, query_roster

    timeouts: list[float | None] = []

    class Recording(HouseholdGrid):
        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> Iterable[Message]:
            timeouts.append(timeout)
            return super().send_and_receive(messages, timeout=timeout)

    t0 = time.monotonic()
    # 3 households of 2 expected, the 4 nodes of 2 connected: the third never comes
    with pytest.raises(RosterError, match="expected 3 households"):
        query_roster(
            Recording(SimGrid()), 2, num_households=3, query_timeout=60.0, connect_timeout=0.5
        )
    assert 0.5 <= time.monotonic() - t0 < 30.0
    assert timeouts == [60.0]  # the answers' window
    # without it, the wait for the nodes is query_timeout's
    t0 = time.monotonic()
    with pytest.raises(RosterError, match="expected 3 households"):
        query_roster(HouseholdGrid(SimGrid()), 2, num_households=3, query_timeout=1.0)
    assert time.monotonic() - t0 >= 1.0
