"""Recall@K and MAP@R measured through a `GalleryIndex` (exact or approximate search), with the
rules of `dvml_tf.evaluation.metrics`: a query never finds itself, R counts the gallery images of
its class, Recall@K's denominator is every query.

    metrics = index_retrieval_metrics(index, embeddings, labels, recall_ks=(1, 2, 4, 8))

The index's ids are the row numbers of the evaluated split (as `dvml_tf.index.builder` builds
it), so `flat` gives exactly `evaluate_embeddings`' figures and an ANN backend shows what its
approximation costs.
"""

import numpy as np

from dvml_tf.evaluation import metrics as metrics_lib

# Queries per `GalleryIndex.search` call: bounds the [queries, k] results held at once.
QUERY_CHUNK = 4096


def index_retrieval_metrics(index, embeddings, labels, recall_ks, is_query=None,
                            compute_map=True):
    """Recall@K and MAP@R of a split's queries searched through an index of its gallery rows.

    Args:
        index: a `GalleryIndex` with labels whose int ids are row numbers of this split.
        embeddings: float [N, D], every row of the split (queries are taken from it).
        labels: [N] class labels of the split.
        recall_ks: ints >= 1.
        is_query: optional bool [N], the queries (default: every row).
        compute_map: also compute MAP@R.

    Returns:
        dict "recall@K" for each K (ascending) and "map@r".

    Raises:
        ValueError: the index holds ids that are not rows of the split, or rows whose labels
            differ from the split's (it was built from other data).
    """
    labels = np.asarray(labels)
    count = len(labels)
    ids = index.ids
    if not index.has_labels or ids.dtype.kind != "i" or not len(ids):
        raise ValueError("The index must hold labelled rows with int ids (row numbers of the "
                         "evaluated split), as index.py build writes it.")
    if ids.min() < 0 or ids.max() >= count:
        raise ValueError(f"The index holds ids outside the split's {count} rows (up to "
                         f"{ids.max()}): it was built from another split or dataset.")
    differ = np.flatnonzero(index.get_labels(ids) != labels[ids])
    if differ.size:
        raise ValueError(f"{differ.size} of the index's {len(ids)} rows have other labels than "
                         f"the split's rows of the same number (e.g. row {ids[differ[0]]}): it "
                         "was built from other data.")
    is_query, _ = metrics_lib.check_roles(is_query, None, count)
    query_rows = np.flatnonzero(is_query)
    in_index = np.zeros(count, bool)
    in_index[ids] = True
    codes = metrics_lib.encode_labels(labels)
    recall_ks = tuple(sorted(set(recall_ks)))

    def search(k):
        for start in range(0, len(query_rows), QUERY_CHUNK):
            rows = query_rows[start:start + QUERY_CHUNK]
            found, _ = index.search(embeddings[rows], k)
            yield start, found

    return metrics_lib.retrieval_metrics(
        search, codes[query_rows], codes, ids, np.where(in_index[query_rows], query_rows, -1),
        recall_ks, compute_map)
