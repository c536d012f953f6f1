"""Node dropout in the distributed training step: a node's whole contribution missing at random.

``NodeTrainer(..., node_dropout=p)`` trains a household so that its plan still answers well with a
device gone (degraded mode), as the emulation's budget training does with
``BudgetConfig.node_dropout`` (``pm.dropped_nodes``). The decisions:

- **The draw.** The nodes missing from step ``t`` are
  :func:`~disco_fl.core.gates.dropped_nodes` ``(gate_seed, t, N, p, keep=owner)``: each node is
  dropped with probability ``p``, from a generator keyed by the shared seed and the step number.
  Every node computes the same set, with no message; the emulation draws with the same function.
- **The batch owner is never dropped**: it holds the data, the labels and the loss (so at least
  one node takes part in every step).
- **A dropped node sits the step out**, as a missing device would: it runs no forward and no
  backward, sends nothing and receives nothing. It still votes in the commit (the step stays
  all-or-nothing on every node). Its weights get no gradient, so the optimizer leaves them and
  their state (momentum, Adam's moments and step count) as they were; with stochastic gates its
  gate logits get the budget penalty's gradient only (the penalty covers every gate, as in the
  emulation); its BatchNorm running statistics stay as they were.
- **The others send it nothing and receive nothing from it.** Its messages are replaced as in
  degraded inference (:meth:`~disco_fl.node.driver.Executor.substitute`): zeros for its channels
  of an exchanged tensor and of the output, its normalization statistics left out (combined over
  the nodes present). No gradient goes to it or comes from it (their gate logits towards it get
  none from the loss).
- **The emulation computes the same** (``pm.dropped_nodes``, :mod:`disco_fl.emulation.model`):
  the fused path zeroes what a dropped node sends and what it reads, detaches its weights and
  writes back no BatchNorm statistics of it; where nodes share normalization statistics
  (GroupNorm / LayerNorm across nodes), ``execution="auto"`` runs the lock step, which leaves a
  dropped node's statistics out as this step does.
- **Bytes are what is sent**: the payload counters count no message to or from a dropped node,
  and :func:`~disco_fl.runtime.training.predict_step_bytes` ``(..., dropped=...)`` leaves the same
  messages out, so both agree step by step (``StepResult.dropped`` says which nodes sat out).

Programs whose messages have no substitute (e.g. a pixel shuffle gathered on the requester) and
DP-SGD (its per-sample norms and noise assume every node in every step) are refused with
``node_dropout > 0``.
"""

from __future__ import annotations

from disco_fl.core.gates import check_node_dropout
from disco_fl.partition import Program, full_open_count, get_spec, op_traffic

# ops whose messages a missing sender's substitute stands for (zeros: closed channels)
_SUBSTITUTED = ("exchange", "output")


def dropout_problem(program: Program) -> str | None:
    """Why ``program`` cannot train with dropped nodes, or ``None``: an op other than the input,
    an exchange or the output sends activations between nodes (nothing could stand for a
    dropped node's message)."""
    count = full_open_count(program)
    for op in program.ops:
        if op.kind == "input" or op.kind in _SUBSTITUTED or not get_spec(op.kind).coded_messages:
            continue
        if op_traffic(program, op, count):
            return f"op {op.name} ({op.kind}) cannot go on without a dropped node's message"
    return None


def dropout_rate(rate: object, program: Program, *, dp: bool) -> float:
    """``rate`` checked (:func:`~disco_fl.core.gates.check_node_dropout`) for a trainer of
    ``program`` (``dp``: with DP-SGD); ``ValueError`` for what cannot drop nodes."""
    p = check_node_dropout(rate)
    if p and (problem := "DP-SGD" if dp else dropout_problem(program)):
        raise ValueError(f"node_dropout > 0 is not supported here: {problem}")
    return p
