"""The forward and backward passes of one training step on one node, op by op.

The forward runs the program with the one driver of inference and the emulation
(:func:`disco_fl.node.drive`) but with autograd (:class:`TrainExecutor`), sending and receiving each
op's messages through the step's :class:`~disco_fl.runtime.training.commit.StepIO`; it returns one
:class:`OpRecord` per op (what the backward needs of it). The backward walks the records in reverse,
sends the gradients of received messages back to their senders and receives those of its own
messages (see :mod:`disco_fl.runtime.training.step` for the protocol and the memory rules).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from disco_fl.core.gates import PairGates, gate_generator, sample_hard_concrete
from disco_fl.core.wire import WireError, decode_tensor
from disco_fl.node import (
    MISSING,
    Executor,
    MessageError,
    Recv,
    Send,
    Step,
    drive,
    input_batch,
    message_problem,
    schedule,
)
from disco_fl.node.shard import NodeShard, OpState
from disco_fl.partition import Op, Program, Traffic, full_open_count, get_spec, plan_open_count
from disco_fl.partition.plan import Plan
from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.training.autograd import (
    NO_CHAIN,
    Gathered,
    GatherFn,
    Sent,
    gather_pack,
    unpack,
)
from disco_fl.runtime.training.commit import StepIO
from disco_fl.runtime.training.errors import PeerFailure
from disco_fl.runtime.training.trace import OpTrace, StepTrace


class NodeTrainer(Protocol):
    """What the passes read of the node's trainer
    (:class:`~disco_fl.runtime.training.NodeTrainer`)."""

    index: int
    plan: Plan
    shard: NodeShard
    gate_seed: int
    layer_of: dict[str, int]
    max_message_bytes: int

    @property
    def gate_mode(self) -> str: ...

    @property
    def dp_state(self) -> object | None: ...  # DP on: every op keeps its inputs

    @property
    def compact(self) -> bool: ...

    def open_local(self, exchange: str, src: int, dst: int) -> torch.Tensor: ...

    def open_sources(self, exchange: str) -> list[int]: ...


Frame = peer_pb2.Frame
_NONE = torch.zeros(0, dtype=torch.long)  # no channel selected


class TrainContext:
    """:class:`~disco_fl.partition.registry.NodeContext` of one node during one step."""

    def __init__(self, trainer: NodeTrainer, program: Program, step: int) -> None:
        self.t = trainer
        self.dropped: frozenset[int] = frozenset()  # node dropout: nodes sitting the step out
        self.index = trainer.index
        self.num_nodes = program.num_nodes
        self.program = program
        self.training = True
        self.step = step
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}  # per-step copies
        self.selections: dict[tuple[str, int], torch.Tensor] = {}  # (exchange, dest) -> idx
        self._peers = [j for j in range(program.num_nodes) if j != trainer.index]

    def state(self, op: Op) -> Mapping[str, torch.Tensor]:
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

    def shared_generator(self, op: Op) -> torch.Generator:
        """Stochastic depth: every node (and the emulation, with ``pm.gate_seed`` = the
        trainer's ``gate_seed`` and ``pm.gate_step`` = the step) derives the same generator,
        so every node drops the same samples."""
        return gate_generator(self.t.gate_seed, self.step, self.t.layer_of[op.name], -1, -1)

    def sources(self, op: Op) -> list[int]:
        if self.t.compact:  # assemble [own, open channels of each peer] (the compact columns)
            return self.t.open_sources(op.name)
        return self._peers


@dataclass
class OpRecord:
    """What the backward (and DP) needs of one op of the forward."""

    layer: int
    op: Op
    leaves: list[tuple[str, torch.Tensor]]  # (value name, input leaf)
    msgs: dict[int, Sent]  # dest -> message sent (its graph to the inputs / gates)
    received: dict[int, torch.Tensor]  # src -> received leaf (needs a gradient back)
    out: Any
    xs: list[Any] = field(default_factory=list)  # DP: the op's inputs
    full_received: dict[int, torch.Tensor] = field(default_factory=dict)  # DP
    grad_out: torch.Tensor | None = None  # DP: the op's output gradient
    # lean mode: an exchange's assembled value (built lazily by its consumers)
    gathered: Gathered | None = None
    # lean mode: per gathered input, (value, leaf of own channels, leaves of received ones)
    gather_leaves: list[tuple[Gathered, torch.Tensor, dict[int, torch.Tensor]]] = field(
        default_factory=list
    )
    chainable: bool = False  # lean mode: a consumer may extend this op's graph


class TrainExecutor(Executor):
    """The driver's executor of a training forward pass (:func:`forward`).

    Makes each op's tensor inputs autograd leaves (so the backward pass can run op by op
    and send the gradients of received messages back), defers a lean exchange's assembly to
    its consumers (:class:`~disco_fl.runtime.training.autograd.Gathered`), and keeps one
    :class:`OpRecord` per op in ``records``. With DP every op keeps its inputs and its own
    graph (per-sample gradients) and nothing is freed early.
    """

    strict = True

    def __init__(self, tr: NodeTrainer, ctx: TrainContext) -> None:
        super().__init__(ctx.program, ctx)
        self.tr = tr
        self.tctx = ctx
        self.keep_xs = tr.dp_state is not None
        self.lean = not self.keep_xs  # DP needs every op's inputs and its own graph
        self.free_values = self.lean
        self.uses: dict[str, int] = {}
        for op in ctx.program.ops:
            for name in op.inputs:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.records: list[OpRecord] = []
        self.rec_of: dict[str, OpRecord] = {}
        self.batch: int | None = None
        # the op being run: its leaves, gathered inputs, received selections, assembled inputs
        self.leaves: list[tuple[str, torch.Tensor]] = []
        self.gathers: list[tuple[Gathered, torch.Tensor, dict[int, torch.Tensor]]] = []
        self.built: list[tuple[torch.Tensor, Gathered]] = []
        self.recv_sel: dict[int, torch.Tensor] = {}
        self.full: dict[int, torch.Tensor] = {}
        self.gathered: Gathered | None = None

    def inputs(self, step: Step, env: dict[str, Any], x: Any) -> list[Any]:
        op = step.op
        self.leaves, self.gathers, self.built, self.recv_sel = [], [], [], {}
        if step.is_input:
            owner = step.node == self.program.requester
            return [x.detach() if owner and x is not None else None]
        xs: list[Any] = []
        for name in op.inputs:
            v = env[name]
            if isinstance(v, Gathered):
                lo = v.own.detach().requires_grad_(True)
                lr = {j: r.detach().requires_grad_(True) for j, r in v.recv.items()}
                gv = GatherFn.apply(v, lo, *(lr[j] for j in v.srcs))
                self.gathers.append((v, lo, lr))
                self.built.append((gv, v))
                xs.append(gv)
            elif isinstance(v, torch.Tensor) and v.is_floating_point():
                prod = self.rec_of.get(name)
                if (
                    self.lean
                    and prod is not None
                    and prod.chainable
                    and self.uses[name] == 1
                    and v.requires_grad
                    and not step.out_to
                    and not step.in_from
                    and op.kind not in NO_CHAIN
                ):
                    # the single consumer extends the producer's graph: the producer's
                    # output is kept only if this op's backward saves it
                    prod.out = None
                    xs.append(v)
                else:
                    leaf = v.detach().requires_grad_(True)
                    self.leaves.append((name, leaf))
                    xs.append(leaf)
            else:
                xs.append(v)
        return xs

    def channels(self, step: Step, src: int, traffic: Traffic) -> int:
        if step.op.kind == "exchange":  # the selection says (stochastic gates send any)
            return int(self.recv_sel[src].numel())
        return super().channels(step, src, traffic)

    def compute(self, step: Step, xs: list[Any], received: dict[int, torch.Tensor]) -> Any:
        op, spec, tr, ctx = step.op, step.spec, self.tr, self.tctx
        if not step.is_input:
            for t in received.values():
                t.requires_grad_(True)
        full = dict(received)
        self.gathered = None
        if op.kind == "exchange" and self.lean and isinstance(xs[0], torch.Tensor):
            self.gathered = _gathered(tr, self.program, op, ctx, xs[0], full, self.recv_sel)
            out: Any = self.gathered
        else:
            if op.kind == "exchange":
                full = _assemble(tr, self.program, op, xs[0], full, self.recv_sel)
            if self.built:  # store assembled inputs as references to their parts
                with torch.autograd.graph.saved_tensors_hooks(gather_pack(self.built), unpack):
                    out = spec.compute(op, ctx, xs, full)
                self.built.clear()  # the hooks live on with the graph: drop the tensors
            else:
                out = spec.compute(op, ctx, xs, full)
        self.full = full
        return out

    def done(
        self,
        step: Step,
        xs: list[Any],
        msgs: dict[int, torch.Tensor],
        received: dict[int, torch.Tensor],
        value: Any,
    ) -> bool:
        op, gathered = step.op, self.gathered
        if (b := input_batch(op, value)) is not None:
            self.batch = b
        gone = self.tctx.dropped  # node dropout: no gradient goes to or comes from them
        sent = {
            d: Sent(m.shape, m.dtype, get_gradient_edge(m) if m.requires_grad else None)
            for d, m in msgs.items()
            if d not in gone
        }
        kept = {s: t for s, t in received.items() if s not in gone and not step.is_input}
        rec = OpRecord(step.layer, op, self.leaves, sent, kept, None if gathered else value)
        rec.gathered = gathered
        rec.gather_leaves = self.gathers
        rec.chainable = self.lean and op.kind not in ("input", "exchange") and not msgs and not kept
        self.rec_of[op.name] = rec
        if self.keep_xs:
            rec.xs = xs
            rec.full_received = self.full
        self.records.append(rec)
        self.full, self.gathered = {}, None
        return self.batch == 0 and self.keep_xs  # DP: an empty Poisson batch is noise only


def forward(
    tr: NodeTrainer, ctx: TrainContext, io_: StepIO, x: torch.Tensor | None
) -> list[OpRecord]:
    """Run the program's ops on this node with the one driver (:func:`~disco_fl.node.drive`),
    exchanging their messages through ``io_``; one record per op."""
    program = ctx.program
    steps = schedule(program, tr.index, _open_count(tr, program), tr.plan.codec)
    ex = TrainExecutor(tr, ctx)
    stochastic = tr.gate_mode == "stochastic"
    run = drive(steps, ex, x, turn_after=None)
    try:
        event = next(run)
        while True:
            if isinstance(event, Send) and event.dest not in ctx.dropped:
                st, dest = event.step, event.dest
                if st.op.kind == "exchange" and stochastic:
                    io_.send_selection(st.layer, dest, ctx.selections[(st.op.name, dest)])
                io_.send(st.layer, dest, event.tensor, st.direction, codec=st.wire_codec)
                event = next(run)
            elif isinstance(event, Recv) and event.src in ctx.dropped:  # see .dropout
                st, src = event.step, event.src
                hard = tr.gate_mode == "hard" and st.op.kind == "exchange"
                ex.recv_sel[src] = tr.open_local(st.op.name, src, tr.index) if hard else _NONE
                event = run.send(MISSING)  # the driver substitutes (degraded mode's zeros)
            elif isinstance(event, Recv):
                st, src = event.step, event.src
                if st.op.kind == "exchange":
                    ex.recv_sel[src] = _selection_from(tr, io_, st.op, st.layer, src)
                f = io_.recv(st.layer, src, direction=st.direction, codec=st.wire_codec)
                try:
                    t = decode_tensor(f.tensor, max_bytes=tr.max_message_bytes)
                except WireError as e:
                    raise PeerFailure(
                        src, f"bad message at layer {st.layer} ({st.op.name}): {e}"
                    ) from e
                try:
                    event = run.send(t)
                except MessageError as e:
                    raise PeerFailure(e.src, str(e)) from None
            else:  # FLUSH, TURN, a Send to a dropped node (nothing goes to it)
                event = next(run)
    except StopIteration:
        pass
    finally:
        run.close()
    return ex.records


def _open_count(tr: NodeTrainer, program: Program) -> Callable[[str, int, int], int]:
    """Channels sent per exchange and pair: stochastic gates may send any channel of the
    slice (the selection frame says which), hard masks the plan's open ones."""
    if tr.gate_mode == "stochastic":
        return full_open_count(program)
    return plan_open_count(tr.plan)


