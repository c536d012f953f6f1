"""A node's local data (its ``data`` / ``eval-data`` settings) and the built-in set's parts.

The built-in set (5,000 MNIST images) is cut once, with a fixed seed, into a public part
(the server pretrains the dense model on it), a private part (split among households) and a
held-out test part (split among households for federated evaluation; the demo's final
collaborative inference runs on all of it).

Every task (:mod:`disco_fl.tasks`) reads the same images: classification their labels,
segmentation and super-resolution the targets derived from them
(:func:`disco_fl.data.task_data`: a per-pixel class map, the image at twice the input's size),
so a node's example counts are the same for every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from disco_fl.data import (
    HF_PREFIX,
    PIXEL_TASKS,
    load_builtin,
    load_hf_partition,
    load_npz,
    split_households,
    stratified_split,
    task_data,
    to_tensor,
)

BUILTIN_FRACTIONS = (0.3, 0.5, 0.2)
BUILTIN_SEED = 1234


def builtin_split() -> dict[str, np.ndarray]:
    """Indices of the built-in set's ``public``, ``private`` and ``test`` parts (fixed seed)."""
    _, labels = load_builtin()
    pub, priv, test = stratified_split(labels, list(BUILTIN_FRACTIONS), seed=BUILTIN_SEED)
    return {"public": pub, "private": priv, "test": test}


def _tensors(
    images: np.ndarray, labels: np.ndarray, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets for ``task`` (classification: exactly as before tasks existed)."""
    if task == "classification":
        return to_tensor(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return task_data(images, labels, task)


def builtin_tensors(part: str, task: str = "classification") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of one part of the built-in set for ``task`` (classification:
    normalized images and labels)."""
    images, labels = load_builtin()
    idx = builtin_split()[part]
    return _tensors(images[idx], labels[idx], task)


def parse_builtin(spec: str) -> tuple[int, int]:
    """``"builtin:i/n"`` -> ``(i, n)``."""
    try:
        i_s, n_s = spec.split(":", 1)[1].split("/")
        i, n = int(i_s), int(n_s)
    except (IndexError, ValueError) as e:
        raise ValueError(f"data {spec!r}: expected 'builtin:<partition>/<partitions>'") from e
    if not 0 <= i < n:
        raise ValueError(f"data {spec!r}: partition {i} is not in [0, {n})")
    return i, n


@dataclass
class NodeData:
    """A node's local training and held-out data (empty tensors: the node holds none)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor


def _empty() -> NodeData:
    z = torch.zeros(0)
    zl = torch.zeros(0, dtype=torch.long)
    return NodeData(z, zl, z, zl)


def node_data(spec: str, eval_spec: str = "", task: str = "classification") -> NodeData:
    """Local data from a node's ``data`` setting, for ``task``.

    ``""``: none. ``"builtin:i/n"``: household partition ``i`` of ``n`` of the built-in
    private part (IID, seeded) for training, and partition ``i`` of ``n`` of its test part
    for evaluation. A path: a ``.npz`` with ``images`` and ``labels``; evaluation uses
    ``eval_spec`` (another ``.npz``) or, if empty, a stratified 20 % held out of the file.
    ``"hf:<path>:<partitioner>:i/n[:key=value...]"``: partition ``i`` of ``n`` of a Hugging
    Face dataset on disk, cut by Flower Datasets' ``IidPartitioner`` or
    ``DirichletPartitioner`` (:mod:`disco_fl.data.flower_datasets`; the ``datasets`` extra),
    read as a ``.npz`` is (``eval_spec`` may be an ``hf:`` setting too).
    For segmentation and super-resolution the targets are derived from the images and their
    digit labels as the built-in ones are (:func:`disco_fl.data.task_data`), or given: a
    ``.npz`` with ``images`` and ``targets`` (:func:`_npz`).
    """
    spec = spec.strip()
    if task not in ("classification", *PIXEL_TASKS):
        raise ValueError(f"unknown task {task!r}; known tasks: classification, {PIXEL_TASKS}")
    if not spec:
        return _empty()
    if spec.startswith("builtin:"):
        i, n = parse_builtin(spec)
        images, labels = load_builtin()
        parts = builtin_split()
        out = []
        for part in ("private", "test"):
            idx = parts[part]
            hh = split_households(labels[idx], n, "iid", seed=BUILTIN_SEED)[i]
            sel = idx[hh]
            out.append(_tensors(images[sel], labels[sel], task))
        return NodeData(out[0][0], out[0][1], out[1][0], out[1][1])
    x, y, labels = _local(spec, task)
    if eval_spec.strip():
        return NodeData(x, y, *_local(eval_spec.strip(), task)[:2])
    n = len(y)
    n_eval = max(1, n // 5) if n > 1 else 0
    tr, te = stratified_split(labels, [n - n_eval, n_eval], seed=BUILTIN_SEED)
    return NodeData(x[tr], y[tr], x[te], y[te])


def _local(spec: str, task: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``(x, y, labels to stratify by)`` of an ``hf:`` setting or a ``.npz`` path."""
    if spec.startswith(HF_PREFIX):
        images, labels = load_hf_partition(spec)
        return (*_tensors(images, labels, task), labels)
    return _npz(Path(spec), task)


def _npz(path: Path, task: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``(x, y, labels to stratify by)`` of a node's ``.npz``: ``images`` + ``labels``
    (targets derived for a dense task), or for a dense task ``images`` + ``targets`` (your
    own: segmentation class maps ``(N, H, W)``; super-resolution uint8 images at the output
    size, scaled to [0, 1] as the inputs are; no stratification)."""
    if task != "classification" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                own = "targets" in z.files and "images" in z.files
                images, targets = (z["images"], z["targets"]) if own else (None, None)
        except (OSError, ValueError) as e:
            raise ValueError(f"could not read npz file {str(path)!r}: {e}") from e
        if images is not None and targets is not None:
            return (*_own_targets(images, targets, task, path), np.zeros(len(images), np.int64))
    images, labels = load_npz(path)
    return (*_tensors(images, labels, task), np.asarray(labels))


def _own_targets(
    images: np.ndarray, targets: np.ndarray, task: str, path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(targets) != len(images):
        raise ValueError(
            f"{path}: 'images' must be uint8 (N, H, W[, C]) with one target each, got "
            f"{images.dtype} {images.shape} and {len(targets)} targets"
        )
    if task == "segmentation":
        if targets.shape != images.shape[:3] or targets.dtype.kind not in "iu":
            raise ValueError(f"{path}: segmentation 'targets' must be integer (N, H, W) maps")
        if targets.size and targets.min() < 0:
            raise ValueError(f"{path}: segmentation 'targets' must be class indices >= 0")
        return to_tensor(images), torch.as_tensor(targets.astype(np.int64))
    if targets.dtype != np.uint8 or targets.ndim != images.ndim:
        raise ValueError(f"{path}: super-resolution 'targets' must be uint8 images like 'images'")
    return to_tensor(images, 0.0, 1.0), to_tensor(targets, 0.0, 1.0)


__all__ = [
    "BUILTIN_FRACTIONS",
    "BUILTIN_SEED",
    "NodeData",
    "builtin_split",
    "builtin_tensors",
    "node_data",
    "parse_builtin",
]
