"""Generic training: train state, jitted step, loop, checkpoints, metric writers."""

from jaxalign.training.checkpoint import Checkpointer, CorruptCheckpointError, NonFiniteError, Resumed
from jaxalign.training.loop import count_tokens, train
from jaxalign.training.optim import OptimConfig, make_optimizer, make_schedule
from jaxalign.training.state import (
    ModelDef,
    TrainState,
    abstract_state,
    init_train_state,
    state_shardings,
)
from jaxalign.training.step import TrainStep, make_train_step

__all__ = [
    "Checkpointer",
    "CorruptCheckpointError",
    "ModelDef",
    "NonFiniteError",
    "OptimConfig",
    "Resumed",
    "TrainState",
    "TrainStep",
    "abstract_state",
    "count_tokens",
    "init_train_state",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "state_shardings",
    "train",
]
