import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import losses
from tests.losses import checks
from tests.losses import reference


@pytest.mark.parametrize(
    "kwargs", [{"l2_reg": 0.002}, {"l2_reg": 0.05}, {"l2_reg": 0.0, "temperature": 0.5}]
)
def test_matches_numpy_reference(kwargs):
    x, labels = checks.pk_batch(num_classes=5, images_per_class=2, dim=6, seed=4)
    loss = losses.NPairLoss(dtype="float64", **kwargs)
    temperature = kwargs.get("temperature", 1.0)
    checks.assert_matches_reference(
        loss, lambda e: reference.npair(e, labels, kwargs["l2_reg"], temperature), x, labels
    )


def test_normalized_variant_has_no_norm_penalty():
    x, labels = checks.pk_batch(num_classes=4, images_per_class=2, dim=6, seed=5)
    loss = losses.NPairLoss(normalize=True, temperature=0.1, l2_reg=1.0, dtype="float64")
    checks.assert_matches_reference(
        loss, lambda e: reference.npair(reference.normalize(e), labels, 0.0, 0.1), x, labels
    )


def test_hand_case():
    # Two orthogonal pairs: S = [[1, 0], [0, 1]] -> loss = log(1 + e^-1) for each anchor.
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = np.array([4, 4, 9, 9])
    loss = losses.NPairLoss(l2_reg=0.0, dtype="float64")
    assert float(loss(x, labels)) == pytest.approx(np.log1p(np.exp(-1.0)))


def test_rejects_batches_that_are_not_pairs():
    x = np.zeros((6, 3))
    loss = losses.NPairLoss()
    with pytest.raises(ValueError, match="laid out in pairs"):
        loss(x, np.array([0, 1, 0, 1, 2, 2]))
    with pytest.raises(ValueError, match="distinct classes"):
        loss(x, np.array([0, 0, 0, 0, 1, 1]))  # K = 4 for class 0
    with pytest.raises(ValueError, match="odd batch"):
        loss(np.zeros((5, 3)), np.array([0, 0, 1, 1, 2]))


def test_graph_mode_check_names_the_problem():
    loss = losses.NPairLoss()
    fn = tf.function(lambda x, y: loss(x, y))
    with pytest.raises(tf.errors.InvalidArgumentError, match="laid out in pairs"):
        fn(tf.zeros((4, 3)), tf.constant([0, 1, 0, 1]))


def test_extreme_logits_are_stable():
    x, labels = checks.pk_batch(num_classes=6, images_per_class=2, dim=8, seed=6, scale=300.0)
    x = tf.constant(x, tf.float32)
    loss = losses.NPairLoss()
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(x, labels)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(tape.gradient(value, x).numpy()))
