"""Distributed training: each node trains its own shard with its peers over a transport.

Modules, each read whole: :mod:`~disco_fl.training.step` (the trainer and the protocol of one
step), :mod:`~disco_fl.training.passes` (the forward and backward passes),
:mod:`~disco_fl.training.autograd` (lean-memory autograd), :mod:`~disco_fl.training.compact`
(compact weights), :mod:`~disco_fl.training.commit` (control frames: aborts and the commit
vote), :mod:`~disco_fl.training.checkpoint`, :mod:`~disco_fl.training.accounting` (predicted
bytes), :mod:`~disco_fl.training.errors`, :mod:`~disco_fl.training.trace` (the per-op trace
DP reads) and :mod:`~disco_fl.training.dp` (differential privacy).
"""

from disco_fl.partition import plan_open_count
from disco_fl.plan import plan_of
from disco_fl.training.accounting import StepBytes, predict_step_bytes
from disco_fl.training.errors import StepAborted
from disco_fl.training.step import NodeTrainer, StepResult, default_param_groups
from disco_fl.training.trace import OpTrace, StepTrace

__all__ = [
    "NodeTrainer",
    "OpTrace",
    "StepAborted",
    "StepBytes",
    "StepResult",
    "StepTrace",
    "default_param_groups",
    "plan_of",
    "plan_open_count",
    "predict_step_bytes",
]
