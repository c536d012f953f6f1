"""Strict checkpoint loading and atomic, checksummed checkpoint saving.

Files of :func:`save_checkpoint_atomic` are ordinary ``torch.save`` files whose zip comment
holds their sha256 (:mod:`disco_fl.core.files`); :func:`load_checkpoint_strict` verifies it and
refuses a mismatch with :class:`CheckpointChecksumError`. A ``.pth`` of another tool (no
checksum) is still read, with ``weights_only=True``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from disco_fl.core.files import ChecksumError, load_torch, save_torch

__all__ = [
    "CheckpointChecksumError",
    "CheckpointError",
    "load_checkpoint_strict",
    "save_checkpoint_atomic",
]

_WRAPPER_KEYS = ("state_dict", "model")
_NUM_BATCHES_TRACKED = "num_batches_tracked"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model."""


class CheckpointChecksumError(CheckpointError, ChecksumError):
    """A checkpoint written with a checksum no longer matches it (corrupted on disk)."""


def _read(path: str | os.PathLike[str]) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {os.fspath(path)!r} does not exist")
    try:
        return load_torch(path, require_checksum=False)
    except ChecksumError as exc:
        raise CheckpointChecksumError(str(exc)) from exc
    except Exception as exc:  # corrupt, truncated or unsafe pickles all end up here
        raise CheckpointError(
            f"could not read checkpoint {os.fspath(path)!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {source} holds a {type(obj).__name__}, not a state dict")
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner
    return obj


def _format_error(
    source: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...] | str]],
) -> str:
    lines = [f"checkpoint {source} does not match the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if all(k.startswith("module.") for k in unexpected) and missing:
            lines.append("  hint: keys start with 'module.'; strip the DataParallel prefix")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}):")
        for name, expected, got in mismatched:
            lines.append(f"    {name}: expected {expected}, got {got}")
    return "\n".join(lines)


def load_checkpoint_strict(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    allow_missing_num_batches_tracked: bool = True,
) -> None:
    """Load a torchvision-style checkpoint into ``model`` after checking every key and shape.

    Parameters
    ----------
    model : nn.Module
        The model to load into (in place).
    path_or_state_dict : str, os.PathLike or Mapping
        A ``.pth`` file, read with ``torch.load(..., map_location="cpu", weights_only=True)``,
        or an in-memory object. Either is a state dict or a dict whose ``"state_dict"`` or
        ``"model"`` entry is one (checked in that order).
    allow_missing_num_batches_tracked : bool, default True
        Accept checkpoints without BatchNorm ``*.num_batches_tracked`` buffers (older
        torchvision weights lack them); those buffers are then set to 0, which is what
        PyTorch's own BatchNorm loading does. With False they count as missing keys.

    Raises
    ------
    CheckpointError
        If the file is missing, corrupt or not a state dict (the message names the path), or
        if keys are missing or unexpected or shapes differ (the message lists every missing
        key, every unexpected key and every shape mismatch with expected and actual shape).
        :class:`CheckpointChecksumError` (a subclass) if the file carries a checksum that
        does not match its bytes.
    """
    if isinstance(path_or_state_dict, Mapping):
        source = "<state dict>"
        state = _unwrap(path_or_state_dict, source)
    else:
        source = repr(os.fspath(path_or_state_dict))
        state = _unwrap(_read(path_or_state_dict), source)

    expected = model.state_dict()
    sd: dict[str, Any] = dict(state)
    if allow_missing_num_batches_tracked:
        for key, value in expected.items():
            if key.rsplit(".", 1)[-1] == _NUM_BATCHES_TRACKED and key not in sd:
                sd[key] = torch.zeros_like(value)

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...] | str]] = []
    for key, ref in expected.items():
        if key not in sd:
            continue
        got = sd[key]
        if not isinstance(got, torch.Tensor):
            mismatched.append((key, tuple(ref.shape), f"a {type(got).__name__}, not a tensor"))
        elif tuple(got.shape) != tuple(ref.shape):
            mismatched.append((key, tuple(ref.shape), tuple(got.shape)))
    if missing or unexpected or mismatched:
        raise CheckpointError(_format_error(source, missing, unexpected, mismatched))
    model.load_state_dict(sd, strict=True)


def save_checkpoint_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """Save ``obj`` with ``torch.save`` and a checksum so that ``path`` is never left
    half-written and a later corruption is detected.

    The bytes (their sha256 in the zip comment) go to a temporary file in the same
    directory, which is fsynced and moved over ``path`` with ``os.replace``; the directory is
    fsynced too (:func:`disco_fl.core.files.atomic_write_bytes`). If anything fails, the temporary
    file is removed, any previous file at ``path`` is left untouched and the exception
    propagates.

    Parameters
    ----------
    obj : Any
        What to save (typically ``model.state_dict()``): tensors and plain data only
        (:func:`disco_fl.core.files.plain_data`; anything else raises ``TypeError``).
    path : str or os.PathLike
        Destination. Missing parent directories are created. The file gets mode 0o644.
    """
    save_torch(obj, path, mode=0o644)
