"""Partitioning: the op registry, the program format and the fx capture."""

from disco_fl.partition import (  # noqa: F401  (register specs)
    ops_attention,
    ops_comm,
    ops_local,
    ops_norm,
)
from disco_fl.partition.capture import (
    capture,
    capture_function,
    capture_leaf,
    capture_method,
    capture_module,
)
from disco_fl.partition.program import Op, Program, TensorInfo
from disco_fl.partition.registry import (
    SPECS,
    InferContext,
    NodeContext,
    OpSpec,
    PartitionError,
    Traffic,
    get_spec,
    register_spec,
)

__all__ = [
    "SPECS",
    "InferContext",
    "NodeContext",
    "Op",
    "OpSpec",
    "PartitionError",
    "Program",
    "TensorInfo",
    "Traffic",
    "capture",
    "capture_function",
    "capture_leaf",
    "capture_method",
    "capture_module",
    "get_spec",
    "register_spec",
]
