"""Table 4 measurements: KS p-values of class-centred features and the relative deviation.

References are independent of the code under test: scipy.stats.ks_2samp in a loop over pairs and
directions, np.triu_indices, np.linalg.svd, scipy.spatial.distance.pdist, hand-computed cases.
"""

import warnings

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import pdist

from research.dvml_omniglot import variance_analysis as va


def _scipy_ks(x, y):
    with warnings.catch_warnings():
        # scipy warns when it falls back from exact to asymptotic for a tiny p-value.
        warnings.simplefilter("ignore", RuntimeWarning)
        return stats.ks_2samp(x, y)


@pytest.mark.parametrize("ties", [False, True])
def test_ks_statistics_and_pvalues_match_scipy(ties):
    rng = np.random.default_rng(1 if ties else 2)
    sizes = np.array([1, 2, 3, 7, 12, 25, 40, 40])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    if ties:
        values = rng.integers(0, 4, (len(labels), 3)).astype(float)
    else:
        values = rng.normal(size=(len(labels), 3)) * (1 + 0.3 * labels[:, None])
    pairs = va.random_class_pairs(len(sizes), 1000)
    d_scaled, n_a, n_b = va.ks_2samp_statistic_pairs(values, labels, pairs)
    p = va.ks_2samp_pvalue(d_scaled, n_a[:, None], n_b[:, None])
    for row, (a, b) in enumerate(pairs):
        assert (n_a[row], n_b[row]) == (sizes[a], sizes[b])
        for j in range(values.shape[1]):
            expected = _scipy_ks(values[labels == a, j], values[labels == b, j])
            assert d_scaled[row, j] / (n_a[row] * n_b[row]) == pytest.approx(
                expected.statistic, abs=1e-12)
            assert p[row, j] == pytest.approx(expected.pvalue, abs=1e-9)


def test_asymptotic_pvalue_matches_scipy_above_the_exact_limit():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=30), rng.normal(0.3, 1, size=45)
    values = np.concatenate([x, y])[:, None]
    labels = np.repeat([0, 1], [30, 45])
    d_scaled, n_a, n_b = va.ks_2samp_statistic_pairs(values, labels, np.array([[0, 1]]))
    p = va.ks_2samp_pvalue(d_scaled, n_a[:, None], n_b[:, None], exact_max_size=20)
    assert p[0, 0] == pytest.approx(stats.ks_2samp(x, y, method="asymp").pvalue, abs=1e-12)


def test_random_class_pairs():
    every = va.random_class_pairs(7, 10_000)
    np.testing.assert_array_equal(every, np.stack(np.triu_indices(7, k=1), axis=1))
    reference = {tuple(p) for p in np.stack(np.triu_indices(50, k=1), axis=1)}
    for seed in range(3):
        pairs = va.random_class_pairs(50, 200, seed=seed)
        assert pairs.shape == (200, 2)
        assert len({tuple(p) for p in pairs}) == 200
        assert {tuple(p) for p in pairs} <= reference
    draw = va.random_class_pairs(50, 200, seed=5)
    np.testing.assert_array_equal(draw, va.random_class_pairs(50, 200, seed=5))
    assert not np.array_equal(draw, va.random_class_pairs(50, 200, seed=6))
    # Unranking stays exact for a large number of classes (SOP: 11,316).
    big = va.random_class_pairs(11_316, 500, seed=0)
    assert np.all(big[:, 0] < big[:, 1]) and big.max() < 11_316 and big.min() >= 0
    with pytest.raises(ValueError, match="num_classes"):
        va.random_class_pairs(1)


def _reference_ks(features, labels, num_pairs, num_directions, seed):
    """Loops with scipy: centre per class, SVD directions, ks_2samp per pair and direction."""
    classes = np.unique(labels)
    centred = features.astype(np.float64).copy()
    for c in classes:
        centred[labels == c] -= centred[labels == c].mean(axis=0)
    if num_directions is not None:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        centred = centred @ vt[:num_directions].T  # KS is invariant to the sign of a direction.
    pair_means = []
    for a, b in va.random_class_pairs(len(classes), num_pairs, seed):
        x, y = centred[labels == classes[a]], centred[labels == classes[b]]
        pair_means.append(np.mean([_scipy_ks(x[:, j], y[:, j]).pvalue
                                   for j in range(centred.shape[1])]))
    return 100 * np.mean(pair_means), 100 * np.std(pair_means)


@pytest.mark.parametrize("num_directions", [None, 3])
def test_ks_class_pvalues_match_a_scipy_loop(num_directions):
    rng = np.random.default_rng(4)
    labels = rng.permutation(np.repeat(np.arange(12) * 7 + 3, rng.integers(4, 15, 12)))
    features = rng.normal(size=(len(labels), 6)) * rng.uniform(0.5, 2, 6) + labels[:, None]
    result = va.ks_class_pvalues(features, labels, num_pairs=30, num_directions=num_directions,
                                 seed=2)
    mean, std = _reference_ks(features, labels, 30, num_directions, seed=2)
    assert result["p_value_mean_percent"] == pytest.approx(mean, abs=1e-7)
    assert result["p_value_std_percent"] == pytest.approx(std, abs=1e-7)
    assert result["num_pairs"] == 30 and result["num_classes"] == 12
    assert result["num_directions"] == (6 if num_directions is None else 3)


