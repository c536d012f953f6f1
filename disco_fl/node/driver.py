"""The one driver of a node's program, sans I/O.

:func:`drive` walks a node's :class:`~disco_fl.node.schedule.Step` list. For every op it asks
the :class:`Executor` for the op's inputs, calls ``spec.send`` (what this node owes each
peer), yields a :class:`Send` per message, then a :class:`Recv` per message it needs (the
caller sends the received tensor in), checks each one against the plan
(:func:`~disco_fl.node.schedule.message_problem`), and has the executor compute the op.
It never touches a socket, a clock other than the optional deadline, or a codec: whoever drives
it moves the messages:

- the emulation runs N drivers in lock step in one process (:mod:`disco_fl.node.lockstep`);
- the network runtime moves them as frames over a transport (:mod:`disco_fl.runtime.inference`);
- the training step does too, with an executor that keeps what the backward pass needs
  (:mod:`disco_fl.runtime.training.passes`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from disco_fl.node.schedule import Step, expected_shape, input_batch, message_problem
from disco_fl.partition import Program, Traffic
from disco_fl.partition.registry import NodeContext


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``tensor`` to node ``dest`` (the driver continues at once)."""

    step: Step
    dest: int
    tensor: torch.Tensor


@dataclass(frozen=True, slots=True)
class Recv:
    """The driver needs node ``src``'s message of ``step``: send the tensor in."""

    step: Step
    src: int


FLUSH = "flush"  # yielded after the sends of an op: a good moment to put frames on the wire
TURN = "turn"  # yielded after an op (see drive's turn_after): a good moment to let others run


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


# the answer to a Recv whose sender is missing (degraded mode): the executor substitutes it
MISSING: Any = _Missing()
Event = Send | Recv | str

_this_thread = threading.local()  # the torch thread count this thread's computation was set to


def _torch_threads_here() -> None:
    """Have the calling thread compute on ``torch.get_num_threads()`` threads.

    ``torch.set_num_threads`` sets OpenMP's count for the thread that calls it (and torch's
    default), but a thread Python starts later computes on OpenMP's own default, every core
    (pytorch/pytorch#37259): a node computing on its event loop's thread ran two OpenMP
    threads under ``disco-fl serve --threads 1`` on a 2-core machine. Set once per thread
    and count.
    """
    n = torch.get_num_threads()
    if getattr(_this_thread, "torch_threads", None) != n:
        torch.set_num_threads(n)
        _this_thread.torch_threads = n


class MessageError(RuntimeError):
    """A received message does not fit the plan (``src`` sent it)."""

    def __init__(self, message: str, *, src: int, layer: int) -> None:
        super().__init__(message)
        self.src = src
        self.layer = layer


class Executor:
    """How a node gets an op's inputs and computes it: inference, as the op's spec says.

    Training subclasses it (:class:`disco_fl.runtime.training.passes.TrainExecutor`) to make
    autograd leaves of the inputs and to record what the backward pass needs.
    """

    strict = False  # message check: also dtype, finite values, exact input shape
    free_values = True  # drop values no later op reads

    def __init__(self, program: Program, ctx: NodeContext, *, overlap: bool = False) -> None:
        self.program = program
        self.ctx = ctx
        self.overlap = overlap  # readers of an exchange compute while its messages travel

    def inputs(self, step: Step, env: dict[str, Any], x: Any) -> list[Any]:
        if step.is_input:
            return [x if step.node == self.program.requester else None]
        return [env[name] for name in step.op.inputs]

    def channels(self, step: Step, src: int, traffic: Traffic) -> int:
        """Channels ``src``'s message of ``step`` carries (0: not a channel message)."""
        return traffic.channels if traffic.coded else 0

    def compute(self, step: Step, xs: list[Any], received: dict[int, torch.Tensor]) -> Any:
        return step.spec.compute(step.op, self.ctx, xs, received)

    def substitute(self, step: Step, src: int, traffic: Traffic, own: Any) -> torch.Tensor | None:
        """What stands for the message of a missing node ``src`` (degraded mode): zeros for its
        channels of an exchanged or output tensor (its channels are closed), nothing for
        normalization statistics (they combine over the nodes present). Other messages
        cannot be done without: ``MessageError``."""
        op = step.op
        if traffic.coded and op.kind in ("exchange", "output") and isinstance(own, torch.Tensor):
            channels = self.channels(step, src, traffic)
            shape = expected_shape(self.program, op, src, own, channels)
            if shape is not None:
                return own.new_zeros(shape)
        if not traffic.coded:
            return None
        raise MessageError(
            f"layer {step.layer} ({op.name}, {op.kind}): cannot go on without node {src}'s message",
            src=src,
            layer=step.layer,
        )

    def done(
        self,
        step: Step,
        xs: list[Any],
        msgs: dict[int, torch.Tensor],
        received: dict[int, torch.Tensor],
        value: Any,
    ) -> bool:
        """Called after every op; ``True`` ends the program early."""
        return False


@dataclass
class Deferred:
    """An exchange's value with overlap on: the node's own channels, and its peers' messages
    once the first reader has received them (:func:`drive`)."""

    step: Step
    own: torch.Tensor
    received: dict[int, torch.Tensor] | None = None


