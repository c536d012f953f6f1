"""Shared test helpers."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
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
