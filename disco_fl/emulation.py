"""The emulated partitioned model: N nodes in one process, as one trainable ``nn.Module``.

``pm.shards[k]`` holds everything node ``k`` owns: its slice of every layer's parameters
(``shards[k].ops[op_name]``) and the gates of the channels it sends
(``shards[k].gates[exchange_name]``, one vector per destination). The forward pass runs all
nodes in lock step (:func:`disco_fl.node.run_lockstep`).

Gate modes (``pm.gate_mode``):

- ``"hard"`` (default): every message is multiplied by the 0/1 hard mask. With all masks open
  (the start) the model equals the original.
- ``"stochastic"``: hard-concrete samples (training the gates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from disco_fl.gates import PairGates, gate_generator, prob_open, sample_hard_concrete
from disco_fl.layout import Layout
from disco_fl.node import run_lockstep
from disco_fl.partition import Op, PartitionError, Program, capture_export, get_spec
from disco_fl.partition import capture as fx_capture
from disco_fl.partition.ops_comm import gathered_columns

GateMode = Literal["hard", "stochastic"]
Execution = Literal["auto", "fused", "lockstep"]
CaptureMode = Literal["fx", "export", "auto"]


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
        shard, e.g. for :class:`~disco_fl.training.NodeTrainer`.
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


class _EmuNode:
    """:class:`~disco_fl.partition.registry.NodeContext` of one emulated node."""

    def __init__(self, pm: PartitionedModel, k: int) -> None:
        self.pm = pm
        self.index = k
        self.num_nodes = pm.program.num_nodes
        self.program = pm.program
        self.shard: NodeShard = pm.shards[k]  # type: ignore[assignment]
        self.training = pm.training
        self._peers = [j for j in range(self.num_nodes) if j != k]

    def state(self, op: Op) -> Mapping[str, torch.Tensor]:
        return self.shard.op_tensors(op.name)

    def send_selection(self, op: Op, dest: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gates: PairGates = self.shard.gates[op.name]  # type: ignore[assignment]
        if self.pm.gate_mode == "stochastic":
            return None, self.pm.gate_sample(op.name, self.index, dest)
        mask = gates.mask(dest)
        return None, mask

    def sources(self, op: Op) -> list[int]:
        return self._peers


class _GlobalNode:
    """Context of the fused emulation: whole tensors, assembled parameters."""

    index = -1

    def __init__(self, pm: PartitionedModel) -> None:
        self.program = pm.program
        self.num_nodes = pm.program.num_nodes
        self.training = pm.training
        self.current: Mapping[str, torch.Tensor] = {}

    def state(self, op: Op) -> Mapping[str, torch.Tensor]:
        return self.current

    def send_selection(self, op: Op, dest: int) -> None:
        return None

    def sources(self, op: Op) -> list[int]:
        return []


def _assemble(pieces: list[torch.Tensor], layout: Layout | None) -> torch.Tensor:
    """Concatenate per-node slices (dim 0) and put them in global channel order."""
    full = torch.cat(pieces, 0)
    if layout is None or layout.is_contiguous():
        return full
    order = torch.cat([layout.index_tensor(k) for k in range(layout.num_nodes)])
    return full.index_select(0, torch.argsort(order))


class PartitionedModel(nn.Module):
    """A model split across ``num_nodes`` nodes, emulated in one process.

    Build it with :func:`partition`. Call it like the original model.

    Attributes
    ----------
    program : Program
        The ops every node runs.
    shards : nn.ModuleList
        ``shards[k]`` is node ``k``'s :class:`NodeShard`.
    gate_mode : {"hard", "stochastic"}
        Default ``"hard"``.
    codec : str
        Wire codec whose rounding the forward pass reproduces; default ``"fp32"`` (exact).
    execution : {"auto", "fused", "lockstep"}
        ``lockstep`` runs every node's own math (:mod:`disco_fl.node`) with in-process messages.
        ``fused`` computes the same function faster: a closed gate of channel ``c`` for node
        ``k`` is a zeroed column ``c`` of ``k``'s weights, so each mixing layer becomes one
        convolution over the whole tensor with gated weights. ``auto`` (default) is fused for
        the fp32 codec, lock-step otherwise (other codecs round only the received channels).
    gate_seed : int or None
        Default ``None`` (stochastic gates draw from the global RNG). Set, with ``gate_step``
        (default 0), the noise is reproducible per ``(step, exchange, src, dst)``: the
        distributed training step (:mod:`disco_fl.training`) draws the same samples.
    """

    def __init__(self, program: Program, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.program = program
        self.shards = nn.ModuleList(
            [NodeShard(program, k, modules) for k in range(program.num_nodes)]
        )
        self.gate_mode: GateMode = "hard"
        self.codec = "fp32"
        self.execution: Execution = "auto"
        # seeded gate noise (see :meth:`gate_sample`); None: the global RNG (the default)
        self.gate_seed: int | None = None
        self.gate_step = 0
        self._layer_of = {op.name: i for i, op in enumerate(program.ops)}
        self._perm_cache: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def num_nodes(self) -> int:
        return self.program.num_nodes

    def shard(self, k: int) -> NodeShard:
        s = self.shards[k]
        if not isinstance(s, NodeShard):
            raise TypeError("shards must hold NodeShard modules")
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.execution == "fused" or (self.execution == "auto" and self.codec == "fp32"):
            return self._fused_forward(x)
        nodes = [_EmuNode(self, k) for k in range(self.num_nodes)]
        return run_lockstep(self.program, nodes, x, self.codec)

    # -- fused emulation ----------------------------------------------------------------
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = _GlobalNode(self)
        env: dict[str, Any] = {}
        columns: dict[str, list[torch.Tensor]] = {}
        for op in self.program.ops:
            spec = get_spec(op.kind)
            if op.kind == "exchange":
                columns[op.name] = self._column_gates(op.name)
            xs = [x] if op.kind == "input" else [env[i] for i in op.inputs]
            ctx.current = self._global_state(op, columns)
            env[op.name] = spec.compute_global(op, ctx, xs)
            if op.kind == "batch_norm" and self.training and "running_mean" in ctx.current:
                self._write_back(op, ctx.current, ("running_mean", "running_var"))
        out = env[self.program.ops[-1].name]
        assert isinstance(out, torch.Tensor)
        return out

    def _column_gates(self, exchange: str) -> list[torch.Tensor]:
        """For each reader ``k``: ``(C,)`` multiplier of every global channel of the tensor."""
        layout = self.program.infos[exchange].layout
        assert layout is not None
        out = []
        for k in range(self.num_nodes):
            pieces = []
            for j in range(self.num_nodes):
                if j == k:
                    pieces.append(torch.ones(layout.count(j)))
                    continue
                g: PairGates = self.shards[j].gates[exchange]  # type: ignore[index, assignment]
                if self.gate_mode == "stochastic":
                    pieces.append(self.gate_sample(exchange, j, k))
                else:
                    pieces.append(g.mask(k))
            out.append(_assemble(pieces, layout))
        return out

    def _unpermute(self, exchange: str, k: int) -> torch.Tensor:
        key = (exchange, k)
        if key not in self._perm_cache:
            layout = self.program.infos[exchange].layout
            assert layout is not None
            cols = torch.tensor(gathered_columns(layout, k), dtype=torch.long)
            self._perm_cache[key] = torch.argsort(cols)
        return self._perm_cache[key]

    def _global_state(
        self, op: Op, columns: Mapping[str, list[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        states = [self.shard(k).op_tensors(op.name) for k in range(self.num_nodes)]
        if not states[0]:
            return {}
        layout = self.program.infos[op.name].layout
        x = self.program.infos[op.inputs[0]] if op.inputs else None
        out: dict[str, torch.Tensor] = {}
        for name in states[0]:
            if (
                name == "weight"
                and get_spec(op.kind).mixing
                and x is not None
                and x.kind == "gathered"
            ):
                exch = op.inputs[0]
                pieces = []
                for k, st in enumerate(states):
                    w = st["weight"].index_select(
                        1, self._unpermute(exch, k)
                    )  # global column order
                    shape = [1, -1] + [1] * (w.dim() - 2)
                    pieces.append(w * columns[exch][k].view(shape))
                out[name] = _assemble(pieces, layout)  # rows in global order
            elif layout is None:
                out[name] = states[0][name]
            else:
                out[name] = _assemble([st[name] for st in states], layout)
        return out

    def _write_back(
        self, op: Op, state: Mapping[str, torch.Tensor], names: tuple[str, ...]
    ) -> None:
        layout = self.program.infos[op.name].layout
        with torch.no_grad():
            for k in range(self.num_nodes):
                own = self.shard(k).op_tensors(op.name)
                for n in names:
                    src = (
                        state[n]
                        if layout is None
                        else state[n].index_select(0, layout.index_tensor(k))
                    )
                    own[n].copy_(src)

    # -- gates --------------------------------------------------------------------------
    def gate_sample(self, exchange: str, src: int, dst: int) -> torch.Tensor:
        """Hard-concrete sample of the gates ``src -> dst`` of ``exchange`` (stochastic mode).

        With ``gate_seed`` set, the noise comes from
        :func:`~disco_fl.gates.gate_generator` ``(gate_seed, gate_step, layer, src, dst)``,
        exactly as the distributed training step draws it; otherwise (default) from the global
        RNG.
        """
        g: PairGates = self.shards[src].gates[exchange]  # type: ignore[index, assignment]
        gen = None
        if self.gate_seed is not None:
            gen = gate_generator(self.gate_seed, self.gate_step, self._layer_of[exchange], src, dst)
        return sample_hard_concrete(g.log_alpha[str(dst)], gen)

    def gate_items(self) -> list[tuple[str, int, int, PairGates]]:
        """``(exchange, sender, dest, gates)`` for every exchanged tensor and ordered pair."""
        out = []
        for op in self.program.exchanges:
            for j, shard in enumerate(self.shards):
                g: PairGates = shard.gates[op.name]  # type: ignore[index, assignment]
                for d in g.dests:
                    out.append((op.name, j, d, g))
        return out

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for s in self.shards for p in s.gates.parameters()]  # type: ignore[union-attr]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for s in self.shards for p in s.ops.parameters()]  # type: ignore[union-attr]

    def open_channels(self, exchange: str, src: int, dst: int) -> list[int]:
        """Global channel indices of ``src`` that the hard mask sends to ``dst``, ascending."""
        layout = self.program.infos[exchange].layout
        assert layout is not None
        g: PairGates = self.shards[src].gates[exchange]  # type: ignore[index, assignment]
        mask = g.mask(dst)
        idx = layout.indices(src)
        return [idx[i] for i in torch.nonzero(mask > 0.5).flatten().tolist()]

    def set_all_masks(self, value: float) -> None:
        for _, _, d, g in self.gate_items():
            g.set_mask(d, torch.full((g.num_channels,), float(value)))

    def expected_exchange_fraction(self) -> torch.Tensor:
        """Differentiable expected fraction of dense exchange elements (stochastic gates)."""
        num = torch.zeros(())
        den = 0.0
        for name, _, d, g in self.gate_items():
            per = self.program.infos[name].elements_per_channel
            num = num + prob_open(g.log_alpha[str(d)]).sum() * per
            den += g.num_channels * per
        return num / den if den else num

    def hard_exchange_fraction(self) -> float:
        num = den = 0.0
        for name, _, d, g in self.gate_items():
            per = self.program.infos[name].elements_per_channel
            num += float((g.mask(d) > 0.5).sum()) * per
            den += g.num_channels * per
        return num / den if den else 0.0

    def comm_report(self, codec: str = "fp32") -> Any:
        """Bytes crossing the network for one sample under the current hard masks.

        See :func:`disco_fl.comm.comm_report`.
        """
        from disco_fl.comm import comm_report

        return comm_report(self, codec)

    def export(self, path: Any, codec: str = "fp32", meta: dict[str, Any] | None = None) -> Any:
        """Write the plan and one weights file per node; see :func:`disco_fl.export.export`."""
        from disco_fl.export import export

        return export(self, path, codec=codec, meta=meta)


def partition(
    model: nn.Module,
    num_nodes: int,
    example_input: torch.Tensor,
    *,
    capacities: Sequence[float] | None = None,
    capture: CaptureMode = "fx",
) -> PartitionedModel:
    """Split every layer of ``model`` across ``num_nodes`` nodes (emulated in one process).

    Parameters
    ----------
    model : nn.Module
        A standard PyTorch model. It is not modified.
    num_nodes : int
        Number of nodes N (>= 1). Every layer must have at least N output channels.
    example_input : torch.Tensor
        A batch-first example input; it fixes channel counts and the per-sample traffic.
    capacities : sequence of float, optional
        Relative capacity per node for uneven slices; default equal slices.
    capture : {"fx", "export", "auto"}
        How the model is captured. ``"fx"`` (default): symbolic ``torch.fx``
        (:func:`~disco_fl.partition.capture`), which keeps the model's training-mode
        behaviour. ``"export"``: ``torch.export`` in eval mode
        (:func:`~disco_fl.partition.capture_export`): Python control flow, functional calls
        and the ops of today's vision zoos (grouped convolutions, views of the channel dim,
        channel shuffles, resizing, ...); stochastic depth is captured as its eval-mode
        identity. ``"auto"``: fx, and export where fx refuses the model.

    Returns
    -------
    PartitionedModel
        Gates open: it computes exactly what ``model`` computes.
    """
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise PartitionError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    if capture not in ("fx", "export", "auto"):
        raise PartitionError(f"capture must be 'fx', 'export' or 'auto', got {capture!r}")
    if capture == "export":
        program, modules = capture_export(model, num_nodes, example_input, capacities)
    else:
        try:
            program, modules = fx_capture(model, num_nodes, example_input, capacities)
        except PartitionError as fx_error:
            if capture == "fx" or not isinstance(example_input, torch.Tensor):
                raise
            try:
                program, modules = capture_export(model, num_nodes, example_input, capacities)
            except PartitionError as e:
                raise PartitionError(f"{e} (the fx capture refused it too: {fx_error})") from e
    pm = PartitionedModel(program, modules)
    pm.train(model.training)
    return pm
