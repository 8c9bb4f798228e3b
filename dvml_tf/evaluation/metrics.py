"""Retrieval and clustering metrics of the DVML evaluation protocol, on numpy embeddings.

* Recall@K (DVML §4.1): a query counts as a hit if at least one of its K nearest *other*
  samples (the query itself excluded by index) has its class.
* MAP@R (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020): for a query with
  R = number of other samples of its class, AP@R = (1/R) * sum_{i<=R} rel(i) * P@i, where
  rel(i) = 1 if the i-th neighbour has the query's class and P@i is the precision of the first
  i neighbours; MAP@R is the mean over queries.
* NMI (DVML §4.1, Song et al. 2016): 2 I(clusters; classes) / (H(clusters) + H(classes)),
  identical to scikit-learn's ``normalized_mutual_info_score`` (arithmetic normalisation).
* F1 (Song et al. 2016): harmonic mean of the pairwise precision and recall of a clustering:
  a pair of samples is a true positive when it shares both its cluster and its class.

Queries with no possible positive (R = 0: no other image of their class in the gallery, e.g.
the image of a single-image class) are left out of every metric: of Recall@K's denominator and
of MAP@R's mean (AP@R is 0/0 for them). This is the convention of pytorch-metric-learning's
AccuracyCalculator (Musgrave et al.'s library), applied to both metrics alike so that they
describe the same queries; such images still serve as distractors in the gallery.
`queries_without_positive` counts the queries left out (evaluate.py reports it).
tensorflow-similarity's own metrics would count them as misses; `tfsim_check` scores the same
queries as we do.

All functions take numpy arrays and return plain Python floats (fractions in [0, 1]).
"""

import math

import numpy as np
from absl import logging

from dvml_tf.evaluation import knn
from dvml_tf.evaluation import positive_rank

DEFAULT_RECALL_KS = (1, 2, 4, 8)


def _check_labels_1d(labels, name="labels"):
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array; got shape {array.shape}.")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty.")
    return array


def _encode(labels):
    """Maps arbitrary (int or str) labels to codes 0..C-1; returns (codes, counts per class)."""
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return codes.reshape(-1).astype(np.int64), counts.astype(np.int64)


def _check_k(k, name="k"):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= 1; got {k!r}.")
    if k < 1:
        raise ValueError(f"{name} must be >= 1; got {k}.")
    return int(k)


def _check_neighbor_labels(query_labels, neighbor_labels):
    query_labels = _check_labels_1d(query_labels, "query_labels")
    neighbor_labels = np.asarray(neighbor_labels)
    if neighbor_labels.ndim != 2 or neighbor_labels.shape[0] != query_labels.shape[0]:
        raise ValueError(
            "neighbor_labels must have shape [num_queries, num_neighbors] with num_queries = "
            f"len(query_labels) = {query_labels.shape[0]}; got shape {neighbor_labels.shape}."
        )
    return query_labels, neighbor_labels


def _first_hit_rank(matches):
    """0-based rank of each query's first same-class neighbour; num_neighbors if none."""
    return np.where(matches.any(axis=1), matches.argmax(axis=1), matches.shape[1])


def _average_precision_at_r(matches, num_relevant):
    """AP@R of each query; matches [Q, M] bool with M >= max(num_relevant) (R > 0 rows only)."""
    width = int(num_relevant.max())
    rel = matches[:, :width] & (np.arange(width) < num_relevant[:, None])
    # P@i at relevant positions only: (number of hits among the first i) / i.
    precision = np.cumsum(rel, axis=1) / np.arange(1, width + 1)
    return (precision * rel).sum(axis=1) / num_relevant


def recall_at_k(query_labels, neighbor_labels, k, num_relevant=None):
    """Recall@K from the labels of each query's neighbours.

    Args:
        query_labels: [Q] labels of the queries.
        neighbor_labels: [Q, M] labels of each query's neighbours sorted by distance, the query
            itself already excluded; M >= k.
        k: int >= 1.
        num_relevant: optional [Q] ints, R of each query (`relevant_counts`): the queries with
            R = 0 (no possible positive) are left out, as `evaluate_embeddings` does. None:
            every query counts.

    Returns:
        float: share of the (counted) queries with at least one same-class label among the
        first k neighbours; NaN if no query is counted.

    Raises:
        ValueError: on mismatched shapes or an invalid k.
    """
    query_labels, neighbor_labels = _check_neighbor_labels(query_labels, neighbor_labels)
    k = _check_k(k)
    if k > neighbor_labels.shape[1]:
        raise ValueError(
            f"k={k} exceeds the number of neighbours given ({neighbor_labels.shape[1]})."
        )
    counted = np.ones(len(query_labels), bool)
    if num_relevant is not None:
        counted = np.asarray(num_relevant).reshape(-1) > 0
        if counted.shape != query_labels.shape:
            raise ValueError(f"num_relevant must have shape {query_labels.shape}; got "
                             f"{np.shape(num_relevant)}.")
    if not counted.any():
        return math.nan
    matches = neighbor_labels[counted, :k] == query_labels[counted, None]
    return float(matches.any(axis=1).mean())


