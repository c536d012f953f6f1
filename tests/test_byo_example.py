"""The "Bring your own model" example (``examples/byo_model``, shown verbatim in README.md and
docs/deployment.md): its ServerApp runs DISCO rounds on the user's model over a simulated
grid whose nodes store the delivered shards with the real ``query.deliver`` handler; its
ClientApp trains a household with the user's loss and reports the user's metric."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from disco_fl.fl.delivery import DELIVER_TYPE
from tests.conftest import run_nodes
from tests.test_flower_contract import NODES, SimGrid
from tests.test_user_model import _by_shard, _context, _data, _household

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "byo_model"
FILES = ["byo_app/task.py", "byo_app/server_app.py", "byo_app/client_app.py", "pyproject.toml"]


@pytest.fixture
def byo(monkeypatch: pytest.MonkeyPatch, flower_run_identity: None) -> Any:
    """The example's package importable, as Flower makes an installed app's folder."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for name in [m for m in sys.modules if m == "byo_app" or m.startswith("byo_app.")]:
        monkeypatch.delitem(sys.modules, name)
    import byo_app.client_app
    import byo_app.server_app
    import byo_app.task

    return byo_app


def _blocks(doc: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```(?:python|toml)\n(.*?)```", doc, re.S)]


@pytest.mark.parametrize("doc", ["README.md", "docs/deployment.md"])
def test_docs_show_the_example_verbatim(doc: str) -> None:
    blocks = _blocks((ROOT / doc).read_text())
    for name in FILES:
        code = (EXAMPLE / name).read_text().strip()
        assert code in blocks, f"{doc} does not show examples/byo_model/{name} as it is"


class DeliveringGrid(SimGrid):
    """SimGrid's nodes (households a and b), whose ``query.deliver`` messages go through the
    real node handler into ``root / <node id>``."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def _answer(self, m: Message) -> RecordDict:
        if m.metadata.message_type != DELIVER_TYPE:
            return super()._answer(m)
        from disco_fl.fl.delivery import deliver

        nid = m.metadata.dst_node_id
        h, k, _, _ = NODES[nid]
        node_config = {"household": h, "shard": k, "data-dir": str(self.root / str(nid))}
        ctx = Context(run_id=1, node_id=nid, node_config=node_config, state=RecordDict(),
                      run_config={})  # fmt: skip
        return deliver(m, ctx).content


def test_example_server_app_runs_rounds_and_delivers(byo: Any, tmp_path: Path) -> None:
    from disco_fl.emulation.export import load_shard

    cfg = {
        "model": "byo_app.task:Net", "nodes": 2, "num-rounds": 2, "steps": 2, "budget": 0.3,
        "initial-checkpoint": "", "run-dir": str(tmp_path / "run"),
    }  # fmt: skip
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    grid = DeliveringGrid(tmp_path / "nodes")
    byo.server_app.main(grid, ctx)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [h["round"] for h in summary["history"]] == [1, 2]
    assert summary["delivered"] == {"a/0": "ok", "a/1": "ok", "b/0": "ok", "b/1": "ok"}
    plan_dir = tmp_path / "run" / "plan"
    assert json.loads((plan_dir / "plan.json").read_text())["meta"]["model"] == "byo_app.task:Net"
    for nid, (_, k, _, _) in NODES.items():
        got = load_shard(tmp_path / "nodes" / str(nid) / "plan.json", k)
        assert got.plan.hash == summary["plan_hash"]
        want = load_shard(plan_dir / "plan.json", k)
        a, b = got.shard.state_dict(), want.shard.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_example_client_app_uses_the_users_loss_and_metric(
    byo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.clientapp import ClientApp

    from disco_fl.fl import DiscoStrategy, ModelSpec
    from disco_fl.fl.server import NodeInfo, build_roster

    assert isinstance(byo.client_app.app, ClientApp)
    calls: list[str] = []
    loss, metric = byo.task.loss_fn, byo.task.metric_fn
    monkeypatch.setattr(byo.task, "loss_fn", lambda o, t: calls.append("loss") or loss(o, t))
    monkeypatch.setattr(byo.task, "metric_fn", lambda o, t: calls.append("metric") or metric(o, t))
    monkeypatch.delitem(sys.modules, "byo_app.client_app")
    import byo_app.client_app  # the app made with the wrapped functions

    s = DiscoStrategy(ModelSpec("byo_app.task:Net", num_nodes=2), steps=2, batch_size=4,
                      eval_batch_size=5)  # fmt: skip
    infos = [NodeInfo(101, "a", 0, "127.0.0.1:7100", 40, 10), NodeInfo(102, "a", 1, "x:1", 0, 0)]
    s.roster = build_roster(infos, 2)
    s.roster["a"].token = "t"
    s.num_rounds = 1
    ca, hub = _household(monkeypatch, _data())
    train = _by_shard(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    ev = _by_shard(s.configure_evaluate(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    app = byo_app.client_app.app
    try:
        replies = run_nodes(lambda k: app(train[k], _context(k)), 2)
        assert calls == ["loss", "loss"]
        replies += run_nodes(lambda k: app(ev[k], _context(k)), 2)
    finally:
        hub.close()
    assert calls == ["loss", "loss", "metric"]
    m = replies[2].content["metrics"]
    assert set(m.keys()) == {"num-examples", "top1", "confidence"} and 0.0 < m["confidence"] <= 1
    assert replies[0].content["metrics"]["loss"] > 0
