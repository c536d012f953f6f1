"""Tasks: what a model's output means, its loss, metric and distillation target.

Three tasks, by name (:func:`get_task`):

=================== ============================ ================= ===========================
task                output / target              metric            distillation from a teacher
=================== ============================ ================= ===========================
classification      logits ``(B, K)`` / ``(B,)`` accuracy          KL at temperature ``t``
                    int64 class                  (fraction)        (Hinton et al.)
segmentation        logits ``(B, K, H, W)`` /    miou (mean IoU,   per-pixel KL at ``t``
                    ``(B, H, W)`` int64 class    a fraction)
super_resolution    image ``(B, C, H, W)`` /     psnr_db (dB,      MSE to the teacher's image
                    image, values in [0, 1]      peak 1.0)
=================== ============================ ================= ===========================

Definitions (fixed here so that every benchmark reports the same numbers):

- **accuracy**: fraction of samples whose arg-max logit is the label.
- **miou**: over the whole evaluated set, per class ``IoU = TP / (TP + FP + FN)`` from the
  confusion matrix of arg-max predictions (every pixel counts once); the mean over the
  classes that occur in the targets or the predictions (background included). A fraction in
  [0, 1]; BENCHMARKS.md prints points (x 100).
- **psnr_db**: per image ``10 log10(1 / MSE)`` of the prediction clamped to [0, 1] (the peak
  signal is 1.0), averaged over images. The MSE of one image is floored at 1e-10 (100 dB).

Distillation mixes the task loss with the teacher term:
``(1 - w) * loss + w * term``, ``term`` being ``t^2 * KL`` (classification, per pixel for
segmentation: KL summed over classes, averaged over pixels) or ``MSE(output, teacher)``
(super-resolution; the temperature is not used). ``w = 0`` or no teacher: the task loss alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "TASKS",
    "ClassificationTask",
    "SegmentationTask",
    "SuperResolutionTask",
    "Task",
    "get_task",
    "mean_iou",
    "psnr_db",
    "user_metrics",
]


def _kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """``t^2 * KL(softmax(teacher / t) || softmax(student / t))`` over dim 1, averaged over
    every other position (the batch; and the pixels of a segmentation map)."""
    if student.dim() > 2:  # (B, K, H, W) -> (B * H * W, K)
        k = student.shape[1]
        student = student.movedim(1, -1).reshape(-1, k)
        teacher = teacher.movedim(1, -1).reshape(-1, k)
    kl = F.kl_div(
        F.log_softmax(student / t, 1),
        F.log_softmax(teacher / t, 1),
        reduction="batchmean",
        log_target=True,
    )
    return t * t * kl


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean IoU (a fraction) of integer class maps of equal shape; see the module docstring."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}")
    p, t = pred.reshape(-1).long(), target.reshape(-1).long()
    if p.numel() and (int(min(p.min(), t.min())) < 0 or int(max(p.max(), t.max())) >= num_classes):
        raise ValueError(f"class indices must be in [0, {num_classes})")
    conf = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    conf = conf.view(num_classes, num_classes).double()  # rows: target, columns: prediction
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    if not bool(present.any()):
        return 0.0
    return float((tp[present] / union[present]).mean())


def psnr_db(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of images in [0, 1] (prediction clamped; peak 1.0)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}")
    if len(pred) == 0:
        return 0.0
    err = (pred.clamp(0.0, 1.0).double() - target.double()) ** 2
    mse = err.reshape(len(pred), -1).mean(1).clamp(min=1e-10)
    return float((10.0 * torch.log10(1.0 / mse)).mean())


class Task:
    """One task: loss, metric, distillation and predictions (see the module docstring)."""

    name: str = ""
    metric_name: str = ""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def teacher_term(
        self, output: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        raise NotImplementedError

    def distill_loss(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        teacher: torch.Tensor | None,
        weight: float,
        temperature: float,
    ) -> torch.Tensor:
        """``(1 - weight) * loss + weight * teacher_term`` (the loss alone without a teacher)."""
        loss = self.loss(output, target)
        if teacher is None or weight <= 0:
            return loss
        return (1.0 - weight) * loss + weight * self.teacher_term(output, teacher, temperature)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """Inference output: class indices (classification, segmentation) or the image."""
        return output.argmax(1)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        """The metric of predictions (from :meth:`predict`) against targets."""
        raise NotImplementedError

    def metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The metric (:attr:`metric_name`) of model outputs against targets."""
        return self.score(self.predict(outputs), targets)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ClassificationTask(Task):
    name = "classification"
    metric_name = "accuracy"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def teacher_term(
        self, output: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        return _kl(output, teacher, temperature)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        return int((predictions == targets).sum()) / max(len(targets), 1)


class SegmentationTask(ClassificationTask):
    """Per-pixel classification: cross-entropy over pixels, mean IoU."""

    name = "segmentation"
    metric_name = "miou"

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        num_classes = int(max(int(predictions.max()), int(targets.max()))) + 1
        return mean_iou(predictions, targets, num_classes)

    def metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return mean_iou(outputs.argmax(1), targets, outputs.shape[1])


class SuperResolutionTask(Task):
    """Image regression: MSE loss, PSNR in dB; distillation = MSE to the teacher's image."""

    name = "super_resolution"
    metric_name = "psnr_db"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def teacher_term(
        self, output: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        return F.mse_loss(output, teacher)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.clamp(0.0, 1.0)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        return psnr_db(predictions, targets)


TASKS: dict[str, Task] = {
    t.name: t for t in (ClassificationTask(), SegmentationTask(), SuperResolutionTask())
}


def get_task(task: str | Task) -> Task:
    """The :class:`Task` named ``task`` ("classification", "segmentation",
    "super_resolution"); a :class:`Task` is returned as is."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except (KeyError, TypeError):
        known = ", ".join(TASKS)
        raise ValueError(f"unknown task {task!r}; known tasks: {known}") from None


RESERVED_METRICS = ("num-examples", "correct")  # the ClientApp's own metrics


def user_metrics(
    metric_fn: Callable[[torch.Tensor, torch.Tensor], Any],
    outputs: torch.Tensor,
    targets: torch.Tensor,
) -> dict[str, float]:
    """``metric_fn(outputs, targets)`` as metrics: a number is ``{"metric": value}``, a
    mapping gives its entries (numbers; ``num-examples`` and ``correct`` are the ClientApp's
    own names).
    The server reports each per household and its example-weighted mean."""
    got = metric_fn(outputs, targets)
    items = got.items() if isinstance(got, Mapping) else [("metric", got)]
    out: dict[str, float] = {}
    for name, v in items:
        if not isinstance(name, str) or name in RESERVED_METRICS or "/" in name:
            raise ValueError(f"metric_fn: metric name {name!r} is reserved or not a plain name")
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"metric_fn: metric {name!r} must be a number, got {v!r}")
        out[name] = float(v)
    return out
