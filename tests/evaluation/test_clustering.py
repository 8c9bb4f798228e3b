"""Tests of the k-means used for NMI/F1."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from dvml_tf.evaluation import clustering


def blobs(seed, num_classes=5, per_class=12, dim=4):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = rng.standard_normal((num_classes, dim)) * 20
    return (centres[labels] + rng.standard_normal((labels.size, dim))).astype(np.float32), labels


def test_well_separated_blobs_are_recovered():
    x, labels = blobs(0)
    ids = clustering.kmeans_cluster(x, 5, seed=0)
    assert ids.dtype == np.int64 and ids.shape == labels.shape
    assert adjusted_rand_score(labels, ids) == pytest.approx(1.0)


def test_deterministic_under_a_seed():
    x, _ = blobs(1, num_classes=8, per_class=6)
    a = clustering.kmeans_cluster(x, 8, seed=3)
    b = clustering.kmeans_cluster(x, 8, seed=3)
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) <= set(range(8))


def test_default_settings_reach_sklearn():
    x, _ = blobs(2)
    model = clustering.fit_kmeans(x, 5, seed=0)
    assert model.init == "k-means++" and model.n_init == 1 and model.max_iter == 300
    model = clustering.fit_kmeans(x, 5, seed=0, init="random", max_iter=7)
    assert model.init == "random" and model.max_iter == 7 and model.n_iter_ <= 7


def test_large_k_uses_random_init_and_few_iterations():
    small = clustering.kmeans_settings(clustering.KMEANS_PLUSPLUS_MAX_CLUSTERS)
    large = clustering.kmeans_settings(11_316)
    assert small["init"] == "k-means++"
    assert large == {
        "init": "random", "n_init": 1, "max_iter": 20, "tol": 1e-4, "algorithm": "lloyd"
    }
    large["init"] = "changed"  # A copy: the module defaults are not mutated.
    assert clustering.kmeans_settings(11_316)["init"] == "random"


@pytest.mark.parametrize(
    ("k", "kwargs", "message"),
    [
        (0, {}, "num_clusters must be in [1, 60]"),
        (61, {}, "num_clusters must be in [1, 60]"),
        (2.0, {}, "num_clusters must be an int"),
        (3, {"n_clusters": 4}, "unknown k-means settings ['n_clusters']"),
    ],
)
def test_bad_input_raises(k, kwargs, message):
    x, _ = blobs(3)
    with pytest.raises(ValueError) as err:
        clustering.kmeans_cluster(x, k, **kwargs)
    assert message in str(err.value)


def test_nan_rows_are_rejected():
    x, _ = blobs(4)
    x[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf values in 1 of 60 rows"):
        clustering.kmeans_cluster(x, 5)
