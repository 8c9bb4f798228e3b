"""Triplet loss on squared Euclidean distances (DVML Eq. 2; Weinberger & Saul 2009, FaceNet)."""

import keras
import tensorflow as tf

from dvml_tf.losses import base
from dvml_tf.losses import pairwise

MINING_MODES = ("all", "semihard")
REDUCTIONS = ("all", "active")


@keras.saving.register_keras_serializable(package="dvml_tf")
class TripletLoss(base.MetricLoss):
    """Triplet loss max(margin + D(a, p)^2 - D(a, n)^2, 0) over the triplets of a batch.

    Args:
        margin: float. Margin alpha on squared distances. Paper §3.1 gives none: 0.2 on the
            unit sphere follows FaceNet.
        mining: `"all"` averages over every valid triplet of the batch (anchor a, positive p of
            a's class, negative n of another class); `"semihard"` uses, for every positive pair,
            the closest negative farther than the positive (FaceNet), or the farthest negative
            when no such negative exists (the `tfa.losses.TripletSemiHardLoss` rule); the loss
            is the mean over positive pairs.
        normalize: bool. L2-normalize the embeddings first. Paper §4.1 is silent; the lab's
            Chainer code normalizes.
        reduction: `"all"` averages the hinge over every triplet (paper Eq. 2 sums them);
            `"active"` over the triplets with a non-zero loss only, so that the loss does not
            shrink towards 0 as most triplets become satisfied (its gradient per active triplet
            stays the same scale; FaceNet-style "batch all" averaging).
        **kwargs: forwarded to `MetricLoss`.
    """

    def __init__(self, margin=0.2, mining="all", normalize=True, reduction="all", **kwargs):
        super().__init__(normalize=normalize, **kwargs)
        if mining not in MINING_MODES:
            raise ValueError(
                f"Unknown triplet mining {mining!r}; valid: {', '.join(MINING_MODES)}."
            )
        if margin < 0:
            raise ValueError(f"The triplet margin must be >= 0; got {margin}.")
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"Unknown triplet reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}."
            )
        self.margin = float(margin)
        self.mining = mining
        self.reduction = reduction

    def _reduce(self, hinge, valid):
        if self.reduction == "active":
            valid = tf.logical_and(valid, hinge > 0)
        return pairwise.masked_mean(hinge, valid)

    def loss_value(self, embeddings, labels, seed):
        distances = pairwise.pairwise_squared_distances(embeddings)
        positive, negative = pairwise.same_class_masks(labels)
        anchor_positive = distances[..., :, :, None]  # [..., a, p, 1]
        anchor_negative = distances[..., :, None, :]  # [..., a, 1, n]
        if self.mining == "all":
            hinge = tf.nn.relu(self.margin + anchor_positive - anchor_negative)  # [..., a, p, n]
            valid = tf.logical_and(positive[:, :, None], negative[:, None, :])
            return self._reduce(hinge, valid)
        # Semi-hard: for each (a, p), the closest negative with D(a, n) > D(a, p).
        big = tf.reduce_max(distances) + 1.0
        semihard = tf.logical_and(negative[:, None, :], anchor_negative > anchor_positive)
        closest_semihard = tf.reduce_min(tf.where(semihard, anchor_negative, big), axis=-1)
        farthest_negative = tf.reduce_max(
            tf.where(negative, distances, tf.zeros_like(distances)), axis=-1, keepdims=True
        )
        chosen = tf.where(tf.reduce_any(semihard, axis=-1), closest_semihard, farthest_negative)
        hinge = tf.nn.relu(self.margin + distances - chosen)  # [..., a, p]
        return self._reduce(hinge, positive)

    def get_config(self):
        config = super().get_config()
        config.update({"margin": self.margin, "mining": self.mining, "reduction": self.reduction})
        return config
