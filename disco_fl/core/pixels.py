"""Image pixels as the model input: the one conversion every node makes.

An image model's input is ``(x / 255 - mean) / std`` per channel of uint8 pixels ``x``
(``[N, C, H, W]``), with the plan's ``meta["input"]`` mean and std. A request may carry the
pixels themselves instead of that float tensor: they cross the network exactly, at 1 byte per
element whatever the plan's activation codec (4x fewer than fp32), and every node, the
requester included, computes the model input from them with :func:`pixels_to_input`, the
same fp32 arithmetic as the data loaders (:func:`disco_fl.data.to_tensor`) and ``disco-fl
infer``'s float path, so both paths give bit-identical model inputs.

A plan *declares image normalization* when its ``meta["input"]`` holds a ``mean`` and a
``std`` (one value, or one per channel). Pixels for a plan that declares none, pixels of the
wrong shape, or pixels anywhere but the model input are refused (:class:`PixelError`, and the
wire's own checks in :mod:`disco_fl.core.wire`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

PIXEL_DTYPE = torch.uint8


class PixelError(ValueError):
    """uint8 pixels that cannot be the model input of this plan (no image normalization, wrong
    shape or type)."""


def per_channel(value: Any, channels: int, name: str) -> list[float]:
    """``value`` (one number, or one per channel) as ``channels`` floats (a ``std`` must be
    positive); raises :class:`PixelError`."""
    try:
        values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    except (TypeError, ValueError):
        raise PixelError(f"{name} {value!r} is not a number or a list of numbers") from None
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise PixelError(f"{name} has {len(values)} entries but images have {channels} channels")
    if name == "std" and any(v <= 0 for v in values):
        raise PixelError(f"std must be positive, got {values}")
    return values


def image_normalization(
    meta: Mapping[str, Any] | None,
    channels: int,
    default: tuple[float, float] | None = None,
) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` of a plan's ``meta["input"]``.

    ``default`` (one mean and one std for every channel) stands for what the plan does not
    say; without it (the nodes' case) a plan that declares no mean and std raises
    :class:`PixelError`.
    """
    spec = meta.get("input") if isinstance(meta, Mapping) else None
    spec = spec if isinstance(spec, Mapping) else {}
    mean, std = spec.get("mean"), spec.get("std")
    if mean is None or std is None:
        if default is None:
            raise PixelError(
                "the plan declares no image normalization (meta['input'] mean and std): "
                "send the normalized float input instead of uint8 pixels"
            )
        mean = default[0] if mean is None else mean
        std = default[1] if std is None else std
    return per_channel(mean, channels, "mean"), per_channel(std, channels, "std")


def pixels_to_input(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x.float() / 255 - mean) / std`` per channel of uint8 pixels ``x`` ``(N, C, H, W)``:
    the model input, float32, contiguous."""
    if x.dtype != PIXEL_DTYPE or x.dim() != 4:
        raise PixelError(f"pixels must be uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
    c = int(x.shape[1])
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, c, 1, 1)
    return ((x.to(torch.float32) / 255.0 - m) / s).contiguous()


def pixel_problem(
    x: torch.Tensor, input_shape: Sequence[int], meta: Mapping[str, Any]
) -> str | None:
    """Why uint8 pixels ``x`` cannot be the model input of a plan whose input is
    ``input_shape`` (batch first) and ``meta``, or ``None``."""
    if x.dtype != PIXEL_DTYPE:
        return f"pixels of type {x.dtype}, expected uint8"
    if (why := plan_pixel_problem(input_shape, meta)) is not None:
        return why
    want = [int(s) for s in input_shape[1:]]
    if x.dim() != 4 or list(x.shape[1:]) != want:
        dims = ", ".join(map(str, want))
        return f"uint8 input of shape {list(x.shape)}; the plan expects [batch, {dims}]"
    return None


def plan_pixel_problem(input_shape: Sequence[int], meta: Mapping[str, Any]) -> str | None:
    """Why a plan whose input is ``input_shape`` (batch first) and ``meta`` cannot take uint8
    pixels at all (not an image input, or no image normalization declared), or ``None``."""
    want = [int(s) for s in input_shape[1:]]
    if len(want) != 3:
        shape = list(input_shape)
        return f"uint8 pixels need an image input [N, C, H, W]; the plan's input is {shape}"
    try:
        image_normalization(meta, want[0])
    except PixelError as e:
        return str(e)
    return None


def model_input(
    x: torch.Tensor, input_shape: Sequence[int], meta: Mapping[str, Any]
) -> torch.Tensor:
    """The model input of uint8 pixels ``x`` for a plan (``input_shape`` batch first, its
    ``meta``): checked (:func:`pixel_problem`, raises :class:`PixelError`), then
    :func:`pixels_to_input` with the plan's normalization."""
    why = pixel_problem(x, input_shape, meta)
    if why is not None:
        raise PixelError(why)
    mean, std = image_normalization(meta, int(x.shape[1]))
    return pixels_to_input(x, mean, std)