def trace_of(ctx: TrainContext, records: Sequence[OpRecord]) -> StepTrace:
    """The public per-op trace of a step whose records kept their inputs (DP)."""
    ops = [OpTrace(r.op, r.xs, r.full_received, r.grad_out) for r in records]
    return StepTrace(ctx.step, batch_size(records), ctx, ctx.buffers, ops)


def _gathered(
    tr: NodeTrainer,
    program: Program,
    op: Op,
    ctx: TrainContext,
    own: torch.Tensor,
    got: dict[int, torch.Tensor],
    sel: dict[int, torch.Tensor],
) -> Gathered:
    """Lean exchange output: the spec's assembly of ``own`` and the received messages,
    deferred to its consumers."""
    info = program.infos[op.name]
    layout = info.layout
    assert layout is not None and info.cdim is not None
    spec = get_spec(op.kind)

    def build(o: torch.Tensor, r: dict[int, torch.Tensor]) -> torch.Tensor:
        y = spec.compute(op, ctx, [o], _assemble(tr, program, op, o, r, sel))
        assert isinstance(y, torch.Tensor)
        return y

    return Gathered(
        own.detach(),
        {j: t.detach() for j, t in got.items()},
        build,
        info.cdim,
        [layout.count(j) for j in range(program.num_nodes)],
        tr.index,
        sel,
        tr.compact,
    )


