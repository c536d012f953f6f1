"""Stochastic depth (drop path): torchvision's ``StochasticDepth`` / ``stochastic_depth`` and
timm's ``DropPath``, as one channel-local op ``drop_path``.

In evaluation (or with ``p == 0``) the op is the identity. In training it computes
``x * mask / (1 - p)`` (torchvision's formula; with ``p == 1`` every path is dropped and
nothing is divided; timm's ``scale_by_keep=False`` does not divide), where ``mask`` is one
Bernoulli(``1 - p``) draw per sample (``mode="row"``) or one for the whole batch
(``mode="batch"``). Every node holds a slice of the channels of the same samples, so every node
must drop the *same* samples: the mask comes from the node context's
:meth:`~disco_fl.partition.registry.NodeContext.shared_generator`, which every node (and the
emulation) derives identically from the run's seed, the step and the op's index in the program
(:func:`disco_fl.core.gates.gate_generator` with ``src = dst = -1``). The mask depends on
nothing of the node; no message is sent.

Capture: the fx capture keeps the modules as leaves (:mod:`.capture_layers`). The
``torch.export`` capture runs the model in eval mode, where the modules are identities and
leave no op; :func:`keep_drop_path` swaps their ``forward`` for a call of the custom op
``torch.ops.disco_fl.drop_path`` (an identity that the export keeps as one graph node) while
exporting, and :mod:`.aten_rules` captures it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from disco_fl.partition.program import Op, TensorInfo
from disco_fl.partition.registry import (
    InferContext,
    NodeContext,
    OpSpec,
    PartitionError,
    register_spec,
)

MODES = ("row", "batch")


def drop_path_attrs(m: nn.Module) -> dict[str, Any] | None:
    """``{"p", "mode", "scale"}`` of a stochastic-depth module (torchvision's
    ``StochasticDepth``, timm's ``DropPath``), recognised by class name and attributes (neither
    library is imported); ``None`` for any other module."""
    name = type(m).__name__
    a: dict[str, Any] = vars(m)
    if name == "StochasticDepth" and "p" in a and "mode" in a:
        return {"p": float(a["p"]), "mode": str(a["mode"]), "scale": True}
    if name == "DropPath" and "drop_prob" in a:
        scale = bool(a.get("scale_by_keep", True))
        return {"p": float(a["drop_prob"] or 0.0), "mode": "row", "scale": scale}
    return None


def drop_path_mask(
    x: torch.Tensor, p: float, mode: str, scale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """The multiplier of ``x`` in training: ``(B, 1, ...)`` (``row``) or ``(1, ...)``
    (``batch``), ``keep / (1 - p)`` (``keep`` only where ``p == 1`` or ``scale`` is off).
    The draw is ``torch.rand`` on the CPU from ``generator`` (the global RNG if ``None``), so it
    is the same on every node for the same generator."""
    draws = x.shape[0] if mode == "row" else 1
    survival = 1.0 - p
    keep = (torch.rand(draws, generator=generator) < survival).to(x.dtype)
    if survival > 0.0 and scale:
        keep = keep / survival
    shape = (draws,) + (1,) * (x.dim() - 1)
    return keep.view(shape).to(x.device)


@register_spec
class DropPathSpec(OpSpec):
    kind = "drop_path"

    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        if len(ins) != 1:
            raise PartitionError(f"{op.name}: expected one tensor input")
        x = ins[0]
        if x.kind == "gathered":
            raise PartitionError(f"{op.name}: cannot read an exchanged value")
        p, mode = float(op.attrs.get("p", 0.0)), op.attrs.get("mode", "row")
        if not 0.0 <= p <= 1.0:
            raise PartitionError(f"{op.name}: drop probability must be in [0, 1], got {p}")
        if mode not in MODES:
            raise PartitionError(f"{op.name}: mode must be 'row' or 'batch', got {mode!r}")
        if not ctx.out_shape:
            raise PartitionError(f"{op.name}: stochastic depth of a scalar")
        return TensorInfo(x.kind, ctx.out_shape, x.cdim, x.layout)

    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        x = xs[0]
        p = float(op.attrs.get("p", 0.0))
        if not node.training or p == 0.0:
            return x
        mode, scale = op.attrs.get("mode", "row"), bool(op.attrs.get("scale", True))
        return x * drop_path_mask(x, p, mode, scale, node.shared_generator(op))


# -- torch.export: keep the modules as one graph node -------------------------------------------


@torch.library.custom_op("disco_fl::drop_path", mutates_args=())
def _drop_path_op(x: torch.Tensor, p: float, mode: str, scale: bool) -> torch.Tensor:
    """Stochastic depth in eval mode (the identity), as one node of an exported graph; only
    :func:`keep_drop_path` calls it, while exporting."""
    return x.clone()


@_drop_path_op.register_fake
def _(x: torch.Tensor, p: float, mode: str, scale: bool) -> torch.Tensor:
    return torch.empty_like(x)


DROP_PATH_OP = torch.ops.disco_fl.drop_path


@contextlib.contextmanager
def keep_drop_path(model: nn.Module) -> Iterator[None]:
    """While exporting ``model``: every stochastic-depth module (:func:`drop_path_attrs`) calls
    :data:`DROP_PATH_OP` instead of its own ``forward`` (which in eval mode leaves no op). The
    modules are restored on exit, whatever happens."""
    swapped: list[tuple[nn.Module, bool, Any]] = []
    try:
        for m in model.modules():
            attrs = drop_path_attrs(m)
            if attrs is None:
                continue
            own = "forward" in m.__dict__
            swapped.append((m, own, m.__dict__.get("forward")))

            def forward(x: torch.Tensor, _a: dict[str, Any] = attrs) -> torch.Tensor:
                return DROP_PATH_OP(x, _a["p"], _a["mode"], _a["scale"])  # type: ignore[no-any-return]

            m.forward = forward  # type: ignore[method-assign]
        yield
    finally:
        for m, own, fwd in reversed(swapped):
            if own:
                m.forward = fwd  # type: ignore[method-assign]
            else:
                del m.forward
