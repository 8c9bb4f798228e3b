"""The variational terms of DVML: KL to the prior (L1, Eq. 8) and reconstruction (L2, Eq. 9).

Besides the paper's reconstruction (a plain Euclidean norm) there is its Gaussian-likelihood
form on standardized features, `half_squared_error`: the plain norm's gradient e/||e|| acts like
a likelihood whose variance equals the current error, far above the per-dimension variance of
the features, which is the regime where a VAE's latent collapses (Lucas et al. 2019).
"""

import tensorflow as tf

from dvml_tf.losses import pairwise


def kl_per_dimension(mean, log_variance):
    """KL(N(mean, exp(log_variance)) || N(0, 1)) of every sample and dimension, in nats.

    Args:
        mean: float tensor `[B, J]`.
        log_variance: float tensor `[B, J]`.

    Returns:
        Float tensor `[B, J]`.
    """
    return 0.5 * (tf.square(mean) + tf.exp(log_variance) - log_variance - 1.0)


def kl_divergence(mean, log_variance):
    """KL(N(mean, exp(log_variance)) || N(0, I)) per sample, summed over dimensions.

    Paper §3.3, Eq. 8 prints the ELBO term (1/2B) sum(1 + log s^2 - m^2 - s^2), which is the
    negative KL; this is the quantity to minimize.

    Args:
        mean: float tensor `[B, J]`.
        log_variance: float tensor `[B, J]`.

    Returns:
        Float tensor `[B]`.
    """
    return tf.reduce_sum(kl_per_dimension(mean, log_variance), axis=-1)


def reconstruction_distance(target, reconstruction):
    """Euclidean norm ||target - reconstruction||_2 per sample (paper Eq. 9: not squared, no mean
    over dimensions; element-wise MSE would be ~dim(f) times smaller and squared).

    Args:
        target: float tensor `[..., F]` (broadcast against `reconstruction`).
        reconstruction: float tensor `[..., F]`.

    Returns:
        Float tensor of the leading shape, e.g. `[T, B]`.
    """
    return pairwise.safe_sqrt(tf.reduce_sum(tf.square(target - reconstruction), axis=-1))


def half_squared_error(target, reconstruction):
    """Half the sum of squares 0.5 ||target - reconstruction||^2 per sample: the negative
    log-likelihood (up to a constant) of a unit-variance Gaussian decoder, for standardized
    targets.

    Args:
        target: float tensor `[..., F]` (broadcast against `reconstruction`).
        reconstruction: float tensor `[..., F]`.

    Returns:
        Float tensor of the leading shape.
    """
    return 0.5 * tf.reduce_sum(tf.square(target - reconstruction), axis=-1)
