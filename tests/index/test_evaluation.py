"""Recall@K and MAP@R through a gallery index (`dvml_tf.index.evaluation`) follow the rules of
exact evaluation, checked against the numpy brute force of tests/evaluation/test_metrics.py:
also for queries without a possible positive, which both leave out."""

import numpy as np
import pytest

from dvml_tf.evaluation import metrics
from dvml_tf.index import GalleryIndex
from dvml_tf.index import evaluation
from tests.evaluation.test_metrics import brute_force_query_gallery
from tests.evaluation.test_metrics import brute_force_retrieval
from tests.evaluation.test_metrics import clustered_data


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_flat_index_scores_the_same_queries_as_exact_evaluation(metric):
    x, labels = clustered_data(5, singletons=4, spread=1.5)
    index = GalleryIndex(x.shape[1], metric, "flat")
    index.add(np.arange(len(labels)), x, labels=labels)
    ks = (1, 2, 4, 30)
    through_index = evaluation.index_retrieval_metrics(index, x, labels, ks)
    expected = brute_force_retrieval(x, labels, ks, metric)
    assert through_index == pytest.approx(expected, abs=1e-9)
    assert through_index == pytest.approx(
        metrics.evaluate_embeddings(x, labels, ks, metric=metric, compute_clustering=False),
        abs=1e-12)


def test_an_index_of_the_gallery_rows_leaves_out_queries_without_a_gallery_positive():
    x, labels = clustered_data(6, num_classes=4, per_class=5, singletons=2, spread=1.2)
    rng = np.random.default_rng(6)
    is_query = rng.random(len(labels)) < 0.5
    is_gallery = ~is_query
    rows = np.flatnonzero(is_gallery)
    index = GalleryIndex(x.shape[1], "euclidean", "flat")
    index.add(rows, x[rows], labels=labels[rows])
    found = evaluation.index_retrieval_metrics(index, x, labels, (1, 3), is_query=is_query)
    expected = brute_force_query_gallery(x, labels, is_query, is_gallery, (1, 3), "euclidean")
    assert found == pytest.approx(expected, abs=1e-9)
    assert metrics.queries_without_positive(labels, is_query, is_gallery) >= 1