def _selection_from(tr: NodeTrainer, io_: StepIO, op: Op, layer: int, src: int) -> torch.Tensor:
    layout = tr.plan.program.infos[op.name].layout
    assert layout is not None
    if tr.gate_mode == "hard":
        return tr.open_local(op.name, src, tr.index)
    # typed indices, strictly increasing, each below the sender's slice width (else refused)
    return io_.recv_selection(layer, src, layout.count(src))


def _assemble(
    tr: NodeTrainer,
    program: Program,
    op: Op,
    own: torch.Tensor,
    got: dict[int, torch.Tensor],
    sel: dict[int, torch.Tensor],
) -> dict[int, torch.Tensor]:
    """Scatter each received message into a zero tensor of the sender's whole slice
    (compact trainer: the messages as they are, see :meth:`NodeTrainer.open_sources`)."""
    if tr.compact:
        return dict(got)
    info = program.infos[op.name]
    layout = info.layout
    cdim = info.cdim
    assert layout is not None and cdim is not None
    out: dict[int, torch.Tensor] = {}
    for j in range(program.num_nodes):
        if j == tr.index:
            continue
        shape = list(own.shape)
        shape[cdim] = layout.count(j)
        base = torch.zeros(shape, dtype=own.dtype)
        if j in got:
            base = base.index_copy(cdim, sel[j], got[j])
        out[j] = base
    return out


