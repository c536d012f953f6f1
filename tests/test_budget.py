"""Budget training: the achieved communication meets the target; checkpoints resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import disco_fl
from disco_fl.data import load_builtin, stratified_split, to_tensor
from disco_fl.emulation.budget import (
    BudgetConfig,
    calibrate_masks,
    evaluate,
    fit_budget,
    train_model,
)
from disco_fl.models import resnet_narrow


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = load_builtin()
    tr, te = stratified_split(labels, [600, 300], seed=0)
    x = to_tensor(images)
    y = torch.as_tensor(labels).long()
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="module")
def dense(data: tuple[torch.Tensor, ...]) -> torch.nn.Module:
    xtr, ytr, _, _ = data
    torch.manual_seed(0)
    return train_model(resnet_narrow(), xtr, ytr, epochs=8, lr=0.01, batch_size=64)


@pytest.mark.parametrize("budget", [0.3, 0.1])
def test_budget_is_reached(
    budget: float, data: tuple[torch.Tensor, ...], dense: torch.nn.Module
) -> None:
    xtr, ytr, xte, yte = data
    pm = disco_fl.partition(dense, 4, xtr[:2])
    cfg = BudgetConfig(budget=budget, gate_epochs=2, finetune_epochs=3, batch_size=64, seed=0)
    res = fit_budget(pm, xtr, ytr, cfg, teacher=dense)
    # the hard masks use the budget, to within 10% (and never more)
    assert budget * 0.9 <= res.achieved_fraction <= budget
    rep = pm.comm_report()
    assert rep.exchange_fraction == pytest.approx(res.achieved_fraction)
    assert rep.bytes_per_sample < rep.dense_bytes_per_sample * (budget + 0.05)
    assert evaluate(pm, xte, yte) > 0.3  # far above chance (0.1) after a very short run


@pytest.mark.parametrize("budget", [0.3, 0.1])
def test_lagrangian_pulls_gate_probabilities_to_the_budget(budget: float) -> None:
    """With no hand-set penalty weight, the multiplier drives the expected fraction from ~1
    to the neighbourhood of the target (it may overshoot below it) during the gate phase."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 1),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 16, 4),
    )
    x = torch.randn(256, 1, 4, 4)
    y = x.flatten(1)[:, :4].argmax(1)
    pm = disco_fl.partition(model, 2, x[:2])
    assert float(pm.expected_exchange_fraction().detach()) > 0.99
    cfg = BudgetConfig(budget=budget, gate_epochs=30, finetune_epochs=0, batch_size=32)
    res = fit_budget(pm, x, y, cfg)
    assert res.expected_fraction < 1.5 * budget
    assert res.history[-1]["lam"] > 0
    assert budget * 0.9 <= res.achieved_fraction <= budget


def test_budget_zero_and_one(data: tuple[torch.Tensor, ...], dense: torch.nn.Module) -> None:
    xtr, ytr, _, _ = data
    pm = disco_fl.partition(dense, 2, xtr[:2])
    fit_budget(
        pm,
        xtr[:128],
        ytr[:128],
        BudgetConfig(budget=0.0, gate_epochs=3, finetune_epochs=1, batch_size=64),
    )
    assert pm.comm_report().exchange_bytes == 0
    fit_budget(
        pm,
        xtr[:128],
        ytr[:128],
        BudgetConfig(budget=1.0, gate_epochs=3, finetune_epochs=0, batch_size=64),
    )
    assert pm.comm_report().exchange_fraction == 1.0


def test_calibration_prefers_high_logits_and_fits() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1))
    pm = disco_fl.partition(model, 2, torch.randn(1, 1, 4, 4))
    (_, _, d0, g0), (_, _, d1, g1) = pm.gate_items()
    with torch.no_grad():
        g0.log_alpha[str(d0)].copy_(torch.tensor([5.0, -1.0]))
        g1.log_alpha[str(d1)].copy_(torch.tensor([0.0, 3.0]))
    achieved = calibrate_masks(pm, 0.5)
    assert achieved == 0.5
    assert g0.mask(d0).tolist() == [1.0, 0.0] and g1.mask(d1).tolist() == [0.0, 1.0]


