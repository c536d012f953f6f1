"""``espcn``: an ESPCN super-resolution network (Shi et al., CVPR 2016).

``conv5x5(C -> 64) tanh -> conv3x3(64 -> 32) tanh -> conv3x3(32 -> C * r^2) -> PixelShuffle(r)``
on the low-resolution input: the last layer predicts the ``r * r`` sub-pixel phases of every
output pixel, and the pixel shuffle places them. Partitioned, the pixel shuffle merges
phases held by different nodes, so it is captured as a ``gather_pixel_shuffle`` at the
requesting node (the output gathering); use ``capture="export"`` (or ``"auto"``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ESPCN", "espcn"]


class ESPCN(nn.Module):
    """ESPCN: ``(B, C, h, w)`` -> ``(B, C, h * r, w * r)``."""

    def __init__(
        self, scale: int = 2, in_channels: int = 1, widths: tuple[int, int] = (64, 32)
    ) -> None:
        super().__init__()
        w0, w1 = widths
        self.scale = scale
        self.conv1 = nn.Conv2d(in_channels, w0, 5, padding=2)
        self.conv2 = nn.Conv2d(w0, w1, 3, padding=1)
        self.conv3 = nn.Conv2d(w1, in_channels * scale * scale, 3, padding=1)
        self.act = nn.Tanh()
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.shuffle(self.conv3(x))


def espcn(scale: int = 2, in_channels: int = 1, widths: tuple[int, int] = (64, 32)) -> ESPCN:
    """The built-in x2 super-resolution model (14x14 -> 28x28 for the built-in data)."""
    return ESPCN(scale, in_channels, widths)
