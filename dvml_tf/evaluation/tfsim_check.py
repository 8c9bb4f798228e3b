"""Cross-check of Recall@K and MAP@R with tensorflow-similarity (an optional extra).

`tfsim_retrieval_metrics` indexes numpy embeddings in a tensorflow-similarity ``Indexer`` whose
search is NMSLib's exact ``brute_force`` method, looks every sample up among all of them, and
scores the lookups with tensorflow-similarity's own ``RecallAtK`` and ``MapAtK`` metrics. Its
keys are those of `metrics.evaluate_embeddings` ("recall@K", "map@r").

How tensorflow-similarity 0.17.1 defines the two metrics (read from its source,
``tensorflow_similarity/retrieval_metrics``) and how this module makes it compute our quantity:

* ``RecallAtK.compute`` is ``mean_q any(match_mask[q, s : s + K])`` over the queries it is
  given, with ``s = 1`` if ``drop_closest_lookup`` else 0. Same definition as ours; it is given
  the queries with R >= 1 only, since we leave queries without a possible positive out of every
  metric (pytorch-metric-learning's convention, see `metrics`), where tfsim alone would count
  them as misses.
* Self-match: tfsim's ``drop_closest_lookup=True`` drops the *nearest* lookup, assuming it is
  the query itself. With exact duplicates the nearest may be the duplicate (NMSLib does not
  break ties by index), and then the query itself stays in the list and counts as a hit. We
  exclude the query **by index** instead: the Indexer stores each row's index as its data,
  K + 1 lookups are made, the lookup whose index is the query's is removed, and the metrics are
  called with ``drop_closest_lookup=False``. `self_match="drop_closest"` gives tfsim's own
  behaviour, via ``Indexer.evaluate_retrieval``, for comparison.
* ``MapAtK(r=..., clip_at_r=True)`` sums ``rel_j * P@j`` over the first ``R`` positions and
  divides by ``R`` (``r`` maps a class to its number of indexed samples, minus one with
  ``drop_closest_lookup``), which is AP@R. But it averages over *all* queries, a query with
  R = 0 contributing 0 (``divide_no_nan``), while we (and Musgrave et al.) leave such queries
  out. We therefore score only the queries with R >= 1, for both metrics. (Also: with
  ``drop_closest_lookup=True``, ``PrecisionAtK``/``MapAtK`` keep ``match_mask[:, 1:k]``, i.e.
  k - 1 columns, whereas ``RecallAtK`` keeps ``[1 : 1 + k]``; so MapAtK needs ``k = max R + 1``
  there.)
* Ties: NMSLib's order among equal distances is not by index, so exact ties across classes can
  make the two disagree; on continuous embeddings there are none.
* Distances: NMSLib's ``l2`` space for "euclidean" and ``cosinesimil`` (1 - cosine) for
  "cosine", matching `knn`.

tensorflow-similarity's losses do not work under Keras 3, but its Indexer, NMSLib search and
retrieval metrics do (tensorflow-similarity 0.17.1). Importing it takes 5-20 s (umap, numba).
"""

import numpy as np

from dvml_tf.evaluation import knn
from dvml_tf.evaluation import metrics

INSTALL_HINT = "pip install -r requirements-tfsim.txt"
SELF_MATCH_MODES = ("index", "drop_closest")


def import_tfsim():
    """Imports tensorflow_similarity with an actionable error if it is missing.

    Returns:
        The ``tensorflow_similarity`` module.

    Raises:
        ImportError: naming the requirements file to install.
    """
    try:
        import tensorflow_similarity as tfsim
    except ImportError as err:
        raise ImportError(
            "tensorflow-similarity is an optional extra needed for the --tfsim cross-check; "
            f"install it with `{INSTALL_HINT}` (tensorflow-similarity==0.17.1). ({err})"
        ) from err
    return tfsim


def _build_indexer(embeddings, codes, metric):
    """An Indexer over the embeddings with NMSLib exact (brute-force) search."""
    from tensorflow_similarity.indexer import Indexer
    from tensorflow_similarity.search import NMSLibSearch

    dim = embeddings.shape[1]
    search = NMSLibSearch(distance=metric, dim=dim, method="brute_force")
    indexer = Indexer(embedding_size=dim, distance=metric, search=search)
    # The row index is stored as the lookup "data", so that the self-match can be removed by
    # identity rather than by rank.
    indexer.batch_add(
        embeddings, labels=codes.tolist(), data=np.arange(embeddings.shape[0]), verbose=0
    )
    return indexer


def _lookup_arrays(indexer, embeddings, k):
    """Runs the lookups; returns (row ids, labels, distances) arrays [N, k]."""
    lookups = indexer.batch_lookup(embeddings, k=k, verbose=0)
    # Unpacking tfsim's Lookup objects is inherently per lookup; it is the cross-check path,
    # not the evaluation path.
    ids = np.array([[int(lk.data) for lk in row] for row in lookups], dtype=np.int64)
    labels = np.array([[lk.label for lk in row] for row in lookups], dtype=np.int64)
    dists = np.array([[lk.distance for lk in row] for row in lookups], dtype=np.float32)
    return ids, labels, dists


