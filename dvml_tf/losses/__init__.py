"""Base metric losses (written in TF ops: tensorflow-addons does not import on TF 2.21) and the
variational terms of DVML."""

from dvml_tf.losses.base import MetricLoss
from dvml_tf.losses.contrastive import ContrastiveLoss
from dvml_tf.losses.distance_weighted import MarginDWSLoss
from dvml_tf.losses.distance_weighted import Triplet2DWSLoss
from dvml_tf.losses.npair import NPairLoss
from dvml_tf.losses.triplet import TripletLoss
from dvml_tf.losses.variational import kl_divergence
from dvml_tf.losses.variational import reconstruction_distance

METRIC_LOSSES = {
    "triplet": TripletLoss,
    "npair": NPairLoss,
    "triplet2_dws": Triplet2DWSLoss,
    "margin_dws": MarginDWSLoss,
    "contrastive": ContrastiveLoss,
}


def get_metric_loss(name, **kwargs):
    """Builds a base metric loss by name.

    Args:
        name: one of `METRIC_LOSSES`.
        **kwargs: the loss's constructor arguments.

    Returns:
        A `MetricLoss`.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in METRIC_LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid losses: {', '.join(METRIC_LOSSES)}.")
    return METRIC_LOSSES[name](**kwargs)


__all__ = [
    "METRIC_LOSSES",
    "ContrastiveLoss",
    "MarginDWSLoss",
    "MetricLoss",
    "NPairLoss",
    "Triplet2DWSLoss",
    "TripletLoss",
    "get_metric_loss",
    "kl_divergence",
    "reconstruction_distance",
]
