"""Base metric losses (written in TF ops: tensorflow-addons does not import on TF 2.21) and the
variational terms of DVML."""

from dvml_tf.losses.base import MetricLoss
from dvml_tf.losses.contrastive import ContrastiveLoss
from dvml_tf.losses.distance_weighted import MarginDWSLoss
from dvml_tf.losses.distance_weighted import Triplet2DWSLoss
from dvml_tf.losses.npair import NPairLoss
from dvml_tf.losses.synthesis import METHODS as SYNTHESIS_METHODS
from dvml_tf.losses.synthesis import SyntheticAugmentation
from dvml_tf.losses.triplet import TripletLoss
from dvml_tf.losses.variational import half_squared_error
from dvml_tf.losses.variational import kl_divergence
from dvml_tf.losses.variational import kl_per_dimension
from dvml_tf.losses.variational import reconstruction_distance

METRIC_LOSSES = {
    "triplet": TripletLoss,
    "npair": NPairLoss,
    "triplet2_dws": Triplet2DWSLoss,
    "margin_dws": MarginDWSLoss,
    "contrastive": ContrastiveLoss,
}


def get_metric_loss(name, synthesis="none", **kwargs):
    """Builds a base metric loss by name, optionally augmented by a reference synthesis.

    Args:
        name: one of `METRIC_LOSSES`.
        synthesis: "none" or one of `SYNTHESIS_METHODS` (`SyntheticAugmentation`).
        **kwargs: the loss's constructor arguments.

    Returns:
        A `MetricLoss`.

    Raises:
        ValueError: for an unknown name or method.
    """
    if name not in METRIC_LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid losses: {', '.join(METRIC_LOSSES)}.")
    loss = METRIC_LOSSES[name](**kwargs)
    if synthesis == "none":
        return loss
    return SyntheticAugmentation(loss, synthesis)


__all__ = [
    "METRIC_LOSSES",
    "SYNTHESIS_METHODS",
    "ContrastiveLoss",
    "MarginDWSLoss",
    "MetricLoss",
    "NPairLoss",
    "SyntheticAugmentation",
    "Triplet2DWSLoss",
    "TripletLoss",
    "get_metric_loss",
    "half_squared_error",
    "kl_divergence",
    "kl_per_dimension",
    "reconstruction_distance",
]
