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

from disco_fl.core.gates import PairGates, gate_generator, prob_open, sample_hard_concrete
from disco_fl.core.layout import Layout
from disco_fl.node import run_lockstep
from disco_fl.node.shard import NodeShard
from disco_fl.partition import (
    Op,
    PartitionError,
    Program,
    capture_export,
    full_open_count,
    get_spec,
    op_traffic,
)
from disco_fl.partition import capture as fx_capture
from disco_fl.partition.head import head_on
from disco_fl.partition.ops_comm import gathered_columns
from disco_fl.partition.outputs import restore_output

GateMode = Literal["hard", "stochastic"]
Execution = Literal["auto", "fused", "lockstep"]
CaptureMode = Literal["fx", "export", "auto"]


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

    def send_selection(
        self, op: Op, dest: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        if not self._count(op, self.index):
            return None  # no channels of this tensor here: nothing to send
        gates: PairGates = self.shard.gates[op.name]  # type: ignore[assignment]
        if self.pm.gate_mode == "stochastic":
            return None, self.pm.gate_sample(op.name, self.index, dest)
        mask = gates.mask(dest)
        return None, mask

    def sources(self, op: Op) -> list[int]:
        return [j for j in self._peers if self._count(op, j)]

    def shared_generator(self, op: Op) -> torch.Generator | None:
        return self.pm.shared_generator(op)

    def _count(self, op: Op, k: int) -> int:
        layout = self.program.infos[op.name].layout
        return layout.count(k) if layout is not None else 0


class _GlobalNode:
    """Context of the fused emulation: whole tensors, assembled parameters."""

    index = -1

    def __init__(self, pm: PartitionedModel) -> None:
        self.pm = pm
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

    def shared_generator(self, op: Op) -> torch.Generator | None:
        return self.pm.shared_generator(op)


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
        the fp32 codec, lock-step otherwise (other codecs round only the received channels),
        and while ``dropped_nodes`` is set in a program whose nodes share normalization
        statistics (the fused path would not leave the dropped nodes' out).
    dropped_nodes : frozenset of int
        Node dropout (training): the nodes that do not run in the next forward passes, as in
        degraded mode; default none. See :mod:`disco_fl.runtime.training.dropout`.
    gate_seed : int or None
        Default ``None`` (stochastic gates draw from the global RNG). Set, with ``gate_step``
        (default 0), the noise is reproducible per ``(step, exchange, src, dst)``: the
        distributed training step (:mod:`disco_fl.runtime.training`) draws the same samples.
        The same holds for the masks of stochastic depth (:meth:`shared_generator`).
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
        # node dropout (training): nodes that do not run in the next forward passes, as in a
        # household's degraded mode: nothing of theirs arrives, no gradient reaches their
        # weights, their BatchNorm running statistics stay (disco_fl.core.gates.dropped_nodes
        # draws the set per step)
        self.dropped_nodes: frozenset[int] = frozenset()
        # BatchNorm statistics per set of missing nodes, for degraded mode
        # (disco_fl.emulation.statistics.calibrate_degraded; written by export)
        self.degraded_statistics: dict[frozenset[int], Any] = {}
        self._layer_of = {op.name: i for i, op in enumerate(program.ops)}
        self._random_ops = any(
            op.kind == "drop_path" and float(op.attrs.get("p", 0.0)) > 0 for op in program.ops
        )
        self._forward_seed = 0  # gate_seed None: drawn from the global RNG per forward
        self._perm_cache: dict[tuple[str, int], torch.Tensor] = {}
        self._stats: bool | None = None  # see _shared_statistics

    @property
    def num_nodes(self) -> int:
        return self.program.num_nodes

    def shard(self, k: int) -> NodeShard:
        s = self.shards[k]
        if not isinstance(s, NodeShard):
            raise TypeError("shards must hold NodeShard modules")
        return s

    def forward(self, x: torch.Tensor) -> Any:
        """The model's output: a tensor, or the dict / tuple / list of tensors the original
        model returns (:func:`~disco_fl.partition.outputs.restore_output`)."""
        if self.training and self._random_ops and self.gate_seed is None:
            self._forward_seed = int(torch.randint(0, 2**62, (1,)).item())
        fused = self.execution == "auto" and self.codec == "fp32"
        if self.dropped_nodes and self._shared_statistics():  # left out of them: lock step
            fused = False
        if self.execution == "fused" or fused:
            return restore_output(self.program, self._fused_forward(x))
        nodes = [_EmuNode(self, k) for k in range(self.num_nodes)]
        y = run_lockstep(self.program, nodes, x, self.codec, missing=self.dropped_nodes)
        return restore_output(self.program, y)

    def _shared_statistics(self) -> bool:
        """Some op exchanges normalization statistics: with nodes dropped, only the lock-step
        emulation leaves theirs out (the fused one normalizes over every channel)."""
        if self._stats is None:
            count = full_open_count(self.program)
            self._stats = any(
                not get_spec(op.kind).coded_messages and op_traffic(self.program, op, count)
                for op in self.program.ops
            )
        return self._stats

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
        return self._drop_output(out) if self.dropped_nodes else out

    def _drop_output(self, out: torch.Tensor) -> torch.Tensor:
        """The output with the dropped nodes' slices zero (they never arrive)."""
        info = self.program.infos[self.program.ops[-1].inputs[0]]
        if info.kind != "sharded" or info.layout is None or info.cdim is None:
            return out
        keep = torch.tensor([o not in self.dropped_nodes for o in info.layout.owners])
        shape = [1] * out.dim()
        shape[info.cdim] = -1
        return out * keep.to(out.dtype).view(shape)

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
                if j in self.dropped_nodes or k in self.dropped_nodes:  # node dropout:
                    # nothing arrives from j; a dropped reader k's channels never leave it
                    pieces.append(torch.zeros(layout.count(j)))
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
        for k in self.dropped_nodes:  # a dropped node does not run: no gradient reaches it
            states[k] = {n: t.detach() for n, t in states[k].items()}
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
                if k in self.dropped_nodes:  # it did not run: its statistics stay
                    continue
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
        :func:`~disco_fl.core.gates.gate_generator` ``(gate_seed, gate_step, layer, src, dst)``,
        exactly as the distributed training step draws it; otherwise (default) from the global
        RNG.
        """
        g: PairGates = self.shards[src].gates[exchange]  # type: ignore[index, assignment]
        gen = None
        if self.gate_seed is not None:
            gen = gate_generator(self.gate_seed, self.gate_step, self._layer_of[exchange], src, dst)
        return sample_hard_concrete(g.log_alpha[str(dst)], gen)

    def shared_generator(self, op: Op) -> torch.Generator:
        """The generator of a random op that every node shares (stochastic depth: every node
        drops the same samples): :func:`~disco_fl.core.gates.gate_generator`
        ``(gate_seed, gate_step, layer, -1, -1)``, exactly as the distributed training step
        derives it. With ``gate_seed`` None (the default) the seed is drawn from the global RNG
        once per forward pass, so the nodes of the emulation (fused or lock-step) still share
        the draw; equality with the distributed training step needs ``gate_seed`` set (and
        ``gate_step`` = the step)."""
        seed = self.gate_seed if self.gate_seed is not None else self._forward_seed
        return gate_generator(seed, self.gate_step, self._layer_of[op.name], -1, -1)

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

        See :func:`disco_fl.emulation.comm.comm_report`.
        """
        from disco_fl.emulation.comm import comm_report

        return comm_report(self, codec)

    def export(self, path: Any, codec: str = "fp32", meta: dict[str, Any] | None = None) -> Any:
        """Write the plan and one weights file per node; see :func:`disco_fl.export.export`."""
        from disco_fl.emulation.export import export

        return export(self, path, codec=codec, meta=meta)


def partition(
    model: nn.Module,
    num_nodes: int,
    example_input: torch.Tensor,
    *,
    capacities: Sequence[float] | None = None,
    capture: CaptureMode = "fx",
    head: Literal["split", "requester"] = "split",
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
        channel shuffles, resizing, ...). Stochastic depth (torchvision's ``StochasticDepth``,
        timm's ``DropPath``) becomes a ``drop_path`` op with either capture: the identity in
        eval mode, per-sample drops in training (:mod:`disco_fl.partition.ops_drop`).
        ``"auto"``: fx, and export where fx refuses the model.
    head : {"split", "requester"}
        ``"split"`` (default): the last mixing layer is split like every other. ``"requester"``:
        the requester computes all of it (:func:`~disco_fl.partition.head.head_on`), so that
        with a device missing (degraded mode) it still produces the whole output.

    Returns
    -------
    PartitionedModel
        Gates open: it computes exactly what ``model`` computes.
    """
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise PartitionError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    if capture not in ("fx", "export", "auto"):
        raise PartitionError(f"capture must be 'fx', 'export' or 'auto', got {capture!r}")
    exported = capture == "export"
    if exported:
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
            exported = True
    if head == "requester":
        program = head_on(program, program.requester)
    elif head != "split":
        raise PartitionError(f"head must be 'split' or 'requester', got {head!r}")
    pm = PartitionedModel(program, modules)
    pm.train(model.training)
    return pm
