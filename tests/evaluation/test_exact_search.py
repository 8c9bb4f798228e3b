"""Tests of the tiled exact search against a float64 brute force on adversarial data."""

import numpy as np
import pytest

from dvml_tf.evaluation import exact_search
from dvml_tf.evaluation import knn
from dvml_tf.evaluation import metrics


def brute_force(queries, k, gallery=None, metric="euclidean"):
    """float64 difference-form distances, self excluded by index, stable sort (index ties)."""
    q = (knn.l2_normalize(queries) if metric == "cosine" else queries).astype(np.float64)
    g = q if gallery is None else (
        knn.l2_normalize(gallery) if metric == "cosine" else gallery).astype(np.float64)
    if metric == "cosine":
        score = -(q @ g.T)
    else:
        score = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    if gallery is None:
        np.fill_diagonal(score, np.inf)
    return np.argsort(score, axis=1, kind="stable")[:, :k]


def adversarial(seed, num=360, dim=12):
    """Ties, duplicates, near-ties inside bfloat16's error, large norms, a far offset."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, dim)).astype(np.float32)
    x[10:20] = x[3]  # exact duplicates: exact ties for every query
    # Near-ties: copies moved by ~1e-4 relative (inside the bfloat16 bound of ~1e-2, far
    # outside float64's rounding, so the brute force orders them right).
    x[20:40] = x[40:60] * np.float32(1 + 1e-4) + np.float32(1e-4) * rng.standard_normal(
        (20, dim)).astype(np.float32)
    x[60:100] *= np.float32(1e4)  # large norms
    x[100:110] = np.round(x[100:110])  # small integers: exact ties by symmetry
    return x


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("offset", [0.0, 3000.0])
@pytest.mark.parametrize("budget", [1 << 30, 150_000])  # symmetric tiles; 128-row chunks
def test_self_search_is_the_float64_ranking(metric, offset, budget):
    x = adversarial(1) + np.float32(offset)
    expected = brute_force(x, 15, metric=metric)
    results = {}
    for precision in ("float32", "bfloat16"):
        ids, dists = knn.nearest_neighbors(x, 15, metric=metric, memory_budget_bytes=budget,
                                           precision=precision)
        np.testing.assert_array_equal(ids, expected)
        results[precision] = dists
    # Both product formats report the same float64 re-scored distances, bit for bit.
    np.testing.assert_array_equal(results["float32"], results["bfloat16"])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_gallery_search_is_the_float64_ranking(metric):
    gallery = adversarial(2, num=500)
    queries = np.concatenate([gallery[[3, 12, 45, 70, 105]],
                              adversarial(3, num=60) * np.float32(1.5)])
    expected = brute_force(queries, 20, gallery, metric)
    for precision in ("float32", "bfloat16"):
        for budget in (1 << 30, 120_000):
            ids, _ = knn.nearest_neighbors(queries, 20, gallery=gallery, metric=metric,
                                           memory_budget_bytes=budget, precision=precision)
            np.testing.assert_array_equal(ids, expected)


def test_symmetric_and_chunked_plans_agree_with_large_k():
    x = adversarial(4, num=300)
    assert exact_search.Plan(300, 300, 250, True, 1 << 30).symmetric
    assert not exact_search.Plan(300, 300, 250, True, 400_000).symmetric
    whole = knn.nearest_neighbors(x, 250, memory_budget_bytes=1 << 30)
    chunked = knn.nearest_neighbors(x, 250, memory_budget_bytes=400_000)
    np.testing.assert_array_equal(whole[0], brute_force(x, 250))
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_metrics_from_class_patterns_match_the_full_ranking(precision):
    # The metrics' search certifies only the same-class/other-class pattern; Recall@K and MAP@R
    # must still be those of the float64 ranking.
    x = adversarial(5, num=400)
    labels = np.random.default_rng(5).integers(0, 60, 400)
    labels[10:20] = labels[3]  # duplicates of one class
    labels[20:40] = np.arange(20) % 3  # near-ties across classes
    got = metrics.evaluate_embeddings(x, labels, recall_ks=(1, 2, 8, 50), compute_clustering=False,
                                      precision=precision)
    codes = metrics.encode_labels(labels)
    num_relevant = np.bincount(codes)[codes] - 1
    neighbours = brute_force(x, 50)
    sums = metrics.RetrievalSums((1, 2, 8, 50))
    sums.add(codes, codes[neighbours], num_relevant)
    assert got == sums.result()
