"""N nodes in one process, op by op: the emulation's and shard-only execution's driver.

Every node runs the one driver (:func:`disco_fl.node.driver.drive`); messages go from one to
the other through ``codec.roundtrip`` (activations) exactly as the wire would change them;
normalization statistics stay fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from disco_fl.core.codecs import Codec, get_codec
from disco_fl.node.driver import MISSING, Executor, Recv, Send, drive
from disco_fl.node.schedule import schedule
from disco_fl.partition import Program, full_open_count
from disco_fl.partition.registry import NodeContext, OpenCount


def run_lockstep(
    program: Program,
    nodes: Sequence[NodeContext],
    x: torch.Tensor,
    codec: Codec | str = "fp32",
    open_count: OpenCount | None = None,
    *,
    overlap: bool = False,
    missing: Collection[int] = (),
    exact_input: bool = False,
    meter: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
) -> torch.Tensor:
    """Run every node of ``program`` in this process; return the requester's output.

    ``open_count`` says how many channels each exchange sends per pair (default: every
    channel of the slice, as the emulation's masked messages; shards of a plan send the
    plan's open channels only). ``overlap``: readers of an exchange compute their own
    channels' part before they take the peers' messages (:func:`~disco_fl.node.drive`).
    ``missing``: nodes that do not run (a household with devices gone, degraded mode); the
    others get :data:`~disco_fl.node.MISSING` for their messages, as the runtime's degraded
    mode gives them. ``exact_input``: the input reaches the other nodes unchanged (a request
    of uint8 pixels, sent as they are and normalized by every node alike), not through
    ``codec``. ``meter(k)``: a context entered around every stretch node ``k`` runs (its
    compute and the messages it hands over), e.g. to time or count each node's work.
    """
    codec = get_codec(codec) if isinstance(codec, str) else codec
    n = program.num_nodes
    if len(nodes) != n:
        raise ValueError(f"expected {n} nodes, got {len(nodes)}")
    count = open_count or full_open_count(program)
    gone = set(missing)
    if program.requester in gone:
        raise ValueError(f"the requester (node {program.requester}) cannot be missing")
    drivers = [
        drive(
            schedule(program, k, count, codec.name),
            Executor(program, nodes[k], overlap=overlap),
            x,
            turn_after=None,  # nothing else runs between its ops
        )
        for k in range(n)
    ]
    mail: dict[tuple[int, int, int], torch.Tensor] = {}  # (layer, src, dst) -> message
    want: list[Any] = [None] * n  # what each driver waits for (a Recv), or None to start
    results: list[Any] = [None] * n
    running = set(range(n)) - gone
    while running:
        progressed = False
        for k in sorted(running):
            reply: Any = None
            w = want[k]
            if isinstance(w, Recv):
                key = (w.step.layer, w.src, k)
                if w.src in gone:
                    reply = MISSING
                elif key not in mail:
                    continue
                else:
                    reply = mail.pop(key)
            try:
                with meter(k) if meter else contextlib.nullcontext():
                    event = drivers[k].send(reply) if w is not None else next(drivers[k])
                    while not isinstance(event, Recv):
                        if isinstance(event, Send):
                            t = event.tensor
                            st = event.step
                            coded = st.spec.coded_messages and not (exact_input and st.is_input)
                            mail[(st.layer, k, event.dest)] = codec.roundtrip(t) if coded else t
                        event = next(drivers[k])
                want[k] = event
            except StopIteration as done:
                results[k] = done.value
                running.discard(k)
            progressed = True
        if not progressed:
            raise RuntimeError("nodes wait for each other: the program's traffic is inconsistent")
    out = results[program.requester]
    if not isinstance(out, torch.Tensor):
        raise RuntimeError("program produced no output tensor")
    return out
