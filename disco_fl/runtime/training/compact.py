"""Compact weights (hard gates): train only the weight columns of open channels.

In hard gate mode a mixing op's weight columns that read channels closed towards this node get
exactly zero gradient and never change, yet at full width they cost a weight, a gradient and
the optimizer's state. :class:`CompactWeights` replaces, in the shard itself, every such weight
by a parameter of the open columns only (the columns
:func:`~disco_fl.emulation.export.compact_columns`
keeps, in that order), keeps the closed columns aside unchanged, and re-points the optimizer's
parameter groups in place (its state cut to the kept columns, or widened back with zeros).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from disco_fl.emulation.export import compact_columns
from disco_fl.node.shard import NodeShard
from disco_fl.partition import get_spec
from disco_fl.partition.plan import Plan


@dataclass(frozen=True)
class Columns:
    """Columns of one mixing op's full-width weight (positions in the gathered order)."""

    keep: torch.Tensor  # the open ones, in the compact order
    closed: torch.Tensor
    full: int


class CompactWeights:
    """The compactable weights of node ``shard.index`` and, while compact, their closed columns.

    Parameters
    ----------
    shard : NodeShard
        The node's shard; its weights are swapped in place.
    plan : Plan
        The household's plan (its hard masks decide the open columns).
    optimizer : torch.optim.Optimizer
        Re-pointed in place whenever a weight is swapped.
    """

    def __init__(self, shard: NodeShard, plan: Plan, optimizer: torch.optim.Optimizer) -> None:
        self.shard = shard
        self.plan = plan
        self.optimizer = optimizer
        self.index = shard.index
        self.cols = self._compactable()  # op name -> kept / closed columns
        self.closed: dict[str, torch.Tensor] = {}  # op name -> closed columns (while compact)
        self.active = False

    def _compactable(self) -> dict[str, Columns]:
        """Weights of mixing ops that read closed channels: their kept and closed columns."""
        program = self.plan.program
        out: dict[str, Columns] = {}
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
            out[op.name] = Columns(
                torch.tensor(keep, dtype=torch.long),
                torch.tensor([c for c in range(full) if c not in kept], dtype=torch.long),
                full,
            )
        return out

    def weight(self, name: str) -> torch.nn.Parameter:
        w = self.shard.ops[name]._parameters["weight"]
        assert w is not None
        return w

    def compact(self) -> None:
        """Replace every compactable weight by its open columns; keep the closed ones aside."""
        for name, cols in self.cols.items():
            w = self.weight(name)
            if w.dim() < 2 or w.shape[1] != cols.full:
                raise ValueError(
                    f"node {self.index}: {name}.weight has shape {tuple(w.shape)}, expected "
                    f"{cols.full} columns (the full-width shard)"
                )
            with torch.no_grad():
                small = torch.nn.Parameter(
                    w.detach().index_select(1, cols.keep), requires_grad=w.requires_grad
                )
                self.closed[name] = w.detach().index_select(1, cols.closed)

            def cut(v: torch.Tensor, c: Columns = cols) -> torch.Tensor:
                return v.index_select(1, c.keep)

            swap_param(self.optimizer, w, small, cut)
            self.shard.ops[name].weight = small
        self.active = True

    def full_weight(self, name: str) -> torch.Tensor:
        """The full-width weight of ``name``: trained columns and closed ones, interleaved."""
        cols = self.cols[name]
        w = self.weight(name).detach()
        shape = list(w.shape)
        shape[1] = cols.full
        out = torch.empty(shape, dtype=w.dtype)
        out.index_copy_(1, cols.keep, w)
        out.index_copy_(1, cols.closed, self.closed[name])
        return out

    def expand(self) -> None:
        """Put full-width weights back into the shard (closed columns as they were, trained
        columns as trained) and re-point the optimizer to them (its state of the closed
        columns zero, as a full-width run has it)."""
        if not self.active:
            return
        for name, cols in self.cols.items():
            w = self.weight(name)
            full = torch.nn.Parameter(self.full_weight(name), requires_grad=w.requires_grad)

            def widen(v: torch.Tensor, c: Columns = cols) -> torch.Tensor:
                return _widen(v, c)

            swap_param(self.optimizer, w, full, widen)
            self.shard.ops[name].weight = full
        self.closed = {}
        self.active = False

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The shard's ``state_dict`` at full width (copies), whether compact or not."""
        out = {k: v.detach().clone() for k, v in self.shard.state_dict().items()}
        if self.active:
            for name in self.cols:
                out[f"ops.{name}.weight"] = self.full_weight(name)
        return out

    def split_full(self, shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Compact: cut the compactable weights of a full-width state dict (in place) to their
        kept columns; return their closed columns (to :attr:`closed` once loaded)."""
        closed: dict[str, torch.Tensor] = {}
        if not self.active:
            return closed
        for name, cols in self.cols.items():
            key = f"ops.{name}.weight"
            w = shard.get(key)
            if not isinstance(w, torch.Tensor) or w.dim() < 2 or w.shape[1] != cols.full:
                raise ValueError(f"checkpoint: {key} is not a full-width weight")
            shard[key] = w.index_select(1, cols.keep)
            closed[name] = w.index_select(1, cols.closed)
        return closed

    def fit_optimizer_state(self, sd: Mapping[str, Any]) -> dict[str, Any]:
        """An optimizer state of a compact (full-width) trainer, for this full-width
        (compact) one: the state tensors of compactable weights cut to the kept columns, or
        widened with zeros."""
        sd = dict(sd)
        if not self.cols:
            return sd
        mine = {id(self.weight(name)): name for name in self.cols}
        saved = [i for g in sd.get("param_groups", []) for i in g["params"]]
        current = [p for g in self.optimizer.param_groups for p in g["params"]]
        states = dict(sd.get("state", {}))
        for i, p in zip(saved, current, strict=False):
            name = mine.get(id(p))
            if name is None or i not in states:
                continue
            cols = self.cols[name]
            fixed: dict[str, Any] = {}
            for key, v in states[i].items():
                if isinstance(v, torch.Tensor) and v.dim() == p.dim() and v.shape != p.shape:
                    if v.shape[1] == cols.full and p.shape[1] == cols.keep.numel():
                        v = v.index_select(1, cols.keep)
                    elif v.shape[1] == cols.keep.numel() and p.shape[1] == cols.full:
                        v = _widen(v, cols)
                fixed[key] = v
            states[i] = fixed
        sd["state"] = states
        return sd


def _widen(v: torch.Tensor, c: Columns) -> torch.Tensor:
    """Kept columns back at full width, zeros in the closed ones."""
    shape = list(v.shape)
    shape[1] = c.full
    return torch.zeros(shape, dtype=v.dtype).index_copy_(1, c.keep, v)


def swap_param(
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
