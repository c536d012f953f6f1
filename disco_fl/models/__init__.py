"""Models: torchvision-compatible ResNets, a timm-compatible ViT, small segmentation nets
(``seg_small``, ``seg_small_rh``, ``seg_narrow``), ESPCN super-resolution (``espcn``), strict
checkpoint handling."""

from disco_fl.models.checkpoint import (
    CheckpointChecksumError,
    CheckpointError,
    load_checkpoint_strict,
    save_checkpoint_atomic,
)
from disco_fl.models.registry import MODEL_TASKS, MODELS, build_model
from disco_fl.models.resnet import (
    ResNet,
    ResNetConfig,
    resnet18,
    resnet50,
    resnet_narrow,
    resnet_small,
)
from disco_fl.models.segmentation import SegSmall, SegSmallRH, seg_narrow, seg_small, seg_small_rh
from disco_fl.models.super_resolution import ESPCN, espcn
from disco_fl.models.vit import ViT, ViTConfig, vit_tiny_mnist

__all__ = [
    "ESPCN",
    "MODELS",
    "MODEL_TASKS",
    "CheckpointChecksumError",
    "CheckpointError",
    "ResNet",
    "ResNetConfig",
    "SegSmall",
    "SegSmallRH",
    "ViT",
    "ViTConfig",
    "build_model",
    "espcn",
    "load_checkpoint_strict",
    "resnet18",
    "resnet50",
    "resnet_narrow",
    "resnet_small",
    "save_checkpoint_atomic",
    "seg_narrow",
    "seg_small",
    "seg_small_rh",
    "vit_tiny_mnist",
]
