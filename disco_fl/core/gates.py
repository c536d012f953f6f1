"""Communication gates: hard-concrete (L0) relaxation.

Every exchanged tensor has, for each ordered node pair ``j -> k``, one gate per channel of node
``j``. The gate parameters live on the *sender* ``j``: it samples the gate, multiplies the
channel before sending, and receives the gradient of what it sent, so gate gradients never
need extra traffic.

Relaxation (Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0
Regularization", 2018): with ``u ~ U(0, 1)``,
``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, ``z = clamp(s (zeta - gamma) + gamma,
0, 1)``. Samples are *exactly* zero with positive probability, so a closed sample is not
sent and gets no gradient: training traffic shrinks as gates close.
``P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))`` is differentiable and gives the
expected communication used by the budget constraint.

At evaluation, gates are deterministic *hard masks* (0/1 per channel and pair), chosen by
:func:`disco_fl.emulation.budget.calibrate_masks` (highest ``log_alpha`` first, until the byte
budget is used). A closed mask means the channel is never sent and the receiver's weights that read
it are dropped from its exported shard.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
INIT_LOG_ALPHA = 4.0  # P(open) ~ 0.997 at the start: gates begin open
_LOG_RATIO = math.log(-GAMMA / ZETA)


def sample_hard_concrete(
    log_alpha: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype)
    u = u.clamp(1e-6, 1.0 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def gate_generator(seed: int, step: int, layer: int, src: int, dst: int) -> torch.Generator:
    """A generator for the hard-concrete noise of one gate vector in one training step.

    Seeded from ``(seed, step, layer, src, dst)`` (``layer`` = the exchange's op index in the
    program), so the emulation and the distributed training step draw the same samples
    whatever order they visit the gates in. ``src = dst = -1`` is the draw of a random op that
    every node shares (stochastic depth: :mod:`disco_fl.partition.ops_drop`).
    """
    key = hashlib.sha256(f"disco-gate/{seed}/{step}/{layer}/{src}/{dst}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


def check_node_dropout(rate: object) -> float:
    """``rate`` as a float if it is a node dropout rate, a number in ``[0, 1)``; else a
    ``ValueError`` that says so (1 would drop every node but the batch owner at every step)."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise ValueError(f"node_dropout must be a number in [0, 1), got {rate!r}")
    return float(rate)


def dropped_nodes(seed: int, step: int, num_nodes: int, rate: float, keep: int) -> frozenset[int]:
    """The nodes missing from training step ``step`` under node dropout at ``rate``.

    The one draw of node dropout, for the emulation's budget training
    (:func:`~disco_fl.emulation.budget.fit_budget`, ``seed`` = its ``config.seed``) and the
    distributed training step (:class:`~disco_fl.runtime.training.NodeTrainer`, ``seed`` = its
    ``gate_seed``): ``u = torch.rand(num_nodes)`` from :func:`gate_generator` ``(seed, step,
    -2, -2, -2)`` (a key no gate and no stochastic-depth draw uses), and node ``k`` is dropped
    when ``u[k] < rate``, each node independently, except ``keep`` (the batch owner: it holds
    the data and the loss), which is never dropped, so at least one node takes part. A
    function of its arguments only: every node of a household derives the same set without a
    message. ``rate`` 0 draws nothing and drops nobody.
    """
    if check_node_dropout(rate) == 0.0:
        return frozenset()
    u = torch.rand(num_nodes, generator=gate_generator(seed, step, -2, -2, -2))
    return frozenset(k for k in range(num_nodes) if k != keep and float(u[k]) < rate)


def prob_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(z != 0)``, differentiable in ``log_alpha``."""
    return torch.sigmoid(log_alpha - BETA * _LOG_RATIO)


class PairGates(nn.Module):
    """Gates of one exchanged tensor on its sender node: one vector per destination node.

    Attributes
    ----------
    log_alpha : nn.ParameterDict
        ``str(dest) -> (C_sender,)`` gate logits.
    masks : buffers ``mask_<dest>``
        ``(C_sender,)`` float 0/1 hard masks used at evaluation and export; all ones at start.
    """

    def __init__(self, num_channels: int, dests: list[int]) -> None:
        super().__init__()
        self.dests = list(dests)
        self.num_channels = num_channels
        self.log_alpha = nn.ParameterDict(
            {str(d): nn.Parameter(torch.full((num_channels,), INIT_LOG_ALPHA)) for d in dests}
        )
        for d in dests:
            self.register_buffer(f"mask_{d}", torch.ones(num_channels))

    def mask(self, dest: int) -> torch.Tensor:
        m = self._buffers.get(f"mask_{dest}")
        if m is None:
            raise KeyError(f"no gates towards node {dest}")
        return m

    def set_mask(self, dest: int, mask: torch.Tensor) -> None:
        if mask.shape != (self.num_channels,):
            raise ValueError(f"mask for dest {dest} must have shape ({self.num_channels},)")
        self.mask(dest).copy_(mask.to(self.mask(dest).dtype))
