"""Distance-weighted sampling and the two losses built on it (Wu et al., ICCV 2017).

DVML's "Triplet2 + DWS" (Eq. 4) is an un-squared triplet hinge on triplets chosen by Wu et al.'s
distance-weighted sampling; Wu et al.'s own loss is the margin loss with a learnable boundary
beta. Both are here. Embeddings live on the unit sphere, where the density of the distance d
between two uniformly spread points in R^n is q(d) ∝ d^(n-2) (1 - d^2/4)^((n-3)/2); negatives are
drawn with probability ∝ min(λ, 1/q(d)), which spreads them over all distances instead of
concentrating them near sqrt(2).

Sampling follows the authors' MXNet example (`example/gluon/embedding_learning/model.py`): distances
are clipped below at `cutoff` (this is the λ cap), negatives at or beyond `nonzero_loss_cutoff`
(which cannot produce a loss) get weight 0, and every positive pair (a, p) of the batch is paired
with one negative drawn for its anchor, i.e. K - 1 negatives per anchor in a P x K batch. An
anchor whose negatives are all beyond the cutoff draws uniformly among its negatives.
"""

import keras
import tensorflow as tf

from dvml_tf.losses import base
from dvml_tf.losses import pairwise


def distance_weighted_log_weights(distances, negative, embedding_dim, cutoff, nonzero_loss_cutoff):
    """Unnormalized log-probabilities of choosing each negative for each anchor.

    Args:
        distances: float tensor `[..., B, B]`, Euclidean distances on the unit sphere.
        negative: bool tensor `[B, B]`, true where the pair is of different classes.
        embedding_dim: int, n in q(d).
        cutoff: float, distances are clipped below at this value.
        nonzero_loss_cutoff: float, negatives at or beyond this distance get probability 0.

    Returns:
        Float tensor `[..., B, B]` of logits with -inf where a pair must not be drawn. Every row
        with at least one negative has a finite entry.
    """
    distances = tf.stop_gradient(distances)
    clipped = tf.maximum(distances, cutoff)
    n = float(embedding_dim)
    # log(1/q(d)) = -(n - 2) log d - ((n - 3) / 2) log(1 - d^2 / 4)
    log_weights = -(n - 2.0) * tf.math.log(clipped) - ((n - 3.0) / 2.0) * tf.math.log(
        tf.maximum(1.0 - 0.25 * tf.square(clipped), 1e-8)
    )
    allowed = tf.logical_and(negative, distances < nonzero_loss_cutoff)
    minus_inf = tf.constant(-float("inf"), distances.dtype)
    # Subtracting the row maximum keeps exp() in range for large n (n = 512 gives |log w| ~ 1e3).
    row_max = tf.reduce_max(tf.where(allowed, log_weights, minus_inf), axis=-1, keepdims=True)
    weighted = tf.where(allowed, log_weights - row_max, minus_inf)
    uniform = tf.where(negative, tf.zeros_like(distances), minus_inf)
    has_allowed = tf.reduce_any(allowed, axis=-1, keepdims=True)
    return tf.where(has_allowed, weighted, uniform)


def sample_negatives(log_weights, seed):
    """Draws one negative per (anchor, slot): `[..., B, B]` indices into the batch.

    Args:
        log_weights: float tensor `[..., B, B]` from `distance_weighted_log_weights`.
        seed: int tensor `[2]` for stateless sampling.

    Returns:
        int32 tensor `[..., B, B]`: entry (a, j) is the negative drawn for anchor a in slot j.
    """
    shape = tf.shape(log_weights)
    batch = shape[-1]
    rows = tf.reshape(log_weights, [-1, batch])
    # XLA compiles stateless_categorical only with an int32 seed.
    seed = tf.cast(seed, tf.int32)
    drawn = tf.random.stateless_categorical(rows, batch, seed=seed, dtype=tf.int32)
    return tf.reshape(drawn, shape)


