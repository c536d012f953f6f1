"""Flower server side of DISCO: :class:`DiscoStrategy` and the ``ServerApp``.

Modules: :mod:`strategies.disco` (the strategy's hooks and thin ``start``),
:mod:`strategies.roster` (who is in which household), :mod:`strategies.devices` (slices by
the nodes' capacities, the memory check), :mod:`strategies.exchange` (how long a round waits
for replies), :mod:`strategies.aggregation` (replies as data, shard averaging),
:mod:`strategies.checkpoint` (the run's checkpoint). The ``ServerApp`` lives in
:mod:`strategies.server_app` (``strategies.server_app:app``).
"""

from strategies.checkpoint import CHECKPOINT_FORMAT
from strategies.disco import DiscoStrategy
from strategies.messages import DPSettings
from strategies.roster import Household, NodeInfo, NodeMemoryError, RosterError, build_roster

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