def test_resume_from_checkpoint_is_exact(
    data: tuple[torch.Tensor, ...],
    dense: torch.nn.Module,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    xtr, ytr, _, _ = data
    x, y = xtr[:256], ytr[:256]
    cfg = BudgetConfig(budget=0.2, gate_epochs=2, finetune_epochs=1, batch_size=64, seed=3)
    ref = disco_fl.partition(dense, 2, x[:2])
    fit_budget(ref, x, y, cfg, checkpoint_dir=tmp_path / "a")

    import disco_fl.emulation.budget as tr

    real_save = tr._save
    calls = {"n": 0}

    def save_then_crash(path: Path, obj: dict) -> None:
        real_save(path, obj)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed after the second epoch's checkpoint

    monkeypatch.setattr(tr, "_save", save_then_crash)
    pm = disco_fl.partition(dense, 2, x[:2])
    with pytest.raises(KeyboardInterrupt):
        fit_budget(pm, x, y, cfg, checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(tr, "_save", real_save)
    resumed = disco_fl.partition(dense, 2, x[:2])
    fit_budget(resumed, x, y, cfg, checkpoint_dir=tmp_path / "b")
    for (n1, a), (n2, b) in zip(
        ref.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(a, b), n1


def test_checkpoint_from_other_config_is_refused(
    data: tuple[torch.Tensor, ...], dense: torch.nn.Module, tmp_path: Path
) -> None:
    xtr, ytr, _, _ = data
    pm = disco_fl.partition(dense, 2, xtr[:2])
    fit_budget(
        pm,
        xtr[:64],
        ytr[:64],
        BudgetConfig(budget=0.2, gate_epochs=1, finetune_epochs=0, batch_size=64),
        checkpoint_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="different configuration"):
        fit_budget(
            pm,
            xtr[:64],
            ytr[:64],
            BudgetConfig(budget=0.3, gate_epochs=1, finetune_epochs=0, batch_size=64),
            checkpoint_dir=tmp_path,
        )


@pytest.mark.parametrize(
    "bad",
    [dict(budget=1.5), dict(budget=-0.1), dict(budget=0.1, lr=0.0), dict(budget=0.1, anneal=0.0)],
)
def test_bad_config(bad: dict) -> None:
    with pytest.raises(ValueError):
        BudgetConfig(**bad)


def test_sync_point_limit_keeps_the_strongest_exchanges() -> None:
    torch.manual_seed(0)
    pm = disco_fl.partition(resnet_narrow(), 2, torch.randn(2, 1, 28, 28))
    names = [e.name for e in pm.program.exchanges]
    assert len(names) > 4
    strong = {names[1], names[-2]}
    for name, _, d, g in pm.gate_items():  # two exchanges the training wanted open
        g.log_alpha[str(d)].data.fill_(3.0 if name in strong else -4.0)
    free = calibrate_masks(pm, 0.3)
    assert pm.comm_report().sync_points > 2  # the budget alone spreads channels
    limited = calibrate_masks(pm, 0.3, max_sync_points=2)
    rep = pm.comm_report()
    assert rep.sync_points == 2
    assert {layer.op for layer in rep.layers if layer.kind == "exchange" and layer.bytes} == strong
    assert limited <= 0.3 + 1e-9 and limited > 0.5 * free  # the freed budget is reused
    pm0 = disco_fl.partition(resnet_narrow(), 2, torch.randn(2, 1, 28, 28))
    calibrate_masks(pm0, 0.3, max_sync_points=0)
    assert pm0.comm_report().sync_points == 0 and pm0.hard_exchange_fraction() == 0.0


def test_sync_point_limit_counts_normalization_layers() -> None:
    from tests.zoo import UserNet

    pm = disco_fl.partition(UserNet(), 2, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="normalization layers"):
        calibrate_masks(pm, 0.5, max_sync_points=0)
    with pytest.raises(ValueError, match="max_sync_points"):
        BudgetConfig(budget=0.1, max_sync_points=-1)
