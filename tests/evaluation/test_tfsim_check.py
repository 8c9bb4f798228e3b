"""Agreement of our Recall@K and MAP@R with tensorflow-similarity's (to 1e-6).

Skipped only if tensorflow_similarity cannot be imported; CI installs it
(requirements-tfsim.txt). It is imported once for this module (the import takes 5-20 s).
"""

import sys

import numpy as np
import pytest

from dvml_tf.evaluation import metrics
from dvml_tf.evaluation import tfsim_check


@pytest.fixture(scope="module")
def tfsim():
    return pytest.importorskip("tensorflow_similarity")


def random_case(seed, num=150, dim=8, num_classes=12, singletons=4):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.integers(0, num_classes, num), 100 + np.arange(singletons)])
    centres = rng.standard_normal((labels.max() + 1, dim))
    x = centres[labels] + 0.9 * rng.standard_normal((labels.size, dim))
    return x.astype(np.float32), labels


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_agrees_with_evaluate_embeddings(tfsim, metric):
    x, labels = random_case(0)
    ks = (1, 2, 4, 8, 32)
    ours = metrics.evaluate_embeddings(x, labels, ks, metric=metric, compute_clustering=False)
    theirs = tfsim_check.tfsim_retrieval_metrics(x, labels, ks, metric=metric)
    assert list(theirs) == list(ours)
    for key in ours:
        assert theirs[key] == pytest.approx(ours[key], abs=1e-6), key
    assert 0.0 < ours["recall@1"] < 1.0 and 0.0 < ours["map@r"] < 1.0


def test_tfsims_own_drop_closest_agrees_without_duplicates(tfsim):
    x, labels = random_case(1, num=90)
    ours = metrics.evaluate_embeddings(x, labels, (1, 5), compute_clustering=False)
    theirs = tfsim_check.tfsim_retrieval_metrics(x, labels, (1, 5), self_match="drop_closest")
    for key in ours:
        assert theirs[key] == pytest.approx(ours[key], abs=1e-6), key


def test_tfsim_map_counts_singletons_as_zero(tfsim):
    # The documented difference: tfsim's MapAtK averages over all queries, R = 0 ones giving 0;
    # ours leaves them out. Computed directly with tfsim's metric on a hand case.
    import tensorflow as tf
    from tensorflow_similarity.retrieval_metrics import MapAtK

    query = tf.constant([0, 0, 9])
    match = tf.constant([[True, False], [True, True], [False, False]])
    value = MapAtK(r={0: 1, 9: 0}, clip_at_r=True, k=2).compute(
        query_labels=query, lookup_labels=None, lookup_distances=None, match_mask=match
    )
    assert float(value) == pytest.approx(2 / 3)  # (1 + 1 + 0) / 3, not (1 + 1) / 2.
    ours = metrics.map_at_r(np.array([0, 0, 9]), np.array([[0, 1], [0, 0], [1, 1]]), [1, 1, 0])
    assert ours == pytest.approx(1.0)


def test_tfsims_recall_alone_would_count_queries_without_a_positive_as_misses(tfsim):
    # Why only the queries with R >= 1 are given to tfsim: RecallAtK averages over every query
    # it gets, so the singleton query 9 (no possible positive) would be a miss.
    import tensorflow as tf
    from tensorflow_similarity.retrieval_metrics import RecallAtK

    query = tf.constant([0, 0, 9])
    match = tf.constant([[True, False], [False, True], [False, False]])
    value = RecallAtK(k=2).compute(query_labels=query, lookup_labels=None,
                                   lookup_distances=None, match_mask=match)
    assert float(value) == pytest.approx(2 / 3)
    ours = metrics.recall_at_k(np.array([0, 0, 9]), np.array([[0, 1], [1, 0], [1, 1]]), 2,
                               num_relevant=[1, 1, 0])
    assert ours == 1.0
    # And the cross-check agrees with us on data that has such queries (random_case has 4).
    x, labels = random_case(2, num=60)
    assert metrics.queries_without_positive(labels) >= 4
    theirs = tfsim_check.tfsim_retrieval_metrics(x, labels, (1, 4))
    assert theirs == pytest.approx(metrics.evaluate_embeddings(x, labels, (1, 4),
                                                               compute_clustering=False),
                                   abs=1e-6)


def test_missing_tfsim_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_similarity", None)  # Makes the import fail.
    with pytest.raises(ImportError, match=r"pip install -r requirements-tfsim\.txt"):
        tfsim_check.tfsim_retrieval_metrics(np.eye(4), [0, 0, 1, 1], (1,))


def test_bad_input_raises_before_importing_tfsim():
    with pytest.raises(ValueError, match="self_match must be one of"):
        tfsim_check.tfsim_retrieval_metrics(np.eye(4), [0, 0, 1, 1], self_match="nearest")
    with pytest.raises(ValueError, match="at least 2 classes"):
        tfsim_check.tfsim_retrieval_metrics(np.eye(4), [0, 0, 0, 0])
