"""The PPO trainer (trainer.py) and its parts: the batch an update trains on (batch.py), the
rollout metrics (metrics.py), held-out evaluation (evaluation.py), what records and stops a run
(control.py), save and resume (state.py)."""

from tether.trainers import NonFiniteError, lr_lambda
from tether.trainers.ppo.batch import PPOBatch
from tether.trainers.ppo.control import (LOG_LEVELS, NONFINITE_FAULT_ENV, STOP_SIGNALS, TrainingStopped, UpdateUndo,
                                         stop_requests)
from tether.trainers.ppo.metrics import reference_perplexity
from tether.trainers.ppo.trainer import PPOTrainer

__all__ = [
    "PPOTrainer",
    "PPOBatch",
    "TrainingStopped",
    "NonFiniteError",
    "UpdateUndo",
    "stop_requests",
    "STOP_SIGNALS",
    "LOG_LEVELS",
    "NONFINITE_FAULT_ENV",
    "reference_perplexity",
    "lr_lambda",
]
