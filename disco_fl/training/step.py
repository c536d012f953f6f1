"""The distributed training step: one node of a household trains its shard over a transport.

:class:`NodeTrainer` holds what node ``k`` owns (its :class:`~disco_fl.emulation.NodeShard`:
weights, buffers and gate logits; its optimizer and optimizer state) and runs training steps
with its peers. It calls the same ``spec.send`` / ``spec.compute`` as the emulation and the
inference runtime: there is one implementation of a node's math.

Protocol of one step ``t`` (session ``<run>/s<t>``; ``layer`` = the op's index in the
program):

1. **Forward**, op by op as in inference, but with autograd: the op's inputs are detached
   leaves and every received message is a leaf, so each op is its own small graph. Exchanged
   activations use the plan's codec (default fp32); normalization statistics are fp32. In
   ``"hard"`` gate mode only the channels open in the plan's masks are sent; in
   ``"stochastic"`` mode only the channels whose hard-concrete sample is non-zero, preceded by
   a *selection* frame (sub-session ``/sel``: the sender's local channel indices, fp32) so the
   receiver knows where they go. The receiver scatters a message into a zero tensor of the
   sender's full slice, so its weights keep every column (as in the emulation).
2. **Loss** on the batch owner (the step's requester): cross entropy, optionally with
   distillation from teacher logits. Labels and teacher logits never leave the owner.
3. **Backward**, in reverse op order, in two parts per op (which cannot deadlock: part 1 of
   op ``L`` needs only ops after ``L``, part 2 needs every peer's part 1 of ``L``):
   (1) backward through ``compute`` (the op's output gradient, accumulated from later ops);
   the gradients of the received leaves go back to their senders as ``BACKWARD`` frames
   (fp32 whatever the plan's codec: gradients are not quantized, and the straight-through
   convention applies to a lossy forward codec); (2) receive the gradients of this node's own
   messages and backward through ``send`` (to the inputs and, in stochastic mode, the gate
   logits, which live on the sender). Gradients of the op's input leaves are added to the
   producing ops' output gradients.
4. Optional differential privacy (:mod:`disco_fl.training.dp`): per-sample norms are summed
   across the household (sub-session ``/norms``), each node clips and noises its own
   coordinates. An empty (Poisson) batch is a noise-only step: the forward stops after the
   input layer (whose frame tells every node), no backward, no norms, noise only.
5. **Commit** (sub-session ``/commit``): every node sends a vote to the owner (layer 0); the
   owner, holding every vote, answers every node (layer 1). Only then does a node apply its
   optimizer and write back its BatchNorm running statistics (kept in per-step copies until
   then). Any error (its own, a peer's error frame, an unreachable peer, a timeout) aborts
   the step: the node sends an abort frame with the cause to every peer (sub-session
   ``/abort``; waits poll it), drops its gradients, leaves its shard and optimizer state
   unchanged and raises :class:`StepAborted` naming the failed node. The owner commits only
   after all votes, so a step fails everywhere unless the owner itself dies between its
   answers (then the household resumes from the last checkpoint, see
   :meth:`NodeTrainer.save_checkpoint`).

**Batch owner schedule**: ``owners`` (default: the plan's requester) lists the nodes that
hold training data, ascending; step ``t`` is owned by ``owners[t % len(owners)]`` (round
robin), known to every node from the configuration. The owner feeds the input and computes
the loss; everything else is symmetric.

**Gate noise** (stochastic mode): the sender draws its samples with
:func:`~disco_fl.gates.gate_generator` ``(gate_seed, step, layer, src, dst)``, exactly as the
emulation does with ``pm.gate_seed`` / ``pm.gate_step`` set.

**Memory** (without DP): a node keeps only what its backward needs. An exchanged tensor is
not stored assembled: its consumers rebuild ``[own channels, received channels]`` on the fly
(:class:`_GatherFn`) and a saved-tensor hook stores it as references to the node's own
activation and the compact received messages (no zero-padded copies, no second copy of the
own channels); runs of local ops whose value has a single consumer that exchanges nothing
share one autograd graph, so intermediate outputs that no backward reads (e.g. a BatchNorm
output followed by a ReLU) are freed; values are dropped after their last reader; a sent
message is kept only as the autograd edge its gradient flows into (not its values). The math
and the order of every sum are those of the per-op graphs (bit-identical shards after Adam
steps in our checks: ResNet, hard and stochastic gates, and the zoo's mixed "user" net).
With hard masks, ``NodeTrainer(..., compact=True)`` also drops the weight columns of closed
channels from what is trained (weights, gradients, optimizer state) and from the assembled
inputs (``[own channels, open channels received]``, no zero padding); the closed columns are
kept aside, unchanged, for the full-width shard (:meth:`NodeTrainer.full_state_dict`).

**Communication** is counted from the transport's payload counters (``data`` + ``scales`` of
every frame sent) and reported per step as forward, backward and control (commit, DP norms)
bytes; :func:`predict_step_bytes` gives the forward and backward figures from the masks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from disco_fl.codecs import get_codec
from disco_fl.emulation import NodeShard, OpState
from disco_fl.export import compact_columns
from disco_fl.files import ChecksumError, load_torch, remove_stale_temps, save_torch
from disco_fl.gates import PairGates, gate_generator, prob_open, sample_hard_concrete
from disco_fl.partition import Op, Program, Traffic, get_spec
from disco_fl.plan import Plan
from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.train import distill_loss
from disco_fl.transport.base import MAX_ERROR_TEXT, PeerDownError, Transport
from disco_fl.wire import CODECS, WireError, decode_tensor, encode_tensor

if TYPE_CHECKING:
    from disco_fl.training.dp import DPConfig, DPState, DPStepInfo

Frame = peer_pb2.Frame
TrainGateMode = Literal["hard", "stochastic"]
POLL_S = 0.05  # how often a waiting node looks for peers' abort frames
ABORT_GRACE_S = 1.0  # after the deadline, how long a node still listens for peers' aborts
_ABORT_RE = re.compile(r"\[failed node (\d+)\] (.*)", re.DOTALL)
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
CHECKPOINT_FORMAT = "disco_fl.train_node/1"


class StepAborted(RuntimeError):
    """A training step failed on some node; no node applied it.

    Attributes
    ----------
    node : int
        The node raising it.
    step : int
        The aborted step.
    failed_node : int
        The node where the failure started (``node`` itself for its own errors).
    cause : str
        What went wrong.
    """

    def __init__(self, node: int, step: int, failed_node: int, cause: str) -> None:
        who = "this node" if failed_node == node else f"node {failed_node}"
        super().__init__(
            f"node {node}: training step {step} aborted, {who} failed: {cause}; no update was "
            f"applied (resume from the last checkpoint)"
        )
        self.node = node
        self.step = step
        self.failed_node = failed_node
        self.cause = cause


class _PeerFailure(RuntimeError):
    """A peer reported an abort / error, or cannot be reached."""

    def __init__(self, peer: int, cause: str) -> None:
        super().__init__(cause)
        self.peer = peer


@dataclass
class StepResult:
    """What one node reports for one committed step.

    ``loss`` is set on the batch owner only. Bytes are payload bytes this node sent.
    """

    step: int
    owner: int
    loss: float | None
    forward_bytes: int
    backward_bytes: int
    control_bytes: int
    seconds: float
    dp: DPStepInfo | None = None

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes + self.control_bytes


@dataclass
class StepBytes:
    """Predicted payload bytes of one step, summed over the household (or for one sender)."""

    forward: int = 0
    backward: int = 0
    # node k -> (forward bytes k sends, backward bytes k sends)
    per_sender: dict[int, tuple[int, int]] = field(default_factory=dict)


def _traffic(program: Program, op: Op, open_count: Callable[[str, int, int], int]) -> list[Traffic]:
    return get_spec(op.kind).traffic(op, program, lambda s, d: open_count(op.name, s, d))


def predict_step_bytes(
    program: Program,
    open_count: Callable[[str, int, int], int],
    batch: int,
    *,
    codec: str = "fp32",
    owner: int | None = None,
    selection_frames: bool = False,
) -> StepBytes:
    """Payload bytes of one training step, from the program and the open channels.

    Parameters
    ----------
    program : Program
        The partitioned program.
    open_count : callable
        ``open_count(exchange, src, dst)``: channels sent (hard masks: the plan's open
        channels; stochastic gates: the non-zero samples of that step).
    batch : int
        Batch size.
    codec : str
        Codec of forward activations; default ``"fp32"``. Statistics and gradients are fp32.
    owner : int, optional
        The step's batch owner; default ``program.requester``.
    selection_frames : bool
        Stochastic gates: add the selection frames (4 bytes per sent channel, per exchange
        and pair, independent of the batch). Default False.

    Returns
    -------
    StepBytes
        Forward bytes (input, activations, statistics, outputs, selections) and backward
        bytes (one fp32 gradient per received element of every message but the input).
    """
    if owner is not None:
        program = dataclasses.replace(program, requester=owner)
    c = get_codec(codec)
    out = StepBytes()
    for op in program.ops:
        coded = get_spec(op.kind).coded_messages
        for t in _traffic(program, op, open_count):
            f = (c.message_bytes(t.elements) if coded else 4 * t.elements) * batch
            b = 0 if op.kind == "input" else 4 * t.elements * batch
            if selection_frames and op.kind == "exchange":
                f += 4 * t.channels
            fw, bw = out.per_sender.get(t.src, (0, 0))
            out.per_sender[t.src] = (fw + f, bw)
            fw, bw = out.per_sender.get(t.dst, (0, 0))  # gradients flow back from the receiver
            out.per_sender[t.dst] = (fw, bw + b)
            out.forward += f
            out.backward += b
    return out


def plan_open_count(plan: Plan) -> Callable[[str, int, int], int]:
    """``open_count`` of :func:`predict_step_bytes` for a plan's hard masks."""

    def count(name: str, s: int, d: int) -> int:
        return len(plan.open_channels(name, s, d))

    return count


