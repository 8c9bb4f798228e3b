"""The reference synthesis methods, by hand, and the augmented loss against the base loss on
the union of real and synthetic points."""

import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import losses
from dvml_tf.losses import synthesis
from tests.losses import checks

# A class-major batch of 2 classes x 2 images in 2-D.
X = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [-1.0, 1.0]])
LABELS = np.array([5, 5, 9, 9])


def test_partners_are_the_adjacent_image():
    np.testing.assert_array_equal(synthesis.partner_indices(6).numpy(), [1, 0, 3, 2, 5, 4])


def test_embedding_expansion_points_by_hand():
    points = synthesis.embedding_expansion(tf.constant(X), points=2, normalize=False).numpy()
    assert points.shape == (2, 4, 2)
    # image 0 = (1, 0), partner (0, 2): at 1/3 and 2/3 of the way.
    np.testing.assert_allclose(points[0, 0], [2 / 3, 2 / 3])
    np.testing.assert_allclose(points[1, 0], [1 / 3, 4 / 3])
    normalized = synthesis.embedding_expansion(tf.constant(X), points=2).numpy()
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=-1), 1.0, rtol=1e-6)


def test_symmetrical_reflects_about_the_partners_axis():
    reflected = synthesis.symmetrical(tf.constant(X)).numpy()[0]
    # (1, 0) about the axis (0, 1): (-1, 0); (0, 2) about (1, 0): (0, -2).
    np.testing.assert_allclose(reflected[0], [-1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(reflected[1], [0.0, -2.0], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(reflected, axis=-1), np.linalg.norm(X, axis=-1))
    # The angle to the partner is kept.
    partner = X[[1, 0, 3, 2]]
    cosine = np.sum(reflected * partner, -1) / np.linalg.norm(partner, axis=-1)
    np.testing.assert_allclose(cosine, np.sum(X * partner, -1) / np.linalg.norm(partner, axis=-1))


def test_deviation_transfer_moves_another_class_deviation_onto_the_centre():
    seed = tf.constant([1, 2], tf.int64)
    partners = synthesis.other_class_partners(tf.constant(LABELS), seed).numpy()
    assert all(LABELS[p] != label for p, label in zip(partners, LABELS, strict=True))
    synthetic = synthesis.deviation_transfer(tf.constant(X), tf.constant(LABELS), seed).numpy()[0]
    centres = np.array([[0.5, 1.0]] * 2 + [[1.0, 2.5]] * 2)
    np.testing.assert_allclose(synthetic, centres + (X - centres)[partners])


def test_augmented_triplet_loss_is_the_base_loss_on_the_union():
    x, labels = checks.pk_batch(num_classes=3, images_per_class=2, dim=4, seed=2)
    base = losses.TripletLoss(margin=0.4, normalize=True, dtype="float64")
    augmented = losses.SyntheticAugmentation(base, "symmetrical", dtype="float64")
    normalized = tf.math.l2_normalize(tf.constant(x), axis=-1)
    synthetic = tf.math.l2_normalize(synthesis.symmetrical(normalized)[0], axis=-1).numpy()
    union = np.empty((12, 4))
    union[0::2], union[1::2] = normalized.numpy(), synthetic  # each image, then its synthesis
    expected = float(base(union, np.repeat(labels, 2)))
    assert float(augmented(x, labels)) == pytest.approx(expected, rel=1e-9)
    assert expected != pytest.approx(float(base(x, labels)))


def test_augmented_npair_averages_the_real_and_synthetic_batches():
    x, labels = checks.pk_batch(num_classes=4, images_per_class=2, dim=3, seed=3)
    base = losses.NPairLoss(dtype="float64")
    augmented = losses.SyntheticAugmentation(base, "embedding_expansion", points=1,
                                             dtype="float64")
    midpoints = (x + x[[1, 0, 3, 2, 5, 4, 7, 6]]) / 2
    expected = (float(base(x, labels)) + float(base(midpoints, labels))) / 2
    assert float(augmented(x, labels)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", ["triplet", "npair", "triplet2_dws", "margin_dws", "contrastive"])
@pytest.mark.parametrize("method", synthesis.METHODS)
def test_every_method_trains_every_loss_with_finite_gradients(name, method):
    k = 2 if name == "npair" else 4
    x, labels = checks.pk_batch(num_classes=4, images_per_class=k, dim=6, seed=4)
    loss = losses.get_metric_loss(name, synthesis=method)
    embeddings = tf.Variable(tf.constant(x, tf.float32))
    with tf.GradientTape() as tape:
        value = loss(embeddings, tf.constant(labels), seed=tf.constant([1, 2], tf.int64))
    gradient = tape.gradient(value, embeddings).numpy()
    assert np.isfinite(float(value)) and np.all(np.isfinite(gradient))
    assert np.abs(gradient).max() > 0
    if not loss.base_loss.uses_seed:  # (distance-weighted sampling draws per batch)
        # Leading dimensions (DVML's T synthesized batches) are averaged like the base loss.
        stacked = loss(tf.stack([embeddings, embeddings]), tf.constant(labels),
                       seed=tf.constant([1, 2], tf.int64))
        assert float(stacked) == pytest.approx(float(value), rel=1e-5)


def test_bad_batches_and_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown synthesis method"):
        losses.get_metric_loss("triplet", synthesis="mixup")
    loss = losses.get_metric_loss("triplet", synthesis="embedding_expansion")
    with pytest.raises(ValueError, match="even number of images per class"):
        loss(tf.zeros([9, 3]), tf.constant(np.repeat(np.arange(3), 3)))
    with pytest.raises(ValueError, match="images 2i and 2i\\+1"):
        loss(tf.ones([4, 3]), tf.constant([0, 1, 0, 1]))


def test_serialization_round_trip():
    import keras

    loss = losses.get_metric_loss("triplet2_dws", synthesis="symmetrical")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, losses.SyntheticAugmentation)
    assert restored.method == "symmetrical" and isinstance(restored.base_loss,
                                                           losses.Triplet2DWSLoss)
    x, labels = checks.pk_batch(num_classes=3, images_per_class=4, dim=5, seed=5)
    seed = tf.constant([3, 4], tf.int64)
    assert float(restored(x, labels, seed=seed)) == pytest.approx(float(loss(x, labels,
                                                                              seed=seed)))
