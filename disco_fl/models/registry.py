"""The model registry: builders by name, used by the CLI and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from disco_fl.models.resnet import resnet18, resnet50, resnet_narrow, resnet_small
from disco_fl.models.segmentation import seg_narrow, seg_small, seg_small_rh
from disco_fl.models.super_resolution import espcn
from disco_fl.models.vit import vit_tiny_mnist

__all__ = ["MODELS", "MODEL_TASKS", "build_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet": resnet_small,
    "resnet_narrow": resnet_narrow,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vit_tiny_mnist": vit_tiny_mnist,
    "seg_small": seg_small,  # segmentation (task "segmentation"); partition with capture="auto"
    "seg_small_rh": seg_small_rh,  # seg_small, one 14x14 classifier: for head="requester"
    "seg_narrow": seg_narrow,  # seg_small_rh at half the width: for head="requester"
    "espcn": espcn,  # x2 super-resolution (task "super_resolution"); capture="auto"
}

#: The task each registered model is built for (classification unless listed).
MODEL_TASKS: dict[str, str] = {
    "seg_small": "segmentation",
    "seg_small_rh": "segmentation",
    "seg_narrow": "segmentation",
    "espcn": "super_resolution",
}


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model by name.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS` ("resnet", "resnet_narrow", "resnet18", "resnet50",
        "vit_tiny_mnist", "seg_small", "seg_small_rh", "seg_narrow", "espcn").
    **kwargs
        Passed to the builder (the classifiers and the segmentation nets ``seg_small``,
        ``seg_small_rh``, ``seg_narrow`` take ``num_classes`` and ``in_channels``; the
        ResNets also ``norm``, the ViT ``pool`` and ``dropout``; ``espcn`` takes ``scale``,
        ``in_channels`` and ``widths``).

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the known names.
    """
    try:
        builder = MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
    return builder(**kwargs)
