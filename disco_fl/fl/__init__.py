"""DISCO on Flower: the model spec and record packing (``federated``), the typed round
config (``round_config``), the edge ``ClientApp`` (``client_app``, served as
``disco_fl.fl.client_app:app``), the shards delivered to the nodes (``delivery``) and the
server side (``server``: :class:`DiscoStrategy` and the ``ServerApp``).

What a user's own Flower app needs (see README.md, "Bring your own model")::

    from disco_fl.fl import DiscoStrategy, ModelSpec, make_client_app, run_disco

(imported on first use, so that a ClientApp process does not import the server side).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DPSettings": "disco_fl.fl.server.messages",
    "DiscoStrategy": "disco_fl.fl.server.strategy",
    "ModelSpec": "disco_fl.fl.federated",
    "make_client_app": "disco_fl.fl.client_app",
    "run_disco": "disco_fl.fl.server.server_app",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'disco_fl.fl' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
