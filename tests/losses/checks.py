"""Shared assertions: a TF loss against its numpy reference, in value and in gradient."""

import numpy as np
import tensorflow as tf

from tests.losses import reference


def value_and_gradient(loss, embeddings, labels, seed=(3, 4)):
    embeddings = tf.constant(embeddings, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        value = loss(embeddings, tf.constant(labels), seed=tf.constant(seed, tf.int64))
    return float(value), tape.gradient(value, embeddings).numpy()


def assert_matches_reference(loss, reference_fn, embeddings, labels, seed=(3, 4), rtol=1e-6):
    """reference_fn(embeddings) -> float, with labels (and any sampled indices) bound."""
    value, gradient = value_and_gradient(loss, embeddings, labels, seed)
    np.testing.assert_allclose(value, reference_fn(embeddings), rtol=rtol, atol=1e-9)
    expected = reference.numerical_gradient(reference_fn, embeddings)
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(gradient).max() > 0, "a gradient that is identically zero tests nothing"


def pk_batch(num_classes, images_per_class, dim, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes) * 7 + 3, images_per_class)  # non-contiguous ids
    embeddings = scale * rng.normal(size=(num_classes * images_per_class, dim))
    return embeddings, labels
