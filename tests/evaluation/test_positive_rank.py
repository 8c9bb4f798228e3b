"""Tests of the nearest positive's exact rank against a float64 brute force on adversarial data."""

import numpy as np
import pytest

from dvml_tf.evaluation import exact_search
from dvml_tf.evaluation import knn
from dvml_tf.evaluation import metrics
from dvml_tf.evaluation import positive_rank
from dvml_tf.evaluation import score_bounds
from tests.evaluation.test_exact_search import adversarial
from tests.evaluation.test_exact_search import brute_force

NUM = 1100  # more than 1,000 rows, so that Recall@1000 is not trivially 1


def adversarial_classes(seed):
    """Rows of `adversarial` with classes of size 1, 2, small and one of 300 (above the pairwise
    limit), and exact ties and near-ties between the nearest positive and negatives."""
    x = adversarial(seed, num=NUM)
    labels = np.random.default_rng(seed).integers(0, NUM // 4, NUM)
    # Row 3 and its exact duplicates 10..19 alternate between two classes: for each of them
    # the nearest positive ties exactly with negatives (the index decides).
    labels[3] = labels[10:20:2] = NUM
    labels[11:20:2] = NUM + 1
    labels[20:40] = np.arange(20) % 3  # near-ties (inside bfloat16's bound) across classes
    labels[100:110] = NUM + 2 + np.arange(10) % 2  # integer points: ties by symmetry
    labels[700:1000] = NUM + 5  # a large class
    labels[1000] = NUM + 6  # a single-image class: no positive
    labels[1001:1003] = NUM + 7  # a class of 2
    return x, labels


def brute_positive_ranks(x, codes, metric):
    """0-based rank of each row's first same-class row in the float64 ranking (-1: none)."""
    order = brute_force(x, len(x) - 1, metric=metric)
    match = codes[order] == codes[:, None]
    return np.where(match.any(axis=1), match.argmax(axis=1), -1)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("precision, budget", [("float32", 1 << 30), ("bfloat16", 1 << 30),
                                               ("float32", 150_000)])  # symmetric; chunks
def test_ranks_are_those_of_the_float64_ranking(metric, precision, budget):
    x, labels = adversarial_classes(1)
    codes = metrics.encode_labels(labels)
    counter = positive_rank.RankCounter(codes, budget, 2)
    search = knn.exact_search_for(x, 1, metric=metric, memory_budget_bytes=budget,
                                  precision=precision, codes=(codes, codes), rank_counter=counter)
    assert search.plan.symmetric == (budget > 150_000)
    expected = brute_positive_ranks(x, codes, metric)
    has_positive = expected >= 0
    seen = 0
    for start, ids, _ in search:
        # The ranks of a yielded block are final when it is yielded.
        rows = slice(start, start + len(ids))
        np.testing.assert_array_equal(counter.ranks[rows][has_positive[rows]],
                                      expected[rows][has_positive[rows]])
        seen += len(ids)
    assert seen == NUM
    assert (expected[has_positive] >= 10).sum() > 100  # the counts are not all small
    assert not has_positive[1000] and has_positive[1001]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_nearest_positives_are_exact(metric):
    x, labels = adversarial_classes(2)
    codes = metrics.encode_labels(labels)
    canonical = knn.l2_normalize(x) if metric == "cosine" else x
    prepared = score_bounds.prepare(canonical, metric, "float32")
    found = positive_rank.nearest_positives(prepared, codes, 1 << 30, 2)
    order = brute_force(x, NUM - 1, metric=metric)
    match = codes[order] == codes[:, None]
    has = match.any(axis=1)
    expected = np.where(has, order[np.arange(NUM), match.argmax(axis=1)], -1)
    np.testing.assert_array_equal(found.index, expected)
    assert np.isneginf(found.high[~has]).all()
    assert (found.low[has] <= found.high[has]).all()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("compute_map", [True, False])
def test_recall_up_to_1000_equals_the_full_ranking(metric, compute_map):
    x, labels = adversarial_classes(3)
    ks = (1, 2, 10, 1000)
    got = metrics.evaluate_embeddings(x, labels, recall_ks=ks, metric=metric,
                                      compute_clustering=False, compute_map=compute_map)
    codes = metrics.encode_labels(labels)
    num_relevant = np.bincount(codes)[codes] - 1
    sums = metrics.RetrievalSums(ks, compute_map)
    sums.add(codes, codes[brute_force(x, NUM - 1, metric=metric)], num_relevant)
    assert got == sums.result()
    assert 0 < got["recall@10"] < got["recall@1000"] < 1


def test_a_rank_counter_needs_a_self_search():
    x = adversarial(4, num=120)
    counter = positive_rank.RankCounter(np.arange(120) % 5, 1 << 30, 1)
    with pytest.raises(ValueError, match="rank_counter needs a self-search"):
        exact_search.Search(x, x, 1, "euclidean", 1 << 30, "float32", 1, rank_counter=counter)
