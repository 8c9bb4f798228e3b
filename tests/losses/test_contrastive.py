import numpy as np
import pytest

from dvml_tf import losses
from tests.losses import checks
from tests.losses import reference


@pytest.mark.parametrize("normalize,margin", [(True, 1.0), (False, 3.0)])
def test_matches_numpy_reference(normalize, margin):
    x, labels = checks.pk_batch(num_classes=4, images_per_class=3, dim=5, seed=7)
    loss = losses.ContrastiveLoss(margin=margin, normalize=normalize, dtype="float64")

    def ref(e):
        return reference.contrastive(reference.normalize(e) if normalize else e, labels, margin)

    checks.assert_matches_reference(loss, ref, x, labels)


def test_hand_case():
    # Positives at distance 1 and 0.5 (squared: 1, 0.25), negatives all farther than margin 1
    # except (1, 2) at distance 0.5: (1 - 0.5)^2 = 0.25 over 8 ordered negative pairs.
    x = np.array([[0.0], [1.0], [1.5], [2.0]])
    labels = np.array([0, 0, 1, 1])
    loss = losses.ContrastiveLoss(margin=1.0, normalize=False, dtype="float64")
    # Positive ordered pairs: (0,1),(1,0): 1; (2,3),(3,2): 0.25 -> mean 0.625.
    # Negative ordered pairs: (0,2) d=1.5 ->0, (0,3) 2 ->0, (1,2) 0.5 -> 0.25, (1,3) 1 -> 0, x2.
    assert float(loss(x, labels)) == pytest.approx(0.625 + 0.5 / 8)


def test_coincident_points_have_finite_gradients():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 0, 1, 1])
    loss = losses.ContrastiveLoss(normalize=False, dtype="float64")
    value, gradient = checks.value_and_gradient(loss, x, labels)
    assert np.isfinite(value)
    assert np.all(np.isfinite(gradient))
