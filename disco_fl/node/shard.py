"""What one node holds: :class:`NodeShard`, the one per-node state type.

The emulation holds one per node (sliced from the original model), the trainer holds its own
(rebuilt from its tensors alone, :meth:`NodeShard.from_state_dict`), and an exported shard
(:class:`disco_fl.emulation.export.ExportedShard`) wraps one holding the plan's compact tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from disco_fl.core.gates import PairGates
from disco_fl.partition import PartitionError, Program, get_spec


class OpState(nn.Module):
    """Parameters and buffers of one op on one node."""

    def __init__(
        self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]
    ) -> None:
        super().__init__()
        for k, v in params.items():
            self.register_parameter(k, nn.Parameter(v))
        for k, v in buffers.items():
            self.register_buffer(k, v)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {k: v for k, v in self._parameters.items() if v is not None}
        out.update({k: v for k, v in self._buffers.items() if v is not None})
        return out


OpTensors = Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]]


class NodeShard(nn.Module):
    """Everything node ``k`` holds in the emulation.

    Built from the original model's ``modules`` (slicing each op's weights), or, with
    ``tensors`` (see :meth:`from_tensors`), from node ``k``'s own tensors only.
    """

    def __init__(
        self,
        program: Program,
        k: int,
        modules: Mapping[str, nn.Module] | None = None,
        *,
        tensors: OpTensors | None = None,
    ) -> None:
        super().__init__()
        if (modules is None) == (tensors is None):
            raise ValueError("NodeShard needs exactly one of modules and tensors")
        self.index = k
        self.ops = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        for op in program.ops:
            spec = get_spec(op.kind)
            if tensors is not None:
                params, buffers = tensors.get(op.name, ({}, {}))
            else:
                assert modules is not None
                module = modules.get(op.module) if op.module else None
                params, buffers = spec.init_state(op, module, program, k)
            if params or buffers:
                self.ops[op.name] = OpState(params, buffers)
            if op.kind == "exchange":
                layout = program.infos[op.name].layout
                if layout is None:
                    raise PartitionError(f"{op.name}: exchange without layout")
                dests = [d for d in range(program.num_nodes) if d != k]
                self.gates[op.name] = PairGates(layout.count(k), dests)

    @classmethod
    def from_tensors(
        cls,
        program: Program,
        k: int,
        tensors: OpTensors,
        gates: Mapping[str, torch.Tensor] | None = None,
    ) -> NodeShard:
        """Node ``k``'s shard from its own tensors alone (no model, no other node's weights).

        ``tensors`` is :meth:`own_tensors` of a shard of the same program (``op name ->
        (parameters, buffers)``); ``gates`` optionally a ``self.gates.state_dict()`` (gate
        logits and hard masks; default: gates open). A node process can thus load only its
        shard, e.g. for :class:`~disco_fl.runtime.training.NodeTrainer`.
        """
        shard = cls(program, k, tensors=tensors)
        if gates is not None:
            shard.gates.load_state_dict(gates)
        return shard

    @classmethod
    def from_state_dict(
        cls, program: Program, k: int, state: Mapping[str, torch.Tensor]
    ) -> NodeShard:
        """Node ``k``'s shard from a flat ``state_dict()`` of a shard of ``program`` (keys
        ``ops.<op>.<tensor>`` and ``gates.<exchange>.*``): no model, no other node's tensors.
        Which tensors are buffers the op says (:meth:`OpSpec.buffer_names`). Raises
        ``ValueError`` naming a key of no op of the program, or gates that do not fit."""
        ops = {op.name: op for op in program.ops}
        tensors: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        gates: dict[str, torch.Tensor] = {}
        for key, t in state.items():
            group, _, rest = key.partition(".")
            name, _, tname = rest.partition(".")
            if group == "gates":
                gates[rest] = t
                continue
            if group != "ops" or name not in ops or not tname or "." in tname:
                raise ValueError(f"shard {k}: {key!r} is no tensor of an op of the program")
            params, buffers = tensors.setdefault(name, ({}, {}))
            (buffers if tname in get_spec(ops[name].kind).buffer_names(ops[name]) else params)[
                tname
            ] = t
        shard = cls(program, k, tensors=tensors)
        try:
            shard.gates.load_state_dict(gates, strict=True)
        except RuntimeError as e:
            raise ValueError(f"shard {k}: gates do not fit the program: {e}") from e
        return shard

    def own_tensors(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """``op name -> (parameters, buffers)``, detached copies (see :meth:`from_tensors`)."""
        out: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        for name, st in self.ops.items():
            assert isinstance(st, OpState)
            params = {k: v.detach().clone() for k, v in st._parameters.items() if v is not None}
            bufs = {k: v.detach().clone() for k, v in st._buffers.items() if v is not None}
            out[name] = (params, bufs)
        return out

    def op_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Parameters and buffers of op ``name`` on this node (empty if it has none)."""
        if name not in self.ops:
            return {}
        state = self.ops[name]
        return state.tensors() if isinstance(state, OpState) else {}
