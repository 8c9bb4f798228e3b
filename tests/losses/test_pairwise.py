import numpy as np
import tensorflow as tf

from dvml_tf.losses import pairwise


def test_distances_match_brute_force_and_have_zero_diagonal():
    x = np.random.default_rng(0).normal(size=(2, 7, 5))
    brute = np.linalg.norm(x[:, :, None] - x[:, None, :], axis=-1)
    got = pairwise.pairwise_distances(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, brute, atol=1e-7)
    assert np.all(np.diagonal(got, axis1=1, axis2=2) == 0)


def test_sqrt_gradient_is_finite_at_zero():
    x = tf.constant([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        d = tf.reduce_sum(pairwise.pairwise_distances(x))
    assert np.all(np.isfinite(tape.gradient(d, x).numpy()))


def test_masks():
    positive, negative = pairwise.same_class_masks(tf.constant([1, 1, 2]))
    np.testing.assert_array_equal(positive.numpy(), [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(negative.numpy(), [[0, 0, 1], [0, 0, 1], [1, 1, 0]])


def test_masked_mean_of_empty_mask_is_zero():
    assert float(pairwise.masked_mean(tf.ones((2, 2)), tf.zeros((2, 2), tf.bool))) == 0.0
