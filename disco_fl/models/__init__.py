"""Models: torchvision-compatible ResNets and strict checkpoint handling."""

from disco_fl.models.checkpoint import (
    CheckpointError,
    load_checkpoint_strict,
    save_checkpoint_atomic,
)
from disco_fl.models.resnet import (
    MODELS,
    ResNet,
    ResNetConfig,
    build_model,
    resnet18,
    resnet50,
    resnet_narrow,
    resnet_small,
)

__all__ = [
    "MODELS",
    "CheckpointError",
    "ResNet",
    "ResNetConfig",
    "build_model",
    "load_checkpoint_strict",
    "resnet18",
    "resnet50",
    "resnet_narrow",
    "resnet_small",
    "save_checkpoint_atomic",
]