def queries_without_positive(labels, is_query=None, is_gallery=None):
    """How many queries have no possible positive (R = 0) and are left out of the metrics.

    Args:
        labels: [N] class labels.
        is_query, is_gallery: optional bool [N] (default: every row), as in
            `evaluate_embeddings`; a query never counts itself.

    Returns:
        int.
    """
    labels = _check_labels_1d(labels)
    is_query, is_gallery = check_roles(is_query, is_gallery, len(labels))
    codes = _encode(labels)[0]
    relevant = (relevant_counts(codes[is_query], codes[is_gallery])
                - is_gallery[is_query]).astype(np.int64)
    return int(np.count_nonzero(relevant <= 0))


def relevant_counts(query_labels, gallery_labels=None):
    """R of each query: the number of gallery samples of its class.

    Args:
        query_labels: [Q] labels.
        gallery_labels: [G] labels, or None when the queries are their own gallery (each query
            then does not count itself).

    Returns:
        int64 array [Q].
    """
    query_labels = _check_labels_1d(query_labels, "query_labels")
    if gallery_labels is None:
        codes, counts = _encode(query_labels)
        return counts[codes] - 1
    gallery_labels = _check_labels_1d(gallery_labels, "gallery_labels")
    classes, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.clip(np.searchsorted(classes, query_labels), 0, classes.size - 1)
    return np.where(classes[pos] == query_labels, counts[pos], 0).astype(np.int64)


def map_at_r(query_labels, neighbor_labels, num_relevant):
    """MAP@R (Musgrave et al. 2020) from the labels of each query's neighbours.

    Args:
        query_labels: [Q] labels of the queries.
        neighbor_labels: [Q, M] labels of each query's neighbours sorted by distance (query
            excluded); M >= max(num_relevant).
        num_relevant: [Q] ints, R of each query (see `relevant_counts`).

    Returns:
        float: mean AP@R over the queries with R >= 1 (queries with R = 0 are excluded, since
        AP@R is 0/0 for them); NaN if no query has R >= 1.

    Raises:
        ValueError: on mismatched shapes, negative R, or too few neighbours.
    """
    query_labels, neighbor_labels = _check_neighbor_labels(query_labels, neighbor_labels)
    num_relevant = np.asarray(num_relevant, dtype=np.int64)
    if num_relevant.shape != query_labels.shape:
        raise ValueError(
            f"num_relevant must have shape {query_labels.shape}; got {num_relevant.shape}."
        )
    if (num_relevant < 0).any():
        raise ValueError("num_relevant must be >= 0.")
    valid = num_relevant > 0
    if not valid.any():
        return math.nan
    if num_relevant.max() > neighbor_labels.shape[1]:
        raise ValueError(
            f"MAP@R needs max(num_relevant) = {num_relevant.max()} neighbours per query; got "
            f"{neighbor_labels.shape[1]}."
        )
    matches = neighbor_labels[valid] == query_labels[valid, None]
    return float(_average_precision_at_r(matches, num_relevant[valid]).mean())


def _contingency(cluster_ids, labels):
    """Cluster sizes, class sizes and non-zero cell counts of the contingency table (int64)."""
    cluster_ids = _check_labels_1d(cluster_ids, "cluster_ids")
    labels = _check_labels_1d(labels)
    if cluster_ids.shape[0] != labels.shape[0]:
        raise ValueError(
            f"cluster_ids and labels must have the same length; got {cluster_ids.shape[0]} and "
            f"{labels.shape[0]}."
        )
    clusters, cluster_sizes = _encode(cluster_ids)
    classes, class_sizes = _encode(labels)
    _, cells = np.unique(clusters * class_sizes.size + classes, return_counts=True)
    return cluster_sizes, class_sizes, cells.astype(np.int64)


