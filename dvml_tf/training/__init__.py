"""Training: the run configuration and presets, distribution strategies, the training loop."""

from dvml_tf.training.config import DATASETS
from dvml_tf.training.config import STRATEGIES
from dvml_tf.training.config import TrainConfig
from dvml_tf.training.distribution import is_chief
from dvml_tf.training.distribution import make_strategy
from dvml_tf.training.run_loader import TrainedRun
from dvml_tf.training.run_loader import load_run
from dvml_tf.training.trainer import NonFiniteLossError
from dvml_tf.training.trainer import Trainer
from dvml_tf.training.trainer import build_model
from dvml_tf.training.trainer import make_distributed_step

__all__ = [
    "DATASETS",
    "STRATEGIES",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainedRun",
    "Trainer",
    "build_model",
    "is_chief",
    "load_run",
    "make_distributed_step",
    "make_strategy",
]
