"""Exact k-nearest-neighbour search in tiles (never the full N x N matrix).

Distances:

* ``"euclidean"``: Euclidean distance on the raw vectors.
* ``"cosine"``: cosine distance ``1 - cos(q, g)`` on the float32 L2-normalised vectors.

Exact means exact arithmetic: neighbours are ranked by the real distance that the float32
inputs define, and exact ties go to the smaller gallery index. The ranking therefore does not
depend on the memory budget, the thread count, the BLAS or the product format (float32 or
bfloat16): a fast product proposes candidates with a proven error bound, and only the pairs
whose order the bound leaves open are re-scored in float64 or, for exact ties, in integer
arithmetic (`exact_search`, `score_bounds`). Reported distances are float32 roundings of the
float64 re-scored values (within ~1e-16 relative of the exact distance).

With ``gallery=None`` the queries are their own gallery and each query is excluded from its own
neighbours **by index** (not by distance), so an exact duplicate of the query is still returned,
at distance 0. That case computes each block of the symmetric score matrix once and uses it for
both of its row blocks, which halves the matrix product.

The memory budget bounds the scratch memory (tiles and the candidates of unfinished rows); see
`exact_search.Plan`.
"""

import os

import numpy as np

from dvml_tf.evaluation import exact_search
from dvml_tf.evaluation import score_bounds

METRICS = ("euclidean", "cosine")
# About 1 GiB of scratch: 60,502 x 512 searches its 12 neighbours (R@1 + MAP@R on SOP) with
# symmetric 2048 x 2048 tiles and at most about 70 MB of candidates.
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30


def check_embeddings(embeddings, name="embeddings"):
    """Validates an embedding matrix and returns it as a C-contiguous float32 array.

    Args:
        embeddings: array-like of shape [N, D].
        name: argument name used in error messages.

    Returns:
        float32 numpy array of shape [N, D].

    Raises:
        ValueError: if the array is not 2-D, is empty, has no columns, or holds NaN or Inf values
            (the message gives how many rows are affected).
    """
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array [num_samples, dim]; got shape {array.shape}."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers; got dtype {array.dtype}.")
    array = np.ascontiguousarray(array, dtype=np.float32)
    bad_rows = np.count_nonzero(~np.isfinite(array).all(axis=1))
    if bad_rows:
        raise ValueError(
            f"{name} contains NaN or Inf values in {bad_rows} of {array.shape[0]} rows."
        )
    return array


def _check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}.")


