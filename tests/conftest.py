"""Shared test helpers."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import torch


def import_torchvision() -> ModuleType:
    """Import torchvision (a test dependency only) with this project's CPU torch.

    torchvision 0.28's compiled ops (``nms``, ``roi_align``, ...) do not load against the CPU
    build of torch 2.13 used here, and its import then fails in ``torch.library.register_fake``
    ("operator torchvision::nms does not exist"). The model definitions never call those ops,
    so during the import ``register_fake`` is replaced by a function returning an identity
    decorator (the fake kernels of the missing ops are simply not registered), then restored.
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    original = torch.library.register_fake

    def _skip(*args: Any, **kwargs: Any) -> Any:
        return lambda fn: fn

    torch.library.register_fake = _skip  # type: ignore[assignment]
    try:
        import torchvision
    finally:
        torch.library.register_fake = original  # type: ignore[assignment]
    return torchvision
