"""Training in emulation: dense pretraining and fine-tuning gates to a communication budget.

Budget training (:func:`fit_budget`) has three phases:

1. **gates** (``gate_epochs``): weights and gate logits train together with stochastic
   hard-concrete gates. The budget is a constraint, not a penalty to tune: the loss is
   ``task + lam * E / target`` where ``E`` is the expected fraction of dense exchange bytes and
   ``lam >= 0`` is a Lagrange multiplier updated by dual ascent (``lam += dual_lr *
   (E / target - 1)``). The target falls geometrically from 1 to ``budget`` over the first
   ``anneal`` fraction of the phase, so the network gives up channels gradually.
2. **calibrate**: hard masks are chosen by :func:`calibrate_masks`: channels in decreasing
   order of gate logit, each taken if it still fits in ``budget * dense`` exchange bytes.
   The achieved fraction is at most the budget and within one channel of it.
3. **finetune** (``finetune_epochs``): masks fixed, weights adapt to them. Finally the
   BatchNorm running statistics are re-estimated with the final masks
   (:func:`~disco_fl.emulation.statistics.recalibrate_batchnorm`), since closing gates
   shifts every later activation. A plan trained with node dropout also gets statistics for
   each single missing node (:func:`~disco_fl.emulation.statistics.calibrate_degraded`).

Everything is seeded; a checkpoint is written (atomically) after every epoch and the run
resumes from it when ``checkpoint_dir`` already holds one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from disco_fl.core.files import load_torch
from disco_fl.core.gates import check_node_dropout, dropped_nodes, prob_open
from disco_fl.emulation.model import PartitionedModel
from disco_fl.emulation.statistics import calibrate_degraded, recalibrate_batchnorm
from disco_fl.tasks import Task, get_task

Log = Callable[[str], None]


def _quiet(msg: str) -> None:
    return None


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 500,
    task: str | Task = "classification",
) -> float:
    """The task's metric in eval mode (:mod:`disco_fl.tasks`): top-1 accuracy by default,
    mean IoU (a fraction) for segmentation, PSNR in dB for super-resolution."""
    t = get_task(task)
    was = model.training
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            preds.append(t.predict(model(x[i : i + batch_size])))
    model.train(was)
    if not preds:
        return 0.0
    return t.score(torch.cat(preds), y)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill), vectorized."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=gen)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * shifts[:, 0].float() / w
    theta[:, 1, 2] = -2.0 * shifts[:, 1].float() / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def distill_loss(
    logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None, weight: float, t: float
) -> torch.Tensor:
    """``(1 - weight) * CE + weight * t^2 * KL(teacher || student)`` at temperature ``t``
    (classification; other tasks: ``get_task(name).distill_loss``)."""
    return get_task("classification").distill_loss(logits, y, teacher, weight, t)


def _check_shift(task: Task, shift: int) -> None:
    if shift > 0 and task.name != "classification":
        raise ValueError(
            f"augment_shift moves the input only; it is for classification, not {task.name}"
        )


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [perm]


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    lr: float = 2e-3,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    augment_shift: int = 0,
    seed: int = 0,
    log: Log = _quiet,
    task: str | Task = "classification",
) -> nn.Module:
    """Plain supervised training (AdamW, one-cycle schedule) with the task's loss; used for
    the dense model."""
    t = get_task(task)
    _check_shift(t, augment_shift)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(len(x) // batch_size, 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    for ep in range(epochs):
        t0, tot = time.time(), 0.0
        batches = _batches(len(x), batch_size, gen)
        for idx in batches:
            loss = t.loss(model(random_shift(x[idx], augment_shift, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            tot += float(loss.detach())
        log(f"epoch {ep + 1}/{epochs} loss {tot / len(batches):.4f} ({time.time() - t0:.1f}s)")
    model.eval()
    return model


@dataclass
class BudgetConfig:
    """Settings of :func:`fit_budget` (defaults suit the small ResNets on 28x28 inputs)."""

    budget: float  # target fraction of dense exchange bytes, in [0, 1]
    gate_epochs: int = 6  # epochs with stochastic gates (phase 1)
    finetune_epochs: int = 4  # epochs with the hard masks fixed (phase 3)
    batch_size: int = 128
    lr: float = 2e-3  # Adam learning rate of the weights (cosine decay in phase 3)
    gate_lr: float = 0.1  # Adam learning rate of the gate logits
    dual_lr: float = 0.05  # dual ascent step of the Lagrange multiplier (per step)
    anneal: float = 0.6  # fraction of phase 1 over which the target falls from 1 to budget
    distill: float = 0.9  # weight of distillation when a teacher is given (0 = off)
    temperature: float = 4.0  # distillation temperature
    augment_shift: int = 0  # random translation of training images, pixels (0 = off)
    max_steps_per_epoch: int | None = None  # cap on batches per epoch (short runs)
    # at most this many layers exchange anything (each is a round trip); None = no limit
    max_sync_points: int | None = None
    seed: int = 0
    # node dropout: each node but the requester is missing from a training step with this
    # probability (its whole contribution zeroed, as in degraded mode), so that the plan
    # still answers well with a device gone; 0: off. The draw of step t (counted over all
    # epochs): disco_fl.core.gates.dropped_nodes(seed, t, ...), as the distributed training
    # step (NodeTrainer(node_dropout=..., gate_seed=seed)) draws it
    node_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.budget <= 1.0 or math.isnan(self.budget):
            raise ValueError(f"budget must be in [0, 1], got {self.budget}")
        for f in ("gate_epochs", "finetune_epochs"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError("max_steps_per_epoch must be >= 1")
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError("batch_size and lr must be positive")
        check_node_dropout(self.node_dropout)
        if self.gate_lr <= 0 or self.dual_lr <= 0:
            raise ValueError("gate_lr and dual_lr must be positive")
        if not 0.0 < self.anneal <= 1.0:
            raise ValueError("anneal must be in (0, 1]")
        if self.max_sync_points is not None and self.max_sync_points < 0:
            raise ValueError("max_sync_points must be >= 0 (or None for no limit)")


def _fill_masks(pm: PartitionedModel, budget: float, allowed: set[str] | None) -> float:
    """Hard masks: highest gate logits first (exchanges in ``allowed`` only, all if None)
    while the exchange bytes fit ``budget``; returns the achieved fraction."""
    items: list[tuple[float, int, Any, int, int]] = []
    dense = 0
    for name, _, d, g in pm.gate_items():
        per = pm.program.infos[name].elements_per_channel
        dense += per * g.num_channels
        if allowed is not None and name not in allowed:
            continue
        la = g.log_alpha[str(d)].detach()
        for c in range(g.num_channels):
            items.append((float(la[c]), per, g, d, c))
    items.sort(key=lambda t: (-t[0], t[1]))
    masks = {(id(g), d): torch.zeros(g.num_channels) for _, _, d, g in pm.gate_items()}
    limit = budget * dense
    used = 0
    for _, per, g, d, c in items:
        if used + per <= limit + 1e-9:
            masks[(id(g), d)][c] = 1.0
            used += per
    for _, _, d, g in pm.gate_items():
        g.set_mask(d, masks[(id(g), d)])
    return used / dense if dense else 0.0


def calibrate_masks(
    pm: PartitionedModel, budget: float, max_sync_points: int | None = None
) -> float:
    """Set hard masks: highest gate logits first, while the exchange bytes fit the budget.

    With ``max_sync_points``, at most that many layers may exchange anything (each one costs
    a network round trip at inference): cross-node normalization layers always do; among the
    exchanges, those whose selected gates the training voted open most clearly
    (``sum max(0, 2 P(open) - 1)``, ties by ``sum P(open)``) are kept, the others are closed,
    and the freed budget goes to the kept exchanges' next channels. Returns the achieved
    fraction of dense exchange bytes (``<= budget``).
    """
    achieved = _fill_masks(pm, budget, None)
    if max_sync_points is None:
        return achieved
    rep = pm.comm_report()
    stats = sum(1 for layer in rep.layers if layer.kind == "stats" and layer.bytes)
    room = max_sync_points - stats
    if room < 0:
        raise ValueError(
            f"max_sync_points={max_sync_points} is below the {stats} normalization layers "
            "that always exchange statistics"
        )
    score: dict[str, tuple[float, float]] = {}
    for name, _, d, g in pm.gate_items():
        p = prob_open(g.log_alpha[str(d)].detach()) * g.mask(d)
        if float(p.sum()) > 0:
            vote, mass = score.get(name, (0.0, 0.0))
            score[name] = (vote + float((2 * p - 1).clamp(min=0).sum()), mass + float(p.sum()))
    if len(score) <= room:
        return achieved
    keep = set(sorted(score, key=lambda e: score[e], reverse=True)[:room])
    return _fill_masks(pm, budget, keep)


@dataclass
class BudgetResult:
    budget: float
    achieved_fraction: float  # hard masks, fraction of dense exchange bytes
    expected_fraction: float  # end of phase 1, from the gate probabilities
    history: list[dict[str, float]]
    seconds: float


def _save(path: Path, obj: dict[str, Any]) -> None:
    from disco_fl.models import save_checkpoint_atomic

    save_checkpoint_atomic(obj, path)


def fit_budget(
    pm: PartitionedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    config: BudgetConfig,
    *,
    teacher: nn.Module | None = None,
    checkpoint_dir: str | Path | None = None,
    log: Log = _quiet,
    task: str | Task = "classification",
) -> BudgetResult:
    """Fine-tune gates and weights of ``pm`` so that its exchanges fit ``config.budget``.

    ``y`` holds the task's targets (:mod:`disco_fl.tasks`): class labels, class maps
    (segmentation) or images (super-resolution); the loss is the task's, with distillation
    from ``teacher``'s outputs when given (``config.distill`` is its weight).
    """
    t_start = time.time()
    the_task = get_task(task)
    _check_shift(the_task, config.augment_shift)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    ckpt = Path(checkpoint_dir) / "budget.pt" if checkpoint_dir else None
    gate_epochs = config.gate_epochs if 0.0 < config.budget < 1.0 else 0
    total = gate_epochs + config.finetune_epochs
    steps_per_epoch = len(_batches(len(x), config.batch_size, torch.Generator().manual_seed(0)))
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    anneal_steps = max(1, int(config.anneal * gate_epochs * steps_per_epoch))
    gate_opt = torch.optim.Adam(pm.gate_parameters(), lr=config.gate_lr)
    w_opt = torch.optim.Adam(pm.weight_parameters(), lr=config.lr)
    state: dict[str, Any] = {"epoch": 0, "lam": 0.0, "history": [], "expected": 1.0}
    if teacher is not None:
        teacher.eval()
    if ckpt is not None and ckpt.exists():
        saved = load_torch(ckpt)  # checksum verified, weights_only=True
        if saved.get("config") != asdict(config):
            raise ValueError(f"checkpoint {ckpt} was made with a different configuration")
        pm.load_state_dict(saved["model"])
        gate_opt.load_state_dict(saved["gate_opt"])
        w_opt.load_state_dict(saved["w_opt"])
        gen.set_state(saved["gen"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        log(f"resumed from {ckpt} at epoch {state['epoch']}")

    if state["epoch"] == 0 and gate_epochs == 0:
        if config.budget >= 1.0 or config.budget <= 0.0:
            pm.set_all_masks(1.0 if config.budget >= 1.0 else 0.0)
        else:  # no gate training: equal logits, so the cheapest channels are kept first
            calibrate_masks(pm, config.budget, config.max_sync_points)

    while state["epoch"] < total:
        ep = state["epoch"]
        gate_phase = ep < gate_epochs
        if ep == gate_epochs and gate_epochs > 0:
            achieved = calibrate_masks(pm, config.budget, config.max_sync_points)
            log(f"calibrated hard masks: {achieved:.4f} of dense exchange bytes")
        pm.gate_mode = "stochastic" if gate_phase else "hard"
        pm.train()
        t0 = time.time()
        tot_loss = tot_e = 0.0
        batches = _batches(len(x), config.batch_size, gen)[:steps_per_epoch]
        for i, idx in enumerate(batches):
            xb = random_shift(x[idx], config.augment_shift, gen)
            t_logits = None
            if teacher is not None and config.distill > 0:
                with torch.no_grad():
                    t_logits = teacher(xb)
            if not gate_phase:
                done = (ep - gate_epochs) * steps_per_epoch + i
                frac = done / max(1, config.finetune_epochs * steps_per_epoch)
                for group in w_opt.param_groups:
                    group["lr"] = config.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
            if config.node_dropout > 0:  # the draw the distributed training step makes too
                pm.dropped_nodes = dropped_nodes(
                    config.seed,
                    ep * steps_per_epoch + i,
                    pm.num_nodes,
                    config.node_dropout,
                    keep=pm.program.requester,
                )
            try:
                out = pm(xb)
            finally:
                pm.dropped_nodes = frozenset()
            loss = the_task.distill_loss(out, y[idx], t_logits, config.distill, config.temperature)
            if gate_phase:
                step = ep * steps_per_epoch + i
                target = config.budget ** min(1.0, step / anneal_steps)
                e = pm.expected_exchange_fraction()
                obj = loss + state["lam"] * e / target
                gate_opt.zero_grad(set_to_none=True)
                w_opt.zero_grad(set_to_none=True)
                obj.backward()
                gate_opt.step()
                w_opt.step()
                ev = float(e.detach())
                state["lam"] = max(0.0, state["lam"] + config.dual_lr * (ev / target - 1.0))
                tot_e += ev
            else:
                w_opt.zero_grad(set_to_none=True)
                loss.backward()
                w_opt.step()
            tot_loss += float(loss.detach())
        rec = {
            "epoch": ep + 1,
            "phase": 1.0 if gate_phase else 3.0,
            "loss": tot_loss / len(batches),
            "expected_fraction": tot_e / len(batches)
            if gate_phase
            else pm.hard_exchange_fraction(),
            "lam": state["lam"],
            "seconds": time.time() - t0,
        }
        if gate_phase:
            state["expected"] = float(pm.expected_exchange_fraction().detach())
        state["history"].append(rec)
        log(
            f"epoch {ep + 1}/{total} {'gates' if gate_phase else 'finetune'} "
            f"loss {rec['loss']:.4f} "
            f"comm {rec['expected_fraction']:.4f} lambda {state['lam']:.3f} ({rec['seconds']:.1f}s)"
        )
        state["epoch"] = ep + 1
        if ckpt is not None:
            _save(
                ckpt,
                {
                    "config": asdict(config),
                    "model": pm.state_dict(),
                    "gate_opt": gate_opt.state_dict(),
                    "w_opt": w_opt.state_dict(),
                    "gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "state": state,
                },
            )
    if gate_epochs > 0 and config.finetune_epochs == 0:
        calibrate_masks(pm, config.budget, config.max_sync_points)
    pm.gate_mode = "hard"
    recalibrate_batchnorm(pm, x, batch_size=max(config.batch_size, 256))
    if config.node_dropout > 0:  # a plan meant to run with a node missing
        calibrate_degraded(pm, x, batch_size=max(config.batch_size, 256))
    pm.eval()
    return BudgetResult(
        config.budget,
        pm.hard_exchange_fraction(),
        state["expected"],
        state["history"],
        time.time() - t_start,
    )