def l2_normalize(embeddings):
    """L2-normalises the rows of a float32 matrix.

    Args:
        embeddings: float array [N, D].

    Returns:
        float32 array [N, D] of unit rows. All-zero rows stay zero (their cosine similarity to
        everything is 0) rather than becoming NaN.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, np.finfo(np.float32).tiny)


def resolve_threads(num_threads):
    """The thread count to use: `num_threads` (validated, >= 1) or the usable cores."""
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1; got {num_threads}.")
        return int(num_threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # sched_getaffinity is Linux-only.
        return max(1, os.cpu_count() or 1)


def _prepare(queries, gallery, metric):
    """Validates the inputs and returns (queries, gallery, self_search) ready for scoring."""
    _check_metric(metric)
    queries = check_embeddings(queries, "queries")
    self_search = gallery is None
    if self_search:
        gallery = queries
    else:
        gallery = check_embeddings(gallery, "gallery")
        if gallery.shape[1] != queries.shape[1]:
            raise ValueError(
                f"queries and gallery must have the same dimension; got {queries.shape[1]} and "
                f"{gallery.shape[1]}."
            )
    if metric == "cosine":
        queries = l2_normalize(queries)
        gallery = queries if self_search else l2_normalize(gallery)
    return queries, gallery, self_search


def _check_k(k, num_gallery, self_search):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an int >= 1; got {k!r}.")
    available = num_gallery - 1 if self_search else num_gallery
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}.")
    if k > available:
        raise ValueError(
            f"k={k} exceeds the number of gallery items available per query ({available}"
            f"{', the query itself excluded' if self_search else ''})."
        )
    return int(k)


def iter_nearest_neighbors(
    queries,
    k,
    gallery=None,
    metric="euclidean",
    memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES,
    num_threads=None,
    precision="auto",
):
    """Exact k-nearest-neighbour search, yielding one chunk of query rows at a time.

    Streaming lets a caller reduce each chunk (e.g. to metric sums) so that not even the [Q, k]
    result has to be held in memory.

    Args:
        queries: float array [Q, D].
        k: int, number of neighbours per query, 1 <= k <= gallery size (minus 1 when the query
            set is the gallery).
        gallery: float array [G, D], or None to search the queries among themselves, excluding
            each query from its own result by index.
        metric: "euclidean" (raw vectors) or "cosine" (1 - cosine similarity).
        memory_budget_bytes: scratch memory; sets the tile size and the rows per chunk.
        num_threads: threads for the certification of each chunk; default: the usable cores.
        precision: product format of the candidate pass: "float32", "bfloat16" (TF's oneDNN
            matmul) or "auto" (bfloat16 where the CPU has AVX512_BF16 or AMX and k <= 64). The
            result is the same for all three.

    Yields:
        (start, indices, distances): the chunk covers queries ``start:start + len(indices)``;
        ``indices`` is int64 [rows, k] (gallery row numbers), ``distances`` float32 [rows, k],
        ascending by exact distance, exact ties ordered by the smaller index.

    Raises:
        ValueError: on invalid embeddings, metric, k, num_threads or precision.
    """
    # Validate eagerly (not at the first next()), so bad input fails where the call is made.
    search = exact_search_for(queries, k, gallery, metric, memory_budget_bytes, num_threads,
                              precision)
    return _with_distances(search, metric)


def exact_search_for(queries, k, gallery=None, metric="euclidean",
                     memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES, num_threads=None,
                     precision="auto", codes=None, rank_counter=None):
    """The validated `exact_search.Search` behind `iter_nearest_neighbors`.

    Args:
        queries, k, gallery, metric, memory_budget_bytes, num_threads, precision: as
            `iter_nearest_neighbors`.
        codes: None, or (query_codes, gallery_codes): rankings need only be exact up to the
            order of neighbours of the same kind (same code as the query or not), and no
            scores are computed (what Recall@K and MAP@R need).
        rank_counter: None, or a `positive_rank.RankCounter` fed by the search (gallery=None
            only): the exact rank of each row's nearest positive, for Recall@K of any K.

    Returns:
        `exact_search.Search`; iterating yields (start, ids, float64 scores or None).
    """
    queries, gallery, self_search = _prepare(queries, gallery, metric)
    k = _check_k(k, len(queries) if self_search else len(gallery), self_search)
    return exact_search.Search(queries, None if self_search else gallery, k, metric,
                               _check_budget(memory_budget_bytes), precision,
                               resolve_threads(num_threads), codes,
                               rank_counter=rank_counter)


def _with_distances(search, metric):
    for start, ids, scores in search:
        yield start, ids, score_bounds.float32_distance(scores, metric)


def _check_budget(memory_budget_bytes):
    if (isinstance(memory_budget_bytes, bool)
            or not isinstance(memory_budget_bytes, (int, np.integer)) or memory_budget_bytes < 1):
        raise ValueError(
            f"memory_budget_bytes must be an int >= 1; got {memory_budget_bytes!r}.")
    return int(memory_budget_bytes)


def nearest_neighbors(
    queries,
    k,
    gallery=None,
    metric="euclidean",
    memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES,
    num_threads=None,
    precision="auto",
):
    """Exact k-nearest-neighbour search in tiles.

    Args:
        queries: float array [Q, D].
        k: int, number of neighbours per query, 1 <= k <= gallery size (minus 1 when the query
            set is the gallery).
        gallery: float array [G, D], or None to search the queries among themselves, excluding
            each query from its own result by index (duplicates of it are still returned).
        metric: "euclidean" (raw vectors) or "cosine" (1 - cosine similarity of L2-normalised
            vectors).
        memory_budget_bytes: scratch memory; sets the tile size and the rows per chunk.
        num_threads: threads for the certification of each chunk; default: the usable cores.
        precision: "auto", "float32" or "bfloat16" (see `iter_nearest_neighbors`).

    Returns:
        (indices, distances): int64 [Q, k] gallery row numbers and float32 [Q, k] distances,
        sorted by exact distance with exact ties ordered by the smaller index.

    Raises:
        ValueError: on invalid embeddings, metric, k, num_threads or precision.
    """
    indices, distances = None, None
    for start, ids, vals in iter_nearest_neighbors(
        queries, k, gallery, metric, memory_budget_bytes, num_threads, precision
    ):
        if indices is None:
            num_queries = np.shape(queries)[0]
            indices = np.empty((num_queries, ids.shape[1]), dtype=np.int64)
            distances = np.empty((num_queries, ids.shape[1]), dtype=np.float32)
        indices[start : start + len(ids)] = ids
        distances[start : start + len(ids)] = vals
    return indices, distances
