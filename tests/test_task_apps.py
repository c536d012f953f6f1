"""Tasks in the Flower apps and the CLI (issue 16): the round config carries ``task``; the
ClientApp trains with the task's loss on the task's built-in data and reports the task's
metric; ``disco-fl infer`` writes masks / images of a dense plan."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

import disco_fl
from disco_fl.data import SEGMENTATION_CLASSES
from disco_fl.fl.federated import ModelSpec, node_data
from disco_fl.fl.round_config import EvalConfig, TrainConfig
from disco_fl.fl.server import DiscoStrategy, NodeInfo, build_roster
from disco_fl.fl.server.aggregation import evaluate_metrics
from disco_fl.models.segmentation import SegSmall
from disco_fl.runtime.serving.outputs import png_bytes, voc_palette
from disco_fl.tasks import mean_iou, psnr_db
from tests.conftest import run_nodes
from tests.test_flower_contract import _train_config
from tests.test_serve import Household, start_household  # noqa: F401 (a fixture)
from tests.test_shards import _random_masks


@pytest.fixture(autouse=True)
def _ids(flower_run_identity: None) -> None:
    """Every test here builds Flower Messages."""


# ---- the round config and the model spec ---------------------------------------------------


def test_round_config_carries_the_task() -> None:
    for task in ("segmentation", "super_resolution"):
        cfg = _train_config(task=task)
        rec = ConfigRecord(cfg.to_config())
        assert rec["task"] == task and TrainConfig.from_config(rec) == cfg
        ev = EvalConfig(
            server_round=1, household="a", shard=0, peers=("h:1",), token="t", plan="{}",
            requester=0, eval_batches=1, eval_batch_size=10, task=task,
        )  # fmt: skip
        assert EvalConfig.from_config(ConfigRecord(ev.to_config())).task == task
    # a config of an older server (no "task") is classification
    old = _train_config().to_config()
    del old["task"]
    assert TrainConfig.from_config(old).task == "classification"
    with pytest.raises(ValueError, match=r"'task' must be one of \['classification'"):
        TrainConfig.from_config({**old, "task": "detection"})
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        _train_config(task="detection")


def test_model_spec_task_defaults_and_errors() -> None:
    seg = ModelSpec.from_config({"task": "segmentation", "model": "", "nodes": 2})
    assert (seg.name, seg.num_classes, seg.task) == (
        "seg_small",
        SEGMENTATION_CLASSES,
        "segmentation",
    )
    assert seg.capture == "auto" and ModelSpec.from_config(seg.to_config()) == seg
    sr = ModelSpec.for_task("super_resolution")
    assert (sr.name, sr.sample_shape) == ("espcn", (1, 14, 14))
    assert "task" not in ModelSpec().to_config() and "task" not in ModelSpec().settings()
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        ModelSpec.from_config({"task": "detection"})
    with pytest.raises(ValueError, match="'resnet_narrow' is built for classification"):
        ModelSpec(task="segmentation")
    with pytest.raises(ValueError, match="'seg_small' is built for segmentation"):
        ModelSpec(name="seg_small")
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        node_data("builtin:0/2", task="detection")


def test_strategy_sends_the_task_in_every_message() -> None:
    s = _strategy("super_resolution")
    s.num_rounds = 1
    for m in _by_shard(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None)):  # type: ignore[arg-type]
        assert m.content.config_records["config"]["task"] == "super_resolution"
    for m in _by_shard(s.configure_evaluate(1, s.initial_arrays(), ConfigRecord(), grid=None)):  # type: ignore[arg-type]
        assert m.content.config_records["config"]["task"] == "super_resolution"


def test_node_data_of_a_dense_task_from_a_users_npz(tmp_path: Path) -> None:
    """A ``.npz`` of images + digit labels: targets derived as the built-in ones; of images +
    ``targets``: the user's own, split 80 / 20; bad targets refused by name."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    labels = np.arange(10) % 10
    np.savez(tmp_path / "digits.npz", images=images, labels=labels)
    d = node_data(str(tmp_path / "digits.npz"), task="segmentation")
    assert d.y_train.shape == (8, 28, 28) and len(d.y_eval) == 2
    assert set(d.y_train.unique().tolist()) <= set(range(SEGMENTATION_CLASSES))
    masks = rng.integers(0, 4, (10, 28, 28)).astype(np.int32)
    np.savez(tmp_path / "own.npz", images=images, targets=masks)
    d = node_data(str(tmp_path / "own.npz"), task="segmentation")
    got = torch.cat([d.y_train, d.y_eval])
    assert got.dtype == torch.long and len(d.y_eval) == 2
    assert sorted(m.numpy().tobytes() for m in got) == sorted(
        m.astype(np.int64).tobytes() for m in masks
    )
    small = images[:, ::2, ::2].copy()
    np.savez(tmp_path / "sr.npz", images=small, targets=images)
    d = node_data(str(tmp_path / "sr.npz"), task="super_resolution")
    assert d.x_train.shape == (8, 1, 14, 14) and d.y_eval.shape == (2, 1, 28, 28)
    assert float(d.x_train.max()) <= 1.0 and float(d.y_train.min()) >= 0.0
    np.savez(tmp_path / "bad.npz", images=images, targets=masks[:, :5])
    with pytest.raises(ValueError, match="segmentation 'targets' must be integer"):
        node_data(str(tmp_path / "bad.npz"), task="segmentation")


