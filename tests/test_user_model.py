"""A user's model, loss and metric (issue 16): models named by import path
(``"package.module:function"``) with clear errors, strict checkpoints, ``ModelSpec`` with a
user's model and input shape, the ClientApp with a user's ``loss_fn`` / ``metric_fn``, and
the final shards delivered into each node's data folder (``query.deliver``), from which
``disco-fl serve`` takes its node index and peers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import nn

from disco_fl.fl.federated import ModelSpec, NodeData, parse_input_shape
from disco_fl.fl.server import DiscoStrategy, NodeInfo, build_roster
from disco_fl.models.checkpoint import CheckpointChecksumError, CheckpointError
from disco_fl.models.user import ModelImportError, load_model
from disco_fl.partition.plan import PlanError
from tests.conftest import run_nodes

USER_MODULE = '''
import torch
from torch import nn


def build(num_classes=10, in_channels=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, num_classes),
    )


def no_args():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 4))


class Branchy(nn.Module):
    """Python control flow on the input's rank: symbolic fx refuses it, export takes it."""

    def __init__(self, num_classes=10, **kwargs):
        super().__init__()
        self.seen = dict(kwargs)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        if x.ndim == 4:
            x = torch.relu(self.conv(x))
        return self.fc(x.mean((2, 3)))


def not_a_module():
    return {"weights": 1}


def broken(num_classes=10):
    raise RuntimeError("no such layer size")


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_mod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module outside the package, on ``sys.path`` (as a user's installed package)."""
    name = f"user_models_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


# ---- import paths ----------------------------------------------------------------------


def test_import_path_builds_with_the_arguments_it_names(user_mod: str) -> None:
    m = load_model(f"{user_mod}:build", num_classes=7, in_channels=3, norm="batch")
    assert isinstance(m, nn.Sequential) and m[-1].out_features == 7 and m[0].in_channels == 3
    m = load_model(f"{user_mod}:no_args", num_classes=7, in_channels=3, norm="batch")
    assert m[-1].out_features == 4  # called with none of them
    m = load_model(f"{user_mod}:Branchy", num_classes=5, in_channels=1, norm="group")
    assert m.fc.out_features == 5 and m.seen == {"in_channels": 1, "norm": "group"}  # **kwargs
    # a built-in name still works
    assert type(load_model("resnet_narrow")).__name__ == "ResNet"


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("no_such_pkg_xyz.models:build",
         ["cannot import module 'no_such_pkg_xyz.models'", "PYTHONPATH"]),
        ("{mod}:missing", ["has no attribute 'missing'"]),
        ("{mod}:NOT_CALLABLE", ["is a int, not a callable"]),
        ("{mod}:not_a_module", ["returned a dict, not a torch.nn.Module"]),
        ("{mod}:broken", ["raised RuntimeError: no such layer size"]),
        ("{mod}:", ["import path 'package.module:function'"]),
        ("not_registered", ["unknown model 'not_registered'"]),
    ],
)  # fmt: skip
def test_import_path_errors_name_the_path(user_mod: str, path: str, words: list[str]) -> None:
    path = path.format(mod=user_mod)
    with pytest.raises(ValueError) as e:
        load_model(path, num_classes=10)
    assert repr(path) in str(e.value) or path in str(e.value)
    for w in words:
        assert w in str(e.value)
    if ":" in path:
        assert isinstance(e.value, ModelImportError)


def test_checkpoint_loaded_strictly_and_corruption_refused(user_mod: str, tmp_path: Path) -> None:
    from disco_fl.models import save_checkpoint_atomic

    torch.manual_seed(1)
    src = load_model(f"{user_mod}:build", num_classes=10)
    path = tmp_path / "w.pth"
    save_checkpoint_atomic(src.state_dict(), path)
    torch.manual_seed(2)
    got = load_model(f"{user_mod}:build", checkpoint=path, num_classes=10)
    for key, v in src.state_dict().items():
        assert torch.equal(got.state_dict()[key], v), key
    # a plain torch.save file of another tool (no checksum) is read with weights_only
    plain = tmp_path / "plain.pth"
    torch.save(src.state_dict(), plain)
    load_model(f"{user_mod}:build", checkpoint=plain, num_classes=10)
    # one flipped byte in our checksummed file
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointChecksumError, match="bad.pth"):
        load_model(f"{user_mod}:build", checkpoint=bad, num_classes=10)
    # weights of another shape
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model(f"{user_mod}:build", checkpoint=path, num_classes=3)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(f"{user_mod}:build", checkpoint=tmp_path / "none.pth", num_classes=10)


