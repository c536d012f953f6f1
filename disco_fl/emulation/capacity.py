"""Devices that differ: capacities for uneven slices, and a node's memory need.

- :func:`parse_capacities`: ``"1,3"`` (``disco-fl train --capacities``, ``disco-fl demo
  --capacities``) as relative capacities, one per node.
- :func:`shared_capacities`: the one partition several households train together. Shard
  ``k`` is averaged across households, so every household must slice the model the same way;
  each household's capacities are normalized to sum to 1 and the shares are averaged per
  shard (a household of equal devices pulls towards equal slices).
- :func:`training_memory`: a simple, documented estimate of the memory node ``k`` needs to
  train its shard (the roster refuses a node reporting less, before any training):

  ``4 x parameter bytes`` (fp32 weights, their gradients and Adam's two moments; the
  gate logits included) ``+ buffers`` (BatchNorm statistics, hard masks) ``+ 2 x activation
  bytes of one batch`` (every value the node holds in the forward pass, kept for the backward
  pass, and its gradient) ``+ parameter bytes x batch`` under differential privacy
  (per-sample gradients). Activations count node ``k``'s slice of every sharded value, whole
  replicated values, and for the input of a mixing layer every channel (its own and all
  received: an upper bound, gates open), at fp32 and the per-sample shapes measured on the
  example input. It is an estimate of the tensors, not of the allocator, the interpreter
  (~0.3-0.5 GB for Python + torch) or Flower; a node should report the memory it can give to
  the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from disco_fl.emulation.model import PartitionedModel
from disco_fl.partition import Program

FP32 = 4


def parse_capacities(text: str | None, num_nodes: int) -> tuple[float, ...] | None:
    """``"1,3"`` -> ``(1.0, 3.0)``; ``None`` or ``""`` -> ``None`` (equal slices).
    ``ValueError`` unless there are ``num_nodes`` positive, finite numbers."""
    if text is None or not str(text).strip():
        return None
    try:
        caps = tuple(float(c) for c in str(text).split(","))
    except ValueError as e:
        raise ValueError(f"capacities {text!r}: expected numbers separated by commas") from e
    check_capacities(caps, num_nodes)
    return caps


def check_capacities(caps: Sequence[float], num_nodes: int) -> None:
    if len(caps) != num_nodes or not all(math.isfinite(c) and c > 0 for c in caps):
        raise ValueError(
            f"capacities must be {num_nodes} positive numbers (one per node), got {list(caps)}"
        )


def shared_capacities(per_household: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """One capacity per shard for households that train the same partition: each household's
    capacities normalized to sum 1, averaged per shard (see the module)."""
    if not per_household:
        raise ValueError("no household capacities")
    n = len(per_household[0])
    for caps in per_household:
        check_capacities(caps, n)
    shares = [[c / sum(caps) for c in caps] for caps in per_household]
    return tuple(sum(s[k] for s in shares) / len(shares) for k in range(n))


@dataclass(frozen=True)
class MemoryNeed:
    """Estimated bytes node ``k`` needs to train its shard (:func:`training_memory`)."""

    param_bytes: int
    buffer_bytes: int
    activation_bytes: int  # one batch, forward values (x2 in the total: their gradients)
    dp_bytes: int  # per-sample gradients (differential privacy), else 0

    @property
    def total(self) -> int:
        return 4 * self.param_bytes + self.buffer_bytes + 2 * self.activation_bytes + self.dp_bytes

    def explain(self) -> str:
        dp = f" + {self.dp_bytes:,} per-sample gradients (DP)" if self.dp_bytes else ""
        return (
            f"4 x {self.param_bytes:,} parameter bytes (weights, gradients, Adam moments) + "
            f"{self.buffer_bytes:,} buffer bytes + 2 x {self.activation_bytes:,} activation "
            f"bytes of one batch{dp}"
        )


def activation_bytes_per_sample(pm: PartitionedModel, k: int) -> int:
    """fp32 bytes of the values node ``k`` holds in one sample's forward pass."""
    total = 0
    for info in pm.program.infos.values():
        per_sample = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
        if info.kind == "sharded" and info.layout is not None and info.cdim is not None:
            total += info.layout.count(k) * info.elements_per_channel
        else:  # replicated, or the gathered input of a mixing layer (all channels: upper bound)
            total += per_sample
    return total * FP32


def training_memory(
    pm: PartitionedModel, k: int, batch_size: int, *, dp: bool = False
) -> MemoryNeed:
    """The estimate of the module docstring for node ``k`` of ``pm`` at ``batch_size``."""
    shard = pm.shard(k)
    params = sum(p.numel() * p.element_size() for p in shard.parameters())
    buffers = sum(b.numel() * b.element_size() for b in shard.buffers())
    acts = activation_bytes_per_sample(pm, k) * batch_size
    return MemoryNeed(params, buffers, acts, params * batch_size if dp else 0)


def channel_shares(program: Program) -> list[float]:
    """Each node's share of all sharded channels of ``program`` (sums to 1): how uneven the
    partition came out."""
    counts = [0] * program.num_nodes
    for info in program.infos.values():
        if info.kind == "sharded" and info.layout is not None:
            for k in range(program.num_nodes):
                counts[k] += info.layout.count(k)
    total = sum(counts) or 1
    return [c / total for c in counts]


__all__ = [
    "MemoryNeed",
    "activation_bytes_per_sample",
    "channel_shares",
    "check_capacities",
    "parse_capacities",
    "shared_capacities",
    "training_memory",
]
