"""dvml_tf: Deep Variational Metric Learning (Lin et al., ECCV 2018) in Keras 3 / TensorFlow 2.

data -> models (backbone, DVML heads, decoder) -> losses -> training -> evaluation -> export.
"""

from dvml_tf.evaluation.callbacks import RetrievalMetricsCallback
from dvml_tf.losses import METRIC_LOSSES
from dvml_tf.losses import ContrastiveLoss
from dvml_tf.losses import MarginDWSLoss
from dvml_tf.losses import MetricLoss
from dvml_tf.losses import NPairLoss
from dvml_tf.losses import Triplet2DWSLoss
from dvml_tf.losses import TripletLoss
from dvml_tf.losses import get_metric_loss
from dvml_tf.models import BACKBONES
from dvml_tf.models import DVMLModel
from dvml_tf.models import build_backbone

__version__ = "0.1.0"

__all__ = [
    "BACKBONES",
    "METRIC_LOSSES",
    "ContrastiveLoss",
    "DVMLModel",
    "MarginDWSLoss",
    "MetricLoss",
    "NPairLoss",
    "RetrievalMetricsCallback",
    "Triplet2DWSLoss",
    "TripletLoss",
    "build_backbone",
    "get_metric_loss",
]
