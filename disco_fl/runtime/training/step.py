"""The distributed training step: one node of a household trains its shard over a transport.

:class:`NodeTrainer` holds what node ``k`` owns (its :class:`~disco_fl.emulation.model.NodeShard`:
weights, buffers and gate logits; its optimizer and optimizer state) and runs training steps
with its peers. It calls the same ``spec.send`` / ``spec.compute`` as the emulation and the
inference runtime: there is one implementation of a node's math.

Protocol of one step ``t`` (session ``<run>/g<generation>/s<t>``; ``layer`` = the op's index in the
program; the parts of a step are typed sub-channels of its session, and its control messages typed
``disco.v1.Control`` bodies, see :mod:`disco_fl.runtime.training.commit`). The forward and backward
passes are in :mod:`disco_fl.runtime.training.passes`:

1. **Forward**, op by op as in inference, but with autograd: the op's inputs are detached
   leaves and every received message is a leaf, so each op is its own small graph. Exchanged
   activations use the plan's codec (default fp32); normalization statistics are fp32. In
   ``"hard"`` gate mode only the channels open in the plan's masks are sent; in
   ``"stochastic"`` mode only the channels whose hard-concrete sample is non-zero, preceded by
   a *selection* frame (sub-channel SELECTION: a ``ChannelSelection`` of the sender's local
   channel indices, refused unless strictly increasing and within the sender's slice) so the
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
4. Optional differential privacy (:mod:`disco_fl.runtime.training.dp`): per-sample norms are summed
   across the household (sub-channel NORMS), each node clips and noises its own
   coordinates. An empty (Poisson) batch is a noise-only step: the forward stops after the
   input layer (whose frame tells every node), no backward, no norms, noise only.
5. **Commit** (sub-channel COMMIT): every node sends a ``Vote`` to the owner (layer 0); the
   owner, holding every vote, answers every node (layer 1). Only then does a node apply its
   optimizer and write back its BatchNorm running statistics (kept in per-step copies until
   then). Any error (its own, a peer's error frame, an unreachable peer, a timeout) aborts
   the step: the node sends an ``Abort`` (the failed node as a typed field, and the cause) to
   every peer (sub-channel ABORT; a waiting node is woken by it at once, no polling), drops
   its gradients, leaves its shard and optimizer state
   unchanged and raises :class:`StepAborted` naming the failed node. The owner commits only
   after all votes, so a step fails everywhere unless the owner itself dies between its
   answers (then the household resumes from the last checkpoint, see
   :meth:`NodeTrainer.save_checkpoint`).

**Batch owner schedule**: ``owners`` (default: the plan's requester) lists the nodes that
hold training data, ascending; step ``t`` is owned by ``owners[t % len(owners)]`` (round
robin), known to every node from the configuration. The owner feeds the input and computes
the loss; everything else is symmetric.

**Gate noise** (stochastic mode): the sender draws its samples with
:func:`~disco_fl.core.gates.gate_generator` ``(gate_seed, step, layer, src, dst)``, exactly as the
emulation does with ``pm.gate_seed`` / ``pm.gate_step`` set.

**Memory** (without DP): a node keeps only what its backward needs (lean autograd, with the math and
the order of every sum of the per-op graphs: :mod:`disco_fl.runtime.training.autograd`); with hard
masks, ``compact=True`` trains open columns only (:mod:`disco_fl.runtime.training.compact`).
Checkpoints: :mod:`disco_fl.runtime.training.checkpoint`.

**Node dropout** (``node_dropout``): each node but the step's owner sits a step out at random, the
set drawn on every node from ``gate_seed`` and the step (:meth:`NodeTrainer.dropped`); it sends and
receives nothing and its peers put zeros for its channels, as in degraded inference (the decisions:
:mod:`disco_fl.runtime.training.dropout`).

**Communication** is counted from the transport's payload counters (``data`` + ``scales`` of every
tensor sent, the serialized ``Control`` body of every control frame: a vote is 4 bytes) and reported
per step as forward, backward and control (commit, DP norms) bytes;
:func:`~disco_fl.runtime.training.predict_step_bytes` gives the forward and backward figures from
the masks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from disco_fl.core.gates import PairGates, dropped_nodes
from disco_fl.core.wire import DEFAULT_MAX_MESSAGE_BYTES
from disco_fl.emulation.budget import distill_loss
from disco_fl.node.shard import NodeShard
from disco_fl.partition.plan import Plan
from disco_fl.runtime.training.accounting import gate_penalty
from disco_fl.runtime.training.checkpoint import (
    check_checkpoint,
    checkpoint_state,
    read_checkpoint,
    write_checkpoint,
)
from disco_fl.runtime.training.commit import StepIO, commit
from disco_fl.runtime.training.compact import Columns, CompactWeights
from disco_fl.runtime.training.dp import DPConfig, DPState, DPStepInfo
from disco_fl.runtime.training.dropout import dropout_rate
from disco_fl.runtime.training.errors import PeerFailure, StepAborted
from disco_fl.runtime.training.passes import TrainContext, backward, batch_size, forward, trace_of
from disco_fl.runtime.transport.base import Transport

TrainGateMode = Literal["hard", "stochastic"]


@dataclass
class StepResult:
    """What one node reports for one committed step.

    ``loss`` is set on the batch owner only. Bytes are payload bytes this node sent.
    ``dropped``: the nodes that sat the step out (node dropout).
    """

    step: int
    owner: int
    loss: float | None
    forward_bytes: int
    backward_bytes: int
    control_bytes: int
    seconds: float
    dp: DPStepInfo | None = None
    dropped: frozenset[int] = frozenset()

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes + self.control_bytes


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
        gates trained jointly (noise from :func:`~disco_fl.core.gates.gate_generator`).
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
        Differential privacy (:mod:`disco_fl.runtime.training.dp`); default off.
    max_message_bytes : int
        Bound on one received payload; default 1 GiB.
    compact : bool
        Hard gate mode only; default False. Train only the weight columns of open channels: in hard
        mode a mixing op's columns that read channels closed towards this node get exactly zero
        gradient and never change, yet (full width) they cost a weight, a gradient and the
        optimizer's state. With ``compact=True`` the trainer replaces, in ``shard`` itself, every
        such weight by a parameter of the open columns only (the columns
        :func:`~disco_fl.emulation.export.compact_columns` keeps, in that order) and keeps the
        closed columns aside, unchanged; ``optimizer``'s parameter groups are re-pointed in place to
        the compact parameters (its state, if any, cut to the kept columns). Each node then
        assembles ``[own channels, open channels received]`` only (no zero-padded columns, smaller
        activations). ``shard`` stays compact while the trainer holds it: read the full-width
        tensors with :meth:`full_state_dict` (closed columns bit-identical to the start), or put
        them back with :meth:`expand`. Checkpoints hold the full-width shard either way. Every
        committed step equals the full-width one up to float rounding (the dropped columns only
        added zeros), except with weight decay, which would shrink the closed columns of the
        full-width shard (they do not affect the model: export drops them).
    loss_fn : callable ``(outputs, targets) -> scalar tensor``, optional
        The batch owner's loss (targets of any shape with the batch first); default
        cross-entropy with integer labels (distillation when teacher logits are given).
    node_dropout : float
        In ``[0, 1)``; default 0 (off). Each node but the step's owner sits a step out with this
        probability (:meth:`dropped`; :mod:`disco_fl.runtime.training.dropout`). Not with ``dp``.
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
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        node_dropout: float = 0.0,
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
        self.node_dropout = dropout_rate(node_dropout, program, dp=dp is not None)
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
        self.loss_fn = loss_fn
        self.layer_of = {op.name: i for i, op in enumerate(program.ops)}
        self._open: dict[tuple[str, int, int], torch.Tensor] = {}
        self._sources: dict[str, list[int]] = {}
        self._check_masks()
        # compactable weights: kept / closed columns; the closed ones aside while compact
        self.weights = CompactWeights(shard, plan, optimizer)
        if compact:
            self.weights.compact()
        self.dp_state: DPState | None = None
        if dp is not None:
            self.dp_state = DPState(dp, self)
        self.steps_done = 0
        # advanced on every abort (on every node alike): sessions are "<run>/g<gen>/s<step>"
        self.generation = 0
        self.history: list[StepResult] = []
        self.missing: frozenset[int] = frozenset()  # gone for the round (.degraded)

    # ---- plan ---------------------------------------------------------------------------
    def open_local(self, exchange: str, src: int, dst: int) -> torch.Tensor:
        """Local indices (in ``src``'s slice) of the channels ``src`` sends ``dst`` (hard)."""
        key = (exchange, src, dst)
        if key not in self._open:
            local = self.plan.open_local(exchange, src, dst)
            self._open[key] = torch.tensor(local, dtype=torch.long)
        return self._open[key]

    def open_sources(self, exchange: str) -> list[int]:
        """Peers that send this node at least one channel of ``exchange`` (hard), ascending."""
        if exchange not in self._sources:
            self._sources[exchange] = self.plan.open_sources(exchange, self.index)
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

    # ---- compact weights (hard gates, see :mod:`disco_fl.runtime.training.compact`)
    # ----------------
    @property
    def compact(self) -> bool:
        """Whether the shard holds compact weights now (see ``compact`` above)."""
        return self.weights.active

    @property
    def _cols(self) -> dict[str, Columns]:
        return self.weights.cols

    def expand(self) -> NodeShard:
        """Leave compact mode: put full-width weights back into the shard (closed columns as
        they were, trained columns as trained) and re-point the optimizer to them (its state
        of the closed columns zero, as a full-width run has it); return the shard."""
        self.weights.expand()
        return self.shard

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The shard's ``state_dict`` at full width (copies), whether compact or not: what
        :func:`~disco_fl.fl.federated.shard_arrays` sends, the strategy averages and export
        reads."""
        return self.weights.full_state_dict()

    def param_numel(self) -> int:
        """Elements of the parameters this node trains (compact: open columns only)."""
        return sum(p.numel() for p in self.shard.parameters())

    def owner_of(self, step: int) -> int:
        """The batch owner of ``step``: ``owners[step % len(owners)]``."""
        return self.owners[step % len(self.owners)]

    def dropped(self, step: int) -> frozenset[int]:
        """The nodes that sit ``step`` out (node dropout), the same on every node (see
        :func:`~disco_fl.core.gates.dropped_nodes`; ``gate_seed`` is the seed)."""
        n, owner = self.plan.program.num_nodes, self.owner_of(step)
        return dropped_nodes(self.gate_seed, step, n, self.node_dropout, keep=owner)

    # ---- the step -----------------------------------------------------------------------
    def _batch_problem(self, step: int, x: Any, y: Any) -> str | None:
        """Why the owner's ``x`` / ``y`` cannot make step ``step``, or ``None``."""
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            return f"node {self.index} owns step {step}: it needs x and y"
        if y.dim() == 0 or y.shape[0] != x.shape[0]:  # per sample, or per pixel (B, H, W)
            return f"labels of shape {tuple(y.shape)} for a batch of {x.shape[0]}"
        if x.dim() and x.shape[0] == 0 and self.dp_state is None:
            return "an empty batch is a step only with DP (a noise-only step)"
        return None

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

        ``x`` and ``y`` (input batch and integer labels: one per sample, or one per position
        for dense outputs, e.g. ``(B, H, W)`` for segmentation) are needed on the step's owner
        (:meth:`owner_of`) and ignored elsewhere. Raises :class:`StepAborted` (nothing
        applied) when the step fails on any node.
        """
        owner = self.owner_of(step)
        program = dataclasses.replace(self.plan.program, requester=owner)
        problem = self._batch_problem(step, x, y) if self.index == owner else None
        sid = f"{run_id}/g{self.generation}/s{step}"
        ctx = TrainContext(self, program, step)
        ctx.dropped = self.dropped(step) | self.missing
        deadline = time.monotonic() + self.timeout
        io_ = StepIO(self.transport, sid, step, deadline, self.timeout, self.missing)
        if problem:  # the peers wait for this node's input: tell them now, not at the deadline
            self.generation += 1
            io_.broadcast_abort(self.index, f"ValueError: {problem}")
            io_.end()
            raise ValueError(problem)
        t0 = time.monotonic()
        c0 = self._sent()
        loss_value: float | None = None
        dp_info = None
        try:
            self.optimizer.zero_grad(set_to_none=True)
            self._zero_grads()
            records = [] if self.index in ctx.dropped else forward(self, ctx, io_, x)
            c1 = self._sent()
            # DP, empty Poisson batch: a noise-only step (the forward stopped at the input)
            empty = self.dp_state is not None and batch_size(records) == 0
            g_out: torch.Tensor | None = None
            if self.index == owner and not empty:
                out = records[-1].out
                if not isinstance(out, torch.Tensor):
                    raise RuntimeError("program produced no output tensor")
                logits = out.detach().requires_grad_(True)
                assert y is not None
                loss = (
                    self.loss_fn(logits, y)
                    if self.loss_fn is not None
                    else distill_loss(
                        logits,
                        y,
                        teacher_logits,
                        self.distill if teacher_logits is not None else 0,
                        self.temperature,
                    )
                )
                loss.backward()
                g_out = logits.grad
                loss_value = float(loss.detach())
            if not empty:
                if self.gate_mode == "stochastic" and self.gate_penalty != 0.0:
                    term = gate_penalty(program, self.shard.gates, self.gate_penalty)
                    if term is not None:
                        term.backward()
                backward(self, ctx, io_, records, g_out)
            c2 = self._sent()
            if self.dp_state is not None:
                dp_info = self.dp_state.privatize(trace_of(ctx, records), io_.exchange_norms)
            commit(io_, owner)
            c3 = self._sent()
        except BaseException as e:
            self._zero_grads()
            self.generation += 1  # every node aborts: the retried step uses fresh sessions
            if isinstance(e, PeerFailure):
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
            ctx.dropped,
        )
        self.history.append(res)
        return res

    def _sent(self) -> int:
        return sum(self.transport.payload_bytes_sent().values())

    def _zero_grads(self) -> None:
        for p in self.shard.parameters():
            p.grad = None

    # ---- checkpoints (see :mod:`disco_fl.runtime.training.checkpoint`) ---------------------------
    def state_dict(self) -> dict[str, Any]:
        """This node's shard (full width), optimizer state, steps done and plan hash."""
        return checkpoint_state(
            node=self.index,
            plan_hash=self.plan.hash,
            steps_done=self.steps_done,
            shard=self.full_state_dict(),
            optimizer=self.optimizer.state_dict(),
            compact=self.compact,
            dp=self.dp_state.state_dict() if self.dp_state is not None else None,
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_checkpoint(state, self.index, self.plan.hash)
        shard = dict(state["shard"])
        closed = self.weights.split_full(shard)  # compact: the checkpoint is full width
        self.shard.load_state_dict(shard)
        self.weights.closed.update(closed)
        self.optimizer.load_state_dict(self.weights.fit_optimizer_state(state["optimizer"]))
        self.steps_done = int(state["steps_done"])
        if self.dp_state is not None and "dp" in state:
            self.dp_state.load_state_dict(state["dp"])

    def save_checkpoint(self, path: str | Path) -> None:
        """Write :meth:`state_dict` (tensors and plain data) with a sha256 checksum,
        atomically: a killed write leaves the previous checkpoint."""
        write_checkpoint(self.state_dict(), path)

    def load_checkpoint(self, path: str | Path) -> int:
        """Load a checkpoint written by :meth:`save_checkpoint`; return the next step.

        The checksum is verified (a corrupted or truncated file raises
        :class:`~disco_fl.core.files.ChecksumError` naming it) and only plain data is unpickled
        (``weights_only=True``). Temporary files of killed writes beside it are removed."""
        self.load_state_dict(read_checkpoint(path))
        return self.steps_done
