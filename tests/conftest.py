"""Shared test helpers."""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch


def import_torchvision() -> ModuleType:
    """Import torchvision (a test dependency only) with this project's CPU torch.

    torchvision 0.28's compiled ops (``nms``, ``roi_align``, ...) do not load against the CPU
    build of torch 2.13 used here, and its import then fails in ``torch.library.register_fake``
    ("operator torchvision::nms does not exist"). The model definitions never call those ops,
    so during the import ``register_fake`` is replaced by a function returning an identity
    decorator (the fake kernels of the missing ops are simply not registered), then restored.
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    original = torch.library.register_fake

    def _skip(*args: Any, **kwargs: Any) -> Any:
        return lambda fn: fn

    torch.library.register_fake = _skip  # type: ignore[assignment]
    try:
        import torchvision
    finally:
        torch.library.register_fake = original  # type: ignore[assignment]
    return torchvision


@pytest.fixture
def flower_run_identity() -> Iterator[None]:
    """Messages need a run id (Flower sets one inside a ServerApp); for tests that build
    Messages outside one."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def run_nodes(call: Callable[[int], Any], n: int, timeout: float = 120.0) -> list[Any]:
    """``call(k)`` for nodes ``k = 0..n-1``, each in its own thread (a household in one
    process); returns the results in node order, or raises the first node's error."""
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n

    def go(k: int) -> None:
        try:
            results[k] = call(k)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[k] = e

    threads = [threading.Thread(target=go, args=(k,), daemon=True) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    assert not any(th.is_alive() for th in threads), f"a node did not finish in {timeout} s"
    for e in errors:
        if e is not None:
            raise e
    return results


# ---- the suite on several workers (pytest-xdist, `-n 2` in pyproject.toml's addopts) ---------
#
# A worker runs torch on one thread; two marks shape the parallel run; none of it changes what
# a test checks:
# - ``slow(seconds=S)``: a test that takes about S seconds on 2 busy cores. Slow tests run
#   first, longest first, so that the workers finish together instead of one of them
#   starting a two-minute test at the end (the Flower deployments, ``xdist_group("flower")``,
#   go to one worker together).
# - ``exclusive``: a test that times itself against tight bounds (milliseconds over an emulated
#   link, a deadline + 0.5 s): no other test runs on any worker while it runs (set-up and
#   tear-down included), so it sees the load of the serial suite, not of two at once.


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker computes on one thread (its processes too): two workers with torch's
    default of a thread per core oversubscribe the 2 cores, and the CPU-bound tests then take
    twice as long (tests/test_zoo.py, measured)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def expected_s(item: pytest.Item) -> float:
        mark = item.get_closest_marker("slow")
        return float(mark.kwargs.get("seconds", 30.0)) if mark is not None else 0.0

    # stable: the slow tests first by expected time, the others in their usual order
    items.sort(key=lambda item: -expected_s(item))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Under xdist: every test holds a shared lock, an ``exclusive`` test the exclusive one
    (readers-writer over ``flock``; a turnstile lets a waiting exclusive test in before new
    shared holders, so it is not starved)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        yield
        return
    exclusive = item.get_closest_marker("exclusive") is not None
    folder = Path(tempfile.gettempdir())
    with (
        open(folder / f"pytest-{run}.turnstile", "a") as turnstile,
        open(folder / f"pytest-{run}.lock", "a") as lock,
    ):
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
