"""Op registry: one :class:`OpSpec` per op kind, registered by decorator.

An op spec says, for one kind of op, how channel ownership propagates (``infer``), how a
node's slice of the original parameters is cut (``init_state``), what a node sends before
computing (``send``), what it computes (``compute``) and what crosses the network
(``traffic``). Both the emulation and the network runtime call the same ``send``/``compute``:
there is one implementation of what a node computes.

Capture functions (fx node -> :class:`~disco_fl.partition.program.Op`) register separately, by
module type, function, or method name (see :mod:`disco_fl.partition.capture`). New op families
(e.g. attention) plug in by registering a spec and its capture functions.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from disco_fl.partition.program import Op, Program, TensorInfo

if TYPE_CHECKING:
    from disco_fl.core.layout import Layout


class PartitionError(ValueError):
    """A model, op or argument that cannot be partitioned; the message names the op/layer."""


@dataclass(frozen=True)
class InferContext:
    num_nodes: int
    out_shape: tuple[int, ...]  # global output shape measured on the example input
    capacities: Sequence[float] | None = None


@dataclass(frozen=True)
class Traffic:
    """Per-sample payload of one message ``src -> dst`` for one op (elements, or raw bytes)."""

    src: int
    dst: int
    elements: int
    coded: bool  # True: activations, sent with the plan's codec; False: fp32 statistics
    channels: int = 0
    rows: int = 1  # rows of dim 0 per sample (windows merged into it): int8 scales per sample


class NodeContext(Protocol):
    """What an op sees of the node that runs it."""

    index: int
    num_nodes: int
    training: bool
    program: Program

    def state(self, op: Op) -> Mapping[str, torch.Tensor]:
        """Parameters and buffers of ``op`` on this node."""
        ...

    def send_selection(
        self, op: Op, dest: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """For an exchange: ``(channel index or None=all, per-channel scale or None)``, or
        ``None`` when nothing is sent to ``dest``."""
        ...

    def sources(self, op: Op) -> list[int]:
        """For an exchange: peers whose messages this node assembles, ascending."""
        ...

    def shared_generator(self, op: Op) -> torch.Generator | None:
        """For a random op whose draw every node must share (``drop_path``: the same samples
        dropped on every node): a generator that every node of the step, and the emulation,
        derive identically (from the run's seed, the step and the op's index in the program);
        ``None``: the global RNG (contexts that never train)."""
        ...


class OpSpec(ABC):
    """Behaviour of one op kind. Subclasses override what differs from channel-local ops."""

    kind: ClassVar[str]
    mixing: ClassVar[bool] = False  # reads a ``gathered`` input
    coded_messages: ClassVar[bool] = True  # messages carry activations (the plan's codec)
    # a sum over input channels: computes its own channels' part while peers' are in flight
    # (:meth:`compute_own`, :meth:`add_received`; see :mod:`disco_fl.node.driver`)
    overlaps: ClassVar[bool] = False
    # ``infer`` sets the output's ``batch_mult`` itself (a reshape that merges or splits dim 0);
    # otherwise the builder copies it from an input with as many rows (see ProgramBuilder.emit)
    sets_batch_mult: ClassVar[bool] = False

    @abstractmethod
    def infer(self, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
        """Value info of the op's output (ownership propagation and validation)."""

    def check_layout(self, op: Op, info: TensorInfo) -> None:
        """Mixing ops: extra checks of a recorded output layout (e.g. of a loaded plan, whose
        slice sizes may differ from an equal split); raise :class:`PartitionError`."""
        return None

    def init_state(
        self, op: Op, module: nn.Module | None, program: Program, k: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(parameters, buffers)`` of node ``k`` cut from the original module."""
        return {}, {}

    def buffer_names(self, op: Op) -> frozenset[str]:
        """Names of the tensors of :meth:`init_state` that are buffers (not trained): a node
        rebuilding its shard from a flat state dict, without the model, asks the op."""
        return frozenset()

    def send(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> dict[int, torch.Tensor] | None:
        return None

    @abstractmethod
    def compute(
        self, op: Op, node: NodeContext, xs: Sequence[Any], received: Mapping[int, torch.Tensor]
    ) -> Any:
        """This node's output, given its inputs and the messages it received for this op."""

    def compute_own(self, op: Op, node: NodeContext, own: torch.Tensor) -> torch.Tensor:
        """Ops that :attr:`overlaps`: the part of the output that the node's own channels of
        the gathered input give (bias included)."""
        raise NotImplementedError(f"{self.kind} does not overlap")

    def add_received(
        self, op: Op, node: NodeContext, partial: torch.Tensor, part: torch.Tensor, offset: int
    ) -> torch.Tensor:
        """Ops that :attr:`overlaps`: ``partial`` plus the part that a received message gives;
        ``offset`` is the message's first column in the node's assembled input."""
        raise NotImplementedError(f"{self.kind} does not overlap")

    def compute_global(self, op: Op, node: NodeContext, xs: Sequence[Any]) -> Any:
        """The op on whole tensors with whole (assembled) parameters: the fused emulation.

        ``node.state(op)`` holds the assembled parameters. Default: :meth:`compute`, which is
        correct for every op whose node math is the original op on a slice.
        """
        return self.compute(op, node, xs, {})

    def traffic(
        self, op: Op, program: Program, open_count: Callable[[int, int], int]
    ) -> list[Traffic]:
        """Messages per sample; ``open_count(src, dst)`` gives open channels of an exchange."""
        return []


def infer_info(spec: OpSpec, op: Op, ins: Sequence[TensorInfo], ctx: InferContext) -> TensorInfo:
    """``spec.infer`` plus the rows per sample of dim 0 (``batch_mult``): unless the spec sets
    it (a reshape that merges or splits dim 0), copied from the input with as many rows (the
    windows of a window partition stay merged into dim 0 through elementwise ops, linear
    layers, matmul, softmax, ...). The builder and the plan's validation both use this."""
    info = spec.infer(op, ins, ctx)
    if spec.sets_batch_mult:
        return info
    mult = max((i.batch_mult for i in ins if i.shape[:1] == info.shape[:1]), default=1)
    return info if mult == info.batch_mult else dataclasses.replace(info, batch_mult=mult)


SPECS: dict[str, OpSpec] = {}
S = TypeVar("S", bound=type[OpSpec])


def register_spec(cls: S) -> S:
    """Class decorator: register an op spec under its ``kind``."""
    SPECS[cls.kind] = cls()
    return cls


def get_spec(kind: str) -> OpSpec:
    try:
        return SPECS[kind]
    except KeyError:
        raise PartitionError(f"unknown op kind {kind!r}") from None


OpenCount = Callable[[str, int, int], int]  # (exchange, src, dst) -> channels sent


class HasOpenChannels(Protocol):
    """A plan or a partitioned model: the open channels of an exchange per pair of nodes."""

    program: Program

    def open_channels(self, exchange: str, src: int, dst: int) -> list[int]: ...


def plan_open_count(plan: HasOpenChannels) -> OpenCount:
    """``open_count(exchange, src, dst)`` of a plan's (or a partitioned model's) hard masks."""

    def count(name: str, s: int, d: int) -> int:
        return len(plan.open_channels(name, s, d))

    return count


def full_open_count(program: Program) -> OpenCount:
    """``open_count`` of every channel of the sender's slice (dense exchanges)."""

    def count(name: str, s: int, d: int) -> int:
        layout = program.infos[name].layout
        return layout.count(s) if layout is not None else 0

    return count


def op_traffic(program: Program, op: Op, open_count: OpenCount) -> list[Traffic]:
    """Messages of ``op`` per sample, given ``open_count(exchange, src, dst)`` open channels."""
    return get_spec(op.kind).traffic(op, program, lambda s, d: open_count(op.name, s, d))


def layout_of(info: TensorInfo, what: str) -> Layout:
    if info.layout is None:
        raise PartitionError(f"{what}: value has no channel layout")
    return info.layout
