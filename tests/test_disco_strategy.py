"""DiscoStrategy without processes: roster checks, aggregation, failures as data, the budget
schedule, checkpoints, and Flower's client-side DP wrapper refusing it clearly."""

from __future__ import annotations

import json
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

from disco_fl.fl.federated import (
    ModelSpec,
    round_budget,
    round_mode,
    shard_arrays,
    unpack_state,
)
from disco_fl.fl.server import DiscoStrategy, NodeInfo, RosterError, build_roster

SPEC = ModelSpec(num_nodes=2)


@pytest.fixture(autouse=True)
def _run_identity(flower_run_identity: None) -> None:
    """Every test here builds Flower Messages."""


def _infos(households: dict[str, list[int]], data: bool = True) -> list[NodeInfo]:
    out = []
    nid = 100
    for h, shards in households.items():
        for k in shards:
            nid += 1
            out.append(
                NodeInfo(
                    nid,
                    h,
                    k,
                    f"127.0.0.1:{7000 + nid}",
                    50 if k == 0 and data else 0,
                    10 if k == 0 else 0,
                )
            )
    return out


def test_roster_complete_households() -> None:
    roster = build_roster(_infos({"a": [0, 1], "b": [1, 0]}), 2, expected_households=2)
    assert sorted(roster) == ["a", "b"]
    assert roster["b"].owners == [0] and roster["b"].eval_owner == 0
    assert roster["a"].peers() == [roster["a"].nodes[0].address, roster["a"].nodes[1].address]


@pytest.mark.parametrize(
    ("households", "expected", "match"),
    [
        ({"a": [0, 1], "b": [0]}, None, r"household 'b': missing shard 1 of 2"),
        ({"a": [0, 1, 1]}, None, r"household 'a': duplicate shard 1 on nodes"),
        ({"a": [0, 2]}, None, r"shard index \[2\] out of range.*missing shard 1"),
        ({"a": [0, 1]}, 2, r"expected 2 households, found 1"),
    ],
)
def test_roster_errors_name_what_is_missing(
    households: dict[str, list[int]], expected: int | None, match: str
) -> None:
    with pytest.raises(RosterError, match=match):
        build_roster(_infos(households), 2, expected_households=expected)


def test_roster_needs_data_and_answers() -> None:
    with pytest.raises(RosterError, match="no node holds training data"):
        build_roster(_infos({"a": [0, 1]}, data=False), 2)
    with pytest.raises(RosterError, match="nodes 9 did not answer"):
        build_roster(_infos({"a": [0, 1]}), 2, unanswered=[9])


def test_budget_schedule() -> None:
    b = [round_budget(r, 4, 0.1, 1) for r in range(1, 5)]
    assert b[0] == pytest.approx(0.1 ** (1 / 3)) and b[2] == pytest.approx(0.1)
    assert b[3] == pytest.approx(0.1) and b == sorted(b, reverse=True)
    assert round_budget(1, 1, 0.2, 1) == 0.2
    assert [round_mode(r, 3, 1, False) for r in (1, 2, 3)] == ["stochastic"] * 2 + ["hard"]
    assert round_mode(1, 3, 1, True) == "hard"


def _strategy(tmp_path: Path | None = None) -> DiscoStrategy:
    s = DiscoStrategy(SPEC, steps=2, batch_size=4, checkpoint_dir=tmp_path)
    s.roster = build_roster(_infos({"a": [0, 1], "b": [0, 1]}), 2)
    for hh in s.roster.values():
        hh.token = "t"
    s.num_rounds = 2
    return s


def _reply(
    msg: Message, arrays: ArrayRecord | None, metrics: dict[str, Any], error: str = ""
) -> Message:
    md = Metadata(
        run_id=1,
        message_id="",
        src_node_id=msg.metadata.dst_node_id,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type=msg.metadata.message_type,
    )
    if error:
        return make_message(md, error=Error(code=0, reason=error))
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = arrays
    return make_message(md, content=content)


def test_configure_train_sends_each_node_its_shard_and_roster() -> None:
    s = _strategy()
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    assert len(msgs) == 4 and all(m.metadata.message_type == MessageType.TRAIN for m in msgs)
    for m in msgs:
        cfg = m.content.config_records["config"]
        k = int(cfg["shard"])  # type: ignore[call-overload]
        hh = s.roster[str(cfg["household"])]  # type: ignore[index]
        assert m.metadata.dst_node_id == hh.nodes[k].node_id
        assert list(cfg["peers"]) == hh.peers()  # type: ignore[call-overload]
        assert cfg["gate-mode"] == "stochastic" and list(cfg["owners"]) == [0]  # type: ignore[call-overload]
        plan = json.loads(str(cfg["plan"]))
        assert plan["program"] == s.pm.program.to_json()
        sent = unpack_state(m.content.array_records["arrays"])
        assert sent.keys() == s.pm.shard(k).state_dict().keys()


