"""The program builder shared by the fx capture (:mod:`.capture`) and the ``torch.export``
capture (:mod:`.capture_export`): it appends ops with unique names, lets each op's spec infer
ownership, and inserts one ``exchange`` before every mixing op that reads a sharded value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from disco_fl.partition.program import Op, Program, TensorInfo
from disco_fl.partition.registry import InferContext, PartitionError, get_spec, infer_info


class _ConstHolder(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value.detach().clone())


class ProgramBuilder:
    """Appends ops to a program under construction: unique names, ownership inferred by each
    op's spec, and one ``exchange`` inserted (once per tensor) before every mixing op that
    reads a sharded value. Shared by the fx and the ``torch.export`` front ends."""

    def __init__(self, num_nodes: int, capacities: Sequence[float] | None) -> None:
        self.num_nodes = num_nodes
        self.capacities = capacities
        self.ops: list[Op] = []
        self.infos: dict[str, TensorInfo] = {}
        self._exchanged: dict[str, str] = {}
        self._names: set[str] = set()

    def emit(
        self,
        name: str,
        kind: str,
        inputs: list[str],
        attrs: dict[str, Any] | None,
        module: str | None,
        out_shape: tuple[int, ...],
        where: Callable[[], str],
    ) -> str:
        """Append one op; ``where()`` names it in a :class:`PartitionError`."""
        base, i = name, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        op = Op(name, kind, inputs, attrs or {}, module)
        spec = get_spec(kind)
        if spec.mixing:
            op.inputs = [
                self._gathered(v, where) if self.infos[v].kind == "sharded" else v for v in inputs
            ]
        ctx = InferContext(self.num_nodes, out_shape, self.capacities)
        try:
            info = infer_info(spec, op, [self.infos[v] for v in op.inputs], ctx)
        except ValueError as e:  # PartitionError included
            raise PartitionError(f"{where()}: {e}") from None
        self.ops.append(op)
        self.infos[name] = info
        return name

    def _gathered(self, value: str, where: Callable[[], str]) -> str:
        if value not in self._exchanged:
            src = self.infos[value]
            self._exchanged[value] = self.emit(
                f"{value}_x", "exchange", [value], None, None, src.shape, where
            )
        return self._exchanged[value]

    def program(self) -> Program:
        return Program(self.num_nodes, self.ops, self.infos)