def _entropy(counts, total):
    p = counts / total
    return float(-(p * np.log(p)).sum())


def nmi(cluster_ids, labels):
    """Normalised mutual information 2 I / (H(clusters) + H(classes)).

    Args:
        cluster_ids: [N] cluster assignment.
        labels: [N] class labels.

    Returns:
        float in [0, 1]; 1.0 when both partitions are a single block (as scikit-learn).

    Raises:
        ValueError: on empty or mismatched inputs.
    """
    cluster_sizes, class_sizes, cells = _contingency(cluster_ids, labels)
    total = float(class_sizes.sum())
    if cluster_sizes.size == class_sizes.size == 1:
        return 1.0
    # Sum over the non-zero cells of (n_ij / N) log(N n_ij / (a_i b_j)), written as entropies so
    # that the cluster/class pairing of each cell is not needed: I = H(Ω) + H(C) - H(Ω, C).
    h_clusters = _entropy(cluster_sizes, total)
    h_classes = _entropy(class_sizes, total)
    mutual_information = max(h_clusters + h_classes - _entropy(cells, total), 0.0)
    denominator = h_clusters + h_classes
    if denominator <= 0.0:
        return 1.0
    return float(min(2.0 * mutual_information / denominator, 1.0))


def pairwise_f1(cluster_ids, labels):
    """Pairwise F1 of a clustering (Song et al. 2016).

    Args:
        cluster_ids: [N] cluster assignment.
        labels: [N] class labels.

    Returns:
        float: 2 P R / (P + R) with P = TP / (TP + FP) and R = TP / (TP + FN) over all pairs of
        samples; a pair is predicted positive if it shares a cluster and is truly positive if it
        shares a class. 0.0 when P + R = 0 (e.g. only singleton clusters).

    Raises:
        ValueError: on empty or mismatched inputs.
    """
    cluster_sizes, class_sizes, cells = _contingency(cluster_ids, labels)

    def pairs(counts):
        return float((counts * (counts - 1) // 2).sum())

    true_pos = pairs(cells)
    predicted_pos = pairs(cluster_sizes)
    actual_pos = pairs(class_sizes)
    precision = true_pos / predicted_pos if predicted_pos else 0.0
    recall = true_pos / actual_pos if actual_pos else 0.0
    if precision + recall == 0.0:
        return 0.0
    return float(2.0 * precision * recall / (precision + recall))


def _check_recall_ks(recall_ks):
    if isinstance(recall_ks, (int, np.integer)):
        recall_ks = (recall_ks,)
    recall_ks = tuple(recall_ks)
    if not recall_ks:
        raise ValueError("recall_ks is empty; give at least one K, e.g. (1, 2, 4, 8).")
    return tuple(sorted({_check_k(k, "recall_ks entries") for k in recall_ks}))


def exclude_self(neighbors, self_ids, has_self):
    """Removes each query's own entry from a neighbour list searched one entry too long.

    Searching k + 1 neighbours and dropping the query itself gives exactly the k neighbours of a
    search that excludes the query by index (`knn` with gallery=None): the query scores at least
    as well as any other row, so when it is not among the k + 1 (exact duplicates ranked before
    it), the k + 1 are all better-or-equal others and the last one is dropped instead.

    Args:
        neighbors: [Q, k + 1] neighbour ids (or positions), best first.
        self_ids: [Q] the id of each query in the gallery (any value where `has_self` is False).
        has_self: [Q] bool, whether the query is itself a gallery row.

    Returns:
        [Q, k] array of the same dtype.
    """
    neighbors = np.asarray(neighbors)
    keep = exclude_self_mask(neighbors, self_ids, has_self)
    return neighbors[keep].reshape(neighbors.shape[0], neighbors.shape[1] - 1)


def exclude_self_mask(neighbors, self_ids, has_self):
    """The entries `exclude_self` keeps: bool [Q, k + 1] with k True per row (apply it to the
    scores of the same search too)."""
    neighbors = np.asarray(neighbors)
    keep = ~((neighbors == np.asarray(self_ids)[:, None]) & np.asarray(has_self)[:, None])
    keep[keep.all(axis=1), -1] = False
    return keep


class RetrievalSums:
    """Recall@K hits and AP@R sums accumulated over chunks of queries; queries without a
    possible positive (R = 0) are counted apart and left out of both (see the module
    docstring).

    Args:
        recall_ks: sorted ints >= 1.
        compute_map: also accumulate AP@R.
    """

    def __init__(self, recall_ks, compute_map=True):
        self.recall_ks = tuple(recall_ks)
        self.compute_map = compute_map
        self.hits = np.zeros(len(self.recall_ks), dtype=np.int64)
        self.num_queries = 0  # queries with R >= 1
        self.excluded = 0  # queries with R = 0
        self.ap_sum, self.ap_count = 0.0, 0

    def add(self, query_codes, neighbor_codes, num_relevant, first_positive_rank=None):
        """Adds a chunk of queries.

        Args:
            query_codes: int [q] class codes of the queries.
            neighbor_codes: int [q, m] class codes of their neighbours, best first (the query
                itself excluded; -1 where a search returned fewer than m neighbours). A K > m
                counts the m available neighbours; m >= max(num_relevant) for MAP@R.
            num_relevant: int [q], R of each query (gallery rows of its class, itself excluded).
            first_positive_rank: optional int [q], the exact 0-based rank of each query's nearest
                positive in the whole ranking (`positive_rank.RankCounter`); Recall@K then
                comes from it for every K, and `neighbor_codes` serves MAP@R only.
        """
        relevant = np.asarray(num_relevant)
        # Paper §4.1 is silent: queries without a possible positive are left out of Recall@K
        # and MAP@R alike (pytorch-metric-learning's AccuracyCalculator).
        valid = relevant > 0
        self.excluded += int(np.count_nonzero(~valid))
        if not valid.any():
            return
        relevant = relevant[valid]
        matches = np.asarray(neighbor_codes)[valid] == np.asarray(query_codes)[valid, None]
        width = int(relevant.max()) if self.compute_map else 0
        if width > matches.shape[1]:
            # Fewer neighbours than R (a gallery nearly all of one class): the rest are misses.
            matches = np.pad(matches, ((0, 0), (0, width - matches.shape[1])))
        if first_positive_rank is None:
            ks = np.minimum(np.asarray(self.recall_ks), matches.shape[1])
            first = _first_hit_rank(matches)
        else:
            ks = np.asarray(self.recall_ks)
            first = np.asarray(first_positive_rank)[valid]
        self.hits += np.count_nonzero(first[:, None] < ks[None, :], axis=0)
        self.num_queries += matches.shape[0]
        if self.compute_map:
            self.ap_sum += float(_average_precision_at_r(matches, relevant).sum())
            self.ap_count += matches.shape[0]

    def result(self):
        """dict "recall@K" for each K (share of the queries with R >= 1 that hit) and "map@r"
        (their mean AP@R); NaN when no query has R >= 1."""
        if self.excluded:
            logging.info("%d of %d queries have no other image of their class in the gallery "
                         "and are left out of Recall@K and MAP@R.", self.excluded,
                         self.excluded + self.num_queries)
        results = {f"recall@{k}": float(h / self.num_queries) if self.num_queries else math.nan
                   for k, h in zip(self.recall_ks, self.hits, strict=True)}
        if self.compute_map:
            results["map@r"] = self.ap_sum / self.ap_count if self.ap_count else math.nan
        return results


def check_roles(is_query, is_gallery, count):
    """Query and gallery masks of an evaluation set (all True for a None).

    Args:
        is_query: bool [N] or None.
        is_gallery: bool [N] or None.
        count: N.

    Returns:
        (is_query, is_gallery), two bool arrays [N].

    Raises:
        ValueError: masks of another shape or dtype, no query, or no gallery image.
    """
    masks = []
    for name, mask in (("is_query", is_query), ("is_gallery", is_gallery)):
        mask = np.ones(count, bool) if mask is None else np.asarray(mask)
        if mask.dtype != bool or mask.shape != (count,):
            raise ValueError(f"{name} must be a bool array [{count}]; got {mask.dtype} "
                             f"{mask.shape}.")
        if not mask.any():
            raise ValueError(f"{name} selects no image: evaluation needs queries and a gallery.")
        masks.append(mask)
    return tuple(masks)


def evaluate_embeddings(
    embeddings,
    labels,
    recall_ks=DEFAULT_RECALL_KS,
    metric="euclidean",
    compute_clustering=True,
    kmeans_seed=0,
    compute_map=True,
    memory_budget_bytes=knn.DEFAULT_MEMORY_BUDGET_BYTES,
    kmeans_kwargs=None,
    is_query=None,
    is_gallery=None,
    precision="auto",
):
    """All test metrics of one embedding set: NMI, F1, Recall@K and MAP@R.

    By default the queries are the test set itself, each query excluded from its own neighbours
    by index. With `is_query` / `is_gallery` (the In-Shop protocol) the queries are the rows of
    `is_query` and they search only the rows of `is_gallery` (a query that is also a gallery row
    still never finds itself); R counts the gallery rows of the query's class. The neighbour
    search streams over blocks of queries (`knn.exact_search_for`), so only
    the memory budget's scratch memory is used and the [N, K] neighbour table is never stored.
    Without `is_query` / `is_gallery`, a K beyond what MAP@R needs is scored from the exact
    rank of each query's nearest positive (`positive_rank`), counted during the same search,
    so that R@1000 costs about what R@1 does.

    Args:
        embeddings: float array [N, D].
        labels: [N] class labels (ints or strings).
        recall_ks: ints >= 1. A K >= N - 1 is searched with the N - 1 available neighbours.
        metric: "euclidean" (raw embeddings) or "cosine" (L2-normalised embeddings); k-means for
            NMI/F1 runs on the same vectors (normalised for "cosine").
        compute_clustering: compute "nmi" and "f1" (k-means with K = number of classes).
        kmeans_seed: seed of k-means.
        compute_map: compute "map@r".
        memory_budget_bytes: scratch memory per kNN chunk.
        kmeans_kwargs: dict of overrides for `clustering.kmeans_cluster`.
        is_query: optional bool [N], the queries (default: every row).
        is_gallery: optional bool [N], the gallery (default: every row). NMI and F1 cluster
            all N rows either way.
        precision: product format of the kNN candidate pass ("auto", "float32", "bfloat16");
            the metrics are the same for all three (see `knn.iter_nearest_neighbors`).

    Returns:
        dict of plain floats with keys, in this order: "nmi", "f1" (if compute_clustering),
        "recall@K" for each K in ascending order, "map@r" (if compute_map).

    Raises:
        ValueError: for NaN/Inf embeddings, non-2-D or empty embeddings, labels of another
            length, fewer than two classes, invalid K or metric.
    """
    embeddings = knn.check_embeddings(embeddings)
    labels = _check_labels_1d(labels)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels and embeddings must have the same length; got {labels.shape[0]} labels "
            f"and {embeddings.shape[0]} embeddings."
        )
    codes, class_sizes = _encode(labels)
    if class_sizes.size < 2:
        raise ValueError(
            f"need at least 2 classes to evaluate; labels hold a single class ({labels[0]!r})."
        )
    recall_ks = _check_recall_ks(recall_ks)
    if metric not in knn.METRICS:
        raise ValueError(f"metric must be one of {knn.METRICS}; got {metric!r}.")

    results = {}
    # Paper §4.1 is ambiguous: "Euclidean distance" on z_I; "cosine" is offered for embeddings
    # trained on the unit sphere, where it ranks exactly like Euclidean on normalised vectors.
    if compute_clustering:
        # Imported here: clustering pulls in scikit-learn, which a pure retrieval run avoids.
        from dvml_tf.evaluation import clustering

        vectors = knn.l2_normalize(embeddings) if metric == "cosine" else embeddings
        cluster_ids = clustering.kmeans_cluster(
            vectors, class_sizes.size, seed=kmeans_seed, **(kmeans_kwargs or {})
        )
        results["nmi"] = nmi(cluster_ids, codes)
        results["f1"] = pairwise_f1(cluster_ids, codes)
    if is_query is None and is_gallery is None:
        results.update(
            _retrieval_metrics(
                embeddings, codes, class_sizes, recall_ks, metric, compute_map,
                memory_budget_bytes, precision
            )
        )
    else:
        is_query, is_gallery = check_roles(is_query, is_gallery, len(codes))
        results.update(
            _query_gallery_metrics(
                embeddings, codes, is_query, is_gallery, recall_ks, metric, compute_map,
                memory_budget_bytes, precision
            )
        )
    return results


def neighbours_needed(recall_ks, num_relevant, compute_map, available):
    """How many neighbours each query needs: the largest K, and R for MAP@R, at most the
    `available` gallery rows (a query never counts itself).

    Returns:
        int >= 1.

    Raises:
        ValueError: when no neighbour is available (a gallery of one image, the query itself).
    """
    if available < 1:
        raise ValueError("The gallery holds no image besides the query itself: evaluation needs "
                         "at least 2 gallery images.")
    needed = max(recall_ks[-1], int(np.max(num_relevant)) if compute_map else 1)
    return min(needed, available)


def _retrieval_metrics(embeddings, codes, class_sizes, recall_ks, metric, compute_map, budget,
                       precision):
    """Recall@K and MAP@R, accumulated chunk by chunk over the exact kNN search."""
    num = codes.shape[0]
    # R = 0 for the images of single-image classes: left out (see RetrievalSums).
    num_relevant = class_sizes[codes] - 1
    k = neighbours_needed(recall_ks, num_relevant, compute_map, num - 1)
    counter = None
    list_k = neighbours_needed((1,), num_relevant, compute_map, num - 1)
    if k > list_k:
        # Recall@K for a K beyond what MAP@R needs comes from the exact rank of each query's
        # nearest positive: one count per row instead of a list of K candidates per row.
        counter = positive_rank.RankCounter(codes, budget, knn.resolve_threads(None))
        k = list_k
    sums = RetrievalSums(recall_ks, compute_map)
    # The metrics see only which neighbours share the query's class, so the search leaves the
    # order among neighbours of one kind uncertified (see exact_search).
    for start, ids, _ in knn.exact_search_for(
        embeddings, k, metric=metric, memory_budget_bytes=budget, precision=precision,
        codes=(codes, codes), rank_counter=counter,
    ):
        stop = start + ids.shape[0]
        sums.add(codes[start:stop], codes[ids], num_relevant[start:stop],
                 None if counter is None else counter.ranks[start:stop])
    return sums.result()


def _query_gallery_metrics(embeddings, codes, is_query, is_gallery, recall_ks, metric,
                           compute_map, budget, precision):
    """Recall@K and MAP@R of separate query and gallery sets (which may share rows)."""
    query_rows, gallery_rows = np.flatnonzero(is_query), np.flatnonzero(is_gallery)
    position = np.full(len(codes), -1, dtype=np.int64)
    position[gallery_rows] = np.arange(len(gallery_rows))

    def search(k):
        for start, ids, _ in knn.iter_nearest_neighbors(
            embeddings[query_rows], k, gallery=embeddings[gallery_rows], metric=metric,
            memory_budget_bytes=budget, precision=precision,
        ):
            yield start, ids

    return retrieval_metrics(search, codes[query_rows], codes[gallery_rows],
                             np.arange(len(gallery_rows)), position[query_rows], recall_ks,
                             compute_map)


def retrieval_metrics(search, query_codes, id_codes, gallery_ids, self_ids, recall_ks,
                      compute_map=True):
    """Recall@K and MAP@R of queries searching a gallery with any exact or approximate search.

    Args:
        search: callable k -> iterable of (start, ids): the k best gallery ids of the queries
            start:start + len(ids), best first, over all queries in order; an id < 0 pads a
            row with fewer results.
        query_codes: int [Q] class codes (>= 0) of the queries.
        id_codes: int array mapping each id the search returns to its class code.
        gallery_ids: int [G], the ids of the gallery (R of a query counts them).
        self_ids: int [Q], the id of each query when it is itself in the gallery, else -1.
            Such queries never find themselves (see `exclude_self`).
        recall_ks: sorted ints >= 1.
        compute_map: also compute MAP@R.

    Returns:
        dict "recall@K" for each K and "map@r" (if compute_map).
    """
    self_ids = np.asarray(self_ids)
    has_self = self_ids >= 0
    overlap = int(has_self.any())
    num_relevant = (relevant_counts(query_codes, id_codes[gallery_ids])
                    - has_self).astype(np.int64)
    k = neighbours_needed(recall_ks, num_relevant, compute_map, len(gallery_ids) - overlap)
    sums = RetrievalSums(recall_ks, compute_map)
    for start, ids in search(k + overlap):
        stop = start + ids.shape[0]
        if overlap:
            ids = exclude_self(ids, self_ids[start:stop], has_self[start:stop])
        sums.add(query_codes[start:stop], np.where(ids >= 0, id_codes[np.maximum(ids, 0)], -1),
                 num_relevant[start:stop])
    return sums.result()


def encode_labels(labels):
    """Class codes 0..C-1 of arbitrary (int or str) labels, in sorted label order.

    Args:
        labels: [N] labels.

    Returns:
        int64 [N].
    """
    return _encode(_check_labels_1d(labels))[0]
