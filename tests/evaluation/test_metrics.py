"""Tests of Recall@K, MAP@R, NMI, pairwise F1 and evaluate_embeddings against independent
references: full-matrix brute force with Python loops, scikit-learn, and hand-computed cases."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from sklearn.metrics import normalized_mutual_info_score

from dvml_tf.evaluation import clustering
from dvml_tf.evaluation import metrics


def brute_force_retrieval(embeddings, labels, ks, metric="euclidean"):
    """Recall@K and MAP@R from the full float64 distance matrix, one query at a time."""
    x = np.asarray(embeddings, dtype=np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        dist = 1.0 - x @ x.T
    else:
        dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    num = len(labels)
    hits = dict.fromkeys(ks, 0)
    aps = []
    for q in range(num):
        others = [j for j in np.argsort(dist[q], kind="stable") if j != q]
        tally_query([labels[j] == labels[q] for j in others], ks, hits, aps)
    return tallied_metrics(ks, hits, aps)


def tally_query(same, ks, hits, aps):
    """Adds one query's Recall@K hits and AP@R; `same` says which ranked neighbours share its
    class. A query with no same-class neighbour at all (R = 0) is left out of both, as
    pytorch-metric-learning's AccuracyCalculator leaves it out."""
    r = sum(same)
    if not r:
        return
    for k in ks:
        hits[k] += any(same[:k])
    found, ap = 0, 0.0
    for i in range(r):
        if same[i]:
            found += 1
            ap += found / (i + 1)
    aps.append(ap / r)


def tallied_metrics(ks, hits, aps):
    counted = len(aps)  # one AP@R per query with R >= 1: the queries both metrics score
    out = {f"recall@{k}": hits[k] / counted if counted else math.nan for k in ks}
    out["map@r"] = float(np.mean(aps)) if aps else math.nan
    return out


def clustered_data(seed, num_classes=6, per_class=8, dim=5, spread=0.6, singletons=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    labels = np.concatenate([labels, num_classes + np.arange(singletons)])
    centers = rng.standard_normal((labels.max() + 1, dim)) * 2
    x = centers[labels] + spread * rng.standard_normal((labels.size, dim))
    return x.astype(np.float32), labels


# --- Recall@K and MAP@R on neighbour labels: hand cases --------------------------------------


def test_recall_at_k_hand_case():
    query = np.array([0, 1, 2])
    neighbors = np.array([[1, 0, 0], [0, 0, 2], [1, 1, 2]])
    assert metrics.recall_at_k(query, neighbors, 1) == 0.0
    assert metrics.recall_at_k(query, neighbors, 2) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(query, neighbors, 3) == pytest.approx(2 / 3)
    # With R known, a query without a possible positive is left out (here query 1: R = 0).
    assert metrics.recall_at_k(query, neighbors, 3, num_relevant=[2, 0, 1]) == 1.0
    assert math.isnan(metrics.recall_at_k(query, neighbors, 3, num_relevant=[0, 0, 0]))
    with pytest.raises(ValueError, match="exceeds the number of neighbours"):
        metrics.recall_at_k(query, neighbors, 4)


def test_map_at_r_hand_case():
    # R = 2: relevant at ranks 1 and 3 of the first R = 2 -> only rank 1 counts: (1/1) / 2.
    # R = 3: relevant at ranks 1 and 3 -> (1/1 + 2/3) / 3.
    # R = 0: excluded from the mean.
    query = np.array([5, 5, 7])
    neighbors = np.array([[5, 1, 5], [5, 2, 5], [1, 1, 1]])
    value = metrics.map_at_r(query, neighbors, [2, 3, 0])
    assert value == pytest.approx(np.mean([0.5, (1 + 2 / 3) / 3]))
    assert math.isnan(metrics.map_at_r(query[2:], neighbors[2:], [0]))
    with pytest.raises(ValueError, match="needs max"):
        metrics.map_at_r(query, neighbors, [2, 4, 0])


def test_relevant_counts():
    np.testing.assert_array_equal(metrics.relevant_counts([3, 3, 1, 3, 2, 2]), [2, 2, 0, 2, 1, 1])
    np.testing.assert_array_equal(metrics.relevant_counts([1, 9], [1, 1, 2]), [2, 0])


# --- NMI and pairwise F1 ------------------------------------------------------------------------


def brute_force_f1(clusters, labels):
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(labels)), 2):
        same_cluster, same_class = clusters[i] == clusters[j], labels[i] == labels[j]
        tp += same_cluster and same_class
        fp += same_cluster and not same_class
        fn += same_class and not same_cluster
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_nmi_and_f1_match_references_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    num = int(rng.integers(5, 120))
    labels = rng.integers(0, rng.integers(2, 10), num)
    clusters = rng.integers(0, rng.integers(1, 12), num)
    assert metrics.nmi(clusters, labels) == pytest.approx(
        normalized_mutual_info_score(labels, clusters), abs=1e-12
    )
    assert metrics.pairwise_f1(clusters, labels) == pytest.approx(
        brute_force_f1(clusters, labels), abs=1e-12
    )