class _DistanceWeightedLoss(base.MetricLoss):
    """Shared distance-weighted sampling for the two DWS losses.

    Args:
        margin: float, alpha.
        cutoff: float, lower clip of the distances in q(d) (0.5 in Wu et al.).
        nonzero_loss_cutoff: float, negatives at or beyond this distance are not drawn (1.4).
        **kwargs: forwarded to `MetricLoss`; `normalize` must stay True.
    """

    uses_seed = True

    def __init__(self, margin=0.2, cutoff=0.5, nonzero_loss_cutoff=1.4, **kwargs):
        if not kwargs.pop("normalize", True):
            raise ValueError(
                f"{type(self).__name__} needs unit-norm embeddings (q(d) is the distance density "
                "on the unit sphere); normalize=False is not supported."
            )
        super().__init__(normalize=True, **kwargs)
        if not 0 < cutoff < nonzero_loss_cutoff:
            raise ValueError(
                f"Need 0 < cutoff < nonzero_loss_cutoff; got {cutoff} and {nonzero_loss_cutoff}."
            )
        self.margin = float(margin)
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = float(nonzero_loss_cutoff)

    def sampled_distances(self, embeddings, labels, seed):
        """Returns (D, D(a, n(a, p)), positive mask), each `[..., B, B]`."""
        distances = pairwise.pairwise_distances(embeddings)
        positive, negative = pairwise.same_class_masks(labels)
        log_weights = distance_weighted_log_weights(
            distances, negative, embeddings.shape[-1], self.cutoff, self.nonzero_loss_cutoff
        )
        negatives = sample_negatives(log_weights, seed)
        batch_dims = len(distances.shape) - 1
        anchor_negative = tf.gather(distances, negatives, axis=-1, batch_dims=batch_dims)
        return distances, anchor_negative, positive

    def get_config(self):
        config = super().get_config()
        config.pop("normalize")
        config.update(
            {
                "margin": self.margin,
                "cutoff": self.cutoff,
                "nonzero_loss_cutoff": self.nonzero_loss_cutoff,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="dvml_tf")
class Triplet2DWSLoss(_DistanceWeightedLoss):
    """DVML's Triplet2 + DWS (Eq. 4): max(margin + D(a, p) - D(a, n), 0), D un-squared.

    Each positive pair (a, p) of the batch forms a triplet with a negative drawn for a by
    distance-weighted sampling; the loss is the mean over these triplets.

    Args:
        margin: float. Paper §3.1 gives none; 0.2 is Wu et al.'s alpha.
        cutoff: float. Lower clip of distances in the sampling weights.
        nonzero_loss_cutoff: float. Farther negatives are not sampled.
        **kwargs: forwarded to `MetricLoss`.
    """

    def loss_value(self, embeddings, labels, seed):
        distances, anchor_negative, positive = self.sampled_distances(embeddings, labels, seed)
        hinge = tf.nn.relu(self.margin + distances - anchor_negative)
        return pairwise.masked_mean(hinge, positive)


@keras.saving.register_keras_serializable(package="dvml_tf")
class MarginDWSLoss(_DistanceWeightedLoss):
    """Wu et al.'s margin loss with distance-weighted sampling and a learnable boundary beta.

    l(i, j) = max(margin + y_ij (D_ij - beta), 0) with y = +1 for the positive pairs and -1 for
    the sampled negatives; the sum over terms is divided by the number of non-zero terms, as in
    the authors' code. `nu * beta` is the optional penalty of their paper.

    Args:
        margin: float, alpha (0.2).
        beta_init: float, initial beta (1.2). beta is a single trainable scalar; Wu et al. also
            offer per-class betas, not used by DVML.
        nu: float, weight of the beta penalty (0 in the authors' example).
        cutoff: float. Lower clip of distances in the sampling weights.
        nonzero_loss_cutoff: float. Farther negatives are not sampled.
        **kwargs: forwarded to `MetricLoss`.
    """

    def __init__(self, margin=0.2, beta_init=1.2, nu=0.0, **kwargs):
        super().__init__(margin=margin, **kwargs)
        self.beta_init = float(beta_init)
        self.nu = float(nu)
        self.beta = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.beta_init),
            trainable=True,
            name="beta",
        )

    def loss_value(self, embeddings, labels, seed):
        distances, anchor_negative, positive = self.sampled_distances(embeddings, labels, seed)
        beta = tf.cast(self.beta, embeddings.dtype)
        mask = tf.cast(positive, embeddings.dtype)
        positive_terms = tf.nn.relu(self.margin + distances - beta) * mask
        negative_terms = tf.nn.relu(self.margin + beta - anchor_negative) * mask
        active = tf.reduce_sum(tf.cast(positive_terms > 0, embeddings.dtype)) + tf.reduce_sum(
            tf.cast(negative_terms > 0, embeddings.dtype)
        )
        total = tf.reduce_sum(positive_terms) + tf.reduce_sum(negative_terms)
        return tf.math.divide_no_nan(total, active) + self.nu * beta

    def get_config(self):
        config = super().get_config()
        config.update({"beta_init": self.beta_init, "nu": self.nu})
        return config
