"""Models used by the tests, including ones not written for the zoo."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disco_fl.models import ResNet, ResNetConfig, resnet_narrow


class UserNet(nn.Module):
    """A user's own model: depthwise-separable blocks, GroupNorm, SiLU/GELU, a channel concat,
    max/avg pooling, ``view(x.size(0), -1)``, LayerNorm on features and dropout; uneven channel
    counts (7, 13, 20, 11) so that splits are uneven."""

    def __init__(self, in_ch: int = 3, classes: int = 11) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 13, 3, stride=1, padding=1, bias=True)
        self.gn = nn.GroupNorm(1, 13)  # one group spanning every node: statistics exchanged
        self.dw = nn.Conv2d(13, 13, 3, padding=2, dilation=2, groups=13)
        self.pw = nn.Conv2d(13, 7, 1)
        self.bn = nn.BatchNorm2d(7)
        self.branch = nn.Conv2d(13, 7, (3, 5), stride=1, padding=(1, 2))
        self.gn2 = nn.GroupNorm(2, 14)
        self.pool = nn.MaxPool2d(2)
        self.proj = nn.Conv2d(14, 20, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(20 * 2 * 2, 24)
        self.ln = nn.LayerNorm(24)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gn(self.stem(x)))  # (B, 13, H, W)
        a = self.bn(self.pw(F.gelu(self.dw(h))))  # (B, 7, H, W)
        b = torch.relu(self.branch(h)) * 0.5  # (B, 7, H, W)
        h = torch.cat([a, b], dim=1)  # (B, 14, H, W): non-contiguous ownership
        h = self.pool(F.relu(self.gn2(h)))
        h = F.avg_pool2d(self.proj(h), 2)  # (B, 20, 2, 2)
        h = h.view(h.size(0), -1)
        h = self.drop(F.gelu(self.ln(self.fc1(h))))
        return self.fc2(h)


def bottleneck_resnet() -> nn.Module:
    cfg = ResNetConfig(
        block="bottleneck", layers=(1, 2), widths=(4, 8), stem="imagenet", in_channels=3
    )
    return ResNet(cfg)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so equivalence tests can fail."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


ZOO = {
    "resnet_narrow": (lambda: randomize_bn(resnet_narrow()), (3, 1, 28, 28)),
    "bottleneck": (lambda: randomize_bn(bottleneck_resnet()), (2, 3, 32, 32)),
    "user": (lambda: randomize_bn(UserNet()), (3, 3, 16, 16)),
}
