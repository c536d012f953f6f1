"""Partitioning: the op registry, the program format and the captures (fx, torch.export)."""

from disco_fl.partition import (  # noqa: F401  (register specs and capture rules)
    aten_rules,
    aten_rules_attention,
    capture_attention,
    capture_layers,
    capture_tensor,
    ops_attention,
    ops_comm,
    ops_drop,
    ops_local,
    ops_norm,
    ops_shape,
    ops_view,
    ops_vision,
    ops_window,
)
from disco_fl.partition.capture import (
    capture,
    capture_function,
    capture_leaf,
    capture_method,
    capture_module,
)
from disco_fl.partition.capture_export import capture_aten, capture_export, export_model
from disco_fl.partition.program import Op, Program, TensorInfo
from disco_fl.partition.registry import (
    SPECS,
    InferContext,
    NodeContext,
    OpenCount,
    OpSpec,
    PartitionError,
    Traffic,
    full_open_count,
    get_spec,
    op_traffic,
    plan_open_count,
    register_spec,
)

__all__ = [
    "SPECS",
    "InferContext",
    "NodeContext",
    "Op",
    "OpenCount",
    "OpSpec",
    "PartitionError",
    "Program",
    "TensorInfo",
    "Traffic",
    "capture",
    "capture_aten",
    "capture_export",
    "capture_function",
    "capture_leaf",
    "capture_method",
    "capture_module",
    "export_model",
    "full_open_count",
    "get_spec",
    "op_traffic",
    "plan_open_count",
    "register_spec",
]
