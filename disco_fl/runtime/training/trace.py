"""The public per-op trace of a training step: what differential privacy reads of it.

:mod:`disco_fl.runtime.training.dp` computes per-sample gradients by re-running each op's
``compute`` per sample; it needs, per op, the inputs and received messages the step computed with
and the gradient that flowed into the op's output. The trainer hands it a :class:`StepTrace` (and
nothing of its private records).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from disco_fl.partition import Op
from disco_fl.partition.registry import NodeContext


@dataclass
class OpTrace:
    """One op of a step, as this node computed it."""

    op: Op
    # the op's inputs, batch first (a value computed from model tensors alone: whole)
    inputs: list[Any]
    # peer -> message as the op's ``compute`` read it (exchange: zero-padded to the slice)
    received: dict[int, torch.Tensor]
    # gradient of the step's loss with respect to the op's output (None: none reached it)
    grad_out: torch.Tensor | None = None


@dataclass
class StepTrace:
    """The ops of one step on one node, in program order (stops after the input layer when
    the batch is empty)."""

    step: int
    batch: int  # samples in the batch (0: a noise-only DP step)
    context: NodeContext  # this node in this step, for re-running ``compute``
    buffers: Mapping[str, Mapping[str, torch.Tensor]]  # op name -> the step's buffer copies
    ops: list[OpTrace]
