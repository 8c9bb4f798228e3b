"""Backbones and the DVML model."""

from dvml_tf.models.backbones import BACKBONES
from dvml_tf.models.backbones import PixelNormalization
from dvml_tf.models.backbones import build_backbone
from dvml_tf.models.dvml_model import ACTIVE_UNIT_VARIANCE
from dvml_tf.models.dvml_model import LOG_KEYS
from dvml_tf.models.dvml_model import PAPER_PHASE1_WEIGHTS
from dvml_tf.models.dvml_model import PAPER_PHASE2_WEIGHTS
from dvml_tf.models.dvml_model import DVMLModel
from dvml_tf.models.dvml_model import inference_function

__all__ = [
    "ACTIVE_UNIT_VARIANCE",
    "BACKBONES",
    "LOG_KEYS",
    "PAPER_PHASE1_WEIGHTS",
    "PAPER_PHASE2_WEIGHTS",
    "DVMLModel",
    "PixelNormalization",
    "build_backbone",
    "inference_function",
]
