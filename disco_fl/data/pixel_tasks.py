"""Built-in data for the dense-prediction tasks, derived from the packaged MNIST digits.

Deterministic and offline (no download, no randomness):

- :func:`segmentation_data`: input = the normalized image (as :func:`to_tensor`), target =
  a ``(H, W)`` int64 class map: ``0`` (background) where the pixel is at most ``threshold``
  (uint8, default 127), ``1 + digit`` where the ink is above it: 11 classes
  (:data:`SEGMENTATION_CLASSES`).
- :func:`super_resolution_data`: target = the image in [0, 1], ``(1, H, W)``; input = its
  ``scale x scale`` area average (the mean of each block; 28x28 -> 14x14 for ``scale = 2``),
  also in [0, 1] (not normalized: the network predicts pixel values directly).
- :func:`task_data`: ``(x, y)`` of digits and their labels for a task by name (classification:
  the normalized images and the labels as they are).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from disco_fl.data.datasets import MNIST_MEAN, MNIST_STD, to_tensor

__all__ = [
    "INK_THRESHOLD",
    "PIXEL_TASKS",
    "SEGMENTATION_CLASSES",
    "segmentation_data",
    "super_resolution_data",
    "task_data",
]

#: Number of segmentation classes: background + the 10 digits.
SEGMENTATION_CLASSES: int = 11
#: A pixel is ink (of its digit's class) when its uint8 value is above this.
INK_THRESHOLD: int = 127
#: The tasks whose data is derived here (by :func:`task_data`), beside "classification".
PIXEL_TASKS: tuple[str, ...] = ("segmentation", "super_resolution")


def segmentation_data(
    images: np.ndarray,
    labels: np.ndarray,
    threshold: int = INK_THRESHOLD,
    mean: float = MNIST_MEAN,
    std: float = MNIST_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: x float32 ``(N, 1, H, W)`` normalized, y int64 ``(N, H, W)`` in [0, 11).

    Parameters
    ----------
    images : np.ndarray
        uint8 ``(N, H, W)`` grayscale digits.
    labels : np.ndarray
        N digit labels in [0, 10).
    threshold : int, default 127
        Pixels above it are ink.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"expected {len(images)} labels, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError("labels must be digits 0..9")
    if not 0 <= threshold < 255:
        raise ValueError(f"threshold must be in [0, 255), got {threshold}")
    ink = torch.from_numpy(images > threshold)
    cls = torch.as_tensor(labels.astype(np.int64)).view(-1, 1, 1) + 1
    y = torch.where(ink, cls, torch.zeros((), dtype=torch.int64))
    return to_tensor(images, mean, std), y


def super_resolution_data(images: np.ndarray, scale: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: x float32 ``(N, 1, H / scale, W / scale)`` (area average), y float32
    ``(N, 1, H, W)``, both in [0, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    if scale < 1 or images.shape[1] % scale or images.shape[2] % scale:
        raise ValueError(f"scale {scale} must divide the image size {images.shape[1:]}")
    y = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(torch.float32) / 255.0
    x = F.avg_pool2d(y, scale) if scale > 1 else y.clone()
    return x.contiguous(), y.contiguous()


def task_data(
    images: np.ndarray, labels: np.ndarray, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of uint8 digits and their labels for ``task``: ``"classification"``
    (normalized images, int64 labels), ``"segmentation"`` (:func:`segmentation_data`) or
    ``"super_resolution"`` (:func:`super_resolution_data`; the labels are not used).
    ``ValueError`` naming the known tasks for any other name."""
    if task == "classification":
        return to_tensor(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if task == "segmentation":
        return segmentation_data(images, labels)
    if task == "super_resolution":
        return super_resolution_data(images)
    known = ", ".join(("classification", *PIXEL_TASKS))
    raise ValueError(f"unknown task {task!r}; known tasks: {known}")
