"""Tasks beyond classification (issue 16): losses and metrics, the derived data, the
segmentation and super-resolution models partitioned, and budget training per task."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import disco_fl
from disco_fl.data import (
    SEGMENTATION_CLASSES,
    load_builtin,
    segmentation_data,
    super_resolution_data,
)
from disco_fl.emulation.budget import BudgetConfig, distill_loss, evaluate, fit_budget, train_model
from disco_fl.emulation.export import load_shard, run_shards
from disco_fl.models import MODEL_TASKS, build_model
from disco_fl.tasks import get_task, mean_iou, psnr_db


def test_mean_iou_hand_computed() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    # class 0: TP 2 (0,0),(1,3); FP 1 (1,2); FN 1 (0,1) -> 2/4
    # class 1: TP 2; FP 1 (0,1); FN 0 -> 2/3;  class 2: TP 2; FP 0; FN 1 -> 2/3
    expected = (2 / 4 + 2 / 3 + 2 / 3) / 3
    assert mean_iou(pred, target, 3) == pytest.approx(expected)
    # a class absent from both (3) is not averaged; a predicted-only class counts as IoU 0
    assert mean_iou(pred, target, 4) == pytest.approx(expected)
    assert mean_iou(torch.tensor([3, 0]), torch.tensor([0, 0]), 4) == pytest.approx(0.25)
    assert mean_iou(target, target, 3) == 1.0
    with pytest.raises(ValueError, match="class indices"):
        mean_iou(pred, target, 2)
    # the task's metric takes logits and uses the arg-max
    logits = F.one_hot(pred, 3).permute(2, 0, 1).unsqueeze(0).float()
    assert get_task("segmentation").metric(logits, target.unsqueeze(0)) == pytest.approx(expected)


def test_psnr_hand_computed() -> None:
    target = torch.zeros(2, 1, 2, 2)
    pred = target.clone()
    pred[0] = 0.1  # MSE 0.01 -> 20 dB
    pred[1, 0, 0, 0] = 2.0  # clamped to 1: MSE 1/4 -> 10 log10(4) dB
    expected = (20.0 + 10 * math.log10(4.0)) / 2
    assert psnr_db(pred, target) == pytest.approx(expected)
    assert get_task("super_resolution").metric(pred, target) == pytest.approx(expected)
    assert psnr_db(target, target) == pytest.approx(100.0)  # MSE floored at 1e-10


def test_get_task_and_losses() -> None:
    with pytest.raises(ValueError, match="unknown task 'detection'.*segmentation"):
        get_task("detection")
    cls = get_task("classification")
    assert (cls.metric_name, get_task("segmentation").metric_name) == ("accuracy", "miou")
    assert get_task("super_resolution").metric_name == "psnr_db"
    torch.manual_seed(0)
    logits, teacher, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    # classification keeps the formula of train.distill_loss
    kl = F.kl_div(F.log_softmax(logits / 3, 1), F.softmax(teacher / 3, 1), reduction="batchmean")
    want = 0.3 * F.cross_entropy(logits, y) + 0.7 * 9 * kl
    assert cls.distill_loss(logits, y, teacher, 0.7, 3.0) == pytest.approx(float(want), rel=1e-5)
    assert distill_loss(logits, y, teacher, 0.7, 3.0) == pytest.approx(float(want), rel=1e-5)
    assert cls.distill_loss(logits, y, None, 0.7, 3.0) == F.cross_entropy(logits, y)
    # segmentation: per-pixel KL = KL of the pixels as a batch of classifications
    seg = get_task("segmentation")
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ys = torch.randint(0, 4, (2, 3, 3))
    flat = lambda a: a.permute(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731
    want_seg = cls.distill_loss(flat(s), ys.reshape(-1), flat(t), 0.5, 2.0)
    assert seg.distill_loss(s, ys, t, 0.5, 2.0) == pytest.approx(float(want_seg), rel=1e-5)
    assert seg.predict(s).shape == (2, 3, 3)
    # super-resolution: MSE to the target and to the teacher's image
    sr = get_task("super_resolution")
    a, b, c = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    want_sr = 0.2 * F.mse_loss(a, b) + 0.8 * F.mse_loss(a, c)
    assert sr.distill_loss(a, b, c, 0.8, 4.0) == pytest.approx(float(want_sr), rel=1e-6)


def test_derived_data_shapes_classes_and_determinism() -> None:
    images, labels = load_builtin()
    images, labels = images[::25], labels[::25]  # the file is sorted by digit
    x, y = segmentation_data(images, labels)
    assert x.shape == (200, 1, 28, 28) and y.shape == (200, 28, 28) and y.dtype == torch.int64
    assert SEGMENTATION_CLASSES == 11 and int(y.min()) == 0 and int(y.max()) <= 10
    ink = torch.from_numpy(images > 127)
    assert torch.equal(y == 0, ~ink)
    digits = torch.as_tensor(labels.astype(np.int64)) + 1
    assert torch.equal(y[ink], digits.view(-1, 1, 1).expand_as(y)[ink])
    assert set(torch.unique(y).tolist()) == set(range(11))
    x2, y2 = segmentation_data(images, labels)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    lo, hi = super_resolution_data(images)
    assert lo.shape == (200, 1, 14, 14) and hi.shape == (200, 1, 28, 28)
    assert float(hi.max()) <= 1.0 and float(lo.min()) >= 0.0
    block = images[0, :2, :2].astype(np.float64).mean() / 255.0
    assert float(lo[0, 0, 0, 0]) == pytest.approx(block, abs=1e-6)
    assert torch.equal(super_resolution_data(images)[0], lo)
    with pytest.raises(ValueError, match="scale"):
        super_resolution_data(images, scale=3)


@pytest.mark.parametrize("name", ["seg_small", "espcn"])
@pytest.mark.parametrize("nodes", [2, 4])
def test_models_partition_open_gates_equal_original(name: str, nodes: int) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    size = 28 if name == "seg_small" else 14
    x = torch.randn(3, 1, size, size)
    pm = disco_fl.partition(model, nodes, x[:2], capture="auto").eval()
    with torch.no_grad():
        want = model(x)
        assert torch.allclose(pm(x), want, atol=1e-5)
        pm.execution = "lockstep"  # node by node, messages included
        assert torch.allclose(pm(x), want, atol=1e-5)
    rep = pm.comm_report()
    if name == "espcn":  # the last pixel shuffle is gathered at node 0: output bytes
        assert any(op.kind == "gather_pixel_shuffle" for op in pm.program.ops)
        per_node = 4 // nodes * 14 * 14 * 4
        assert rep.output_bytes == (nodes - 1) * per_node
    else:
        assert rep.output_bytes > 0
    assert rep.exchange_bytes == rep.dense_exchange_bytes > 0


@pytest.mark.parametrize("name", ["seg_small_rh", "seg_narrow"])
@pytest.mark.parametrize("nodes", [2, 4])
def test_seg_small_rh_requester_head_equals_original(name: str, nodes: int) -> None:
    """seg_small_rh (and seg_narrow, the same network at half the width) partitioned with the
    head on the requester: with open gates it computes the original model; its class maps
    never travel (no output bytes), the classifier's input travels instead, as a gated
    exchange."""
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(3, 1, 28, 28)
    split = disco_fl.partition(model, nodes, x[:2], capture="auto").eval()
    pm = disco_fl.partition(model, nodes, x[:2], capture="auto", head="requester").eval()
    with torch.no_grad():
        want = model(x)
        assert want.shape == (3, 11, 28, 28)
        assert torch.allclose(pm(x), want, atol=1e-5)
        assert torch.allclose(split(x), want, atol=1e-5)
        split.execution = "lockstep"
        assert torch.allclose(split(x), want, atol=1e-5)
    rep, rep_split = pm.comm_report(), split.comm_report()
    assert rep.output_bytes == 0 and rep_split.output_bytes > 0
    assert rep.exchange_bytes == rep.dense_exchange_bytes > 0
    assert rep.bytes_per_sample == rep_split.bytes_per_sample - rep_split.output_bytes
    pm.set_all_masks(0.0)
    assert pm.comm_report().exchange_bytes == 0  # the requester alone: input bytes only


def test_seg_narrow_is_seg_small_rh_at_half_width() -> None:
    narrow, full = build_model("seg_narrow"), build_model("seg_small_rh")
    assert type(narrow) is type(full)
    for a, b in zip(narrow.modules(), full.modules(), strict=True):
        if isinstance(a, torch.nn.Conv2d) and a.out_channels != 11:  # not the classifier
            assert (a.out_channels, b.out_channels) in {(16, 32), (24, 48), (32, 64)}
    assert MODEL_TASKS["seg_narrow"] == "segmentation"
    assert narrow.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 11, 28, 28)


def test_seg_small_rh_requester_head_lockstep(tmp_path: Path) -> None:
    """A conv2d head owned by the requester leaves the other node a weight of 0 output channels
    (``F.conv2d`` refuses those; ``ops_comm._conv2d`` answers an empty output): the lock step
    and shard-only execution == the original."""
    torch.manual_seed(0)
    model = build_model("seg_small_rh").eval()
    x = torch.randn(3, 1, 28, 28)
    pm = disco_fl.partition(model, 2, x[:2], capture="auto", head="requester").eval()
    pm.execution = "lockstep"
    with torch.no_grad():
        assert torch.allclose(pm(x), model(x), atol=1e-5)
    pm.export(tmp_path)
    nodes = [load_shard(tmp_path / "plan.json", k) for k in range(2)]
    assert torch.allclose(run_shards(nodes, x), model(x), atol=1e-5)


def test_pixel_shuffle_across_nodes_must_be_the_output() -> None:
    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = build_model("espcn")
            self.tail = torch.nn.Conv2d(1, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.tail(self.body(x))

    with pytest.raises(disco_fl.PartitionError, match="must be the output"):
        disco_fl.partition(Inner().eval(), 2, torch.randn(2, 1, 14, 14), capture="export")


@pytest.mark.parametrize("task", ["classification", "segmentation", "super_resolution"])
def test_fit_budget_runs_for_each_task(task: str) -> None:
    images, labels = load_builtin()
    images, labels = images[::78], labels[::78]  # 64 images, every digit
    if task == "segmentation":
        (x, y), model = segmentation_data(images, labels), build_model("seg_small")
    elif task == "super_resolution":
        (x, y), model = super_resolution_data(images), build_model("espcn")
    else:
        x = torch.from_numpy(images).unsqueeze(1).float() / 255.0
        y, model = torch.as_tensor(labels.astype(np.int64)), build_model("resnet_narrow")
    train_model(model, x, y, epochs=1, batch_size=32, task=task)
    before = evaluate(model, x, y, task=task)
    pm = disco_fl.partition(model, 2, x[:2], capture="auto")
    cfg = BudgetConfig(
        budget=0.1, gate_epochs=1, finetune_epochs=1, batch_size=32, max_steps_per_epoch=2
    )
    res = fit_budget(pm, x, y, cfg, teacher=model, task=task)
    assert 0.0 < res.achieved_fraction <= 0.1 + 1e-9
    assert len(res.history) == 2 and all(math.isfinite(h["loss"]) for h in res.history)
    after = evaluate(pm, x, y, task=task)
    assert math.isfinite(before) and math.isfinite(after)
    if task != "classification":
        with pytest.raises(ValueError, match="augment_shift"):
            fit_budget(pm, x, y, BudgetConfig(budget=0.1, augment_shift=2), task=task)
