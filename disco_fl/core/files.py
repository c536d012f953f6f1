"""Files on disk: atomic writes, stale temporary files, checksummed ``torch`` files.

One writer for the whole library (shards, plans, summaries, certificates, checkpoints):

- :func:`atomic_write_bytes` writes to a temporary file in the target's own folder (named
  ``.disco-tmp.<pid>.<random>.<name>``, mode ``0600``), fsyncs it, moves it over the target
  with ``os.replace`` and fsyncs the folder, so the rename itself survives a power cut. A
  reader sees the old file or the new one, never half of one; a write killed at any point
  leaves the previous file in place.
- :func:`remove_stale_temps` deletes what killed writes left behind: temporary files of a
  process that no longer runs (or older than :data:`STALE_S`). Every write cleans its folder
  first, and the checkpoint loaders clean theirs on start.
- :func:`save_torch` / :func:`load_torch`: checkpoints as ordinary ``torch.save`` zip files
  whose zip comment holds the sha256 of everything before it (``disco_fl sha256 <hex>``).
  ``torch.load`` and ``zipfile`` still read them as they are; :func:`load_torch` refuses a
  file whose checksum is missing or does not match with :class:`ChecksumError` (one flipped
  bit, a truncation), and unpickles only with ``weights_only=True``: a checkpoint holds
  tensors and plain data (dicts, lists, tuples, numbers, strings), checked when it is saved
  (:func:`plain_data`), never arbitrary objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "STALE_S",
    "TEMP_PREFIX",
    "ChecksumError",
    "atomic_write_bytes",
    "fsync_dir",
    "is_sealed",
    "load_torch",
    "plain_data",
    "remove_stale_temps",
    "save_torch",
]

TEMP_PREFIX = ".disco-tmp."
STALE_S = 3600.0  # a temporary file this old is stale even if its writer's pid is alive
_LEGACY_STALE_S = 60.0  # temporaries of the writers before this module (no pid in the name)
_TEMP_RE = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)\.")


class ChecksumError(ValueError):
    """A checkpoint file is corrupt: its checksum is missing or does not match its bytes."""


# ---- atomic writes -----------------------------------------------------------------------


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so that a rename inside it is durable (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows: signal 0 is CTRL_C_EVENT; age only
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # another user's process, or cannot tell: keep its file
    return True


def remove_stale_temps(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete temporary files that killed writes left in ``folder``; return what went.

    A file named ``.disco-tmp.<pid>.*`` is stale when no process ``<pid>`` runs any more or
    when it is older than :data:`STALE_S` (a write in progress, even in another thread of
    this process, is left alone). With ``name``, the temporaries of the earlier writers for
    that target (``.<name>.<8 random characters>[.tmp]``) older than a minute go too.
    """
    folder = Path(folder)
    legacy = None
    if name is not None:
        legacy = re.compile(r"\." + re.escape(name) + r"\.[a-z0-9_]{8}(\.tmp)?")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if m is None and not (legacy is not None and legacy.fullmatch(e.name)):
            continue
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            age = now - e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        stale = (not _pid_alive(int(m.group(1))) or age > STALE_S) if m else age > _LEGACY_STALE_S
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring).

    Missing parent folders are created. The file gets ``mode`` (default ``0600``: the
    temporary file's own mode). Stale temporary files in the folder are removed first. On
    any error the temporary file is removed, the previous ``path`` stays as it was and the
    exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(
        prefix=f"{TEMP_PREFIX}{os.getpid()}.", suffix=f".{path.name}", dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


# ---- checksummed torch files -------------------------------------------------------------

_MAGIC = b"disco_fl sha256 "
_TRAILER = len(_MAGIC) + 64  # the zip comment: magic + hex digest
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record: the last 22 bytes, no comment


def plain_data(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` as data that ``torch.load(weights_only=True)`` reads back: tensors, numbers,
    strings, bytes, None and dicts / lists / tuples of those. Dataclasses become dicts and
    numpy scalars / arrays numbers / tensors; anything else raises ``TypeError`` naming
    where it sits (better at save time than a checkpoint that cannot be loaded)."""
    import torch

    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, (torch.Size, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, Mapping):
        items = [(k, plain_data(v, f"{where}[{k!r}]")) for k, v in obj.items()]
        for k, _ in items:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"{where}: key {k!r} ({type(k).__name__}) is not plain data")
        if isinstance(obj, OrderedDict):  # a module's state dict: keep its version metadata
            out: Any = OrderedDict(items)
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                out._metadata = plain_data(dict(meta), f"{where}._metadata")
            return out
        return dict(items)
    if isinstance(obj, (list, tuple)):
        seq = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return seq if isinstance(obj, list) else tuple(seq)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain_data(dataclasses.asdict(obj), where)
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj.copy())
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__name__} is not plain data")


def _seal(data: bytes) -> bytes:
    """``torch.save`` output with the sha256 of the archive as its zip comment."""
    if len(data) < 22 or data[-22:-18] != _EOCD or data[-2:] != b"\0\0":
        raise ValueError("torch.save did not write a zip archive without a comment")
    body = data[:-2] + _TRAILER.to_bytes(2, "little")
    return body + _MAGIC + hashlib.sha256(body).hexdigest().encode()


def _unseal(data: bytes, source: str) -> bytes:
    """The verified archive of a sealed file (raises :class:`ChecksumError`)."""
    body, trailer = data[:-_TRAILER], data[-_TRAILER:]
    if (
        len(data) < 22 + _TRAILER
        or not trailer.startswith(_MAGIC)
        or body[-22:-18] != _EOCD
        or body[-2:] != _TRAILER.to_bytes(2, "little")
    ):
        raise ChecksumError(
            f"checkpoint {source} has no disco_fl checksum: it is truncated or corrupted, "
            "or was not written by disco_fl; refusing to load it"
        )
    recorded = trailer[len(_MAGIC) :].decode("ascii", "replace")
    actual = hashlib.sha256(body).hexdigest()
    if recorded != actual:
        raise ChecksumError(
            f"checkpoint {source} is corrupted: its sha256 is {actual[:16]}..., the checksum "
            f"recorded when it was written is {recorded[:16]}...; refusing to load it"
        )
    return data


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` ends like a file of :func:`save_torch`: the magic where it belongs,
    or a zip end record announcing a comment of the trailer's length (``torch.save`` writes
    none). One flipped bit or a short truncation leaves one of the two, so a damaged file
    of ours is never taken for another tool's file without a checksum."""
    if len(data) >= _TRAILER and data[-_TRAILER:].startswith(_MAGIC):
        return True
    tail = data[-(22 + _TRAILER) :]
    i = tail.rfind(_EOCD)
    while i >= 0:
        if len(tail) - i >= 22 and int.from_bytes(tail[i + 20 : i + 22], "little") == _TRAILER:
            return True
        i = tail.rfind(_EOCD, 0, i)
    return False


def save_torch(obj: Any, path: str | os.PathLike[str], mode: int | None = None) -> None:
    """``torch.save`` of :func:`plain_data` ``(obj)`` with a checksum, written atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(plain_data(obj), buf)
    atomic_write_bytes(path, _seal(buf.getvalue()), mode)


def load_torch(path: str | os.PathLike[str], require_checksum: bool = True) -> Any:
    """Read a file of :func:`save_torch`: checksum verified, ``weights_only=True``.

    With ``require_checksum=False`` a file without a checksum (a ``.pth`` of another tool)
    is read too, still with ``weights_only=True``; one that has a checksum must match it.

    Raises
    ------
    ChecksumError
        The checksum is missing (and required) or does not match; the message names the file.
    ValueError
        The verified file cannot be unpickled as plain data (message names the file).
    OSError
        It cannot be read.
    """
    import torch

    source = repr(os.fspath(path))
    data = Path(path).read_bytes()
    if require_checksum or is_sealed(data):
        data = _unseal(data, source)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for unreadable files
        raise ValueError(f"cannot read checkpoint {source}: {type(e).__name__}: {e}") from e