def tfsim_retrieval_metrics(
    embeddings, labels, recall_ks=metrics.DEFAULT_RECALL_KS, metric="euclidean",
    self_match="index",
):
    """Recall@K and MAP@R computed by tensorflow-similarity (Indexer + NMSLib brute force).

    Args:
        embeddings: float [N, D] numpy embeddings.
        labels: [N] class labels.
        recall_ks: ints >= 1 (capped at N - 1 neighbours, as in `evaluate_embeddings`).
        metric: "euclidean" or "cosine".
        self_match: "index" (remove the query by index: the same quantity as
            `evaluate_embeddings`) or "drop_closest" (tfsim's own ``drop_closest_lookup``,
            through ``Indexer.evaluate_retrieval``; equal to ours unless exact duplicates exist).

    Returns:
        dict of plain floats: "recall@K" for each K (ascending), then "map@r", both over the
        queries with R >= 1 (NaN if none).

    Raises:
        ImportError: if tensorflow-similarity is not installed (names the requirements file).
        ValueError: on invalid inputs (same checks as `evaluate_embeddings`).
    """
    if self_match not in SELF_MATCH_MODES:
        raise ValueError(f"self_match must be one of {SELF_MATCH_MODES}; got {self_match!r}.")
    embeddings = knn.check_embeddings(embeddings)
    labels = metrics._check_labels_1d(labels)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels and embeddings must have the same length; got {labels.shape[0]} labels "
            f"and {embeddings.shape[0]} embeddings."
        )
    codes, class_sizes = metrics._encode(labels)
    if class_sizes.size < 2:
        raise ValueError("need at least 2 classes to evaluate; labels hold a single class.")
    if metric not in knn.METRICS:
        raise ValueError(f"metric must be one of {knn.METRICS}; got {metric!r}.")
    recall_ks = metrics._check_recall_ks(recall_ks)

    import_tfsim()
    num_relevant = class_sizes[codes] - 1
    max_r = int(num_relevant.max())
    k = min(max(recall_ks[-1], max_r), embeddings.shape[0] - 1)
    indexer = _build_indexer(embeddings, codes, metric)
    if self_match == "drop_closest":
        return _drop_closest_metrics(indexer, embeddings, codes, class_sizes, recall_ks, k)
    return _index_metrics(indexer, embeddings, codes, class_sizes, recall_ks, k)


def _drop_closest_metrics(indexer, embeddings, codes, class_sizes, recall_ks, k):
    """tfsim's own way: ``Indexer.evaluate_retrieval`` with ``drop_closest_lookup=True``."""
    from tensorflow_similarity.retrieval_metrics import MapAtK
    from tensorflow_similarity.retrieval_metrics import RecallAtK

    valid = class_sizes[codes] > 1  # queries with a possible positive (R >= 1)
    if not valid.any():
        return {**{f"recall@{kk}": float("nan") for kk in recall_ks}, "map@r": float("nan")}
    recall = indexer.evaluate_retrieval(
        embeddings[valid],
        target_labels=codes[valid].tolist(),
        retrieval_metrics=[
            RecallAtK(k=min(kk, k), drop_closest_lookup=True, name=f"recall@{kk}")
            for kk in recall_ks
        ],
        verbose=0,
    )
    # tfsim names a result "<name>@<k>".
    results = {f"recall@{kk}": float(recall[f"recall@{kk}@{min(kk, k)}"]) for kk in recall_ks}
    # MapAtK keeps match_mask[:, 1:k] under drop_closest_lookup, so k = max R + 1; r is the class
    # size, which it decrements itself. Only R >= 1 queries are scored (see the module docstring).
    map_metric = MapAtK(
        r={c: int(size) for c, size in enumerate(class_sizes)},
        clip_at_r=True,
        k=int(class_sizes.max()),
        drop_closest_lookup=True,
        name="map@r",
    )
    out = indexer.evaluate_retrieval(
        embeddings[valid],
        target_labels=codes[valid].tolist(),
        retrieval_metrics=[map_metric],
        verbose=0,
    )
    results["map@r"] = float(out["map@r"])
    return results


def _index_metrics(indexer, embeddings, codes, class_sizes, recall_ks, k):
    """Self-match removed by index, then tfsim's ``RecallAtK``/``MapAtK.compute``."""
    import tensorflow as tf
    from tensorflow_similarity.retrieval_metrics import MapAtK
    from tensorflow_similarity.retrieval_metrics import RecallAtK

    num = embeddings.shape[0]
    ids, lookup_labels, dists = _lookup_arrays(indexer, embeddings, k + 1)
    # Remove the query itself (by index); a stable sort keeps the rest in NMSLib's order.
    is_self = ids == np.arange(num)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    lookup_labels = np.take_along_axis(lookup_labels, order, axis=1)
    dists = np.take_along_axis(dists, order, axis=1)
    match_mask = lookup_labels == codes[:, None]
    num_relevant = class_sizes[codes] - 1
    valid = num_relevant > 0  # queries with a possible positive: the only ones scored
    if not valid.any():
        return {**{f"recall@{kk}": float("nan") for kk in recall_ks}, "map@r": float("nan")}
    results = {}
    for kk in recall_ks:
        value = RecallAtK(k=min(kk, k)).compute(
            query_labels=tf.constant(codes[valid]),
            lookup_labels=tf.constant(lookup_labels[valid]),
            lookup_distances=tf.constant(dists[valid]),
            match_mask=tf.constant(match_mask[valid]),
        )
        results[f"recall@{kk}"] = float(value)
    max_r = int(num_relevant.max())
    # r maps a class to its number of *other* samples, since the query was removed above.
    map_metric = MapAtK(
        r={c: int(size) - 1 for c, size in enumerate(class_sizes)}, clip_at_r=True, k=max_r
    )
    value = map_metric.compute(
        query_labels=tf.constant(codes[valid]),
        lookup_labels=tf.constant(lookup_labels[valid, :max_r]),
        lookup_distances=tf.constant(dists[valid, :max_r]),
        match_mask=tf.constant(match_mask[valid, :max_r]),
    )
    results["map@r"] = float(value)
    return results
