"""The run's checkpoint: written after every round, read by :meth:`DiscoStrategy.resume`.

One file, ``<checkpoint_dir>/checkpoint.pt``: tensors and plain data only (loaded with
``weights_only=True``), a sha256 checksum in the zip comment, written atomically by
:func:`disco_fl.core.files.save_torch` (temporary file, fsync, rename, fsync of the folder), so a
killed write leaves the previous checkpoint. Content (:class:`RunState`): the rounds done, the
total rounds, the settings it must agree with to be resumed, the global arrays (every shard,
keys ``"<k>/<key>"``), the budget multiplier ``lam``, the per-round history, each
household's DP history and how the shards were sliced (:class:`~disco_fl.fl.server.devices.Slicing`:
``slices``, the rule; ``capacities``, as the nodes reported them; ``shares``, what the model was
partitioned with, the compute rule's timed shares included), so that a resumed run keeps exactly
that partition. A checkpoint written before ``slices`` and ``shares`` were kept holds only
``capacities``: it loads as the channels rule, partitioned with those capacities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from disco_fl.core.files import ChecksumError, load_torch, remove_stale_temps, save_torch
from disco_fl.fl.federated import rec_float, rec_int
from disco_fl.fl.server.devices import Slicing, set_slicing

CHECKPOINT_FORMAT = "disco_fl.fl_run/1"
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class RunState:
    """What a checkpoint holds (see the module docstring)."""

    rounds_done: int
    num_rounds: int
    settings: dict[str, Any]
    arrays: dict[str, torch.Tensor]
    lam: float
    history: list[dict[str, Any]] = field(default_factory=list)
    # household -> [(sigma, sample rate, committed DP steps)] of its data owners
    dp_history: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)
    slicing: Slicing = field(default_factory=Slicing)  # of the partition

    @classmethod
    def of(cls, strategy: Any, rounds_done: int, arrays: dict[str, torch.Tensor]) -> RunState:
        """The state of a :class:`~disco_fl.fl.server.strategy.DiscoStrategy` after
        ``rounds_done`` rounds, with the global ``arrays``."""
        return cls(
            rounds_done=rounds_done,
            num_rounds=strategy.num_rounds,
            settings=strategy.settings(),
            arrays=arrays,
            lam=strategy.lam,
            history=strategy.history,
            dp_history=strategy.dp_history,
            slicing=strategy.slicing,
        )

    def restore(self, strategy: Any) -> ArrayRecord:
        """Put this state into ``strategy`` (the counterpart of :meth:`of`): the rounds done,
        ``lam``, the histories, the slicing (the shards' partition) and the global arrays,
        loaded into its model and returned."""
        strategy.round_offset = self.rounds_done
        strategy.lam = self.lam
        strategy.history = self.history
        strategy.dp_history = self.dp_history
        set_slicing(strategy, self.slicing)
        arrays = ArrayRecord(self.arrays)
        strategy.assembled_model(arrays)  # loads the shards
        return arrays


def save_run(path: Path, state: RunState) -> None:
    """Write ``state`` to ``path`` atomically, with its checksum."""
    save_torch(
        {
            "format": CHECKPOINT_FORMAT,
            "rounds_done": state.rounds_done,
            "num_rounds": state.num_rounds,
            "settings": state.settings,
            "arrays": {k: v.clone() for k, v in state.arrays.items()},
            "lam": state.lam,
            "history": state.history,
            "dp_history": state.dp_history,
            "slices": state.slicing.rule,
            "capacities": _floats_out(state.slicing.capacities),
            "shares": _floats_out(state.slicing.shares),
        },
        path,
    )


def load_run(path: Path, settings: dict[str, Any]) -> RunState | None:
    """The checkpoint at ``path``, or None when there is none; removes the temporary files of
    killed writes first. Refuses a corrupted one (:class:`~disco_fl.core.files.ChecksumError`
    naming the file), one of another format, and one written with other ``settings``
    (``ValueError``)."""
    remove_stale_temps(path.parent)  # what a write killed in an earlier start left
    if not path.exists():
        return None
    try:
        state = load_torch(path)
    except ChecksumError as e:
        raise ChecksumError(f"cannot read run checkpoint {path}: {e}") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read run checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a DISCO run checkpoint")
    if state["settings"] != settings:
        raise ValueError(f"checkpoint {path} was written with other settings: {state['settings']}")
    return RunState(
        rounds_done=rec_int(state, "rounds_done"),
        num_rounds=rec_int(state, "num_rounds"),
        settings=state["settings"],
        arrays=dict(state["arrays"]),
        lam=rec_float(state, "lam"),
        history=list(state["history"]),
        dp_history={h: [tuple(x) for x in v] for h, v in state["dp_history"].items()},
        slicing=_slicing(state, path),
    )


def _floats_out(values: tuple[float, ...] | None) -> list[float] | None:
    return list(values) if values else None


def _floats_in(values: Any) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values else None


def _slicing(state: dict[str, Any], path: Path) -> Slicing:
    """The checkpoint's :class:`Slicing`; one without ``shares`` (written before they were
    kept) was partitioned by the channels rule with its ``capacities``."""
    caps = _floats_in(state.get("capacities"))
    if "shares" not in state:
        return Slicing("channels", caps, caps)
    try:
        return Slicing(str(state.get("slices", "channels")), caps, _floats_in(state["shares"]))
    except ValueError as e:
        raise ValueError(f"run checkpoint {path}: {e}") from e


__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "RunState", "load_run", "save_run"]
