"""byo_app: the model, its loss and its metric."""

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """A small residual CNN for 1 x 28 x 28 images."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.bn1(self.conv(x)))
        x = torch.relu(self.down(x))
        return self.fc(x.mean((2, 3)))


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with label smoothing."""
    return F.cross_entropy(outputs, targets, label_smoothing=0.1)


def metric_fn(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy and the mean confidence of the predictions."""
    probs = outputs.softmax(1)
    return {
        "top1": float((probs.argmax(1) == targets).float().mean()),
        "confidence": float(probs.max(1).values.mean()),
    }
