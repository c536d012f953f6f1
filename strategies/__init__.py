"""Flower server side of DISCO: :class:`DiscoStrategy` and the ``ServerApp``.

The ``ServerApp`` lives in :mod:`strategies.server_app` (``strategies.server_app:app``).
"""

from strategies.disco import (
    CHECKPOINT_FORMAT,
    DiscoStrategy,
    DPSettings,
    Household,
    NodeInfo,
    RosterError,
    build_roster,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "DPSettings",
    "DiscoStrategy",
    "Household",
    "NodeInfo",
    "RosterError",
    "build_roster",
]
