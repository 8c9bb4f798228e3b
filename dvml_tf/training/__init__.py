"""Training: the run configuration and its flags, distribution strategies, the training loop.

Run construction (model, optimizer, splits, preprocessing, run folders) is `dvml_tf.task`.
"""

from dvml_tf.training.config import STRATEGIES
from dvml_tf.training.config import TrainConfig
from dvml_tf.training.distribution import is_chief
from dvml_tf.training.distribution import make_strategy
from dvml_tf.training.trainer import NonFiniteLossError
from dvml_tf.training.trainer import Trainer
from dvml_tf.training.trainer import make_distributed_step

__all__ = [
    "STRATEGIES",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "is_chief",
    "make_distributed_step",
    "make_strategy",
]