# ---- the ClientApp with a dense task, on the built-in data ---------------------------------

DATA = "builtin:0/20"  # 125 training, 50 held-out images of the built-in set


def _strategy(task: str) -> DiscoStrategy:
    d = node_data(DATA, task=task)
    # fp32 (not the int8 default): the nodes' metric must equal the fp32 emulation's exactly
    spec = ModelSpec.for_task(task, num_nodes=2)
    s = DiscoStrategy(spec, steps=2, batch_size=4, codec="fp32")
    infos = [
        NodeInfo(101, "a", 0, "127.0.0.1:7100", len(d.y_train), len(d.y_eval)),
        NodeInfo(102, "a", 1, "x:1", 0, 0),
    ]
    s.roster = build_roster(infos, 2)
    s.roster["a"].token = "t"
    s.num_rounds = 2
    s.eval_batch_size = 20
    return s


def _context(k: int) -> Context:
    node_config = {"household": "a", "shard": k, "peer-address": f"127.0.0.1:{7100 + k}"}
    if k == 0:
        node_config["data"] = DATA
    return Context(run_id=1, node_id=k, node_config=node_config, state=RecordDict(), run_config={})


def _by_shard(msgs: Any) -> list[Message]:
    return sorted(msgs, key=lambda m: int(m.content.config_records["config"]["shard"]))


def _run(
    monkeypatch: pytest.MonkeyPatch, handler: Callable[..., Message], msgs: list[Message]
) -> list[Message]:
    """Both nodes of household "a" in this process over an in-process peer channel; the
    ClientApp reads its real node data (node 0: ``DATA``; node 1: none)."""
    import disco_fl.fl.client_app as ca
    from disco_fl.runtime.transport import InProcessHub

    hub = InProcessHub(2)
    for k in range(2):
        hub[k].close = lambda *a, **kw: None  # type: ignore[method-assign]
    monkeypatch.setattr(ca, "_transport", lambda cfg, plan, k, *a: hub[k])
    try:
        return run_nodes(lambda k: handler(msgs[k], _context(k)), 2)
    finally:
        hub.close()


