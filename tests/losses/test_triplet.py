import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import losses
from tests.losses import checks
from tests.losses import reference


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mining", ["all", "semihard"])
def test_matches_numpy_reference(mining, normalize):
    x, labels = checks.pk_batch(num_classes=4, images_per_class=3, dim=5, seed=1)
    loss = losses.TripletLoss(margin=0.3, mining=mining, normalize=normalize, dtype="float64")
    reference_fn = reference.triplet_all if mining == "all" else reference.triplet_semihard

    def ref(e):
        return reference_fn(reference.normalize(e) if normalize else e, labels, 0.3)

    checks.assert_matches_reference(loss, ref, x, labels)


def test_hand_case_all_triplets():
    # 1-D points, classes {0, 1} and {3, 3.5}; squared distances d01=1, d02=9, d03=12.25,
    # d12=4, d13=6.25, d23=0.25. With margin 4 the 8 valid triplets give
    # (a=1,p=0,n=2): 4+1-4 = 1 and (a=2,p=3,n=1): 4+0.25-4 = 0.25; the other 6 are <= 0.
    x = np.array([[0.0], [1.0], [3.0], [3.5]])
    labels = np.array([0, 0, 1, 1])
    loss = losses.TripletLoss(margin=4.0, normalize=False, dtype="float64")
    assert float(loss(x, labels)) == pytest.approx(1.25 / 8)
    assert reference.triplet_all(x, labels, 4.0) == pytest.approx(1.25 / 8)


def test_semihard_falls_back_to_farthest_negative():
    # The only negative is closer than the positive: no semi-hard negative exists, so the
    # (farthest) negative is used: 0 + 4 (d_ap) - 1 (d_an) = 3 for a=0,p=1.
    x = np.array([[0.0], [2.0], [1.0], [1.0]])
    labels = np.array([0, 0, 1, 1])
    loss = losses.TripletLoss(margin=0.0, mining="semihard", normalize=False, dtype="float64")
    assert float(loss(x, labels)) == pytest.approx(reference.triplet_semihard(x, labels, 0.0))
    assert float(loss(x, labels)) == pytest.approx(3.0 / 2)  # (3 + 3 + 0 + 0) / 4 pairs


def test_leading_sample_axis_averages_batches():
    x, labels = checks.pk_batch(num_classes=3, images_per_class=2, dim=4, seed=2)
    stacked = np.stack([x, 2 * x, -x])
    loss = losses.TripletLoss(normalize=False, dtype="float64")
    expected = np.mean([float(loss(b, labels)) for b in stacked])
    assert float(loss(stacked, labels)) == pytest.approx(expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mining"):
        losses.TripletLoss(mining="hardest")
    with pytest.raises(ValueError, match="margin"):
        losses.TripletLoss(margin=-1.0)


def test_large_embeddings_are_finite():
    x, labels = checks.pk_batch(num_classes=8, images_per_class=2, dim=16, seed=3, scale=1e4)
    loss = losses.TripletLoss(normalize=False)
    x = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(x, labels)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(tape.gradient(value, x).numpy()))


def test_semihard_negative_must_be_strictly_farther():
    # a=0, p=1 at squared distance 1; negative 2 ties at 1 and is NOT semi-hard, so negative 3
    # (9) is chosen: 0. a=1: min negative 4 -> 0. a=2, p=3 (16): no farther negative -> the
    # farthest (4): 0.5 + 16 - 4 = 12.5. a=3 (16): farthest 9 -> 7.5. Mean: 20 / 4 = 5.
    x = np.array([[0.0], [1.0], [-1.0], [3.0]])
    labels = np.array([0, 0, 1, 1])
    loss = losses.TripletLoss(margin=0.5, mining="semihard", normalize=False, dtype="float64")
    assert float(loss(x, labels)) == pytest.approx(5.0)
    assert reference.triplet_semihard(x, labels, 0.5) == pytest.approx(5.0)


def test_active_reduction_averages_over_the_non_zero_triplets_only():
    # The hand case above: 8 valid triplets, 2 of them active (1 and 0.25).
    x = np.array([[0.0], [1.0], [3.0], [3.5]])
    labels = np.array([0, 0, 1, 1])
    loss = losses.TripletLoss(margin=4.0, normalize=False, reduction="active", dtype="float64")
    assert float(loss(x, labels)) == pytest.approx(1.25 / 2)
    satisfied = losses.TripletLoss(margin=0.0, normalize=False, reduction="active",
                                   dtype="float64")
    assert float(satisfied(np.array([[0.0], [0.1], [5.0], [5.1]]), labels)) == 0.0
    with pytest.raises(ValueError, match="Unknown triplet reduction"):
        losses.TripletLoss(reduction="sum")
