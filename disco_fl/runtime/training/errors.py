"""Errors of the distributed training step.

:class:`StepAborted` is what a caller of :meth:`~disco_fl.runtime.training.NodeTrainer.step` sees;
:class:`PeerFailure` is raised inside a step when a peer reported an abort or an error, sent
something malformed, or cannot be reached (it names that peer, so the abort names it too).
"""

from __future__ import annotations


class StepAborted(RuntimeError):
    """A training step failed on some node; no node applied it.

    Attributes
    ----------
    node : int
        The node raising it.
    step : int
        The aborted step.
    failed_node : int
        The node where the failure started (``node`` itself for its own errors).
    cause : str
        What went wrong.
    """

    def __init__(self, node: int, step: int, failed_node: int, cause: str) -> None:
        who = "this node" if failed_node == node else f"node {failed_node}"
        super().__init__(
            f"node {node}: training step {step} aborted, {who} failed: {cause}; no update was "
            f"applied (resume from the last checkpoint)"
        )
        self.node = node
        self.step = step
        self.failed_node = failed_node
        self.cause = cause


class PeerFailure(RuntimeError):
    """Inside a step: peer ``peer`` reported an abort or an error, sent a malformed frame, or
    cannot be reached. The step aborts naming ``peer`` as the failed node."""

    def __init__(self, peer: int, cause: str) -> None:
        super().__init__(cause)
        self.peer = peer
