"""One node's math, and the lock-step driver that runs N nodes in one process.

:func:`run_node_op` is what a node does for one op: ``send`` its messages, then ``compute``
from its inputs and what it received. The emulation and the in-process shard execution drive
all nodes op by op with :func:`run_lockstep`; the network runtime drives one node and moves
the messages over the transport. All of them call the same op specs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from disco_fl.codecs import Codec, get_codec
from disco_fl.partition import Program, get_spec
from disco_fl.partition.registry import NodeContext


def op_inputs(program: Program, env: dict[str, Any], op_name: str, node: int, x: Any) -> list[Any]:
    op = program.op(op_name)
    if op.kind == "input":
        return [x if node == program.requester else None]
    return [env[i] for i in op.inputs]


def run_lockstep(
    program: Program,
    nodes: Sequence[NodeContext],
    x: torch.Tensor,
    codec: Codec | str = "fp32",
) -> torch.Tensor:
    """Run every node of ``program`` op by op in this process; return the requester's output.

    Messages go through ``codec.roundtrip`` (activations) exactly as the wire would change them;
    normalization statistics stay fp32.
    """
    codec = get_codec(codec) if isinstance(codec, str) else codec
    n = program.num_nodes
    if len(nodes) != n:
        raise ValueError(f"expected {n} nodes, got {len(nodes)}")
    envs: list[dict[str, Any]] = [{} for _ in range(n)]
    result: Any = None
    for op in program.ops:
        spec = get_spec(op.kind)
        xs = [
            [x if k == program.requester else None]
            if op.kind == "input"
            else [envs[k][i] for i in op.inputs]
            for k in range(n)
        ]
        inbox: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]
        for k in range(n):
            msgs = spec.send(op, nodes[k], xs[k])
            if msgs:
                for dest, t in msgs.items():
                    inbox[dest][k] = codec.roundtrip(t) if spec.coded_messages else t
        for k in range(n):
            envs[k][op.name] = spec.compute(op, nodes[k], xs[k], inbox[k])
        if op.kind == "output":
            result = envs[program.requester][op.name]
    if not isinstance(result, torch.Tensor):
        raise RuntimeError("program produced no output tensor")
    return result
