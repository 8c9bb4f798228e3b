import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import losses
from dvml_tf.losses import distance_weighted
from dvml_tf.losses import pairwise
from tests.losses import checks
from tests.losses import reference

SEED = (11, 12)


def drawn_negatives(x, labels, cutoff=0.5, nonzero_loss_cutoff=1.4, seed=SEED):
    """The negatives the loss draws for these (normalized) embeddings and seed."""
    unit = tf.math.l2_normalize(tf.constant(x, tf.float64), axis=-1)
    _, negative = pairwise.same_class_masks(tf.constant(labels))
    log_weights = distance_weighted.distance_weighted_log_weights(
        pairwise.pairwise_distances(unit), negative, x.shape[-1], cutoff, nonzero_loss_cutoff
    )
    return distance_weighted.sample_negatives(log_weights, tf.constant(seed, tf.int64)).numpy()


def test_log_weights_match_numpy_reference():
    x, labels = checks.pk_batch(num_classes=4, images_per_class=3, dim=6, seed=8)
    unit = reference.normalize(x)
    _, negative = pairwise.same_class_masks(tf.constant(labels))
    got = distance_weighted.distance_weighted_log_weights(
        pairwise.pairwise_distances(tf.constant(unit)), negative, 6, 0.5, 1.4
    ).numpy()
    np.testing.assert_allclose(got, reference.dws_log_weights(unit, labels, 0.5, 1.4), atol=1e-9)


def test_sampling_follows_the_weights():
    # 512-d, 2 classes x 3: many draws of the same anchor row must follow softmax(log w).
    x, labels = checks.pk_batch(num_classes=4, images_per_class=2, dim=32, seed=9)
    unit = reference.normalize(x)
    log_w = reference.dws_log_weights(unit, labels, 0.5, 1.4)
    rows = tf.constant(np.repeat(log_w[:1], 20000, axis=0))
    draws = tf.random.stateless_categorical(rows, 1, seed=[1, 2]).numpy().ravel()
    counts = np.bincount(draws, minlength=len(labels)) / draws.size
    probs = np.exp(log_w[0]) / np.exp(log_w[0]).sum()
    np.testing.assert_allclose(counts, probs, atol=0.015)
    # The sampler itself never draws a positive, itself, or a negative beyond the cutoff.
    negatives = drawn_negatives(np.tile(x, (1, 1)), labels)
    for a in range(len(labels)):
        assert np.all(labels[negatives[a]] != labels[a])
        assert np.all(np.isfinite(log_w[a, negatives[a]]))


def test_far_negatives_fall_back_to_uniform():
    # Two antipodal classes: every negative is at distance 2 > 1.4.
    x = np.array([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [-1.0, 0.0, 0.0], [-1.0, 0.0, 0.01]])
    labels = np.array([0, 0, 1, 1])
    log_w = reference.dws_log_weights(reference.normalize(x), labels, 0.5, 1.4)
    assert np.array_equal(np.isfinite(log_w), labels[:, None] != labels[None, :])
    negatives = drawn_negatives(x, labels)
    assert np.all(labels[negatives] != labels[:, None])


@pytest.mark.parametrize("dim", [4, 64])
def test_triplet2_matches_numpy_reference(dim):
    x, labels = checks.pk_batch(num_classes=4, images_per_class=3, dim=dim, seed=10)
    negatives = drawn_negatives(x, labels)
    loss = losses.Triplet2DWSLoss(margin=0.2, dtype="float64")
    checks.assert_matches_reference(
        loss,
        lambda e: reference.triplet2_dws(reference.normalize(e), labels, negatives, 0.2),
        x,
        labels,
        seed=SEED,
    )


def test_margin_loss_matches_numpy_reference_and_trains_beta():
    x, labels = checks.pk_batch(num_classes=4, images_per_class=3, dim=8, seed=11)
    negatives = drawn_negatives(x, labels)
    loss = losses.MarginDWSLoss(margin=0.2, beta_init=1.2, nu=0.01, dtype="float64")
    checks.assert_matches_reference(
        loss,
        lambda e: reference.margin_dws(reference.normalize(e), labels, negatives, 0.2, 1.2, 0.01),
        x,
        labels,
        seed=SEED,
    )
    assert [w.name for w in loss.trainable_weights] == ["beta"]
    with tf.GradientTape() as tape:
        value = loss(tf.constant(x), labels, seed=tf.constant(SEED, tf.int64))
    (beta_gradient,) = tape.gradient(value, loss.trainable_weights)
    assert float(beta_gradient) != 0.0


# A batch computed by hand: class 0 at e1 and e2, class 1 at +e3 and -e3. Every negative of every
# anchor is at distance sqrt(2) (beyond the 1.4 cutoff, so the draw is uniform, but whichever
# negative is drawn, D(a, n) = sqrt(2)); D(a, p) is sqrt(2) for class 0 and 2 for class 1.
HAND_EMBEDDINGS = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]
HAND_LABELS = [0, 0, 1, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet2_on_a_batch_computed_by_hand(seed):
    # Eq. 4 with margin 0.2 over the 4 ordered positive pairs:
    # class 0: 0.2 + sqrt2 - sqrt2 = 0.2 (x2); class 1: 0.2 + 2 - sqrt2 (x2).
    expected = (2 * 0.2 + 2 * (2.2 - np.sqrt(2))) / 4
    loss = losses.Triplet2DWSLoss(margin=0.2)
    seed = tf.constant([seed, 0], tf.int64)
    value = loss(tf.constant(HAND_EMBEDDINGS), tf.constant(HAND_LABELS), seed=seed)
    assert float(value) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_margin_loss_on_a_batch_computed_by_hand(seed):
    # beta = 1.2, margin 0.2. Positive terms max(0.2 + D - 1.2, 0): sqrt2 - 1 (x2) and 1 (x2);
    # negative terms max(0.2 + 1.2 - sqrt2, 0) = 0 (x4). Mean over the 4 active terms, + nu beta.
    expected = (2 * (np.sqrt(2) - 1) + 2 * 1.0) / 4 + 0.1 * 1.2
    loss = losses.MarginDWSLoss(margin=0.2, beta_init=1.2, nu=0.1)
    seed = tf.constant([seed, 0], tf.int64)
    value = loss(tf.constant(HAND_EMBEDDINGS), tf.constant(HAND_LABELS), seed=seed)
    assert float(value) == pytest.approx(expected, abs=1e-6)


def test_sampling_is_deterministic_under_a_seed():
    x, labels = checks.pk_batch(num_classes=6, images_per_class=4, dim=16, seed=12)
    loss = losses.Triplet2DWSLoss()
    first = float(loss(x, labels, seed=tf.constant([5, 6], tf.int64)))
    assert float(loss(x, labels, seed=tf.constant([5, 6], tf.int64))) == first
    others = {float(loss(x, labels, seed=tf.constant([5, s], tf.int64))) for s in range(7, 17)}
    assert len(others - {first}) > 0


def test_requires_unit_norm_and_valid_cutoffs():
    with pytest.raises(ValueError, match="unit-norm"):
        losses.Triplet2DWSLoss(normalize=False)
    with pytest.raises(ValueError, match="cutoff"):
        losses.MarginDWSLoss(cutoff=1.5, nonzero_loss_cutoff=1.4)


def test_needs_positives_and_two_classes():
    loss = losses.Triplet2DWSLoss()
    with pytest.raises(ValueError, match="K >= 2"):
        loss(np.eye(4), np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        loss(np.eye(4), np.array([0, 0, 0, 0]))