def test_nmi_and_f1_hand_cases():
    labels = np.array([0, 0, 1, 1])
    assert metrics.nmi([7, 7, 3, 3], labels) == pytest.approx(1.0)  # Same partition, renamed.
    assert metrics.pairwise_f1(["a", "a", "b", "b"], labels) == pytest.approx(1.0)
    assert metrics.nmi([0, 0, 0, 0], labels) == 0.0
    assert metrics.nmi([0, 0, 0, 0], [1, 1, 1, 1]) == 1.0  # As scikit-learn.
    # All singletons: no predicted pair -> precision undefined -> F1 = 0.
    assert metrics.pairwise_f1([0, 1, 2, 3], labels) == 0.0
    # One cluster: P = 2/6 (2 true pairs of 6), R = 1 -> F1 = 0.5.
    assert metrics.pairwise_f1([0, 0, 0, 0], labels) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same length"):
        metrics.nmi([0, 1], [0, 1, 1])


# --- evaluate_embeddings against brute force ---------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("seed", [0, 1])
def test_evaluate_embeddings_matches_brute_force(metric, seed):
    x, labels = clustered_data(seed, singletons=3, spread=1.5)
    ks = (1, 2, 4, 8, 16)
    got = metrics.evaluate_embeddings(x, labels, ks, metric=metric, compute_clustering=False)
    expected = brute_force_retrieval(x, labels, ks, metric)
    assert list(got) == [f"recall@{k}" for k in ks] + ["map@r"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
        assert type(got[key]) is float


def test_evaluate_embeddings_keys_and_clustering_scores():
    x, labels = clustered_data(3, spread=0.8)
    got = metrics.evaluate_embeddings(x, labels, recall_ks=(8, 1, 2, 4), kmeans_seed=1)
    assert list(got) == ["nmi", "f1", "recall@1", "recall@2", "recall@4", "recall@8", "map@r"]
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in got.values())
    clusters = clustering.kmeans_cluster(x, 6, seed=1)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)
    assert got["f1"] == pytest.approx(brute_force_f1(clusters, labels), abs=1e-12)