def backward(
    tr: NodeTrainer,
    ctx: TrainContext,
    io_: StepIO,
    records: list[OpRecord],
    g_final: torch.Tensor | None,
) -> None:
    grads: dict[str, torch.Tensor] = {}
    if g_final is not None:
        grads[records[-1].op.name] = g_final
    keep = tr.dp_state is not None
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
            io_.send(layer, src, gr, Frame.BACKWARD)
        if op.kind != "input":
            outs: list[GradientEdge] = []
            gouts: list[torch.Tensor] = []
            for dest, msg in sorted(rec.msgs.items()):
                f = io_.recv(layer, dest, direction=Frame.BACKWARD, backward=True)
                try:
                    gm = decode_tensor(f.tensor, max_bytes=tr.max_message_bytes)
                except WireError as e:
                    raise PeerFailure(dest, f"bad gradient at layer {layer}: {e}") from e
                # the one message check: the gradient of a message has the message's shape
                problem = message_problem(
                    ctx.program,
                    op,
                    gm,
                    msg.shape[0] if msg.shape else None,
                    expected=list(msg.shape),
                    strict=True,
                )
                if problem:
                    raise PeerFailure(dest, f"gradient at layer {layer} ({op.name}): {problem}")
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


def batch_size(records: Sequence[OpRecord]) -> int:
    for rec in records:
        b = input_batch(rec.op, rec.out)
        if b is not None:
            return b
    raise RuntimeError("the step has no batched input")