@pytest.mark.parametrize("task", ["segmentation", "super_resolution"])
def test_client_app_trains_and_evaluates_a_dense_task(
    task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train`` with the task's loss on the derived data; ``evaluate`` reports the task's
    metric, equal to the metric of the emulation's outputs on the same held-out images."""
    import disco_fl.fl.client_app as ca

    s = _strategy(task)
    msgs = _by_shard(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    replies = _run(monkeypatch, ca.train, msgs)
    m0 = replies[0].content["metrics"]
    assert not replies[0].has_error() and m0["owner-steps"] == 2
    # the task's loss: pixel cross-entropy of a fresh 11-class net is about ln 11; the MSE of
    # a fresh ESPCN is well below 1 but not 0 (cross-entropy over one channel would be 0)
    if task == "segmentation":
        assert 1.0 < m0["loss"] < 5.0
    else:
        assert 1e-4 < m0["loss"] < 1.0

    s.num_rounds = 1  # evaluation after the last round
    msgs = _by_shard(s.configure_evaluate(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    replies = _run(monkeypatch, ca.evaluate, msgs)
    m0 = replies[0].content["metrics"]
    d = node_data(DATA, task=task)
    s.pm.eval()
    with torch.no_grad():
        out = s.pm(d.x_eval)
    name, want = (
        ("miou", mean_iou(out.argmax(1), d.y_eval, SEGMENTATION_CLASSES))
        if task == "segmentation"
        else ("psnr_db", psnr_db(out.clamp(0, 1), d.y_eval))
    )
    assert "accuracy" not in m0 and "correct" not in m0 and m0["num-examples"] == 50
    assert m0[name] == pytest.approx(want, abs=1e-6)
    assert replies[1].content["metrics"]["num-examples"] == 0
    agg = evaluate_metrics(
        {"a": dict(enumerate(replies))}, {}, s.roster or {}, s.pm.comm_report("fp32")
    )
    assert agg[name] == agg[f"{name}/a"] == m0[name] and "accuracy" not in agg


# ---- disco-fl infer with dense outputs ------------------------------------------------------


def _png_pixels(data: bytes) -> tuple[int, np.ndarray]:
    """(colour type, pixel rows) of a PNG from ``png_bytes`` (filter 0, one IDAT)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert zlib.crc32(tag + body) == int.from_bytes(data[pos + 8 + n : pos + 12 + n], "big")
        chunks[tag] = body
        pos += 12 + n
    w, h = int.from_bytes(chunks[b"IHDR"][:4], "big"), int.from_bytes(chunks[b"IHDR"][4:8], "big")
    ctype = chunks[b"IHDR"][9]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, -1)
    assert (raw[:, 0] == 0).all()
    return ctype, raw[:, 1:].reshape(h, w, -1).squeeze(-1) if ctype != 2 else raw[:, 1:].reshape(
        h, w, 3
    )


def test_png_writer_round_trips() -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    ctype, px = _png_pixels(png_bytes(gray))
    assert ctype == 0 and np.array_equal(px, gray)
    rgb = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
    ctype, px = _png_pixels(png_bytes(rgb))
    assert ctype == 2 and np.array_equal(px, rgb)
    idx = rng.integers(0, 11, (6, 6), dtype=np.uint8)
    ctype, px = _png_pixels(png_bytes(idx, voc_palette()))
    assert ctype == 3 and np.array_equal(px, idx)
    assert voc_palette()[0].tolist() == [0, 0, 0] and len({tuple(c) for c in voc_palette()}) == 256
    with pytest.raises(ValueError, match="beyond a 4-colour palette"):
        png_bytes(idx, voc_palette(4))


def test_infer_writes_the_masks_of_a_segmentation_plan(
    tmp_path: Path,
    start_household: Callable[..., Household],  # noqa: F811
) -> None:
    """A tiny segmentation net, partitioned (some gates closed), served by two processes:
    ``disco-fl infer --out --png-dir`` writes the emulation's arg-max masks."""
    torch.manual_seed(0)
    model = SegSmall(num_classes=5, widths=(8, 8, 8), head_channels=8).eval()
    pm = disco_fl.partition(model, 2, torch.randn(2, 1, 28, 28), capture="auto").eval()
    _random_masks(pm, 0.4, seed=1)
    meta = {"task": "segmentation", "input": {"mean": [0.5], "std": [0.25]}}
    pm.export(tmp_path / "plan", meta=meta)
    hh = start_household(tmp_path / "plan", 2)
    images = np.random.default_rng(0).integers(0, 256, size=(9, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", images=images)
    out, pngs, js = tmp_path / "out.npz", tmp_path / "png", tmp_path / "res.json"
    cmd = [sys.executable, "-m", "disco_fl.cli.main", "infer", str(tmp_path / "in.npz")]
    cmd += ["--address", hh.addrs[0], "--batch-size", "4", "--out", str(out)]
    cmd += ["--png-dir", str(pngs), "--json", str(js)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    x = (torch.from_numpy(images).float().unsqueeze(1) / 255 - 0.5) / 0.25
    with torch.no_grad():
        logits = pm(x)
    with np.load(out, allow_pickle=False) as z:
        masks, outputs, names = z["masks"], z["outputs"], list(z["names"])
    assert masks.dtype == np.uint8 and masks.shape == (9, 28, 28)
    assert np.array_equal(masks, logits.argmax(1).numpy())
    assert np.allclose(outputs, logits.numpy(), atol=1e-5)
    assert names == [f"in.npz[{i}]" for i in range(9)]
    files = sorted(pngs.iterdir())
    assert len(files) == 9 and files[0].name == "00000_in.npz_0.png"
    for f, want in zip(files, masks, strict=True):
        ctype, px = _png_pixels(f.read_bytes())
        assert ctype == 3 and np.array_equal(px, want)
    res = json.loads(js.read_text())
    assert res["task"] == "segmentation" and res["n"] == 9 and res["pngs"] == 9
    # a dense plan without --out / --png-dir: a clear error, not a wall of logits
    r = subprocess.run(cmd[:7], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "give --out FILE.npz and/or --png-dir" in r.stderr


def test_infer_writes_the_images_of_a_super_resolution_plan(
    tmp_path: Path,
    start_household: Callable[..., Household],  # noqa: F811
) -> None:
    """ESPCN (its sub-pixel phase maps gathered before the pixel shuffle), partitioned with
    some gates closed, served by two ``disco-fl serve`` processes: ``disco-fl infer --out``
    writes the emulation's x2 images (runtime over processes == emulation)."""
    from disco_fl.models.super_resolution import ESPCN

    torch.manual_seed(0)
    model = ESPCN(2, 1, widths=(8, 6)).eval()
    pm = disco_fl.partition(model, 2, torch.randn(2, 1, 14, 14), capture="auto").eval()
    _random_masks(pm, 0.4, seed=3)
    meta = {"task": "super_resolution", "input": {"mean": [0.0], "std": [1.0]}}
    pm.export(tmp_path / "plan", meta=meta)
    hh = start_household(tmp_path / "plan", 2)
    images = np.random.default_rng(1).integers(0, 256, size=(5, 14, 14), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", images=images)
    out = tmp_path / "out.npz"
    cmd = [sys.executable, "-m", "disco_fl.cli.main", "infer", str(tmp_path / "in.npz")]
    cmd += ["--address", hh.addrs[0], "--batch-size", "2", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    x = torch.from_numpy(images).float().unsqueeze(1) / 255
    with torch.no_grad():
        want = pm(x)
    with np.load(out, allow_pickle=False) as z:
        outputs = z["outputs"]
    assert outputs.shape == (5, 1, 28, 28)  # images: the output clamped to [0, 1]
    assert np.allclose(outputs, want.clamp(0, 1).numpy(), atol=1e-5)
    with torch.no_grad():  # the closed gates matter: not the open-gate model's images
        assert not np.allclose(outputs, model(x).clamp(0, 1).numpy(), atol=1e-3)


# ---- disco-fl demo --task ------------------------------------------------------------------


@pytest.mark.slow(seconds=70)
@pytest.mark.xdist_group("flower")  # with tests/test_flower_e2e.py's deployments
def test_demo_super_resolution_reports_psnr(tmp_path: Path) -> None:
    """The real local deployment (SuperLink, SuperNodes, serve) with the super-resolution
    task, kept small: one household, one round of 6 steps (60 s on 2 shared cores)."""
    import os

    from tests.test_flower_e2e import _run_demo

    out = tmp_path / "demo.json"
    cmd = [
        sys.executable, "-m", "disco_fl.cli.main", "demo", "--task", "super_resolution",
        "--households", "1", "--rounds", "1", "--steps", "6", "--dense-epochs", "3",
        "--budget", "0.2", "--out", str(tmp_path / "work"), "--json", str(out),
        "--codec", "fp32",  # the served metric == the federated one exactly (no int8 steps)
    ]  # fmt: skip
    p = _run_demo(cmd, dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-4000:]
    s = json.loads(out.read_text())
    assert s["task"] == "super_resolution" and s["metric"] == "psnr_db"
    assert "accuracy_dense" not in s and "accuracy_disco" not in s
    # PSNR in dB of a trained ESPCN on digits: far above a blank guess, finite
    assert 15.0 < s["metric_dense"] < 60.0 and 10.0 < s["metric_disco"] < 60.0
    assert s["bytes_per_sample_disco"] < s["bytes_per_sample_dense"]
    # the federated evaluation reported the same metric, under its name
    assert s["federated_history"][-1]["evaluate"]["psnr_db"] == pytest.approx(s["metric_disco"])
    assert "psnr_db" in p.stdout
