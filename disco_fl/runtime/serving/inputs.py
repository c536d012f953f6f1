"""Inputs for ``disco-fl infer``: image files and ``.npz`` archives -> one model-input tensor.

Images are converted to the plan's input format: grayscale (``L``) for one channel, ``RGB``
for three, resized to the plan's height and width, scaled to [0, 1] and normalized with the
plan's ``meta["input"]`` mean and std (MNIST's when the plan does not say). An ``.npz`` holds
``images`` (uint8 [N, H, W] or [N, H, W, C], normalized the same way) and optionally
``labels`` (then accuracy is reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disco_fl.data import IMAGE_EXTENSIONS, MNIST_MEAN, MNIST_STD, to_tensor


@dataclass
class Inputs:
    x: torch.Tensor  # (N, C, H, W), normalized
    names: list[str]  # one per row: file name, or "file.npz[i]"
    labels: np.ndarray | None  # int64 [N] when every source had labels


def normalization(meta: dict[str, Any], channels: int) -> tuple[list[float], list[float]]:
    """Mean and std per channel from a plan's ``meta`` (MNIST's by default)."""
    spec = meta.get("input", {}) if isinstance(meta, dict) else {}
    mean = spec.get("mean", [MNIST_MEAN])
    std = spec.get("std", [MNIST_STD])
    mean = [float(m) for m in (mean if isinstance(mean, list) else [mean])]
    std = [float(s) for s in (std if isinstance(std, list) else [std])]
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(f"plan meta has a bad input normalization for {channels} channels")
    return mean, std


def _image(path: Path, channels: int, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"image files need a 1- or 3-channel model, the plan has {channels}")
    try:
        with Image.open(path) as src:
            im = src.convert(mode)
        if (im.height, im.width) != hw:
            im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
        arr = np.array(im, dtype=np.uint8)  # a writable copy
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return arr if channels == 3 else arr[:, :, None]


def load_inputs(
    paths: Sequence[str | Path], input_shape: Sequence[int], meta: dict[str, Any]
) -> Inputs:
    """Read ``paths`` (image files and/or ``.npz`` archives) for a model input ``[C, H, W]``."""
    if len(input_shape) != 3:
        raise ValueError(f"image inputs need a [C, H, W] model input, the plan has {input_shape}")
    c, h, w = (int(v) for v in input_shape)
    mean, std = normalization(meta, c)
    parts: list[torch.Tensor] = []
    names: list[str] = []
    labels: list[np.ndarray] | None = []
    if not paths:
        raise ValueError("no inputs given")
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"input {p} does not exist")
        if p.suffix.lower() == ".npz":
            with np.load(p, allow_pickle=False) as npz:
                if "images" not in npz.files:
                    raise ValueError(f"{p} has no 'images' array (it has {sorted(npz.files)})")
                imgs = np.asarray(npz["images"])
                lab = np.asarray(npz["labels"]) if "labels" in npz.files else None
            if imgs.dtype != np.uint8 or imgs.ndim not in (3, 4):
                raise ValueError(f"{p}: 'images' must be uint8 [N, H, W] or [N, H, W, C]")
            x = to_tensor(imgs, mean, std)
            if list(x.shape[1:]) != [c, h, w]:
                raise ValueError(
                    f"{p}: images of shape {list(x.shape[1:])}, plan needs {[c, h, w]}"
                )
            parts.append(x)
            names += [f"{p.name}[{i}]" for i in range(x.shape[0])]
            if labels is not None and lab is not None and len(lab) == x.shape[0]:
                labels.append(lab.astype(np.int64))
            else:
                labels = None
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            parts.append(to_tensor(_image(p, c, (h, w))[None], mean, std))
            names.append(p.name)
            labels = None
        else:
            raise ValueError(f"{p}: expected an image file or a .npz archive")
    return Inputs(torch.cat(parts), names, np.concatenate(labels) if labels else None)
