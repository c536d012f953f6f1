"""Channel ownership: which node holds which channel of a tensor.

A :class:`Layout` maps every global channel of a tensor to the node that owns it. Node ``k``
always stores its channels in ascending global order, so a layout is enough to assemble the
full tensor from the node slices and to slice a full parameter for one node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

CHANNEL_ALIGN = 8  # uneven channel slices in whole groups of this many (see split_sizes)
ALIGN_MIN_GROUPS = 4  # ... where a layer has at least this many groups per node


def split_sizes(
    total: int,
    num_nodes: int,
    capacities: Sequence[float] | None = None,
    *,
    what: str = "layer",
    align: int = 1,
) -> list[int]:
    """Split ``total`` channels into ``num_nodes`` contiguous parts.

    Parameters
    ----------
    total : int
        Number of channels to split.
    num_nodes : int
        Number of nodes.
    capacities : sequence of float, optional
        Relative capacity of each node. Default ``None`` gives an equal split where the first
        ``total % num_nodes`` nodes get one extra channel. Otherwise sizes are proportional to
        the capacities: ``total * c_k / sum(c)`` rounded by largest remainder (a tie goes to
        the node of smaller capacity, then the lower index), then every node below one channel
        gets one from the node most above its exact share.
    what : str
        Name used in the error message.
    align : int
        With capacities: sizes in whole groups of ``align`` channels (the same rounding over
        groups) where ``total`` is a multiple of ``align`` with at least ``ALIGN_MIN_GROUPS``
        groups per node; else channel by channel. Mixing layers use ``CHANNEL_ALIGN``: CPU
        convolution kernels work on blocks of 8 fp32 channels (AVX2; oneDNN's blocked layouts):
        ResNet-18's shard of 25 / 50 / 99 / 198 channels computed 40 % longer than that of
        24 / 48 / 96 / 192 (``bench/household_uneven.py``, BENCHMARKS.md "Uneven devices").
        Equal splits are never aligned (equal devices stay equal).

    Raises
    ------
    ValueError
        If there are fewer channels than nodes, or the capacities are invalid.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    if total < num_nodes:
        raise ValueError(
            f"{what} has {total} channels, fewer than num_nodes={num_nodes}: every node must own "
            "at least one channel of every layer"
        )
    if capacities is None:
        base, extra = divmod(total, num_nodes)
        return [base + (1 if k < extra else 0) for k in range(num_nodes)]
    if len(capacities) != num_nodes or any(not 0 < c < float("inf") for c in capacities):
        raise ValueError(f"capacities must be {num_nodes} positive numbers, got {list(capacities)}")
    if align > 1 and total % align == 0 and total // align >= ALIGN_MIN_GROUPS * num_nodes:
        return [align * g for g in split_sizes(total // align, num_nodes, capacities, what=what)]
    weight = sum(capacities)
    exact = [total * c / weight for c in capacities]
    sizes = [int(e) for e in exact]
    order = sorted(range(num_nodes), key=lambda k: (sizes[k] - exact[k], capacities[k], k))
    for k in order[: total - sum(sizes)]:
        sizes[k] += 1
    for k in range(num_nodes):
        if sizes[k] == 0:  # total >= num_nodes: some node holds more than one
            j = max(
                (j for j in range(num_nodes) if sizes[j] > 1), key=lambda j: sizes[j] - exact[j]
            )
            sizes[j] -= 1
            sizes[k] = 1
    return sizes


@dataclass(frozen=True)
class Layout:
    """Owner node of every global channel of one tensor."""

    owners: tuple[int, ...]  # owners[c] = node holding global channel c
    num_nodes: int
    _cache: dict[int, torch.Tensor] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )
    _runs: list[tuple[int, int]] = field(  # to_json's, computed once (plans hash often)
        default_factory=list, compare=False, hash=False, repr=False
    )

    @staticmethod
    def contiguous(sizes: Sequence[int]) -> Layout:
        owners: list[int] = []
        for k, s in enumerate(sizes):
            owners.extend([k] * s)
        return Layout(tuple(owners), len(sizes))

    @property
    def num_channels(self) -> int:
        return len(self.owners)

    @cached_property
    def _indices(self) -> tuple[tuple[int, ...], ...]:
        per: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for c, k in enumerate(self.owners):
            per[k].append(c)
        return tuple(tuple(p) for p in per)

    def indices(self, k: int) -> tuple[int, ...]:
        """Global channel indices held by node ``k``, ascending."""
        return self._indices[k]

    def index_tensor(self, k: int) -> torch.Tensor:
        if k not in self._cache:
            self._cache[k] = torch.tensor(self.indices(k), dtype=torch.long)
        return self._cache[k]

    def count(self, k: int) -> int:
        return len(self._indices[k])

    def repeat_each(self, n: int) -> Layout:
        """Layout after flattening ``(C, n)`` into ``C * n`` features (channel-major)."""
        return Layout(tuple(k for k in self.owners for _ in range(n)), self.num_nodes)

    def concat(self, other: Layout) -> Layout:
        return Layout(self.owners + other.owners, self.num_nodes)

    def is_contiguous(self) -> bool:
        return list(self.owners) == sorted(self.owners)

    def to_json(self) -> list[list[int]]:
        """Run-length encoding ``[[owner, count], ...]``."""
        if not self._runs and self.owners:
            runs: list[list[int]] = []
            for k in self.owners:
                if runs and runs[-1][0] == k:
                    runs[-1][1] += 1
                else:
                    runs.append([k, 1])
            self._runs.extend((k, n) for k, n in runs)
        return [[k, n] for k, n in self._runs]

    @staticmethod
    def from_json(runs: Sequence[Sequence[int]], num_nodes: int) -> Layout:
        owners: list[int] = []
        for k, n in runs:
            if not 0 <= int(k) < num_nodes or int(n) < 1:
                raise ValueError(f"invalid layout run {[k, n]} for {num_nodes} nodes")
            owners.extend([int(k)] * int(n))
        return Layout(tuple(owners), num_nodes)