def _has_channels(program: Program, st: Step, xs: list[Any]) -> bool:
    """The node holds channels of the exchanged tensor (else there is no own part to compute
    first)."""
    cdim = program.infos[st.op.name].cdim
    return isinstance(xs[0], torch.Tensor) and cdim is not None and xs[0].shape[cdim] > 0


def drive(
    steps: Sequence[Step],
    executor: Executor,
    x: Any,
    *,
    deadline: float | None = None,
    what: str = "",
    turn_after: float | None = 0.0,
) -> Generator[Event, torch.Tensor | None, Any]:
    """Run one node's program; returns the value of the ``output`` op (``None`` on a node
    that computes none, or when the executor ends the program early).

    With ``executor.overlap``, an exchange whose readers all sum over input channels
    (``step.deferrable``) sends its messages and lets its first reader compute the part of its
    own channels (``spec.compute_own``) before receiving the peers' messages, adding each
    message's part as it arrives (``spec.add_received``): computation overlaps the transfer.
    The result equals the computation without overlap up to the order of fp32 sums.

    ``turn_after``: yield :data:`TURN` after an op that ends at least that many seconds
    (``time.perf_counter``) after the driver's previous ``TURN`` (its start, at first); 0:
    after every op; ``None``: never. An event costs its driver a few microseconds, so a
    network node asks for a turn only after computing for a while.

    Raises :class:`MessageError` for a message that does not fit the plan, ``TimeoutError``
    before an op when ``time.monotonic()`` is past ``deadline`` (computation counts against
    it), ``RuntimeError`` when an op's sends differ from the schedule. ``what`` names the
    run in errors (e.g. a session id).
    """
    _torch_threads_here()
    program = executor.program
    ctx = executor.ctx
    env: dict[str, Any] = {}
    state: dict[str, int | None] = {"batch": None}  # the batch size, once the input op set it
    result: Any = None
    clock = time.perf_counter
    turned = clock()  # when the driver last yielded TURN (or started)

    def receive(st: Step, src: int, traffic: Traffic, own: Any) -> Generator[Event, Any, Any]:
        t = yield Recv(st, src)
        if t is MISSING:
            return executor.substitute(st, src, traffic, own)
        assert isinstance(t, torch.Tensor), "a Recv must be answered with a tensor or MISSING"
        channels = executor.channels(st, src, traffic)
        problem = message_problem(
            program,
            st.op,
            t,
            state["batch"],
            channels=channels,
            expected=expected_shape(program, st.op, src, own, channels),
            strict=executor.strict,
        )
        if problem:
            raise MessageError(
                f"layer {st.layer} ({st.op.name}, {st.op.kind}) from node {src}: {problem}",
                src=src,
                layer=st.layer,
            )
        return t

    def read_deferred(st: Step, d: Deferred) -> Generator[Event, Any, Any]:
        """``st``'s value from the exchange ``d``: its own channels' part first, then each
        peer's part as it arrives (received by the first reader, kept for the others). A
        function of its own, so that nothing of ``d`` outlives the read in this frame."""
        cdim = program.infos[d.step.op.name].cdim
        assert cdim is not None
        value = st.spec.compute_own(st.op, ctx, d.own)  # while the peers' are in flight
        offset = d.own.shape[cdim]
        first = d.received is None
        got = d.received if d.received is not None else {}
        d.received = got
        froms = dict(d.step.in_from)
        for src in ctx.sources(d.step.op):
            if first:
                got[src] = yield from receive(d.step, src, froms[src], d.own)
            value = st.spec.add_received(st.op, ctx, value, got[src], offset)
            offset += got[src].shape[cdim]
        return value

    for st in steps:
        op = st.op
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"node {st.node}: the deadline passed while computing, before layer "
                f"{st.layer} ({op.name}){what}"
            )
        xs = executor.inputs(st, env, x)
        msgs = st.spec.send(op, ctx, xs) or {}
        if len(msgs) != len(st.out_to) or sorted(msgs) != st.out_to:
            raise RuntimeError(
                f"node {st.node} layer {st.layer} ({op.name}): op sends to {sorted(msgs)} but "
                f"the plan's traffic says {st.out_to}"
            )
        for dest in st.out_to:
            yield Send(st, dest, msgs[dest])
        if st.out_to:
            yield FLUSH
        received: dict[int, torch.Tensor] = {}
        if executor.overlap and st.deferrable and st.in_from and _has_channels(program, st, xs):
            value: Any = Deferred(st, xs[0])  # its readers receive the messages
        elif len(xs) == 1 and isinstance(xs[0], Deferred):
            value = yield from read_deferred(st, xs[0])
        else:
            for src, traffic in st.in_from:
                t = yield from receive(st, src, traffic, xs[0] if xs else None)
                if t is not None:  # None: a missing node's statistics, left out
                    received[src] = t
            value = executor.compute(st, xs, received)
        env[op.name] = value
        if (b := input_batch(op, value)) is not None:
            state["batch"] = b
        if st.is_output:
            result = value
        if executor.done(st, xs, msgs, received, value):
            return None
        del xs, received, msgs
        if executor.free_values:
            for name in st.free:  # free what no later op reads (peak memory)
                env.pop(name, None)
        if turn_after is not None and (turn_after <= 0 or clock() - turned >= turn_after):
            yield TURN
            turned = clock()
    return result
