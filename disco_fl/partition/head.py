"""The head on the requester: the last mixing layer computed by the node that asks.

By default every mixing layer, the model's head included, is split over the nodes, and the
requester gathers the output slices. :func:`head_on` gives the requester every output
channel of the head (the last mixing layer before the output, through channel-local ops):
the other nodes send it their (open) channels of the head's input instead of output slices,
and the requester computes the whole output from what it has. With a node missing (degraded
mode, :mod:`disco_fl.node.driver`), the output is then complete, computed with that node's
channels closed, rather than missing that node's output slice (e.g. a classifier's logits of
the classes the missing node owned).
"""

from __future__ import annotations

import dataclasses

from disco_fl.core.layout import Layout
from disco_fl.partition.program import Program
from disco_fl.partition.registry import InferContext, PartitionError, get_spec


def head_op(program: Program) -> str:
    """The name of the head: the mixing op whose output reaches the ``output`` op through
    channel-local ops of one input only. Raises :class:`PartitionError` if there is none."""
    outputs = [op for op in program.ops if op.kind == "output"]
    if len(outputs) != 1:
        raise PartitionError("the head needs a program with one output")
    by_name = {op.name: op for op in program.ops}
    value = outputs[0].inputs[0]
    for _ in range(len(program.ops)):
        op = by_name.get(value)
        if op is None:
            break
        spec = get_spec(op.kind)
        if spec.mixing:
            return op.name
        sends = spec.traffic(op, program, lambda s, d: 1)
        if op.kind in ("exchange", "input") or len(op.inputs) != 1 or sends:
            break  # not channel-local
        value = op.inputs[0]
    raise PartitionError(
        "no head: the output is not computed by a mixing layer (conv / linear) followed by "
        "channel-local ops only"
    )


def head_on(program: Program, node: int) -> Program:
    """``program`` with every output channel of its head (:func:`head_op`) owned by ``node``."""
    if not 0 <= node < program.num_nodes:
        raise PartitionError(f"node {node} out of range for {program.num_nodes} nodes")
    head = head_op(program)
    infos = dict(program.infos)
    info = infos[head]
    if info.layout is None or info.cdim is None:
        raise PartitionError(f"{head}: the head's output has no channel layout")
    c = info.shape[info.cdim]
    infos[head] = dataclasses.replace(info, layout=Layout((node,) * c, program.num_nodes))
    changed = {head}
    start = [op.name for op in program.ops].index(head) + 1
    for op in program.ops[start:]:  # the ops downstream of the head follow its layout
        if not changed.intersection(op.inputs):
            continue
        old = infos[op.name]
        ctx = InferContext(program.num_nodes, old.shape)
        infos[op.name] = get_spec(op.kind).infer(op, [infos[i] for i in op.inputs], ctx)
        changed.add(op.name)
    return dataclasses.replace(program, infos=infos)
