"""Stochastic depth (``drop_path``): the identity at eval (gates open == original, fx and export
captures), per-sample drops in training that every node shares (fused == lock-step == each
node's draw == the training step's draw), the user's modules untouched by the export capture,
and DP with noise 0 == per-sample clipping of the emulation's gradients with the same masks."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import disco_fl
from disco_fl.core.gates import gate_generator
from disco_fl.emulation.model import _EmuNode
from disco_fl.partition import PartitionError, get_spec
from disco_fl.partition.ops_drop import drop_path_mask, keep_drop_path
from disco_fl.runtime.training.passes import TrainContext
from tests.conftest import import_torchvision


class DropPath(nn.Module):
    """timm's ``DropPath`` (``timm.layers.drop``), re-stated: timm is not a dependency."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        r = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            r.div_(keep)
        return x * r


def _drop(kind: str, p: float) -> nn.Module:
    if kind == "timm":
        return DropPath(p)
    tv = import_torchvision()
    return tv.ops.StochasticDepth(p, "batch" if kind == "tv_batch" else "row")


class ResNet(nn.Module):
    """stem -> two residual blocks ``h + drop(conv(relu(h)))`` (-> pooled linear head)."""

    def __init__(self, kind: str = "tv", p: float = 0.5, head: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop1 = _drop(kind, p)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop2 = _drop(kind, p)
        self.head = nn.Linear(8, 10) if head else None

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.drop1(self.conv1(F.relu(h)))
        h = h + self.drop2(self.conv2(F.relu(h)))
        if self.head is None:
            return h
        return self.head(h.mean((2, 3)))


def _model(kind: str = "tv", p: float = 0.5, head: bool = False) -> ResNet:
    torch.manual_seed(0)
    return ResNet(kind, p, head)


def _untouched(model: nn.Module) -> bool:
    return all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("kind", ["tv", "tv_batch", "timm"])
def test_drop_path_is_captured_and_the_identity_at_eval(capture: str, kind: str) -> None:
    model = _model(kind).train()
    x = torch.randn(4, 3, 8, 8)
    pm = disco_fl.partition(model, 2, x, capture=capture)  # type: ignore[arg-type]
    assert model.training and _untouched(model)  # the user's model as it was
    ops = [op for op in pm.program.ops if op.kind == "drop_path"]
    mode = "batch" if kind == "tv_batch" else "row"
    assert [op.attrs for op in ops] == [{"p": 0.5, "mode": mode, "scale": True}] * 2
    model.eval()
    pm.eval()
    with torch.no_grad():
        assert float((pm(x) - model(x)).abs().max()) <= 1e-5
        pm.execution = "lockstep"
        assert float((pm(x) - model(x)).abs().max()) <= 1e-5


def test_export_restores_the_modules_when_the_export_fails() -> None:
    class Bad(ResNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = super().forward(x)
            return h.nonzero()  # data-dependent shape: torch.export refuses it

    torch.manual_seed(0)
    model = Bad()
    with pytest.raises(PartitionError):
        disco_fl.partition(model, 2, torch.randn(2, 3, 8, 8), capture="export")
    assert _untouched(model)
    with keep_drop_path(model):
        assert not _untouched(model)
    assert _untouched(model)


def _trainer_view(pm: Any, k: int, seed: int, step: int) -> TrainContext:
    t = SimpleNamespace(index=k, gate_seed=seed, layer_of=dict(pm._layer_of))
    return TrainContext(t, pm.program, step)  # type: ignore[arg-type]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_training_drops_the_same_samples_on_every_node(capture: str) -> None:
    """In training with a seed: fused == lock-step; every node's context (and the training
    step's) draws the same (B,) mask; per sample the residual is dropped or scaled by 2."""
    model = _model("tv").eval()
    x = torch.randn(16, 3, 8, 8)
    pm = disco_fl.partition(model, 3, x[:2], capture=capture)  # type: ignore[arg-type]
    pm.train()
    pm.gate_seed, pm.gate_step = 11, 4
    with torch.no_grad():
        fused = pm(x)
        pm.execution = "lockstep"
        lock = pm(x)
        assert float((fused - lock).abs().max()) <= 1e-5
        assert torch.equal(pm(x), lock)  # same (seed, step): same draw
        pm.gate_step = 5
        assert not torch.equal(pm(x), lock)  # another step: another draw
        pm.gate_step = 4
    ops = [op for op in pm.program.ops if op.kind == "drop_path"]
    masks = []
    for op in ops:
        ones = torch.ones(16, 1, 1, 1)
        views = [_EmuNode(pm, k) for k in range(3)] + [
            _trainer_view(pm, k, 11, 4) for k in range(3)
        ]
        got = [get_spec("drop_path").compute(op, v, [ones], {}) for v in views]
        assert all(torch.equal(g, got[0]) for g in got)
        layer = pm.program.ops.index(op)
        want = drop_path_mask(ones, 0.5, "row", True, gate_generator(11, 4, layer, -1, -1))
        assert torch.equal(got[0], want)
        masks.append(got[0].flatten())
    # per sample: the block's residual is dropped (0) or scaled by 1 / (1 - p) = 2
    with torch.no_grad():
        h = model.stem(x)
        out = h
        for conv, m in ((model.conv1, masks[0]), (model.conv2, masks[1])):
            out = out + conv(F.relu(out)) * m.view(-1, 1, 1, 1)
        assert float((out - lock).abs().max()) <= 1e-4
    for m in masks:
        assert set(m.tolist()) == {0.0, 2.0}


def test_without_a_seed_the_nodes_still_share_the_draw() -> None:
    """gate_seed None: one seed per forward from the global RNG, shared by every node of the
    lock-step emulation (so it equals the fused one from the same RNG state)."""
    model = _model("tv").eval()
    x = torch.randn(16, 3, 8, 8)
    pm = disco_fl.partition(model, 3, x[:2]).train()
    outs = []
    with torch.no_grad():
        for execution in ("fused", "lockstep"):
            pm.execution = execution  # type: ignore[assignment]
            torch.manual_seed(1)
            outs.append(pm(x))
        assert float((outs[0] - outs[1]).abs().max()) <= 1e-5
        assert not torch.equal(pm(x), outs[1])  # the next forward draws anew


def test_drop_probability_one_drops_every_path_and_batch_mode_draws_once() -> None:
    x = torch.randn(6, 4, 2, 2)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(drop_path_mask(x, 1.0, "row", True, g), torch.zeros(6, 1, 1, 1))
    m = drop_path_mask(x, 0.5, "batch", True, g)
    assert m.shape == (1, 1, 1, 1) and float(m) in (0.0, 2.0)
    m = drop_path_mask(x, 0.5, "row", False, torch.Generator().manual_seed(0))
    assert set(m.flatten().tolist()) <= {0.0, 1.0}


def test_dp_noise_zero_uses_the_steps_masks() -> None:
    """One distributed DP step (noise 0, flat clipping) with stochastic depth == per-sample
    gradients of the emulation with the same masks (gate_seed 0, step 0), clipped and summed."""
    from disco_fl.runtime.training.dp import DPConfig
    from tests.test_training_distributed import _dp_distributed_grads

    n, batch, clip = 2, 8, 3.0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    pm = disco_fl.partition(_model("tv", head=True), n, x[:2]).train()
    ref = copy.deepcopy(pm)
    cfg = DPConfig(
        dataset_sizes={0: 800}, max_grad_norm=clip, noise_multiplier=0.0, batch_size=batch
    )
    grads, results = _dp_distributed_grads(pm, (x, y, cfg))
    ref.gate_seed, ref.gate_step = 0, 0
    ref.execution = "lockstep"
    names = [(k, name) for k in range(n) for name, _ in ref.shard(k).named_parameters()]
    names = [(k, name) for k, name in names if "gates" not in name]
    params = [ref.shard(k).get_parameter(name) for k, name in names]
    losses = F.cross_entropy(ref(x), y, reduction="none")
    total = [torch.zeros_like(p) for p in params]
    clipped = 0
    for b in range(batch):
        gb = torch.autograd.grad(losses[b], params, retain_graph=True)
        norm = float(torch.stack([(t * t).sum() for t in gb]).sum().sqrt())
        factor = min(1.0, clip / (norm + 1e-6))
        clipped += factor < 1.0
        for acc, t in zip(total, gb, strict=True):
            acc += t * factor
    assert 0 < clipped < batch
    for i, op in enumerate(ref.program.ops):  # the step dropped some samples' residuals
        if op.kind == "drop_path":
            m = drop_path_mask(x, 0.5, "row", True, gate_generator(0, 0, i, -1, -1))
            assert set(m.flatten().tolist()) == {0.0, 2.0}
    for (k, name), want in zip(names, total, strict=True):
        err = float((grads[k][name] - want / batch).abs().max())
        assert err <= 1e-5, f"node {k} {name}: {err:.3g}"
    assert results[0].dp is not None


def test_exported_plan_keeps_drop_path_and_shards_compute_its_identity(tmp_path: Any) -> None:
    """The plan stores the op (its attributes survive the file); the shards (inference: never
    training) compute the original model."""
    from disco_fl.emulation.export import load_shard, run_shards

    model = _model("timm", head=True).eval()
    x = torch.randn(3, 3, 8, 8)
    pm = disco_fl.partition(model, 2, x, capture="export")
    pm.export(tmp_path)
    shards = [load_shard(tmp_path / "plan.json", k) for k in range(2)]
    ops = [op for op in shards[0].program.ops if op.kind == "drop_path"]
    assert [op.attrs for op in ops] == [{"p": 0.5, "mode": "row", "scale": True}] * 2
    with torch.no_grad():
        assert float((run_shards(shards, x) - model(x)).abs().max()) <= 1e-5
