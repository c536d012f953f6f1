"""Distributed training: each node trains its own shard with its peers over a transport.

See :mod:`disco_fl.training.step` for the protocol (forward, backward frames, commit) and
:mod:`disco_fl.training.dp` for differential privacy.
"""

from disco_fl.training.step import (
    NodeTrainer,
    StepAborted,
    StepBytes,
    StepResult,
    default_param_groups,
    plan_of,
    plan_open_count,
    predict_step_bytes,
)

__all__ = [
    "NodeTrainer",
    "StepAborted",
    "StepBytes",
    "StepResult",
    "default_param_groups",
    "plan_of",
    "plan_open_count",
    "predict_step_bytes",
]