class _TrainContext:
    """:class:`~disco_fl.partition.registry.NodeContext` of one node during one step."""

    def __init__(self, trainer: NodeTrainer, program: Program, step: int) -> None:
        self.t = trainer
        self.index = trainer.index
        self.num_nodes = program.num_nodes
        self.program = program
        self.training = True
        self.step = step
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}  # per-step copies
        self.selections: dict[tuple[str, int], torch.Tensor] = {}  # (exchange, dest) -> idx
        self.override: dict[str, Mapping[str, torch.Tensor]] = {}  # DP: functional params
        self._peers = [j for j in range(program.num_nodes) if j != trainer.index]

    def state(self, op: Op) -> Mapping[str, torch.Tensor]:
        if op.name in self.override:
            return self.override[op.name]
        if op.name not in self.t.shard.ops:
            return {}
        st = self.t.shard.ops[op.name]
        assert isinstance(st, OpState)
        out: dict[str, torch.Tensor] = {k: v for k, v in st._parameters.items() if v is not None}
        if st._buffers:
            if op.name not in self.buffers:
                self.buffers[op.name] = {
                    k: v.detach().clone() for k, v in st._buffers.items() if v is not None
                }
            out.update(self.buffers[op.name])
        return out

    def send_selection(
        self, op: Op, dest: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        gates: PairGates = self.t.shard.gates[op.name]  # type: ignore[assignment]
        if self.t.gate_mode == "stochastic":
            gen = gate_generator(
                self.t.gate_seed, self.step, self.t.layer_of[op.name], self.index, dest
            )
            z = sample_hard_concrete(gates.log_alpha[str(dest)], gen)
            idx = torch.nonzero(z.detach() != 0).flatten()
            self.selections[(op.name, dest)] = idx
            return idx, z.index_select(0, idx)
        idx = self.t.open_local(op.name, self.index, dest)
        if idx.numel() == 0:
            return None
        self.selections[(op.name, dest)] = idx
        return idx, None

    def sources(self, op: Op) -> list[int]:
        if self.t.compact:  # assemble [own, open channels of each peer] (the compact columns)
            return self.t.open_sources(op.name)
        return self._peers


@dataclass
class _OpRecord:
    layer: int
    op: Op
    leaves: list[tuple[str, torch.Tensor]]  # (value name, input leaf)
    msgs: dict[int, _Sent]  # dest -> message sent (its graph to the inputs / gates)
    received: dict[int, torch.Tensor]  # src -> received leaf (needs a gradient back)
    out: Any
    xs: list[Any] = field(default_factory=list)  # DP: the op's inputs
    full_received: dict[int, torch.Tensor] = field(default_factory=dict)  # DP
    grad_out: torch.Tensor | None = None  # DP: the op's output gradient
    # lean mode: an exchange's assembled value (built lazily by its consumers)
    gathered: _Gathered | None = None
    # lean mode: per gathered input, (value, leaf of own channels, leaves of received ones)
    gather_leaves: list[tuple[_Gathered, torch.Tensor, dict[int, torch.Tensor]]] = field(
        default_factory=list
    )
    chainable: bool = False  # lean mode: a consumer may extend this op's graph


@dataclass(frozen=True)
class _Sent:
    """A message sent: its shape and dtype (to check the gradient coming back) and, if it
    needs one, the edge its gradient flows into. The message's values are not kept (no
    backward reads them)."""

    shape: torch.Size
    dtype: torch.dtype
    edge: GradientEdge | None


class _Gathered:
    """An exchange's output in lean mode: this node's channels and the compact messages
    received, assembled (``build``) only when a consumer runs, and the gradients of both parts
    summed over the consumers (consumers in reverse program order, as the per-op graphs do)."""

    def __init__(
        self,
        own: torch.Tensor,
        recv: dict[int, torch.Tensor],
        build: Callable[[torch.Tensor, dict[int, torch.Tensor]], torch.Tensor],
        cdim: int,
        counts: list[int],
        index: int,
        sel: dict[int, torch.Tensor],
        compact: bool = False,
    ) -> None:
        self.own = own
        self.recv = recv
        self.srcs = sorted(recv)
        self.build = build
        self.cdim = cdim
        self.counts = counts  # channels of every node's slice
        self.index = index
        self.sel = sel
        self.compact = compact  # assembled from the messages as they are (no zero padding)
        self.g_own: torch.Tensor | None = None
        self.g_recv: dict[int, torch.Tensor] = {}

    def materialize(self) -> torch.Tensor:
        with torch.no_grad():
            return self.build(self.own, self.recv)

    def add_grads(self, own: torch.Tensor | None, recv: Mapping[int, torch.Tensor]) -> None:
        if own is not None:
            self.g_own = own if self.g_own is None else self.g_own + own
        for j, g in recv.items():
            prev = self.g_recv.get(j)
            self.g_recv[j] = g if prev is None else prev + g


# consumers that never extend a producer's graph: exchanges (their backward is split in two
# parts), and ``cat``, whose backward hands its inputs strided views, which would change the
# producer's backward kernels (and their rounding) against the per-op graphs' contiguous
# gradients
_NO_CHAIN = frozenset({"exchange", "cat"})


class _GatherFn(torch.autograd.Function):
    """``[own, zero-padded messages of every peer]`` along the channel dim (compact trainer:
    ``[own, message of every peer that sends]``); saves nothing."""

    @staticmethod
    def forward(ctx: Any, v: _Gathered, own: torch.Tensor, *recv: torch.Tensor) -> torch.Tensor:
        ctx.v = v
        return v.build(own, dict(zip(v.srcs, recv, strict=True)))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        v: _Gathered = ctx.v
        own = g.narrow(v.cdim, 0, v.counts[v.index])
        off = v.counts[v.index]
        out: dict[int, torch.Tensor] = {}
        for j in range(len(v.counts)):  # own first, then the peers ascending (the assembly)
            if j == v.index:
                continue
            if v.compact:
                if j in v.recv:
                    width = v.recv[j].shape[v.cdim]
                    out[j] = g.narrow(v.cdim, off, width)
                    off += width
                continue
            if j in v.recv:
                out[j] = g.narrow(v.cdim, off, v.counts[j]).index_select(v.cdim, v.sel[j])
            off += v.counts[j]
        return (None, own, *(out[j] for j in v.srcs))


def default_param_groups(
    shard: NodeShard, lr: float, gate_lr: float | None = None
) -> list[dict[str, Any]]:
    """Two parameter groups of a shard: weights (``lr``), gate logits (``gate_lr``, default
    ``lr``). The emulation's optimizer must use the same hyper-parameters per group."""
    return [
        {"params": list(shard.ops.parameters()), "lr": lr},
        {"params": list(shard.gates.parameters()), "lr": lr if gate_lr is None else gate_lr},
    ]


class NodeTrainer:
    """Node ``shard.index`` of a household, training its shard with its peers.

    Parameters
    ----------
    shard : NodeShard
        Everything this node holds (``pm.shards[k]``); trained in place.
    plan : Plan
        What the household agrees on: the program and the hard masks (and the codec of
        forward activations). Its masks must equal this shard's hard masks.
    transport : Transport
        This node's transport (``transport.index == shard.index``).
    optimizer : torch.optim.Optimizer
        Over this shard's parameters (see :func:`default_param_groups`); stepped only after
        a committed step.
    gate_mode : {"hard", "stochastic"}
        ``"hard"`` (default): fixed masks, gates not trained. ``"stochastic"``: hard-concrete
        gates trained jointly (noise from :func:`~disco_fl.gates.gate_generator`).
    gate_seed : int
        Seed of the gate noise; default 0.
    gate_penalty : float
        Coefficient of the expected fraction of dense exchange bytes added to the loss
        (stochastic mode; the emulation's ``expected_exchange_fraction``). Default 0.
    owners : sequence of int, optional
        Nodes holding training data, taking turns as batch owner; default the plan's
        requester.
    timeout : float
        Deadline of one step in seconds; default 60.
    distill : float
        Weight of distillation when teacher logits are given; default 0.9.
    temperature : float
        Distillation temperature; default 4.
    dp : DPConfig, optional
        Differential privacy (:mod:`disco_fl.training.dp`); default off.
    max_message_bytes : int
        Bound on one received payload; default 1 GiB.
    compact : bool
        Hard gate mode only; default False. Train only the weight columns of open channels:
        in hard mode a mixing op's columns that read channels closed towards this node get
        exactly zero gradient and never change, yet (full width) they cost a weight, a
        gradient and the optimizer's state. With ``compact=True`` the trainer replaces, in
        ``shard`` itself, every such weight by a parameter of the open columns only (the
        columns :func:`~disco_fl.export.compact_columns` keeps, in that order) and keeps the
        closed columns aside, unchanged; ``optimizer``'s parameter groups are re-pointed in
        place to the compact parameters (its state, if any, cut to the kept columns). Each
        node then assembles ``[own channels, open channels received]`` only (no zero-padded
        columns, smaller activations). ``shard`` stays compact while the trainer holds it:
        read the full-width tensors with :meth:`full_state_dict` (closed columns bit-identical
        to the start), or put them back with :meth:`expand`. Checkpoints hold the full-width
        shard either way. Every committed step equals the full-width one up to float rounding
        (the dropped columns only added zeros), except with weight decay, which would shrink
        the closed columns of the full-width shard (they do not affect the model: export
        drops them).
    """

    def __init__(
        self,
        shard: NodeShard,
        plan: Plan,
        transport: Transport,
        optimizer: torch.optim.Optimizer,
        *,
        gate_mode: TrainGateMode = "hard",
        gate_seed: int = 0,
        gate_penalty: float = 0.0,
        owners: Sequence[int] | None = None,
        timeout: float = 60.0,
        distill: float = 0.9,
        temperature: float = 4.0,
        dp: DPConfig | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        compact: bool = False,
    ) -> None:
        program = plan.program
        k = shard.index
        n = program.num_nodes
        if transport.index != k or transport.num_nodes != n:
            raise ValueError(
                f"transport of node {transport.index}/{transport.num_nodes} used for shard {k}/{n}"
            )
        if gate_mode not in ("hard", "stochastic"):
            raise ValueError(f"gate_mode must be 'hard' or 'stochastic', got {gate_mode!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if compact and gate_mode != "hard":
            raise ValueError(
                "compact=True needs gate_mode='hard' (stochastic gates may reopen a channel: "
                "every column is trained)"
            )
        self.owners = sorted(set(owners)) if owners else [program.requester]
        if any(not 0 <= o < n for o in self.owners):
            raise ValueError(f"owners {list(owners or [])} out of range for {n} nodes")
        self.shard = shard
        self.plan = plan
        self.index = k
        self.transport = transport
        self.optimizer = optimizer
        self.gate_mode: TrainGateMode = gate_mode
        self.gate_seed = int(gate_seed)
        self.gate_penalty = float(gate_penalty)
        self.timeout = float(timeout)
        self.distill = float(distill)
        self.temperature = float(temperature)
        self.max_message_bytes = max_message_bytes
        self.layer_of = {op.name: i for i, op in enumerate(program.ops)}
        self._open: dict[tuple[str, int, int], torch.Tensor] = {}
        self._sources: dict[str, list[int]] = {}
        self._check_masks()
        self.compact = False
        # compactable weights: op name -> kept / closed columns; closed columns while compact
        self._cols = self._compactable()
        self._closed: dict[str, torch.Tensor] = {}
        if compact:
            self._compact()
        self.dp_state: DPState | None = None
        if dp is not None:
            from disco_fl.training.dp import DPState

            self.dp_state = DPState(dp, self)
        self.steps_done = 0
        # advanced on every abort (on every node alike): sessions are "<run>/g<gen>/s<step>"
        self.generation = 0
        self.history: list[StepResult] = []

    # ---- plan ---------------------------------------------------------------------------
    def open_local(self, exchange: str, src: int, dst: int) -> torch.Tensor:
        """Local indices (in ``src``'s slice) of the channels ``src`` sends ``dst`` (hard)."""
        key = (exchange, src, dst)
        if key not in self._open:
            layout = self.plan.program.infos[exchange].layout
            assert layout is not None
            local = {c: i for i, c in enumerate(layout.indices(src))}
            chans = self.plan.open_channels(exchange, src, dst)
            self._open[key] = torch.tensor([local[c] for c in chans], dtype=torch.long)
        return self._open[key]

    def open_sources(self, exchange: str) -> list[int]:
        """Peers that send this node at least one channel of ``exchange`` (hard), ascending."""
        if exchange not in self._sources:
            self._sources[exchange] = [
                j
                for j in range(self.plan.num_nodes)
                if j != self.index and self.open_local(exchange, j, self.index).numel() > 0
            ]
        return self._sources[exchange]

    def _check_masks(self) -> None:
        for e in self.plan.program.exchanges:
            g = self.shard.gates[e.name]
            assert isinstance(g, PairGates)
            for d in g.dests:
                mine = torch.nonzero(g.mask(d) > 0.5).flatten()
                if not torch.equal(mine, self.open_local(e.name, self.index, d)):
                    raise ValueError(
                        f"node {self.index}: hard mask of {e.name} towards node {d} differs "
                        f"from the plan's"
                    )

    # ---- compact weights (hard gates) ---------------------------------------------------
    def _compactable(self) -> dict[str, _Columns]:
        """Weights of mixing ops that read closed channels: their kept and closed columns."""
        program = self.plan.program
        out: dict[str, _Columns] = {}
        for op in program.ops:
            if not (op.inputs and get_spec(op.kind).mixing) or op.name not in self.shard.ops:
                continue
            x = program.infos[op.inputs[0]]
            if x.kind != "gathered" or x.layout is None:
                continue
            if self.shard.ops[op.name]._parameters.get("weight") is None:
                continue
            full = x.layout.num_channels
            keep = compact_columns(self.plan, op, self.index)
            if keep == list(range(full)):
                continue
            kept = set(keep)
            out[op.name] = _Columns(
                torch.tensor(keep, dtype=torch.long),
                torch.tensor([c for c in range(full) if c not in kept], dtype=torch.long),
                full,
            )
        return out

    def _weight(self, name: str) -> torch.nn.Parameter:
        w = self.shard.ops[name]._parameters["weight"]
        assert w is not None
        return w

    def _compact(self) -> None:
        """Replace every compactable weight by its open columns; keep the closed ones aside."""
        for name, cols in self._cols.items():
            w = self._weight(name)
            if w.dim() < 2 or w.shape[1] != cols.full:
                raise ValueError(
                    f"node {self.index}: {name}.weight has shape {tuple(w.shape)}, expected "
                    f"{cols.full} columns (the full-width shard)"
                )
            with torch.no_grad():
                small = torch.nn.Parameter(
                    w.detach().index_select(1, cols.keep), requires_grad=w.requires_grad
                )
                self._closed[name] = w.detach().index_select(1, cols.closed)

            def cut(v: torch.Tensor, c: _Columns = cols) -> torch.Tensor:
                return v.index_select(1, c.keep)

            _swap_param(self.optimizer, w, small, cut)
            self.shard.ops[name].weight = small
        self.compact = True

    def _full_weight(self, name: str) -> torch.Tensor:
        cols = self._cols[name]
        w = self._weight(name).detach()
        shape = list(w.shape)
        shape[1] = cols.full
        out = torch.empty(shape, dtype=w.dtype)
        out.index_copy_(1, cols.keep, w)
        out.index_copy_(1, cols.closed, self._closed[name])
        return out

    def expand(self) -> NodeShard:
        """Leave compact mode: put full-width weights back into the shard (closed columns as
        they were, trained columns as trained) and re-point the optimizer to them (its state
        of the closed columns zero, as a full-width run has it); return the shard."""
        if not self.compact:
            return self.shard
        for name, cols in self._cols.items():
            w = self._weight(name)
            full = torch.nn.Parameter(self._full_weight(name), requires_grad=w.requires_grad)

            def widen(v: torch.Tensor, c: _Columns = cols) -> torch.Tensor:
                shape = list(v.shape)
                shape[1] = c.full
                return torch.zeros(shape, dtype=v.dtype).index_copy_(1, c.keep, v)

            _swap_param(self.optimizer, w, full, widen)
            self.shard.ops[name].weight = full
        self._closed = {}
        self.compact = False
        return self.shard

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The shard's ``state_dict`` at full width (copies), whether compact or not: what
        :func:`~disco_fl.federated.shard_arrays` sends, the strategy averages and export
        reads."""
        out = {k: v.detach().clone() for k, v in self.shard.state_dict().items()}
        if self.compact:
            for name in self._cols:
                out[f"ops.{name}.weight"] = self._full_weight(name)
        return out

    def param_numel(self) -> int:
        """Elements of the parameters this node trains (compact: open columns only)."""
        return sum(p.numel() for p in self.shard.parameters())

    def owner_of(self, step: int) -> int:
        """The batch owner of ``step``: ``owners[step % len(owners)]``."""
        return self.owners[step % len(self.owners)]

    def _open_count(self, program: Program) -> Callable[[str, int, int], int]:
        if self.gate_mode == "stochastic":

            def all_channels(name: str, s: int, d: int) -> int:
                layout = program.infos[name].layout
                return layout.count(s) if layout is not None else 0

            return all_channels
        return plan_open_count(self.plan)

    # ---- the step -----------------------------------------------------------------------
    def step(
        self,
        step: int,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        run_id: str = "train",
        teacher_logits: torch.Tensor | None = None,
    ) -> StepResult:
        """Run training step ``step`` with the peers; apply it only if it commits everywhere.

        ``x`` and ``y`` (input batch and integer labels) are needed on the step's owner
        (:meth:`owner_of`) and ignored elsewhere. Raises :class:`StepAborted` (nothing
        applied) when the step fails on any node.
        """
        owner = self.owner_of(step)
        program = dataclasses.replace(self.plan.program, requester=owner)
        if self.index == owner:
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise ValueError(f"node {self.index} owns step {step}: it needs x and y")
            if y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"labels of shape {tuple(y.shape)} for a batch of {x.shape[0]}")
            if x.dim() and x.shape[0] == 0 and self.dp_state is None:
                raise ValueError("an empty batch is a step only with DP (a noise-only step)")
        sid = f"{run_id}/g{self.generation}/s{step}"
        ctx = _TrainContext(self, program, step)
        deadline = time.monotonic() + self.timeout
        io_ = _StepIO(self, sid, step, deadline)
        t0 = time.monotonic()
        c0 = self._sent()
        loss_value: float | None = None
        dp_info = None
        try:
            self.optimizer.zero_grad(set_to_none=True)
            self._zero_grads()
            records = self._forward(ctx, io_, x)
            c1 = self._sent()
            # DP, empty Poisson batch: a noise-only step (the forward stopped at the input)
            empty = self.dp_state is not None and _batch_size(records) == 0
            g_out: torch.Tensor | None = None
            if self.index == owner and not empty:
                out = records[-1].out
                if not isinstance(out, torch.Tensor):
                    raise RuntimeError("program produced no output tensor")
                logits = out.detach().requires_grad_(True)
                assert y is not None
                loss = distill_loss(
                    logits,
                    y,
                    teacher_logits,
                    self.distill if teacher_logits is not None else 0,
                    self.temperature,
                )
                loss.backward()
                g_out = logits.grad
                loss_value = float(loss.detach())
            if not empty:
                self._gate_penalty(program)
                self._backward(ctx, io_, records, g_out)
            c2 = self._sent()
            if self.dp_state is not None:
                dp_info = self.dp_state.privatize(ctx, io_, records, owner)
            self._commit(io_, owner)
            c3 = self._sent()
        except BaseException as e:
            self._zero_grads()
            self.generation += 1  # every node aborts: the retried step uses fresh sessions
            if isinstance(e, _PeerFailure):
                io_.broadcast_abort(e.peer, str(e))
                raise StepAborted(self.index, step, e.peer, str(e)) from e
            cause = f"{type(e).__name__}: {e}"
            io_.broadcast_abort(self.index, cause)
            raise StepAborted(self.index, step, self.index, cause) from e
        finally:
            io_.end()
        # committed everywhere (the owner had every vote): apply
        with torch.no_grad():
            for name, bufs in ctx.buffers.items():
                st = self.shard.ops[name]
                for bname, v in bufs.items():
                    getattr(st, bname).copy_(v)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dp_state is not None and dp_info is not None:
            dp_info.epsilon = self.dp_state.after_commit(owner)
        self.steps_done = step + 1
        res = StepResult(
            step,
            owner,
            loss_value,
            c1 - c0,
            c2 - c1,
            c3 - c2,
            time.monotonic() - t0,
            dp_info,
        )
        self.history.append(res)
        return res

    def _sent(self) -> int:
        return sum(self.transport.payload_bytes_sent().values())

    def _zero_grads(self) -> None:
        for p in self.shard.parameters():
            p.grad = None

    def _gate_penalty(self, program: Program) -> None:
        """Add ``gate_penalty * (this node's part of the expected exchange fraction)``."""
        if self.gate_mode != "stochastic" or self.gate_penalty == 0.0:
            return
        den = 0.0
        num = torch.zeros(())
        for e in program.exchanges:
            layout = program.infos[e.name].layout
            assert layout is not None
            per = program.infos[e.name].elements_per_channel
            den += sum(
                layout.count(j) * (program.num_nodes - 1) * per for j in range(layout.num_nodes)
            )
            g = self.shard.gates[e.name]
            assert isinstance(g, PairGates)
            for d in g.dests:
                num = num + prob_open(g.log_alpha[str(d)]).sum() * per
        if den:
            (self.gate_penalty * num / den).backward()

    def _forward(self, ctx: _TrainContext, io_: _StepIO, x: torch.Tensor | None) -> list[_OpRecord]:
        program = ctx.program
        k = self.index
        owner = program.requester
        codec = get_codec(self.plan.codec)
        open_count = self._open_count(program)
        env: dict[str, Any] = {}
        records: list[_OpRecord] = []
        batch: int | None = None
        keep_xs = self.dp_state is not None
        lean = not keep_xs  # DP needs every op's inputs and its own graph (per-sample grads)
        uses: dict[str, int] = {}
        last_use: dict[str, int] = {}
        for i, op in enumerate(program.ops):
            for name in op.inputs:
                uses[name] = uses.get(name, 0) + 1
                last_use[name] = i
        rec_of: dict[str, _OpRecord] = {}
        for layer, op in enumerate(program.ops):
            spec = get_spec(op.kind)
            traffic = _traffic(program, op, open_count)
            out_to = sorted({t.dst for t in traffic if t.src == k})
            in_from = {t.src: t for t in traffic if t.dst == k}
            leaves: list[tuple[str, torch.Tensor]] = []
            gathers: list[tuple[_Gathered, torch.Tensor, dict[int, torch.Tensor]]] = []
            built: list[tuple[torch.Tensor, _Gathered]] = []
            xs: list[Any]
            if op.kind == "input":
                xs = [x.detach() if k == owner and x is not None else None]
            else:
                xs = []
                for name in op.inputs:
                    v = env[name]
                    if isinstance(v, _Gathered):
                        lo = v.own.detach().requires_grad_(True)
                        lr = {j: r.detach().requires_grad_(True) for j, r in v.recv.items()}
                        gv = _GatherFn.apply(v, lo, *(lr[j] for j in v.srcs))
                        gathers.append((v, lo, lr))
                        built.append((gv, v))
                        xs.append(gv)
                    elif isinstance(v, torch.Tensor) and v.is_floating_point():
                        prod = rec_of.get(name)
                        if (
                            lean
                            and prod is not None
                            and prod.chainable
                            and uses[name] == 1
                            and v.requires_grad
                            and not out_to
                            and not in_from
                            and op.kind not in _NO_CHAIN
                        ):
                            # the single consumer extends the producer's graph: the
                            # producer's output is kept only if this op's backward saves it
                            prod.out = None
                            xs.append(v)
                        else:
                            leaf = v.detach().requires_grad_(True)
                            leaves.append((name, leaf))
                            xs.append(leaf)
                    else:
                        xs.append(v)
            msgs = spec.send(op, ctx, xs) or {}
            if sorted(msgs) != out_to:
                raise RuntimeError(
                    f"node {k} layer {layer} ({op.name}): op sends to {sorted(msgs)}, the plan's "
                    f"traffic says {out_to}"
                )
            coded = spec.coded_messages
            wire = codec.name if coded else "fp32"
            direction = _direction(op, coded)
            for dest in out_to:
                if op.kind == "exchange" and self.gate_mode == "stochastic":
                    sel = ctx.selections[(op.name, dest)].to(torch.float32)
                    io_.send(io_.sel_sid, layer, dest, sel, Frame.NORMS)
                io_.send(io_.sid, layer, dest, msgs[dest], direction, codec=wire)
            received: dict[int, torch.Tensor] = {}
            full: dict[int, torch.Tensor] = {}
            recv_sel: dict[int, torch.Tensor] = {}
            for src in sorted(in_from):
                sel_idx: torch.Tensor | None = None
                if op.kind == "exchange":
                    sel_idx = recv_sel[src] = self._selection_from(io_, op, layer, src)
                f = io_.recv(io_.sid, layer, src, direction=direction, codec=wire)
                try:
                    t = decode_tensor(f.tensor, max_bytes=self.max_message_bytes)
                except WireError as e:
                    raise _PeerFailure(src, f"bad message at layer {layer} ({op.name}): {e}") from e
                _check_forward(program, op, layer, src, t, batch, sel_idx, ctx, xs)
                if op.kind != "input":
                    t.requires_grad_(True)
                    received[src] = t
                full[src] = t
            gathered: _Gathered | None = None
            if op.kind == "exchange" and lean and isinstance(xs[0], torch.Tensor):
                gathered = self._gathered(program, op, ctx, xs[0], full, recv_sel)
                out: Any = gathered
            else:
                if op.kind == "exchange":
                    full = self._assemble(program, op, xs[0], full, recv_sel)
                if built:  # store assembled inputs as references to their parts
                    with torch.autograd.graph.saved_tensors_hooks(_gather_pack(built), _unpack):
                        out = spec.compute(op, ctx, xs, full)
                    built.clear()  # the hooks live on with the graph: drop the tensors
                else:
                    out = spec.compute(op, ctx, xs, full)
            env[op.name] = out
            if op.kind == "input" and isinstance(out, torch.Tensor) and out.dim():
                batch = int(out.shape[0])
            sent = {
                d: _Sent(m.shape, m.dtype, get_gradient_edge(m) if m.requires_grad else None)
                for d, m in msgs.items()
            }
            rec = _OpRecord(layer, op, leaves, sent, received, None if gathered else out)
            rec.gathered = gathered
            rec.gather_leaves = gathers
            rec.chainable = (
                lean and op.kind not in ("input", "exchange") and not msgs and not received
            )
            rec_of[op.name] = rec
            if keep_xs:
                rec.xs = xs
                rec.full_received = full
            records.append(rec)
            if batch == 0 and keep_xs:
                break  # DP: an empty Poisson batch is a noise-only step, nothing to compute
            del xs, built, full, msgs
            if lean:
                for name in op.inputs:  # free what no later op reads
                    if last_use[name] == layer:
                        env.pop(name, None)
        return records

    def _gathered(
        self,
        program: Program,
        op: Op,
        ctx: _TrainContext,
        own: torch.Tensor,
        got: dict[int, torch.Tensor],
        sel: dict[int, torch.Tensor],
    ) -> _Gathered:
        """Lean exchange output: the spec's assembly of ``own`` and the received messages,
        deferred to its consumers."""
        info = program.infos[op.name]
        layout = info.layout
        assert layout is not None and info.cdim is not None
        spec = get_spec(op.kind)

        def build(o: torch.Tensor, r: dict[int, torch.Tensor]) -> torch.Tensor:
            y = spec.compute(op, ctx, [o], self._assemble(program, op, o, r, sel))
            assert isinstance(y, torch.Tensor)
            return y

        return _Gathered(
            own.detach(),
            {j: t.detach() for j, t in got.items()},
            build,
            info.cdim,
            [layout.count(j) for j in range(program.num_nodes)],
            self.index,
            sel,
            self.compact,
        )

    def _selection_from(self, io_: _StepIO, op: Op, layer: int, src: int) -> torch.Tensor:
        layout = self.plan.program.infos[op.name].layout
        assert layout is not None
        if self.gate_mode == "hard":
            return self.open_local(op.name, src, self.index)
        f = io_.recv(io_.sel_sid, layer, src, direction=Frame.NORMS, codec="fp32")
        try:
            v = decode_tensor(f.tensor, max_bytes=8 * layout.count(src) + 64)
        except WireError as e:
            raise _PeerFailure(src, f"bad channel selection at layer {layer}: {e}") from e
        c = layout.count(src)
        if (
            v.dim() != 1
            or v.numel() > c
            or not bool(torch.isfinite(v).all())
            or not bool((v == v.round()).all())
            or (v.numel() and (float(v.min()) < 0 or float(v.max()) >= c))
            or (v.numel() > 1 and not bool((v[1:] > v[:-1]).all()))
        ):
            raise _PeerFailure(
                src,
                f"bad channel selection at layer {layer} ({op.name}): expected increasing "
                f"channel indices in [0, {c})",
            )
        return v.to(torch.long)

    def _assemble(
        self,
        program: Program,
        op: Op,
        own: torch.Tensor,
        got: dict[int, torch.Tensor],
        sel: dict[int, torch.Tensor],
    ) -> dict[int, torch.Tensor]:
        """Scatter each received message into a zero tensor of the sender's whole slice
        (compact trainer: the messages as they are, see :meth:`NodeTrainer.open_sources`)."""
        if self.compact:
            return dict(got)
        info = program.infos[op.name]
        layout = info.layout
        cdim = info.cdim
        assert layout is not None and cdim is not None
        out: dict[int, torch.Tensor] = {}
        for j in range(program.num_nodes):
            if j == self.index:
                continue
            shape = list(own.shape)
            shape[cdim] = layout.count(j)
            base = torch.zeros(shape, dtype=own.dtype)
            if j in got:
                base = base.index_copy(cdim, sel[j], got[j])
            out[j] = base
        return out

    def _backward(
        self,
        ctx: _TrainContext,
        io_: _StepIO,
        records: list[_OpRecord],
        g_final: torch.Tensor | None,
    ) -> None:
        grads: dict[str, torch.Tensor] = {}
        if g_final is not None:
            grads[records[-1].op.name] = g_final
        keep = self.dp_state is not None
        for rec in reversed(records):
            op, layer = rec.op, rec.layer
            g = grads.pop(op.name, None)
            if keep:
                rec.grad_out = g
            gat = rec.gathered
            if gat is not None:  # lean exchange: its consumers' gradients, split per part
                if gat.g_own is not None and rec.leaves:
                    rec.leaves[0][1].grad = gat.g_own
                for src, leaf in rec.received.items():
                    leaf.grad = gat.g_recv.get(src)
                rec.gathered = gat.g_own = None
                gat.g_recv = {}
            elif g is not None and isinstance(rec.out, torch.Tensor) and rec.out.requires_grad:
                torch.autograd.backward(rec.out, g)
            for src, leaf in sorted(rec.received.items()):
                gr = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                io_.send(io_.sid, layer, src, gr, Frame.BACKWARD)
            if op.kind != "input":
                outs: list[GradientEdge] = []
                gouts: list[torch.Tensor] = []
                for dest, msg in sorted(rec.msgs.items()):
                    f = io_.recv(
                        io_.sid, layer, dest, direction=Frame.BACKWARD, codec="fp32", backward=True
                    )
                    try:
                        gm = decode_tensor(f.tensor, max_bytes=self.max_message_bytes)
                    except WireError as e:
                        raise _PeerFailure(dest, f"bad gradient at layer {layer}: {e}") from e
                    if gm.shape != msg.shape or gm.dtype != msg.dtype:
                        raise _PeerFailure(
                            dest,
                            f"gradient of shape {tuple(gm.shape)} at layer {layer} ({op.name}) "
                            f"for a message of shape {tuple(msg.shape)}",
                        )
                    if not bool(torch.isfinite(gm).all()):
                        raise _PeerFailure(dest, f"non-finite gradient at layer {layer}")
                    if msg.edge is not None:
                        outs.append(msg.edge)
                        gouts.append(gm)
                if outs:  # messages to several peers may share a graph (e.g. statistics)
                    torch.autograd.backward(outs, gouts)
            for name, leaf in rec.leaves:
                if leaf.grad is not None:
                    prev = grads.get(name)
                    grads[name] = leaf.grad if prev is None else prev + leaf.grad
            for v, lo, lr in rec.gather_leaves:
                v.add_grads(lo.grad, {j: t.grad for j, t in lr.items() if t.grad is not None})
            rec.gather_leaves = []
            if not keep:
                rec.msgs = {}
                rec.received = {}
                rec.out = None
                rec.leaves = []

    def _commit(self, io_: _StepIO, owner: int) -> None:
        one = torch.ones(1)
        peers = [j for j in range(self.plan.num_nodes) if j != self.index]
        if self.index == owner:
            for j in peers:
                io_.recv(io_.commit_sid, 0, j, direction=Frame.NORMS, codec="fp32")
            for j in peers:
                io_.send(io_.commit_sid, 1, j, one, Frame.NORMS)
        else:
            io_.send(io_.commit_sid, 0, owner, one, Frame.NORMS)
            io_.recv(io_.commit_sid, 1, owner, direction=Frame.NORMS, codec="fp32")

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This node's shard, optimizer state, steps done and plan hash."""
        out: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "node": self.index,
            "plan_hash": self.plan.hash,
            "steps_done": self.steps_done,
            "shard": self.full_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "compact": self.compact,  # the optimizer state's weights hold the kept columns
        }
        if self.dp_state is not None:
            out["dp"] = self.dp_state.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a disco_fl training checkpoint")
        if state.get("node") != self.index or state.get("plan_hash") != self.plan.hash:
            raise ValueError(
                f"checkpoint of node {state.get('node')} (plan {str(state.get('plan_hash'))[:12]})"
                f" does not belong to node {self.index} (plan {self.plan.hash[:12]})"
            )
        shard = dict(state["shard"])
        closed: dict[str, torch.Tensor] = {}
        if self.compact:  # the checkpoint is full width: split the compacted weights
            for name, cols in self._cols.items():
                key = f"ops.{name}.weight"
                w = shard.get(key)
                if not isinstance(w, torch.Tensor) or w.dim() < 2 or w.shape[1] != cols.full:
                    raise ValueError(f"checkpoint: {key} is not a full-width weight")
                shard[key] = w.index_select(1, cols.keep)
                closed[name] = w.index_select(1, cols.closed)
        self.shard.load_state_dict(shard)
        self._closed.update(closed)
        self.optimizer.load_state_dict(self._fit_optimizer_state(state["optimizer"]))
        self.steps_done = int(state["steps_done"])
        if self.dp_state is not None and "dp" in state:
            self.dp_state.load_state_dict(state["dp"])

    def _fit_optimizer_state(self, sd: Mapping[str, Any]) -> dict[str, Any]:
        """An optimizer state of a compact (full-width) trainer, for this full-width
        (compact) one: the state tensors of compactable weights cut to the kept columns, or
        widened with zeros."""
        sd = dict(sd)
        if not self._cols:
            return sd
        mine = {id(self._weight(name)): name for name in self._cols}
        saved = [i for g in sd.get("param_groups", []) for i in g["params"]]
        current = [p for g in self.optimizer.param_groups for p in g["params"]]
        states = dict(sd.get("state", {}))
        for i, p in zip(saved, current, strict=False):
            name = mine.get(id(p))
            if name is None or i not in states:
                continue
            cols = self._cols[name]
            fixed: dict[str, Any] = {}
            for key, v in states[i].items():
                if isinstance(v, torch.Tensor) and v.dim() == p.dim() and v.shape != p.shape:
                    if v.shape[1] == cols.full and p.shape[1] == cols.keep.numel():
                        v = v.index_select(1, cols.keep)
                    elif v.shape[1] == cols.keep.numel() and p.shape[1] == cols.full:
                        shape = list(v.shape)
                        shape[1] = cols.full
                        v = torch.zeros(shape, dtype=v.dtype).index_copy_(1, cols.keep, v)
                fixed[key] = v
            states[i] = fixed
        sd["state"] = states
        return sd

    def save_checkpoint(self, path: str | Path) -> None:
        """Write :meth:`state_dict` (tensors and plain data) with a sha256 checksum,
        atomically: a killed write leaves the previous checkpoint (:func:`save_torch`)."""
        save_torch(self.state_dict(), path)

    def load_checkpoint(self, path: str | Path) -> int:
        """Load a checkpoint written by :meth:`save_checkpoint`; return the next step.

        The checksum is verified (a corrupted or truncated file raises
        :class:`~disco_fl.files.ChecksumError` naming it) and only plain data is unpickled
        (``weights_only=True``). Temporary files of killed writes beside it are removed."""
        remove_stale_temps(Path(path).parent)
        try:
            state = load_torch(path)
        except ChecksumError as e:
            raise ChecksumError(f"cannot read training checkpoint {path}: {e}") from e
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read training checkpoint {path}: {e}") from e
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a training checkpoint")
        self.load_state_dict(state)
        return self.steps_done


@dataclass(frozen=True)
class _Columns:
    """Columns of one mixing op's full-width weight (positions in the gathered order)."""

    keep: torch.Tensor  # the open ones, in the compact order
    closed: torch.Tensor
    full: int


def _swap_param(
    optimizer: torch.optim.Optimizer,
    old: torch.nn.Parameter,
    new: torch.nn.Parameter,
    convert: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Replace ``old`` by ``new`` in ``optimizer``'s groups (in place: some optimizers alias
    the lists) and its state (tensors of ``old``'s shape through ``convert``)."""
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            if p is old:
                params[i] = new
    st = optimizer.state.pop(old, None)
    if st is not None:
        optimizer.state[new] = {
            k: convert(v) if isinstance(v, torch.Tensor) and v.shape == old.shape else v
            for k, v in st.items()
        }


class _PackedGather:
    """A saved assembled input, kept as its parts (see :class:`_Gathered`)."""

    def __init__(self, v: _Gathered) -> None:
        self.v = v


def _gather_pack(built: list[tuple[torch.Tensor, _Gathered]]) -> Callable[[torch.Tensor], Any]:
    """Saved-tensor pack hook storing an assembled input (``built``) by reference to its
    parts; :func:`_unpack` rebuilds it, identical, when the backward needs it. ``built`` is
    cleared by the caller after the op (the hook stays referenced by the graph)."""

    def pack(t: torch.Tensor) -> Any:
        for gv, v in built:
            if (
                t.data_ptr() == gv.data_ptr()
                and t.shape == gv.shape
                and t.stride() == gv.stride()
                and t.dtype == gv.dtype
            ):
                return _PackedGather(v)
        return t

    return pack


def _unpack(p: Any) -> torch.Tensor:
    return p.v.materialize() if isinstance(p, _PackedGather) else p  # type: ignore[no-any-return]


def _direction(op: Op, coded: bool) -> int:
    if op.kind == "input":
        return Frame.INPUT
    if op.kind == "output":
        return Frame.OUTPUT
    return Frame.FORWARD if coded else Frame.NORMS


def _check_forward(
    program: Program,
    op: Op,
    layer: int,
    src: int,
    t: torch.Tensor,
    batch: int | None,
    sel: torch.Tensor | None,
    ctx: _TrainContext,
    xs: Sequence[Any],
) -> None:
    """A received forward message must have the shape the plan implies."""
    where = f"layer {layer} ({op.name}, {op.kind})"
    info = program.infos[op.name]
    if t.dtype != torch.float32:
        raise _PeerFailure(src, f"{where}: message of type {t.dtype}, expected float32")
    if not bool(torch.isfinite(t).all()):
        raise _PeerFailure(src, f"{where}: non-finite values")
    if op.kind == "input":
        if t.dim() != len(info.shape) or tuple(t.shape[1:]) != tuple(info.shape[1:]):
            raise _PeerFailure(src, f"{where}: input of shape {tuple(t.shape)}, plan {info.shape}")
        return
    if batch is None or t.dim() == 0 or t.shape[0] != batch:
        raise _PeerFailure(src, f"{where}: message of shape {tuple(t.shape)} for batch {batch}")
    expected: list[int] | None = None
    if op.kind == "exchange" and sel is not None and isinstance(xs[0], torch.Tensor):
        cdim = info.cdim
        assert cdim is not None
        expected = list(xs[0].shape)
        expected[cdim] = int(sel.numel())
    elif op.kind == "output":
        src_info = program.infos[op.inputs[0]]
        if src_info.layout is not None and src_info.cdim is not None and xs:
            expected = list(xs[0].shape)
            expected[src_info.cdim] = src_info.layout.count(src)
    if expected is not None and list(t.shape) != expected:
        raise _PeerFailure(src, f"{where}: message of shape {tuple(t.shape)}, expected {expected}")


class _StepIO:
    """Frames of one step: sending, receiving with abort polling, abort broadcast."""

    def __init__(self, trainer: NodeTrainer, sid: str, step: int, deadline: float) -> None:
        self.t = trainer
        self.k = trainer.index
        self.n = trainer.plan.num_nodes
        self.sid = sid
        self.sel_sid = sid + "/sel"
        self.norms_sid = sid + "/norms"
        self.commit_sid = sid + "/commit"
        self.abort_sid = sid + "/abort"
        self.step = step
        self.deadline = deadline
        self.abort_sent = False

    def send(
        self,
        session: str,
        layer: int,
        dest: int,
        t: torch.Tensor,
        direction: int,
        *,
        codec: str = "fp32",
    ) -> None:
        frame = Frame(
            session_id=session,
            step=self.step,
            layer=layer,
            direction=direction,  # type: ignore[arg-type]
            src=self.k,
            dst=dest,
        )
        encode_tensor(t.detach(), codec, out=frame.tensor)
        try:
            self.t.transport.send(frame)
        except Exception as e:
            if self.t.transport.closed:  # this node's own transport is gone
                raise
            raise _PeerFailure(
                dest, f"cannot send to node {dest} (layer {layer}): {type(e).__name__}: {e}"
            ) from e

    def recv(
        self,
        session: str,
        layer: int,
        src: int,
        *,
        direction: int,
        codec: str,
        backward: bool = False,
    ) -> peer_pb2.Frame:
        tr = self.t.transport
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                why = (
                    f"TimeoutError: no {'gradient' if backward else 'message'} from node {src} "
                    f"for layer {layer} within the step deadline of {self.t.timeout:g} s"
                )
                # tell the peers at once, then listen a little: ``src`` may itself be waiting
                # for the node that really failed, and its abort names that node
                self.broadcast_abort(src, why)
                end = time.monotonic() + ABORT_GRACE_S
                while time.monotonic() < end:
                    self.check_abort(ignore_root=self.k)
                    time.sleep(POLL_S)
                raise _PeerFailure(src, why)
            try:
                f = tr.recv(
                    session, layer, src, min(POLL_S, left), step=self.step, backward=backward
                )
            except TimeoutError:
                self.check_abort()
                continue
            except PeerDownError as e:
                raise _PeerFailure(src, f"node {src} is unreachable: {e}") from e
            if f.error:
                raise _PeerFailure(src, f.error)
            if f.direction != direction or f.tensor.codec != CODECS[codec]:
                raise _PeerFailure(
                    src,
                    f"layer {layer}: frame direction {f.direction} / codec {f.tensor.codec}, "
                    f"expected {direction} / {CODECS[codec]}",
                )
            return f

    def check_abort(self, ignore_root: int | None = None) -> None:
        """Raise :class:`_PeerFailure` if a peer's abort frame arrived (except one naming
        ``ignore_root`` as the failed node)."""
        for j in range(self.n):
            if j == self.k:
                continue
            try:
                f = self.t.transport.recv(self.abort_sid, 0, j, 0.0, step=self.step)
            except TimeoutError:
                continue
            except PeerDownError as e:
                raise _PeerFailure(j, f"node {j} is unreachable: {e}") from e
            m = _ABORT_RE.fullmatch(f.error)
            root = j
            cause = f.error or f"node {j} aborted the step"
            if m is not None and 0 <= int(m.group(1)) < self.n:
                root, cause = int(m.group(1)), m.group(2)
            if root != ignore_root:
                raise _PeerFailure(root, cause)

    def broadcast_abort(self, root: int, cause: str) -> None:
        """Tell every peer (best effort, once) that the step failed, starting at ``root``."""
        if self.abort_sent:
            return
        self.abort_sent = True
        text = f"[failed node {root}] {cause}"[:MAX_ERROR_TEXT]
        for j in range(self.n):
            if j == self.k:
                continue
            frame = Frame(
                session_id=self.abort_sid,
                step=self.step,
                layer=0,
                direction=Frame.NORMS,
                src=self.k,
                dst=j,
                error=text,
            )
            # best effort: the peer may be gone or this transport closed
            with contextlib.suppress(Exception):
                self.t.transport.send(frame)

    def end(self) -> None:
        for s in (self.sid, self.sel_sid, self.norms_sid, self.commit_sid, self.abort_sid):
            with contextlib.suppress(Exception):  # a closed transport has nothing to drop
                self.t.transport.end_session(s)


def plan_of(pm: Any, codec: str = "fp32") -> Plan:
    """The :class:`~disco_fl.plan.Plan` (program, hard masks, codec) of a partitioned model,
    without shard manifests: what the nodes of a household agree on before training."""
    masks = {
        e.name: {
            f"{j}->{k}": pm.open_channels(e.name, j, k)
            for j in range(pm.num_nodes)
            for k in range(pm.num_nodes)
            if j != k
        }
        for e in pm.program.exchanges
    }
    return Plan(pm.program, masks, codec)


def _batch_size(records: Sequence[_OpRecord]) -> int:
    for rec in records:
        if rec.op.kind == "input" and isinstance(rec.out, torch.Tensor) and rec.out.dim():
            return int(rec.out.shape[0])
    raise RuntimeError("the step has no batched input")