def test_hand_case_singleton_class_and_k_larger_than_classes():
    # 1-D points: class 0 = {0, 1}, class 1 = {10, 11, 12}, class 2 = {30} (a singleton).
    x = np.array([[0.0], [1.0], [10.0], [11.0], [12.0], [30.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 1, 2])
    got = metrics.evaluate_embeddings(x, labels, (1, 3, 5, 100), compute_clustering=False)
    # Every non-singleton query has its nearest neighbour in its class; the singleton, which can
    # never hit, is left out of Recall@K (K = 100 > N - 1 is capped to the 5 other samples) and
    # of MAP@R alike: both score the same 5 queries.
    assert got["recall@1"] == got["recall@3"] == got["recall@5"] == got["recall@100"] == 1.0
    assert got["map@r"] == pytest.approx(1.0)
    assert metrics.queries_without_positive(labels) == 1


def test_queries_without_positive_are_left_out_of_both_metrics_alike():
    # Class 0 = {0, 1}, class 1 = {5, 6}, singletons 2 (at -0.6, next to row 0) and 3 (far).
    x = np.array([[0.0], [1.0], [5.0], [6.0], [-0.6], [20.0]], np.float32)
    labels = np.array([0, 0, 1, 1, 2, 3])
    got = metrics.evaluate_embeddings(x, labels, (1, 2), compute_clustering=False)
    # Query 0's nearest is the singleton (0.6 away): an R@1 miss, a hit at K = 2; AP@R (R=1) = 0.
    # The singleton queries 4 and 5 are counted nowhere (before, they were R@K misses only).
    assert got == pytest.approx({"recall@1": 3 / 4, "recall@2": 1.0, "map@r": 3 / 4})
    assert metrics.queries_without_positive(labels) == 2
    # In the query/gallery protocol, R counts the gallery: a query whose class is absent from
    # the gallery (or whose only gallery image is itself) has none.
    is_query = np.array([True, True, True, False, True, False])
    is_gallery = np.array([False, True, True, True, True, True])
    assert metrics.queries_without_positive(labels, is_query, is_gallery) == 2  # rows 1 and 4
    split = metrics.evaluate_embeddings(x, labels, (1,), compute_clustering=False,
                                        is_query=is_query, is_gallery=is_gallery)
    # Rows 0 (finds the singleton first: a miss) and 2 (finds row 3) are scored.
    assert split == pytest.approx({"recall@1": 1 / 2, "map@r": 1 / 2})


def test_hand_case_ties_use_the_smaller_index():
    # Query 0 at the origin has two neighbours at distance 1: index 1 (other class) and index 2
    # (its class). Index order puts the wrong one first: R@1 misses for query 0.
    x = np.array([[0, 0], [1, 0], [0, 1], [5, 5], [5, 6]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 2])
    got = metrics.evaluate_embeddings(x, labels, (1, 2), compute_clustering=False)
    expected = brute_force_retrieval(x, labels, (1, 2))
    assert got == pytest.approx(expected)
    # Query 0 misses at K = 1 and hits at K = 2.
    assert got["recall@1"] < got["recall@2"]


def test_duplicates_at_distance_zero_are_hits():
    x = np.array([[1, 2], [1, 2], [9, 9], [9, 8]], dtype=np.float32)
    got = metrics.evaluate_embeddings(x, ["a", "a", "b", "b"], (1,), compute_clustering=False)
    assert got == {"recall@1": 1.0, "map@r": 1.0}


def test_all_singletons_give_nan_recall_and_map():
    got = metrics.evaluate_embeddings(np.eye(3), [0, 1, 2], (1,), compute_clustering=False)
    assert math.isnan(got["recall@1"]) and math.isnan(got["map@r"])


# --- invariances (hypothesis) --------------------------------------------------------------------

_data = st.tuples(
    st.integers(0, 2**32 - 1),  # seed
    st.integers(12, 50),  # num
    st.integers(2, 6),  # dim
    st.integers(2, 6),  # classes
)


def _random_case(seed, num, dim, num_classes):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num)
    labels[:2] = [0, 1]  # At least two classes.
    x = rng.standard_normal((num, dim)).astype(np.float32) + labels[:, None] * 0.5
    return rng, x, labels


