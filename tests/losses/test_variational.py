import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import losses


def test_kl_is_the_closed_form_and_the_negative_of_the_papers_term():
    rng = np.random.default_rng(0)
    mean, log_var = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    got = losses.kl_divergence(tf.constant(mean), tf.constant(log_var)).numpy()
    closed_form = 0.5 * np.sum(mean**2 + np.exp(log_var) - log_var - 1.0, axis=1)
    np.testing.assert_allclose(got, closed_form, rtol=1e-12)
    # Paper Eq. 8 (per sample): 1/2 sum(1 + log s^2 - m^2 - s^2) is the negative KL.
    paper_elbo_term = 0.5 * np.sum(1 + log_var - mean**2 - np.exp(log_var), axis=1)
    np.testing.assert_allclose(got, -paper_elbo_term, rtol=1e-12)


def test_kl_agrees_with_a_monte_carlo_estimate():
    mean, log_var = np.array([[0.5, -1.0]]), np.array([[0.3, -0.7]])
    rng = np.random.default_rng(1)
    sigma = np.exp(0.5 * log_var)
    z = mean + sigma * rng.normal(size=(400000, 2))
    log_q = -0.5 * np.sum(((z - mean) / sigma) ** 2 + log_var + np.log(2 * np.pi), axis=1)
    log_p = -0.5 * np.sum(z**2 + np.log(2 * np.pi), axis=1)
    estimate = np.mean(log_q - log_p)
    assert float(losses.kl_divergence(mean, log_var)[0]) == pytest.approx(estimate, abs=0.01)


def test_kl_is_zero_at_the_prior():
    assert float(tf.reduce_sum(losses.kl_divergence(tf.zeros((3, 5)), tf.zeros((3, 5))))) == 0.0


def test_reconstruction_is_a_euclidean_norm_not_a_mean_squared_error():
    target = np.array([[3.0, 0.0, 0.0, 0.0]])
    recon = np.array([[[0.0, 4.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]])  # T = 2 draws
    got = losses.reconstruction_distance(tf.constant(target), tf.constant(recon)).numpy()
    np.testing.assert_allclose(got, [[5.0], [3.0]])  # ||(3, -4)|| = 5, not mean((3,-4)^2)=6.25
    mse = np.mean((target - recon) ** 2, axis=-1)
    assert not np.allclose(got, mse)


def test_reconstruction_gradient_is_finite_when_exact():
    x = tf.constant([[1.0, 2.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        d = tf.reduce_sum(losses.reconstruction_distance(x, x))
    assert np.all(np.isfinite(tape.gradient(d, x).numpy()))


def test_kl_per_dimension_and_half_squared_error_by_hand():
    mean = np.array([[1.0, 0.0]])
    log_variance = np.array([[0.0, np.log(4.0)]])
    # dim 0: 0.5 (1 + 1 - 0 - 1) = 0.5; dim 1: 0.5 (0 + 4 - ln 4 - 1)
    expected = [0.5, 0.5 * (3.0 - np.log(4.0))]
    np.testing.assert_allclose(losses.kl_per_dimension(mean, log_variance).numpy(), [expected])
    np.testing.assert_allclose(losses.kl_divergence(mean, log_variance).numpy(), [sum(expected)])
    target = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(
        losses.half_squared_error(target, np.array([[[0.0, 2.0, 5.0]]])).numpy(), [[2.5]])
