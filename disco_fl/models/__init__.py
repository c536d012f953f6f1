"""Models: torchvision-compatible ResNets, a timm-compatible ViT, strict checkpoint handling."""

from disco_fl.models.checkpoint import (
    CheckpointChecksumError,
    CheckpointError,
    load_checkpoint_strict,
    save_checkpoint_atomic,
)
from disco_fl.models.registry import MODELS, build_model
from disco_fl.models.resnet import (
    ResNet,
    ResNetConfig,
    resnet18,
    resnet50,
    resnet_narrow,
    resnet_small,
)
from disco_fl.models.vit import ViT, ViTConfig, vit_tiny_mnist

__all__ = [
    "MODELS",
    "CheckpointChecksumError",
    "CheckpointError",
    "ResNet",
    "ResNetConfig",
    "ViT",
    "ViTConfig",
    "build_model",
    "load_checkpoint_strict",
    "resnet18",
    "resnet50",
    "resnet_narrow",
    "resnet_small",
    "save_checkpoint_atomic",
    "vit_tiny_mnist",
]
