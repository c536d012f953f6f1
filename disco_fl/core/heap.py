"""The C heap under the tensors: keep it between requests, give it back when idle.

PyTorch's CPU tensors come from glibc's ``malloc``. By default glibc hands a large free block
back to the kernel as soon as it is freed (it trims the heap's top past a threshold that follows
the largest block freed so far, and maps the largest blocks on their own); the next tensor of
that size then touches fresh pages, one page fault per 4 KiB. A network whose activations are
tens of MiB pays that at every layer of every run: the two shards of ResNet-18 at 112 px, batch
8, took about 130,000 page faults and 0.5 s of system time per run on top of 1.2 s of user
time (docs/serving.md, "The heap between requests").

:func:`tune_heap` sets three of glibc's ``mallopt`` parameters for the whole process: no
automatic trim (``M_TRIM_THRESHOLD`` at its maximum), a fixed mmap threshold of 32 MiB
(``M_MMAP_THRESHOLD``, glibc's largest; blocks below it come from the heap and are reused) and
one arena (``M_ARENA_MAX``: a serving node computes on its event loop's thread, and a thread's
own arena is made of 64 MiB heaps that glibc unmaps whenever one empties, trim threshold or
not). Freed memory then stays in the process, where the next run reuses it without faults; the
serving nodes give it back when idle (:func:`release_free_memory`, after ``IDLE_TRIM_S`` in
:mod:`disco_fl.runtime.serving.serve_config`). The ``disco-fl`` commands, the Flower ClientApp's
handlers and the ServerApp call it (before their threads start); a library user may. It does
nothing where there is no glibc ``mallopt``, and nothing when the environment sets
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_ARENA_MAX`` (that choice
wins; ``bench/train.py`` sets the second to measure live memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Any

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
NO_TRIM = 2**31 - 1  # mallopt takes an int: trim only past 2 GiB of free top
ENV_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")

_LIBC: list[Any] = []  # the C library, looked up once (None: not available)
_TUNED: list[bool] = []


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _libc_fn(name: str) -> Any:
    if not _LIBC:
        lib = None
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(None)
        _LIBC.append(lib)
    lib = _LIBC[0]
    return getattr(lib, name, None) if lib is not None else None


def tune_heap() -> bool:
    """Keep freed memory in the process (see the module); ``True`` when set (now or by an
    earlier call), ``False`` where it cannot be or the environment chose otherwise."""
    if _TUNED:
        return _TUNED[0]
    ok = False
    mallopt = _libc_fn("mallopt")
    if mallopt is not None and not any(k in os.environ for k in ENV_SETTINGS):
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        settings = [
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, NO_TRIM),
            (M_ARENA_MAX, 1),
        ]
        ok = all([bool(mallopt(param, value)) for param, value in settings])  # every one set
    _TUNED.append(ok)
    return ok


def free_heap_bytes() -> int | None:
    """Bytes the C heap holds free, all arenas (glibc's ``mallinfo2().fordblks``); ``None``
    where there is no such call."""
    info = _libc_fn("mallinfo2")
    if info is None:
        return None
    info.argtypes, info.restype = [], _MallInfo2
    return int(info().fordblks)


def release_free_memory(keep_bytes: int = 0) -> bool:
    """Give the free pages of the C heap back to the operating system (glibc's
    ``malloc_trim``) when it holds more than ``keep_bytes`` free (unknown: always); ``False``
    where there is no such call or nothing was released."""
    trim = _libc_fn("malloc_trim")
    if trim is None:
        return False
    if keep_bytes > 0 and (free := free_heap_bytes()) is not None and free <= keep_bytes:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


__all__ = ["free_heap_bytes", "release_free_memory", "tune_heap"]