@settings(max_examples=25, deadline=None)
@given(_data, st.sampled_from(["euclidean", "cosine"]))
def test_permuting_the_data_does_not_change_the_metrics(case, metric):
    rng, x, labels = _random_case(*case)
    perm = rng.permutation(len(labels))
    a = metrics.evaluate_embeddings(x, labels, (1, 2, 5), metric, compute_clustering=False)
    b = metrics.evaluate_embeddings(x[perm], labels[perm], (1, 2, 5), metric, False)
    assert a == pytest.approx(b, abs=1e-12, nan_ok=True)
    clusters = rng.integers(0, 4, len(labels))
    assert metrics.nmi(clusters, labels) == pytest.approx(
        metrics.nmi(clusters[perm], labels[perm]), abs=1e-12
    )
    assert metrics.pairwise_f1(clusters, labels) == pytest.approx(
        metrics.pairwise_f1(clusters[perm], labels[perm]), abs=1e-12
    )


@settings(max_examples=25, deadline=None)
@given(_data, st.floats(0.01, 100.0))
def test_scaling_does_not_change_cosine_metrics(case, scale):
    rng, x, labels = _random_case(*case)
    row_scales = (scale * rng.uniform(0.5, 2.0, len(labels))).astype(np.float32)[:, None]
    a = metrics.evaluate_embeddings(x, labels, (1, 3), "cosine", compute_clustering=False)
    b = metrics.evaluate_embeddings(x * row_scales, labels, (1, 3), "cosine", False)
    assert a == pytest.approx(b, abs=1e-12, nan_ok=True)


@settings(max_examples=25, deadline=None)
@given(_data, st.floats(-20.0, 20.0))
def test_translation_does_not_change_euclidean_recall(case, shift):
    # Exact in real arithmetic; in float32 a shift of s loses ~ulp(s) per coordinate, so the
    # shifts stay moderate against the unit spread of the data (near-ties would flip otherwise).
    rng, x, labels = _random_case(*case)
    offset = (shift * rng.uniform(-1, 1, x.shape[1])).astype(np.float32)
    a = metrics.evaluate_embeddings(x, labels, (1, 3), "euclidean", compute_clustering=False)
    b = metrics.evaluate_embeddings(x + offset, labels, (1, 3), "euclidean", False)
    assert a == pytest.approx(b, abs=1e-12, nan_ok=True)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("embeddings", "labels", "kwargs", "message"),
    [
        (np.ones((4, 2)), [0, 1, 0], {}, "labels and embeddings must have the same length; got 3"),
        (np.ones((4, 2)), [1, 1, 1, 1], {}, "at least 2 classes"),
        (np.ones(4), [0, 1, 0, 1], {}, "2-D"),
        (np.ones((1, 2, 2)), [0], {}, "2-D"),
        (np.ones((0, 2)), [], {}, "empty"),
        (np.ones((4, 2)), [0, 1, 0, 1], {"recall_ks": (1, 0)}, "recall_ks entries must be >= 1"),
        (np.ones((4, 2)), [0, 1, 0, 1], {"recall_ks": ()}, "recall_ks is empty"),
        (np.ones((4, 2)), [0, 1, 0, 1], {"metric": "l1"}, "metric must be one of"),
        (np.ones((4, 2)), [[0, 1, 0, 1]], {}, "labels must be a 1-D array"),
    ],
)
def test_bad_input_raises_value_error(embeddings, labels, kwargs, message):
    with pytest.raises(ValueError) as err:
        metrics.evaluate_embeddings(embeddings, labels, compute_clustering=False, **kwargs)
    assert message in str(err.value)


def test_nan_embeddings_error_counts_rows():
    x = np.ones((5, 3))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"embeddings contains NaN or Inf values in 1 of 5 rows"):
        metrics.evaluate_embeddings(x, [0, 1, 0, 1, 0])


# --- separate query and gallery sets (the In-Shop protocol) -----------------------------------


