"""Per-sample gradients of one node's shard from a step's trace (differential privacy).

For every op with trainable parameters, the op's ``compute`` is re-run per sample
(``torch.func``: ``vmap`` of a ``vjp``) with the inputs, received messages and output
gradient of that sample, all from the step's :class:`~disco_fl.runtime.training.trace.StepTrace`.
Model tensors used without a batch input (*shared* values: a ViT's class token and positional
embedding) get their per-sample gradient pulled back from the ops that combine them with an
activation (see :mod:`disco_fl.runtime.training.dp` for the method and what is refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from disco_fl.node.shard import NodeShard
from disco_fl.partition import Op, get_spec
from disco_fl.partition.registry import NodeContext, OpSpec
from disco_fl.runtime.training.trace import StepTrace


def per_sample_grads(
    trace: StepTrace, shard: NodeShard, shared: set[str], grad_shared: set[str]
) -> dict[nn.Parameter, torch.Tensor]:
    """``param -> (B, *param.shape)``: per-sample gradients of the step's (mean) loss.

    Ops are visited in reverse order. An op on batched values is re-run per sample with
    its kept inputs (sample ``b``'s rows; model tensors used without a batch input, the
    *shared* values, whole) and ``grad_out[b]``; the ``vjp`` gives the per-sample gradient
    of its own parameters and of every shared input that leads to a trainable ``param`` op
    (e.g. ``expand`` of a class token, ``add`` of a positional embedding). Those per-sample
    output gradients ``(B, *shape)`` are summed per shared value and pulled back through
    the ops on shared values down to the ``param`` ops, one sample at a time.
    """
    out: dict[nn.Parameter, torch.Tensor] = {}
    psg: dict[str, torch.Tensor] = {}  # shared value -> (B, *shape) per-sample gradients
    ctx = trace.context
    for rec in reversed(trace.ops):
        op = rec.op
        shared_out = op.name in grad_shared
        g = psg.pop(op.name, None) if shared_out else rec.grad_out
        if g is None:
            continue
        params: dict[str, nn.Parameter] = {}
        if op.name in shard.ops:
            state = shard.ops[op.name]
            params = {k: p for k, p in state._parameters.items() if p is not None}
        ins = list(op.inputs) if op.kind != "input" else []
        wrt = [i for i, name in enumerate(ins) if name in grad_shared]
        if not params and not wrt:
            continue
        spec = get_spec(op.kind)
        pos = [
            i
            for i, v in enumerate(rec.inputs)
            if isinstance(v, torch.Tensor) and not (i < len(ins) and ins[i] in shared)
        ]
        xs_t = tuple(rec.inputs[i].detach() for i in pos)
        srcs = sorted(rec.received)
        rec_t = tuple(rec.received[j].detach() for j in srcs)
        base = list(rec.inputs)
        buffers = dict(trace.buffers.get(op.name, {}))
        detached = {name: v.detach() for name, v in params.items()}
        us = tuple(rec.inputs[i].detach() for i in wrt)

        def one(
            xb: tuple[torch.Tensor, ...],
            rb: tuple[torch.Tensor, ...],
            gb: torch.Tensor,
            *,
            _op: Any = op,
            _spec: Any = spec,
            _detached: dict[str, torch.Tensor] = detached,
            _us: tuple[torch.Tensor, ...] = us,
            _pos: list[int] = pos,
            _wrt: list[int] = wrt,
            _base: list[Any] = base,
            _srcs: list[int] = srcs,
            _buffers: dict[str, torch.Tensor] = buffers,
            _whole: bool = shared_out,
        ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
            def f(pdict: dict[str, torch.Tensor], ub: tuple[torch.Tensor, ...]) -> torch.Tensor:
                xs = list(_base)
                for i, v in zip(_pos, xb, strict=True):
                    xs[i] = v.unsqueeze(0)
                for i, u in zip(_wrt, ub, strict=True):
                    xs[i] = u
                node = _Override(ctx, _op.name, {**_buffers, **pdict}) if pdict else ctx
                y = _spec.compute(
                    _op,
                    node,
                    xs,
                    {j: r.unsqueeze(0) for j, r in zip(_srcs, rb, strict=True)},
                )
                assert isinstance(y, torch.Tensor)
                return y

            vjp = torch.func.vjp(f, _detached, _us)[1]
            # a shared value's per-sample gradient has the value's own shape; a batched
            # one's row b is the gradient of sample b's output of batch size 1
            gp, gu = vjp(gb if _whole else gb.unsqueeze(0))
            return gp, gu

        gp, gu = torch.func.vmap(one)(xs_t, rec_t, g)
        for k, p in params.items():
            out[p] = gp[k]
        for i, gi in zip(wrt, gu, strict=True):
            name = ins[i]
            psg[name] = gi if name not in psg else psg[name] + gi
    return out


class _Override:
    """A node context whose ``state`` of one op is given tensors (the functional parameters
    of a per-sample re-run); everything else is the step's context."""

    def __init__(self, base: NodeContext, name: str, state: Mapping[str, torch.Tensor]) -> None:
        self.base = base
        self.name = name
        self.over = state
        self.index = base.index
        self.num_nodes = base.num_nodes
        self.training = base.training
        self.program = base.program

    def state(self, op: Op) -> Mapping[str, torch.Tensor]:
        return self.over if op.name == self.name else self.base.state(op)

    def send_selection(
        self, op: Op, dest: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        return self.base.send_selection(op, dest)

    def sources(self, op: Op) -> list[int]:
        return self.base.sources(op)

    def shared_generator(self, op: Op) -> torch.Generator | None:
        return self.base.shared_generator(op)


def shared_values(program: Any) -> tuple[set[str], set[str]]:
    """``(shared, grad_shared)``: values computed from model tensors alone (``param`` and
    ``const`` ops and ops reading only those: no batch input, the same for every sample), and
    those of them that lead to a trainable ``param`` op. Raises ``ValueError`` where such a
    value is read by an op whose per-sample gradient towards it is not supported."""
    shared: set[str] = set()
    grad: set[str] = set()
    for op in program.ops:
        if op.kind in ("param", "const"):
            shared.add(op.name)
            if op.kind == "param" and op.attrs.get("trainable", True):
                grad.add(op.name)
            continue
        if op.kind == "input":
            continue
        reads = [v for v in op.inputs if v in grad]
        if reads:
            spec = get_spec(op.kind)
            random = op.kind in ("dropout", "drop_path") and float(op.attrs.get("p", 0.0)) > 0
            if (
                spec.mixing
                or op.kind in ("exchange", "output")
                or random
                or (type(spec).send is not OpSpec.send)
            ):
                raise ValueError(
                    f"differential privacy: {op.name} ({op.kind}) reads "
                    f"{', '.join(reads)}, computed from model tensors used without a batch "
                    f"input; per-sample gradients through a "
                    f"{'random' if random else 'communicating'} op on such a tensor are not "
                    f"supported (combine it with an activation first, e.g. add or concatenate)"
                )
        if op.inputs and all(v in shared for v in op.inputs):
            shared.add(op.name)
            if reads:
                grad.add(op.name)
    return shared, grad
