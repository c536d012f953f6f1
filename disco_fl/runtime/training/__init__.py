"""Distributed training: each node trains its own shard with its peers over a transport.

Modules, each read whole: :mod:`~disco_fl.runtime.training.step` (the trainer and the protocol of
one step), :mod:`~disco_fl.runtime.training.passes` (the forward and backward passes),
:mod:`~disco_fl.runtime.training.autograd` (lean-memory autograd),
:mod:`~disco_fl.runtime.training.compact` (compact weights),
:mod:`~disco_fl.runtime.training.dropout` (node dropout),
:mod:`~disco_fl.runtime.training.degraded` (going on without a failed node),
:mod:`~disco_fl.runtime.training.commit` (control frames: aborts and the commit vote),
:mod:`~disco_fl.runtime.training.checkpoint`, :mod:`~disco_fl.runtime.training.accounting`
(predicted bytes), :mod:`~disco_fl.runtime.training.errors`, :mod:`~disco_fl.runtime.training.trace`
(the per-op trace DP reads) and :mod:`~disco_fl.runtime.training.dp` (differential privacy).
"""

from disco_fl.partition import plan_open_count
from disco_fl.partition.plan import plan_of
from disco_fl.runtime.training.accounting import StepBytes, predict_step_bytes
from disco_fl.runtime.training.degraded import degraded_step, enable_degraded
from disco_fl.runtime.training.errors import StepAborted
from disco_fl.runtime.training.step import NodeTrainer, StepResult, default_param_groups
from disco_fl.runtime.training.trace import OpTrace, StepTrace

__all__ = [
    "NodeTrainer",
    "OpTrace",
    "StepAborted",
    "StepBytes",
    "StepResult",
    "StepTrace",
    "default_param_groups",
    "degraded_step",
    "enable_degraded",
    "plan_of",
    "plan_open_count",
    "predict_step_bytes",
]
