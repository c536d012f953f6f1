"""Inputs for ``disco-fl infer``: image files and ``.npz`` archives -> one model-input tensor.

Images are converted to the plan's input format: grayscale (``L``) for one channel, ``RGB``
for three, resized to the plan's height and width. An ``.npz`` holds ``images`` (uint8
[N, H, W] or [N, H, W, C]) and optionally ``labels`` (then accuracy is reported).

What is sent (:attr:`Inputs.x`): for a plan whose ``meta["input"]`` has a mean and std, the
uint8 pixels themselves (1 byte per pixel; every node normalizes them,
:mod:`disco_fl.core.pixels`); for a plan without, the pixels scaled to [0, 1] and normalized
with MNIST's mean and std, as fp32, by the same function
(:func:`~disco_fl.core.pixels.pixels_to_input`), so both paths give bit-identical model inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disco_fl.core.pixels import PixelError, image_normalization, pixel_problem, pixels_to_input
from disco_fl.data import IMAGE_EXTENSIONS, MNIST_MEAN, MNIST_STD, to_pixels

# ``disco-fl infer``'s help for its inputs
INPUTS_HELP = (
    "image files and/or .npz (images: uint8 [N, H, W] or [N, H, W, C][, labels]); sent as "
    "uint8 pixels, 1 byte each, exact (4x fewer bytes than fp32), when the plan's meta['input'] "
    "has a mean and std (every node normalizes them), else normalized here (MNIST's mean and "
    "std) and sent as fp32"
)


@dataclass
class Inputs:
    x: torch.Tensor  # what is sent: (N, C, H, W) uint8 pixels, or normalized fp32 (see above)
    names: list[str]  # one per row: file name, or "file.npz[i]"
    labels: np.ndarray | None  # int64 [N] when every source had labels
    pixels: torch.Tensor | None = None  # (N, C, H, W) uint8: the images as read


def normalization(meta: dict[str, Any], channels: int) -> tuple[list[float], list[float]]:
    """Mean and std per channel from a plan's ``meta`` (MNIST's by default)."""
    try:
        return image_normalization(meta, channels, default=(MNIST_MEAN, MNIST_STD))
    except PixelError as e:
        raise ValueError(f"plan meta has a bad input normalization: {e}") from None


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
    parts: list[torch.Tensor] = []  # uint8 (n, C, H, W)
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
            x = to_pixels(imgs)
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
            parts.append(to_pixels(_image(p, c, (h, w))[None]))
            names.append(p.name)
            labels = None
        else:
            raise ValueError(f"{p}: expected an image file or a .npz archive")
    pixels = torch.cat(parts)
    # uint8 on the wire where the plan declares the normalization the nodes apply
    raw = pixel_problem(pixels, [0, c, h, w], meta) is None
    x = pixels if raw else pixels_to_input(pixels, mean, std)
    return Inputs(x, names, np.concatenate(labels) if labels else None, pixels)