def test_model_spec_of_a_user_model(user_mod: str) -> None:
    cfg = {"model": f"{user_mod}:no_args", "nodes": 2, "input-shape": "1,4,4", "num-classes": 4}
    spec = ModelSpec.from_config(cfg)
    assert spec.input_shape == (1, 4, 4) and spec.capture == "auto" and spec.is_user_model
    assert ModelSpec.from_config(spec.to_config()) == spec
    pm = spec.partition()
    x = torch.randn(3, 1, 4, 4)
    dense = spec.build_dense()
    pm.eval()
    assert torch.allclose(pm(x), dense(x), atol=1e-5)
    # fx refuses Branchy (control flow on x.ndim): "auto" captures it with torch.export
    spec = ModelSpec(name=f"{user_mod}:Branchy", num_nodes=2)
    dense = spec.build_dense()
    pm = spec.partition(dense).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(pm(x), dense.eval()(x), atol=1e-5)
    # a built-in keeps fx and its checkpoint settings (no input_shape key: old runs resume)
    assert ModelSpec().capture == "fx" and "input_shape" not in ModelSpec().settings()
    assert parse_input_shape("") is None and parse_input_shape([16]) == (16,)
    with pytest.raises(ValueError, match="input-shape"):
        parse_input_shape("3,a")
    with pytest.raises(ValueError, match="input-shape"):
        parse_input_shape("0,4")


# ---- the ClientApp with a user's loss and metric ---------------------------------------


@pytest.fixture
def _ids(flower_run_identity: None) -> None:
    """These tests build Flower Messages."""


def _strategy() -> DiscoStrategy:
    # fp32 (not the int8 default): the nodes' outputs must equal the fp32 emulation's
    s = DiscoStrategy(ModelSpec(num_nodes=2), steps=3, batch_size=4, codec="fp32")
    infos = [NodeInfo(101, "a", 0, "127.0.0.1:7100", 40, 10), NodeInfo(102, "a", 1, "x:1", 0, 0)]
    s.roster = build_roster(infos, 2)
    s.roster["a"].token = "t"
    s.num_rounds = 2
    return s


def _context(k: int, **extra: Any) -> Context:
    node_config = {"household": "a", "shard": k, "peer-address": f"127.0.0.1:{7100 + k}", **extra}
    return Context(run_id=1, node_id=k, node_config=node_config, state=RecordDict(), run_config={})


def _by_shard(msgs: Any) -> list[Message]:
    return sorted(msgs, key=lambda m: int(m.content.config_records["config"]["shard"]))


def _household(monkeypatch: pytest.MonkeyPatch, data: NodeData) -> Any:
    """The two nodes in this process: in-process peer channel, node 0 holds ``data``."""
    import disco_fl.fl.client_app as ca
    from disco_fl.runtime.transport import InProcessHub

    z, zl = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    none = NodeData(z, zl, z, zl)
    hub = InProcessHub(2)
    for k in range(2):
        hub[k].close = lambda *a, **kw: None  # type: ignore[method-assign]
    monkeypatch.setattr(ca, "_transport", lambda cfg, plan, k, *a: hub[k])
    monkeypatch.setattr(
        ca, "_data", lambda ctx, *_: data if ctx.node_config["shard"] == 0 else none
    )
    return ca, hub


def _data() -> NodeData:
    g = torch.Generator().manual_seed(0)
    return NodeData(
        torch.randn(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g),
        torch.randn(10, 1, 28, 28, generator=g), torch.randint(0, 10, (10,), generator=g),
    )  # fmt: skip


