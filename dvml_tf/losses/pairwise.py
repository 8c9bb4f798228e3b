"""Pairwise distances and label masks shared by the metric losses.

All functions accept embeddings with any number of leading dimensions, `[..., B, D]`, so that one
call evaluates a loss on the real batch (`[B, D]`) and on all T synthesized batches at once
(`[T, B, D]`) without a Python loop.
"""

import tensorflow as tf


def pairwise_squared_distances(embeddings):
    """Squared Euclidean distances between all rows, `[..., B, B]`.

    Uses ||a||^2 + ||b||^2 - 2 a.b (one matmul), clipped at 0 against round-off, with an exact
    zero diagonal.

    Args:
        embeddings: float tensor `[..., B, D]`.

    Returns:
        Float tensor `[..., B, B]`.
    """
    squared_norms = tf.reduce_sum(tf.square(embeddings), axis=-1)
    dot = tf.matmul(embeddings, embeddings, transpose_b=True)
    distances = squared_norms[..., :, None] + squared_norms[..., None, :] - 2.0 * dot
    distances = tf.maximum(distances, 0.0)
    # Round-off leaves tiny non-zero self-distances; they would become sqrt gradients of ~1e3.
    batch = tf.shape(embeddings)[-2]
    return distances * (1.0 - tf.eye(batch, dtype=embeddings.dtype))


def safe_sqrt(squared, epsilon=1e-16):
    """Square root whose gradient is 0 (not inf/NaN) where the argument is 0.

    Args:
        squared: non-negative float tensor.
        epsilon: values at or below this are treated as exact zeros.

    Returns:
        Float tensor of the same shape.
    """
    positive = squared > epsilon
    safe = tf.where(positive, squared, tf.ones_like(squared))
    return tf.where(positive, tf.sqrt(safe), tf.zeros_like(squared))


def pairwise_distances(embeddings):
    """Euclidean distances between all rows, `[..., B, B]`, with finite gradients at 0.

    Args:
        embeddings: float tensor `[..., B, D]`.

    Returns:
        Float tensor `[..., B, B]`.
    """
    return safe_sqrt(pairwise_squared_distances(embeddings))


def same_class_masks(labels):
    """Boolean masks of positive pairs (same class, i != j) and negative pairs.

    Args:
        labels: int tensor `[B]`.

    Returns:
        `(positive, negative)`, two bool tensors `[B, B]`.
    """
    labels = tf.reshape(labels, [-1])
    same = tf.equal(labels[:, None], labels[None, :])
    not_self = tf.logical_not(tf.eye(tf.shape(labels)[0], dtype=tf.bool))
    return tf.logical_and(same, not_self), tf.logical_not(same)


def masked_mean(values, mask):
    """Mean of `values` over the entries where `mask` is true (0 if the mask is empty).

    Args:
        values: float tensor.
        mask: bool tensor broadcastable to `values`.

    Returns:
        Scalar float tensor.
    """
    mask = tf.broadcast_to(tf.cast(mask, values.dtype), tf.shape(values))
    return tf.math.divide_no_nan(tf.reduce_sum(values * mask), tf.reduce_sum(mask))
