"""torchvision 0.28's model zoo as the tests and ``bench/zoo_table.py`` use it.

Every classification and segmentation model of at most 60M parameters (counted from the
weights' metadata, so nothing is built to count), random weights, eval mode, a small input.
Exports are cached per process: ``torch.export`` of a large model takes seconds here.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from disco_fl.partition import PartitionError, Program, capture_export, export_model
from tests.conftest import import_torchvision

MAX_PARAMS = 60_000_000
SEGMENTATION = ("fcn_", "deeplabv3_", "lraspp_")
# inputs smaller than these fail in the models themselves (pooling / window sizes)
MIN_SIDE = {"inception_v3": 96, "maxvit_t": 224}
SIDE = 32
BATCH = 2
# heavy (left out by DISCO_FL_ZOO=smallest): all but the smallest model of each family, and the
# largest (seconds of export and of shard-only execution each on 2 cores)
HEAVY_PARAMS = 30_000_000
# what the capture still refuses, with the words its PartitionError must contain;
# tests/test_zoo.py fails when one of them starts to partition (none since issue 15's
# windowed attention: Swin, Swin V2 and MaxViT partition)
KNOWN_REFUSALS: dict[str, str] = {}


@functools.cache
def zoo_names() -> list[str]:
    """Names of the zoo's models (classification, then segmentation), sorted."""
    tv = import_torchvision()
    names = tv.models.list_models(module=tv.models)
    names += tv.models.list_models(module=tv.models.segmentation)
    return sorted(n for n in names if num_params(n) <= MAX_PARAMS)


def num_params(name: str) -> int:
    tv = import_torchvision()
    return int(tv.models.get_model_weights(name).DEFAULT.meta["num_params"])


def family(name: str) -> str:
    """``resnet`` for resnet18, ``regnet`` for regnet_y_400mf, ``deeplabv`` for deeplabv3_..."""
    match = re.match(r"[a-z]+", name)
    return match.group(0) if match else name


def is_heavy(name: str) -> bool:
    smallest = min((n for n in zoo_names() if family(n) == family(name)), key=num_params)
    return name != smallest or num_params(name) > HEAVY_PARAMS or name in MIN_SIDE


@dataclass
class Entry:
    model: nn.Module
    x: torch.Tensor
    reference: torch.Tensor
    exported: Any  # torch.export.ExportedProgram, or the PartitionError of the export
    export_s: float


def output_tensor(out: Any) -> torch.Tensor:
    """The model's output tensor (segmentation models return ``{"out": tensor}``)."""
    return out["out"] if isinstance(out, dict) else out


@functools.lru_cache(maxsize=2)  # the ~55 models of the zoo do not all fit in memory
def entry(name: str) -> Entry:
    tv = import_torchvision()
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"weights": None}
    if name.startswith(SEGMENTATION):
        kwargs["weights_backbone"] = None
    model = tv.models.get_model(name, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial statistics, so that equivalence can fail
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            mean, var = m.running_mean, m.running_var
            if mean is not None and var is not None:
                mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    side = MIN_SIDE.get(name, SIDE)
    x = torch.randn(BATCH, 3, side, side, generator=g)
    with torch.no_grad():
        ref = output_tensor(model(x))
    t = time.perf_counter()
    try:
        ep: Any = export_model(model, x)
    except PartitionError as e:
        ep = e
    return Entry(model, x, ref, ep, time.perf_counter() - t)


@functools.lru_cache(maxsize=4)
def program(name: str, nodes: int) -> tuple[Program, dict[str, nn.Module]]:
    """The captured program (raises the capture's :class:`PartitionError`)."""
    e = entry(name)
    if isinstance(e.exported, PartitionError):
        raise e.exported
    return capture_export(e.model, nodes, e.x, exported=e.exported)


def refusal(name: str, nodes: int) -> str | None:
    """Why the export capture refuses the model at ``nodes`` nodes, or ``None``."""
    try:
        program(name, nodes)
    except PartitionError as e:
        return str(e)
    return None
