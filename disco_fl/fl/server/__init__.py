"""Flower server side of DISCO: :class:`DiscoStrategy` and the ``ServerApp``.

Modules: :mod:`disco_fl.fl.server.strategy` (the strategy's hooks and thin ``start``),
:mod:`disco_fl.fl.server.roster` (who is in which household), :mod:`disco_fl.fl.server.devices`
(slices by the nodes' capacities, the memory check), :mod:`disco_fl.fl.server.exchange` (how long a
round waits for replies), :mod:`disco_fl.fl.server.aggregation` (replies as data, shard averaging),
:mod:`disco_fl.fl.server.degraded` (households that trained without a failed node),
:mod:`disco_fl.fl.server.checkpoint` (the run's checkpoint). The ``ServerApp`` lives in
:mod:`disco_fl.fl.server.server_app` (``disco_fl.fl.server.server_app:app``).
"""

from disco_fl.fl.server.checkpoint import CHECKPOINT_FORMAT
from disco_fl.fl.server.messages import DPSettings
from disco_fl.fl.server.roster import (
    Household,
    NodeInfo,
    NodeMemoryError,
    RosterError,
    build_roster,
)
from disco_fl.fl.server.strategy import DiscoStrategy

__all__ = [
    "CHECKPOINT_FORMAT",
    "DPSettings",
    "DiscoStrategy",
    "Household",
    "NodeInfo",
    "NodeMemoryError",
    "RosterError",
    "build_roster",
]
