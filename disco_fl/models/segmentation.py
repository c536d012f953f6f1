"""``seg_small``: a small LR-ASPP-style semantic segmentation network for 28x28 inputs.

Layout (Howard et al., "Searching for MobileNetV3", 2019, the LR-ASPP head, scaled down)::

    stem   conv3x3(in -> w0) BN ReLU              28x28
           conv3x3(w0 -> w0) BN ReLU              28x28
    low    conv3x3(w0 -> w1, s2) BN ReLU          14x14
           conv3x3(w1 -> w1) BN ReLU              14x14   <- low-level features
    high   conv3x3(w1 -> w2, s2) BN ReLU           7x7
           conv3x3(w2 -> w2, dilation 2) BN ReLU   7x7
    head   relu(bn(conv1x1(high))) * sigmoid(conv1x1(avgpool(high)))   (LR-ASPP)
    out    upsample(cls_high(head), 14x14) + cls_low(low), upsample to the input size

The class maps are computed at low resolution and upsampled (bilinear) at the end:
a 1x1 convolution commutes with bilinear resizing, so this equals classifying the
upsampled features, with less work. ``F.interpolate`` is captured by ``torch.export``:
partition with ``disco_fl.partition(model, n, x, capture="auto")`` (or ``"export"``).

``seg_small_rh`` (:class:`SegSmallRH`, "requester head") is the same network with the two
class maps folded into one: the LR-ASPP features are projected (1x1) to the low-level width,
upsampled and added to the low-level features, and one 1x1 classifier reads the sum at 14x14::

    out    upsample(cls(low + upsample(proj(head), 14x14)), input size)

``cls(low + up(proj(f))) = cls(low) + up((cls . proj)(f))``: the LR-ASPP output with
``cls_high`` factored through the low-level width (48 >= 11 classes, so no map is lost). The
output is now computed by one mixing layer followed by a channel-local op only, so
``disco_fl.partition(model, n, x, capture="auto", head="requester")`` gives the requester the
whole classifier: the other nodes send it their (gated) channels of its 14x14 input instead
of their slices of the 28x28 class maps, and the requester upsamples. Nothing of the output
travels, and the budget's gates govern what does.

``seg_narrow`` is ``seg_small_rh`` at half the width (widths 16/24/32, LR-ASPP head 32;
31 k parameters), for the communication benchmark: on the built-in digits a half-width
``seg_small`` is nearly as good as the whole one, so two halves that never talk are too, and
exchanges are worth little. At this width half the network (what the requester holds alone at
N = 2) is clearly not enough, so the exchanges matter. Partition it with
``head="requester"`` like ``seg_small_rh`` (with the class maps split instead, their 15.7 kB
per sample at N = 2 would leave at most 9.3x fewer bytes than dense tensor parallelism).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegSmall", "SegSmallRH", "seg_narrow", "seg_small", "seg_small_rh"]


def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _trunk(
    m: nn.Module, in_channels: int, widths: tuple[int, int, int], head_channels: int
) -> None:
    """The layers both segmentation nets share: stem, the 14x14 (``low``) and 7x7 (``high``)
    stages and the LR-ASPP head (a 1x1 conv gated by a pooled sigmoid branch)."""
    w0, w1, w2 = widths
    m.stem = nn.Sequential(_cbr(in_channels, w0), _cbr(w0, w0))
    m.low = nn.Sequential(_cbr(w0, w1, stride=2), _cbr(w1, w1))
    m.high = nn.Sequential(_cbr(w1, w2, stride=2), _cbr(w2, w2, dilation=2))
    m.head_conv = nn.Conv2d(w2, head_channels, 1, bias=False)
    m.head_bn = nn.BatchNorm2d(head_channels)
    m.head_pool = nn.AdaptiveAvgPool2d(1)
    m.head_gate = nn.Conv2d(w2, head_channels, 1)


def _features(m: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, feat)``: the 14x14 features and the head's gated 7x7 features of :func:`_trunk`."""
    low = m.low(m.stem(x))
    high = m.high(low)
    feat = F.relu(m.head_bn(m.head_conv(high)))
    return low, feat * torch.sigmoid(m.head_gate(m.head_pool(high)))


class SegSmall(nn.Module):
    """LR-ASPP-style segmentation net; output ``(B, num_classes, H, W)`` logits."""

    def __init__(
        self,
        num_classes: int = 11,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (32, 48, 64),
        head_channels: int = 64,
    ) -> None:
        super().__init__()
        _trunk(self, in_channels, widths, head_channels)
        self.cls_high = nn.Conv2d(head_channels, num_classes, 1)
        self.cls_low = nn.Conv2d(widths[1], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        low, feat = _features(self, x)
        out = F.interpolate(
            self.cls_high(feat), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        out = out + self.cls_low(low)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def seg_small(
    num_classes: int = 11,
    in_channels: int = 1,
    widths: tuple[int, int, int] = (32, 48, 64),
    head_channels: int = 64,
) -> SegSmall:
    """The built-in segmentation model (11 classes: background + 10 digits, see
    :func:`disco_fl.data.segmentation_data`)."""
    return SegSmall(num_classes, in_channels, widths, head_channels)


class SegSmallRH(nn.Module):
    """:class:`SegSmall` with one classifier at 14x14 (see the module docstring): partition
    it with ``head="requester"`` so that the class maps never travel."""

    def __init__(
        self,
        num_classes: int = 11,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (32, 48, 64),
        head_channels: int = 64,
    ) -> None:
        super().__init__()
        _trunk(self, in_channels, widths, head_channels)
        self.proj = nn.Conv2d(head_channels, widths[1], 1)
        self.cls = nn.Conv2d(widths[1], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        low, feat = _features(self, x)
        up = F.interpolate(
            self.proj(feat), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        return F.interpolate(self.cls(low + up), size=size, mode="bilinear", align_corners=False)


def seg_small_rh(
    num_classes: int = 11,
    in_channels: int = 1,
    widths: tuple[int, int, int] = (32, 48, 64),
    head_channels: int = 64,
) -> SegSmallRH:
    """``seg_small`` with one 14x14 classifier, for ``partition(..., head="requester")``."""
    return SegSmallRH(num_classes, in_channels, widths, head_channels)


def seg_narrow(
    num_classes: int = 11,
    in_channels: int = 1,
    widths: tuple[int, int, int] = (16, 24, 32),
    head_channels: int = 32,
) -> SegSmallRH:
    """``seg_small_rh`` at half the width (see the module docstring), for
    ``partition(..., head="requester")``: the segmentation model of the benchmark where one
    node's half of the network is clearly not enough."""
    return SegSmallRH(num_classes, in_channels, widths, head_channels)
