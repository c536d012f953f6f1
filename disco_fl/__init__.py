"""disco_fl: DISCO (within-layer parallelism with learned sparse communications) on Flower."""

from disco_fl.emulation.model import PartitionedModel, partition
from disco_fl.partition import PartitionError

__all__ = ["PartitionError", "PartitionedModel", "partition"]
__version__ = "0.1.0"
