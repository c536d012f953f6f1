"""Checkpoints of a node's training state: shard (full width), optimizer state, steps done.

A checkpoint belongs to one node of one plan (both checked on load). It holds tensors and
plain data only, is written atomically with a sha256 checksum
(:func:`~disco_fl.core.files.save_torch`) and read with ``weights_only=True``
(:func:`read_checkpoint`). The trainer fits the optimizer state of a compact checkpoint to a
full-width trainer and the other way round
(:meth:`~disco_fl.runtime.training.compact.CompactWeights.fit_optimizer_state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from disco_fl.core.files import ChecksumError, load_torch, remove_stale_temps, save_torch

CHECKPOINT_FORMAT = "disco_fl.train_node/1"


def checkpoint_state(
    *,
    node: int,
    plan_hash: str,
    steps_done: int,
    shard: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any],
    compact: bool,
    dp: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a checkpoint holds: the node's full-width shard, its optimizer state (of the
    compact weights when ``compact``), steps done, node and plan hash, and DP state."""
    out: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "node": node,
        "plan_hash": plan_hash,
        "steps_done": steps_done,
        "shard": dict(shard),
        "optimizer": optimizer,
        "compact": compact,  # the optimizer state's weights hold the kept columns
    }
    if dp is not None:
        out["dp"] = dp
    return out


def check_checkpoint(state: Mapping[str, Any], node: int, plan_hash: str) -> None:
    """Raise ``ValueError`` unless ``state`` is a training checkpoint of ``node`` and plan."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a disco_fl training checkpoint")
    if state.get("node") != node or state.get("plan_hash") != plan_hash:
        raise ValueError(
            f"checkpoint of node {state.get('node')} (plan {str(state.get('plan_hash'))[:12]})"
            f" does not belong to node {node} (plan {plan_hash[:12]})"
        )


def write_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Write ``state`` with a sha256 checksum, atomically: a killed write leaves the previous
    checkpoint (:func:`~disco_fl.core.files.save_torch`)."""
    save_torch(dict(state), path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`write_checkpoint`.

    The checksum is verified (a corrupted or truncated file raises
    :class:`~disco_fl.core.files.ChecksumError` naming it) and only plain data is unpickled
    (``weights_only=True``). Temporary files of killed writes beside it are removed."""
    remove_stale_temps(Path(path).parent)
    try:
        state = load_torch(path)
    except ChecksumError as e:
        raise ChecksumError(f"cannot read training checkpoint {path}: {e}") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read training checkpoint {path}: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a training checkpoint")
    return state