def brute_force_query_gallery(embeddings, labels, is_query, is_gallery, ks, metric):
    """Recall@K and MAP@R of queries searching a gallery, one query at a time in float64."""
    x = np.asarray(embeddings, dtype=np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    gallery = np.flatnonzero(is_gallery)
    hits, aps, queries = dict.fromkeys(ks, 0), [], np.flatnonzero(is_query)
    for q in queries:
        others = [g for g in gallery if g != q]  # a query never finds itself
        if metric == "cosine":
            dist = [1.0 - x[q] @ x[g] for g in others]
        else:
            dist = [np.sqrt(((x[q] - x[g]) ** 2).sum()) for g in others]
        ranked = [others[i] for i in np.argsort(dist, kind="stable")]
        tally_query([labels[g] == labels[q] for g in ranked], ks, hits, aps)
    return tallied_metrics(ks, hits, aps)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_query_gallery_evaluation_matches_brute_force(metric, overlap, seed):
    x, labels = clustered_data(seed, num_classes=5, per_class=7, spread=1.5)
    rng = np.random.default_rng(seed)
    is_query = rng.random(len(labels)) < 0.4
    is_gallery = ~is_query | (overlap & (rng.random(len(labels)) < 0.5))
    x[3] = x[20]  # an exact duplicate across the sets
    got = metrics.evaluate_embeddings(x, labels, recall_ks=(1, 2, 4, 50), metric=metric,
                                      compute_clustering=False, is_query=is_query,
                                      is_gallery=is_gallery)
    expected = brute_force_query_gallery(x, labels, is_query, is_gallery, (1, 2, 4, 50), metric)
    assert got == pytest.approx(expected, abs=1e-9)


def test_all_rows_as_queries_and_gallery_is_the_usual_protocol():
    x, labels = clustered_data(4)
    everything = np.ones(len(labels), bool)
    usual = metrics.evaluate_embeddings(x, labels, compute_clustering=False)
    split = metrics.evaluate_embeddings(x, labels, compute_clustering=False,
                                        is_query=everything, is_gallery=everything)
    assert split == pytest.approx(usual, abs=1e-12)


def test_query_gallery_hand_case():
    # Queries 0 (class a) and 1 (class b) search the gallery rows 2, 3, 4 on a line.
    x = np.array([[0.0], [10.0], [1.0], [2.0], [9.0]], np.float32)
    labels = np.array(["a", "b", "b", "a", "a"])
    is_query = np.array([True, True, False, False, False])
    got = metrics.evaluate_embeddings(x, labels, recall_ks=(1, 2), compute_clustering=False,
                                      is_query=is_query, is_gallery=~is_query)
    # query 0: 2 (b), 3 (a), 4 (a): R@1 miss, R@2 hit, AP@R (R=2) = (0 + 1/2) / 2
    # query 1: 4 (a), 3 (a), 2 (b): R@1 miss, R@2 miss, AP@R (R=1) = 0
    assert got == pytest.approx({"recall@1": 0.0, "recall@2": 0.5, "map@r": 0.125})


def test_exclude_self_keeps_duplicates_before_the_query():
    neighbors = np.array([[7, 3, 5], [4, 2, 9], [1, 8, 6]])
    # row 0: self 3 dropped; row 1: self (5) not among them, the last is dropped; row 2: no self.
    got = metrics.exclude_self(neighbors, np.array([3, 5, 8]), np.array([True, True, False]))
    assert got.tolist() == [[7, 5], [4, 2], [1, 8]]


def test_roles_must_select_queries_and_a_gallery():
    x, labels = clustered_data(0)
    none = np.zeros(len(labels), bool)
    with pytest.raises(ValueError, match="is_query selects no image"):
        metrics.evaluate_embeddings(x, labels, compute_clustering=False, is_query=none)
    with pytest.raises(ValueError, match=r"is_gallery must be a bool array"):
        metrics.evaluate_embeddings(x, labels, compute_clustering=False, is_gallery=[1, 0])
    single = none.copy()
    single[0] = True
    with pytest.raises(ValueError, match="at least 2 gallery images"):
        metrics.evaluate_embeddings(x, labels, compute_clustering=False, is_gallery=single)