def _train(monkeypatch: pytest.MonkeyPatch, loss_fn: Any) -> tuple[DiscoStrategy, list[Any]]:
    from disco_fl.fl.federated import unpack_state

    s = _strategy()
    msgs = _by_shard(s.configure_train(2, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    ca, hub = _household(monkeypatch, _data())
    app = ca.make_client_app(loss_fn=loss_fn)
    assert app is not ca.app
    try:
        replies = run_nodes(lambda k: ca.train(msgs[k], _context(k), loss_fn), 2)
    finally:
        hub.close()
    return s, [unpack_state(r.content.array_records["arrays"]) for r in replies] + replies


def test_client_app_trains_with_a_users_loss(_ids: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss of zero gradient leaves every weight of both nodes as it was (the custom loss is
    the one whose gradient flows back across the household); the default loss changes them;
    the reported loss is the user's."""
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def zero_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append((tuple(outputs.shape), tuple(targets.shape)))
        return 0.0 * outputs.sum() + 1.25

    s, (st0, st1, r0, _) = _train(monkeypatch, zero_loss)
    assert calls == [((4, 10), (4,))] * 3  # node 0 owns every step (the only data owner)
    assert r0.content["metrics"]["loss"] == pytest.approx(1.25)
    weights = [k for k in s.pm.shard(0).state_dict() if k.startswith("ops.") and "running" not in k]
    weights = [k for k in weights if "num_batches" not in k]
    assert weights
    for k, st in enumerate((st0, st1)):
        ref = s.pm.shard(k).state_dict()
        assert all(torch.equal(st[key], ref[key]) for key in weights)
    s, (d0, d1, r0, _) = _train(monkeypatch, None)
    assert any(not torch.equal(d1[key], s.pm.shard(1).state_dict()[key]) for key in weights)
    assert r0.content["metrics"]["loss"] > 1.5  # cross-entropy of a fresh 10-class model


def test_client_app_reports_a_users_metric(_ids: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The requester's metric_fn sees all held-out outputs (== the emulation's); the server
    reports the metric per household and weighted."""
    from disco_fl.fl.server.aggregation import evaluate_metrics

    seen: list[torch.Tensor] = []

    def metric_fn(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        seen.append(outputs)
        return {"mean-logit": outputs.mean(), "top1": float((outputs.argmax(1) == targets).sum())}

    s = _strategy()
    s.num_rounds = 1
    s.eval_batch_size = 4
    msgs = _by_shard(s.configure_evaluate(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    data = _data()
    ca, hub = _household(monkeypatch, data)
    try:
        replies = run_nodes(lambda k: ca.evaluate(msgs[k], _context(k), metric_fn), 2)
    finally:
        hub.close()
    s.pm.eval()
    with torch.no_grad():
        want = s.pm(data.x_eval)
    assert len(seen) == 1 and torch.allclose(seen[0], want, atol=1e-5)
    m0 = replies[0].content["metrics"]
    assert m0["mean-logit"] == pytest.approx(float(want.mean()), abs=1e-5)
    assert "correct" not in m0 and m0["num-examples"] == 10
    good = {"a": {0: replies[0], 1: replies[1]}}
    agg = evaluate_metrics(good, {}, s.roster or {}, s.pm.comm_report("fp32"))
    assert agg["mean-logit/a"] == agg["mean-logit"] == m0["mean-logit"]
    assert "accuracy" not in agg and agg["num-examples"] == 10
    # the default: correct / accuracy, as before (fresh messages: a handler consumes its record)
    msgs = _by_shard(s.configure_evaluate(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    hub2 = _household(monkeypatch, data)[1]
    try:
        replies = run_nodes(lambda k: ca.evaluate(msgs[k], _context(k)), 2)
    finally:
        hub2.close()
    assert replies[0].content["metrics"]["correct"] == int((want.argmax(1) == data.y_eval).sum())


def test_user_metric_values_are_checked() -> None:
    from disco_fl.fl.client_app import user_metrics

    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert user_metrics(lambda o, t: 0.5, x, y) == {"metric": 0.5}
    assert user_metrics(lambda o, t: {"accuracy": torch.tensor(0.25)}, x, y) == {"accuracy": 0.25}
    with pytest.raises(ValueError, match="reserved"):
        user_metrics(lambda o, t: {"num-examples": 1.0}, x, y)
    with pytest.raises(ValueError, match="must be a number"):
        user_metrics(lambda o, t: {"iou": "high"}, x, y)


# ---- shards delivered to the nodes --------------------------------------------------------


def _exported(tmp_path: Path) -> tuple[DiscoStrategy, Path]:
    s = _strategy()
    s._set_masks(0.3)
    s.pm.export(tmp_path / "plan")
    return s, tmp_path / "plan"


def test_delivery_stores_plan_and_shard_checked(_ids: None, tmp_path: Path) -> None:
    from disco_fl.emulation.export import load_shard, run_shards
    from disco_fl.fl.client_app import deliver
    from disco_fl.fl.server.delivery import delivery_messages
    from disco_fl.runtime.serving.node_options import node_defaults

    s, plan_dir = _exported(tmp_path)
    assert s.roster is not None
    msgs = _by_shard(delivery_messages(plan_dir, s.roster))
    assert [m.metadata.message_type for m in msgs] == ["query.deliver"] * 2
    folders = [tmp_path / f"node{k}" for k in range(2)]
    for k, m in enumerate(msgs):
        r = deliver(m, _context(k, **{"data-dir": str(folders[k])}))
        assert r.content.config_records["delivered"]["data-dir"] == str(folders[k])
    nodes = [load_shard(folders[k] / "plan.json", k) for k in range(2)]
    ref = [load_shard(plan_dir / "plan.json", k) for k in range(2)]
    assert nodes[0].plan.hash == nodes[1].plan.hash == ref[0].plan.hash
    assert sorted(p.name for p in folders[1].iterdir()) == ["node.json", "node_1.pt", "plan.json"]
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(run_shards(nodes, x), run_shards(ref, x))
    # disco-fl serve <data folder>: node index and the household's peers from node.json
    assert node_defaults(folders[1], None, None) == (1, ["127.0.0.1:7100", "x:1"])
    assert node_defaults(folders[1], 0, "a:1,b:2") == (0, ["a:1", "b:2"])
    with pytest.raises(ValueError, match="give --node and --peers"):
        node_defaults(plan_dir, None, None)


def test_delivery_refuses_a_tampered_shard_or_another_node(_ids: None, tmp_path: Path) -> None:
    from flwr.app import Array, ArrayRecord

    from disco_fl.fl.client_app import deliver
    from disco_fl.fl.server.delivery import delivery_messages

    s, plan_dir = _exported(tmp_path)
    assert s.roster is not None
    msgs = _by_shard(delivery_messages(plan_dir, s.roster))
    folder = tmp_path / "node0"
    with pytest.raises(ValueError, match="reached household 'a' shard 1"):
        deliver(msgs[0], _context(1, **{"data-dir": str(folder)}))
    raw = bytearray(msgs[0].content.array_records["shard"]["file"].numpy().tobytes())
    raw[-40] ^= 0x01
    import numpy as np

    msgs[0].content.array_records["shard"] = ArrayRecord(
        {"file": Array(np.frombuffer(bytes(raw), dtype=np.uint8).copy())}
    )
    with pytest.raises(PlanError, match="sha256 differs"):
        deliver(msgs[0], _context(0, **{"data-dir": str(folder)}))
    assert not folder.exists()  # nothing written
    cfg = msgs[1].content.config_records["config"]
    plan = json.loads(str(cfg["plan"]))
    plan["codec"] = "fp16"  # edited: no longer its hash
    cfg["plan"] = json.dumps(plan)
    with pytest.raises(PlanError, match="hash"):
        deliver(msgs[1], _context(1, **{"data-dir": str(folder)}))
    assert not folder.exists()


def test_default_data_dir_is_per_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from disco_fl.fl.delivery import data_dir, default_data_dir

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir("kitchen", 1) == tmp_path / "disco_fl" / "kitchen" / "node1"
    assert default_data_dir("../x y", 0) == tmp_path / "disco_fl" / "_x_y" / "node0"
    assert data_dir(_context(0), "a", 0) == tmp_path / "disco_fl" / "a" / "node0"


@pytest.mark.parametrize("command", ["train", "demo"])
def test_cli_names_a_model_path_that_does_not_import(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from disco_fl.cli.main import main

    argv = [command, "--model", "no_such_pkg_xyz.nets:build", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "disco-fl: error: model 'no_such_pkg_xyz.nets:build': cannot import module" in err
    assert not (tmp_path / "o" / "run").exists()  # no deployment was started