def test_aggregate_weighted_and_failed_household_kept(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    arrays = s.initial_arrays()
    msgs = list(s.configure_train(1, arrays, ConfigRecord(), grid=None))  # type: ignore[arg-type]
    before = {k: v.clone() for k, v in s.pm.shard(0).state_dict().items()}
    replies = []
    for m in msgs:
        cfg = m.content.config_records["config"]
        h, k = str(cfg["household"]), int(cfg["shard"])  # type: ignore[call-overload]
        if h == "b" and k == 1:
            replies.append(_reply(m, None, {}, error="StepAborted: node 1 died"))
            continue
        shard = SPEC.partition().shard(k)
        shard.load_state_dict(unpack_state(m.content.array_records["arrays"]))
        with torch.no_grad():
            for p in shard.ops.parameters():
                p.add_(1.0 if h == "a" else 100.0)
        replies.append(
            _reply(
                m,
                shard_arrays(shard),
                {"loss": 0.5, "owner-steps": 2 if k == 0 else 0, "bytes-sent": 10.0},
            )
        )
    agg, metrics = s.aggregate_train(1, replies)
    assert agg is not None and metrics is not None
    assert metrics["households-ok"] == 1 and metrics["households-failed"] == 1
    after = s.pm.shard(0).state_dict()
    w = next(n for n, _ in s.pm.shard(0).ops.named_parameters())
    # only household a counted: +1, not the +100 of the failed household's surviving node
    key = f"ops.{w}"
    assert torch.allclose(after[key], before[key] + 1.0)
    assert s._round_record["failed"]["b"].startswith("shard 1: StepAborted")
    s.history.append(dict(s._round_record))
    s.save_checkpoint(1, agg)
    s2 = _strategy(tmp_path)
    restored = s2.resume()
    assert restored is not None and s2.round_offset == 1
    assert torch.equal(s2.pm.shard(0).state_dict()[key], after[key])
    assert s2.history[0]["failed"]["b"]


def test_missing_reply_counts_as_failure() -> None:
    s = _strategy()
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    replies = [
        _reply(
            m, m.content.array_records["arrays"], {"loss": 1.0, "owner-steps": 1, "bytes-sent": 1.0}
        )
        for m in msgs[:3]
    ]
    _, metrics = s.aggregate_train(1, replies)
    assert metrics is not None and metrics["households-failed"] == 1
    assert "no reply from shard(s) [1]" in next(iter(s._round_record["failed"].values()))


def test_checkpoint_of_other_settings_refused(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    s.save_checkpoint(1, s.initial_arrays())
    other = DiscoStrategy(SPEC, steps=3, batch_size=4, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        other.resume()
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read run checkpoint"):
        s.resume()


def test_flower_client_side_dp_wrapper_fails_clearly() -> None:
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    s = _strategy()
    wrapped = DifferentialPrivacyClientSideFixedClipping(s, 1.0, 1.0, 4)
    with pytest.raises(ValueError, match="cannot be wrapped in Flower's client-side"):
        wrapped.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None)  # type: ignore[arg-type]


def test_dp_needs_group_norm() -> None:
    from disco_fl.fl.server import DPSettings

    with pytest.raises(ValueError, match="norm='group'"):
        DiscoStrategy(SPEC, dp=DPSettings())


def test_node_dropout_reaches_every_node_and_bad_rates_are_refused() -> None:
    from disco_fl.fl.round_config import TrainConfig
    from disco_fl.fl.server import DPSettings

    s = _strategy()
    assert all(
        TrainConfig.from_config(m.content.config_records["config"]).node_dropout == 0.0
        for m in s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None)  # type: ignore[arg-type]
    )
    s.node_dropout = 0.25
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    assert len(msgs) == 4
    for m in msgs:
        assert TrainConfig.from_config(m.content.config_records["config"]).node_dropout == 0.25
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"node_dropout must be a number in \[0, 1\)"):
            DiscoStrategy(SPEC, node_dropout=bad)
    group = ModelSpec(num_nodes=2, norm="group")
    with pytest.raises(ValueError, match="node_dropout cannot go with dp"):
        DiscoStrategy(group, dp=DPSettings(), node_dropout=0.2)


def test_client_peer_channel_uses_mutual_tls_from_node_config(tmp_path: Any) -> None:
    import torch

    from disco_fl.core.wire import encode_tensor
    from disco_fl.proto_gen.disco.v1 import peer_pb2
    from disco_fl.runtime.transport.grpc_transport import GrpcTransport, HandshakeError
    from disco_fl.security import make_household_certs, peer_credentials

    assert peer_credentials("", 0) == (None, None)
    make_household_certs(tmp_path, 2)
    ts = []
    try:
        for k in range(2):
            server, channel = peer_credentials(str(tmp_path), k)
            ts.append(
                GrpcTransport(
                    k,
                    2,
                    plan_hash="h",
                    server_credentials=server,
                    channel_credentials=channel,
                    connect_timeout=5,
                )
            )
        for t in ts:
            t.set_peers([u.address for u in ts])
        f = peer_pb2.Frame(session_id="s", layer=0, src=0, dst=1, direction=peer_pb2.Frame.FORWARD)
        encode_tensor(torch.ones(2, 3), "fp32", out=f.tensor)
        ts[0].send(f)
        assert ts[1].recv("s", 0, 0, 10).tensor.shape == [2, 3]
        # a plaintext peer is refused by the TLS endpoint
        plain = GrpcTransport(1, 2, plan_hash="h", peers=[ts[0].address, "x"], connect_timeout=2)
        try:
            with pytest.raises(HandshakeError):
                plain.connect([0])
        finally:
            plain.close()
    finally:
        for t in ts:
            t.close()
