"""Contrastive loss (Hadsell, Chopra & LeCun 2006), the "Contrastive" rows of DVML's tables."""

import keras
import tensorflow as tf

from dvml_tf.losses import base
from dvml_tf.losses import pairwise


@keras.saving.register_keras_serializable(package="dvml_tf")
class ContrastiveLoss(base.MetricLoss):
    """Pulls same-class pairs together and pushes other pairs beyond a margin.

    loss = mean over positive pairs of D^2 + mean over negative pairs of max(margin - D, 0)^2,
    over all pairs of the batch. The two means are taken separately because a P x K batch has
    about P times more negative than positive pairs.

    Args:
        margin: float. Distance beyond which a negative pair costs nothing. DVML §4 gives none;
            1.0 on the unit sphere is the pytorch-metric-learning default.
        normalize: bool. L2-normalize the embeddings first.
        **kwargs: forwarded to `MetricLoss`.
    """

    def __init__(self, margin=1.0, normalize=True, **kwargs):
        super().__init__(normalize=normalize, **kwargs)
        if margin <= 0:
            raise ValueError(f"The contrastive margin must be > 0; got {margin}.")
        self.margin = float(margin)

    def loss_value(self, embeddings, labels, seed):
        squared = pairwise.pairwise_squared_distances(embeddings)
        distances = pairwise.safe_sqrt(squared)
        positive, negative = pairwise.same_class_masks(labels)
        pull = pairwise.masked_mean(squared, positive)
        push = pairwise.masked_mean(tf.square(tf.nn.relu(self.margin - distances)), negative)
        return pull + push

    def get_config(self):
        config = super().get_config()
        config.update({"margin": self.margin})
        return config
