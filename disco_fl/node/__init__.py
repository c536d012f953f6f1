"""One node of a household: its schedule, the one driver of its program, and the lock-step
execution of N nodes in one process. See docs/architecture.md."""

from disco_fl.node.driver import FLUSH, TURN, Executor, MessageError, Recv, Send, drive
from disco_fl.node.lockstep import run_lockstep
from disco_fl.node.schedule import Step, direction_of, input_batch, message_problem, schedule

__all__ = [
    "FLUSH",
    "TURN",
    "Executor",
    "MessageError",
    "Recv",
    "Send",
    "Step",
    "direction_of",
    "drive",
    "input_batch",
    "message_problem",
    "run_lockstep",
    "schedule",
]