def _gaussian_classes(spreads, per_class, dim, seed):
    rng = np.random.default_rng(seed)
    spreads = np.asarray(spreads, dtype=float)
    labels = np.repeat(np.arange(len(spreads)), per_class)
    centres = rng.normal(0, 10, (len(spreads), dim))
    features = centres[labels] + spreads[labels, None] * rng.normal(size=(len(labels), dim))
    return features, labels


def test_shared_centred_distribution_gives_high_pvalues():
    features, labels = _gaussian_classes(np.ones(40), per_class=30, dim=8, seed=5)
    result = va.ks_class_pvalues(features, labels, num_pairs=200, num_directions=4,
                                 null_reference=True)
    # Centred samples of one distribution: well above 50 % (the centring matches locations),
    # at the level of the class-shuffled null reference and of the Monte-Carlo one.
    assert result["p_value_mean_percent"] > 65
    assert abs(result["p_value_mean_percent"] - result["null_p_value_mean_percent"]) < 5
    assert abs(result["p_value_mean_percent"] - va.null_mean_pvalue_percent(30)) < 5
    assert result["rejection_rate"] < 0.03


def test_different_spreads_give_low_pvalues():
    # Spreads 1, 3, 9, ...: the centred distributions of any two classes differ threefold.
    features, labels = _gaussian_classes(3.0 ** np.arange(8), per_class=60, dim=4, seed=6)
    result = va.ks_class_pvalues(features, labels, num_pairs=200, num_directions=2)
    assert result["p_value_mean_percent"] < 5
    assert result["rejection_rate"] > 0.9


def test_null_reference_exposes_classes_with_different_spreads():
    # Half the classes twice as wide as the others: the class-shuffled reference (one shared
    # distribution) stays high, the measured mean drops well below it.
    features, labels = _gaussian_classes([1.0, 2.0] * 20, per_class=60, dim=4, seed=6)
    result = va.ks_class_pvalues(features, labels, num_pairs=200, num_directions=2,
                                 null_reference=True)
    assert result["null_p_value_mean_percent"] > 65
    assert result["p_value_mean_percent"] < result["null_p_value_mean_percent"] - 15
    assert result["null_rejection_rate"] < 0.03 < 0.1 < result["rejection_rate"]


def test_ks_drops_classes_that_are_too_small():
    features, labels = _gaussian_classes(np.ones(5), per_class=10, dim=3, seed=7)
    features = np.concatenate([features, np.zeros((1, 3))])
    labels = np.concatenate([labels, [99]])
    result = va.ks_class_pvalues(features, labels, num_directions=None)
    assert result["num_classes"] == 5 and result["num_samples"] == 50
    with pytest.raises(ValueError, match="at least 2 classes"):
        va.ks_class_pvalues(features[-12:], labels[-12:])


def test_relative_deviation_hand_computed():
    # Class 0 at (0, 0), class 1 at (10, 0), both with points at distance 1 from the mean.
    features = np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [11, 0], [9, 0]], dtype=float)
    labels = np.array([0, 0, 0, 0, 1, 1])
    result = va.relative_deviation(features, labels)
    assert result["within_class_distance"] == pytest.approx(1.0)
    assert result["between_centre_distance"] == pytest.approx(10.0)
    assert result["relative_deviation_percent"] == pytest.approx(10.0)


def test_relative_deviation_matches_a_loop_and_is_invariant():
    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(9), rng.integers(2, 9, 9))
    features = rng.normal(size=(len(labels), 5)) + 3 * rng.normal(size=(9, 5))[labels]
    means = np.stack([features[labels == c].mean(axis=0) for c in range(9)])
    within = np.mean([np.mean([np.linalg.norm(x - means[c]) for x in features[labels == c]])
                      for c in range(9)])
    between = np.mean([np.linalg.norm(means[a] - means[b])
                       for a in range(9) for b in range(a + 1, 9)])
    result = va.relative_deviation(features, labels)
    assert result["relative_deviation_percent"] == pytest.approx(100 * within / between)
    rotation = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    moved = va.relative_deviation(3.7 * features @ rotation + 11.0, labels)
    assert moved["relative_deviation_percent"] == pytest.approx(
        result["relative_deviation_percent"])


def test_relative_deviation_of_tight_clusters_is_small():
    tight = va.relative_deviation(*_gaussian_classes(np.full(10, 0.1), 20, 8, seed=9))
    loose = va.relative_deviation(*_gaussian_classes(np.full(10, 10.0), 20, 8, seed=9))
    assert tight["relative_deviation_percent"] < 5 < 50 < loose["relative_deviation_percent"]


def test_mean_pairwise_distance_matches_pdist():
    points = np.random.default_rng(10).normal(size=(37, 4))
    assert va.mean_pairwise_distance(points, chunk_size=8) == pytest.approx(pdist(points).mean())


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        va.relative_deviation(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="rows but labels"):
        va.ks_class_pvalues(np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        va.relative_deviation(np.array([[0.0], [np.nan]]), np.array([0, 1]))
    with pytest.raises(ValueError, match="num_directions"):
        va.principal_directions(np.zeros((4, 2)), 3)
