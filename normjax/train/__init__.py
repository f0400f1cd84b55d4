"""One training loop for every experiment: state, steps, checkpoints, metrics."""

from normjax.train.checkpoint import Checkpointer
from normjax.train.loop import Task, train_and_evaluate
from normjax.train.metrics import MetricsLog
from normjax.train.state import TrainState, create_train_state, make_optimizer

__all__ = [
    "Checkpointer",
    "MetricsLog",
    "Task",
    "TrainState",
    "create_train_state",
    "make_optimizer",
    "train_and_evaluate",
]
