"""Exact rank of each query's nearest positive: Recall@K for any K without top-K lists.

Recall@K of a query is 1 iff its nearest positive (a row of its class, not itself) ranks within
the first K of the exact ranking of `exact_search` (exact distance, exact ties to the smaller
index). Only other-class rows can rank before the nearest positive ``p``, so its 0-based rank is
the number of rows ``j`` with ``(s_qj, j) < (s_qp, p)``. That needs one threshold and one count
per query instead of a per-row list of max(K) candidates (1,001 entries per row for R@1000):

1. `nearest_positives`: each query's exact nearest positive from the same-class pairs alone
   (small classes: every pair re-scored in float64, pairs that float64 cannot order settled by
   exact integer keys; large classes: an exact k = 1 search among the class's rows).
2. `RankCounter`, fed every tile of the exact search's candidate pass (both orientations of a
   symmetric tile): a pair whose candidate interval (`score_bounds`: ``s~ +- (w_q + w_j)``) lies
   below the nearest positive's float64 interval is counted, one above it is not, and the few
   that overlap are settled in float64, then by exact integer keys and the index tie rule.

Only the self-search (queries are the gallery) is supported, the case of `evaluate_embeddings`.
"""

import numpy as np

from dvml_tf.evaluation import exact_search
from dvml_tf.evaluation import score_bounds

# Classes up to this size get all their pairs re-scored in float64 (at most 255 per row); the
# rows of larger classes are searched with the tiled exact search instead, which bounds memory.
_MAX_PAIRWISE_CLASS = 256
# Pairs re-scored per batch of classes: bounds the [pairs] float64 arrays (~40 bytes a pair).
_PAIR_BATCH = 1 << 20
# Relative slack added to every float64 comparison of bounds: far above float64's rounding of
# the sums that form them (2^-53), far below the float32 error band (~2^-14 at D = 512), so a
# decision it blocks goes to the exact comparison instead of being taken on rounded numbers.
_SLACK = 2.0**-40


def _magnitude(values):
    """|values| where finite, else 0 (rows without a positive have -inf bounds)."""
    return np.abs(np.where(np.isfinite(values), values, 0.0))


def _widened(values, errors):
    """(low, high) float64 bounds of the exact scores, with the rounding slack."""
    margin = errors + _SLACK * np.abs(values)
    return values - margin, values + margin


def _pick_exact(canonical, query, candidates, metric):
    """Of `candidates` (gallery rows whose float64 intervals overlap), the nearest to `query`
    by exact score, exact ties to the smaller index."""
    keys = score_bounds.exact_keys(canonical, canonical, np.full(len(candidates), query),
                                   candidates, metric)
    return min(zip(keys, candidates.tolist(), strict=True))[1]


class NearestPositives:
    """Each query's nearest positive and its float64 score interval.

    Args:
        index: int64 [N], the nearest positive's row (-1: the row's class has no other row).
        low: float64 [N], lower bound of its exact score (-inf for index -1).
        high: float64 [N], upper bound (-inf for index -1, so that nothing ranks before it).
    """

    def __init__(self, index, low, high):
        self.index = index
        self.low = low
        self.high = high


def nearest_positives(prepared, codes, memory_budget_bytes, num_threads):
    """The exact nearest positive of every row (self-search).

    Args:
        prepared: `score_bounds.Prepared` of the rows (its canonical rows define the scores).
        codes: int [N] class codes.
        memory_budget_bytes: scratch memory of the searches within large classes.
        num_threads: threads of those searches.

    Returns:
        `NearestPositives`.
    """
    canonical, metric = prepared.canonical, prepared.metric
    num = len(codes)
    index = np.full(num, -1, dtype=np.int64)
    sizes = np.bincount(codes)
    by_class = np.argsort(codes, kind="stable")
    first_row = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    for size in np.unique(sizes[sizes >= 2]):
        classes = np.flatnonzero(sizes == size)
        members = by_class[first_row[classes][:, None] + np.arange(size)]
        if size > _MAX_PAIRWISE_CLASS:
            for rows in members:
                index[rows] = rows[_searched_nearest(prepared, rows, memory_budget_bytes,
                                                     num_threads)]
            continue
        others = np.nonzero(~np.eye(size, dtype=bool))[1].reshape(size, size - 1)
        step = max(1, _PAIR_BATCH // (size * (size - 1)))
        for part in range(0, len(classes), step):
            rows = members[part:part + step]
            queries = rows.reshape(-1)
            # [queries, size - 1]: the other members of each query's class.
            gallery = rows[:, others].reshape(-1, size - 1)
            index[queries] = _pairwise_nearest(canonical, queries, gallery, metric)
    has = index >= 0
    low = np.full(num, -np.inf)
    high = np.full(num, -np.inf)
    if has.any():
        rows = np.flatnonzero(has)
        values, errors = score_bounds.rescore(canonical, canonical, rows, index[rows], metric)
        low[rows], high[rows] = _widened(values, errors)
    return NearestPositives(index, low, high)


def _pairwise_nearest(canonical, queries, gallery, metric):
    """Nearest of each query's `gallery` row list ([Q, m]) by exact score and index."""
    values, errors = score_bounds.rescore(
        canonical, canonical, np.repeat(queries, gallery.shape[1]), gallery.reshape(-1), metric)
    low, high = (a.reshape(gallery.shape) for a in _widened(values, errors))
    # Candidates: intervals reaching below the smallest upper bound of the row.
    candidate = low <= high.min(axis=1, keepdims=True)
    count = candidate.sum(axis=1)
    nearest = gallery[np.arange(len(queries)), candidate.argmax(axis=1)]
    for row in np.flatnonzero(count > 1):
        nearest[row] = _pick_exact(canonical, queries[row], gallery[row][candidate[row]], metric)
    return nearest


def _searched_nearest(prepared, rows, memory_budget_bytes, num_threads):
    """Position in `rows` of each row's exact nearest other row (the tiled k = 1 search)."""
    search = exact_search.Search(prepared.canonical[rows], None, 1, prepared.metric,
                                 memory_budget_bytes, prepared.precision, num_threads)
    nearest = np.empty(len(rows), dtype=np.int64)
    for start, ids, _ in search:
        nearest[start:start + len(ids)] = ids[:, 0]
    return nearest


class RankCounter:
    """Counts, per query, the rows that rank before its nearest positive, tile by tile.

    The exact search calls `bind` once with its prepared rows, `count` with every candidate
    tile (in both orientations of a symmetric tile) and `settle` before it yields a block of
    rows; `ranks` then holds the final ranks of every row yielded so far.

    Args:
        codes: int [N] class codes of the rows.
        memory_budget_bytes: scratch memory of `nearest_positives`.
        num_threads: threads of `nearest_positives`.
    """

    def __init__(self, codes, memory_budget_bytes, num_threads):
        self.codes = np.asarray(codes)
        self.budget = memory_budget_bytes
        self.threads = num_threads
        self.ranks = np.zeros(len(self.codes), dtype=np.int64)
        self._pending = []

    def bind(self, prepared):
        """Finds the nearest positives of the search's prepared rows."""
        self.prepared = prepared
        self.positives = nearest_positives(prepared, self.codes, self.budget, self.threads)

    def count(self, block, query_start, gallery_start, max_gallery_weight, transposed=False):
        """Counts the pairs of a candidate tile that surely rank before the nearest positive
        and keeps those that may.

        Args:
            block: float32 candidate scores, rows `gallery_start..` x columns `query_start..`
                if `transposed`, else rows `query_start..` x columns `gallery_start..`; the
                self pairs are +inf.
            query_start, gallery_start: first query row and first gallery row of the tile.
            max_gallery_weight: the largest bound weight of the tile's gallery rows.
            transposed: whether the queries are the tile's columns.
        """
        num_queries = block.shape[1] if transposed else block.shape[0]
        rows = slice(query_start, query_start + num_queries)
        weights = self.prepared.weights
        low, high = self.positives.low[rows], self.positives.high[rows]
        reach = weights[rows] + max_gallery_weight
        # s~ < surely  =>  s~ + w_q + w_g < low;  s~ > maybe  =>  s~ - w_q - w_g > high.
        surely = -score_bounds.round_up_float32(
            -(low - reach - _SLACK * (_magnitude(low) + reach)))
        maybe = score_bounds.round_up_float32(high + reach + _SLACK * (_magnitude(high) + reach))
        surely, maybe = surely.astype(np.float32), maybe.astype(np.float32)
        axis = (None, slice(None)) if transposed else (slice(None), None)
        flat = np.flatnonzero(block <= maybe[axis])
        first, second = np.divmod(flat, block.shape[1])
        values = block.ravel()[flat]
        local = second if transposed else first
        below = values < surely[local]
        self.ranks[rows] += np.bincount(local[below], minlength=num_queries)
        if below.all():
            return
        keep = ~below
        local, values = local[keep], values[keep]
        query = local + query_start
        gallery = (first if transposed else second)[keep] + gallery_start
        # Per-pair bounds decide most of the rest; a positive never ranks before the nearest
        # positive, so same-class pairs are dropped.
        width = weights[query] + weights[gallery]
        slack = _SLACK * (np.abs(values) + width)
        before = values + width + slack < self.positives.low[query]
        after = values - width - slack > self.positives.high[query]
        np.add.at(self.ranks, query[before], 1)
        open_ = ~(before | after) & (self.codes[gallery] != self.codes[query])
        if open_.any():
            self._pending.append((query[open_], gallery[open_]))

    def settle(self):
        """Settles the pairs kept so far: float64 scores, then exact keys and the tie rule."""
        if not self._pending:
            return
        query = np.concatenate([q for q, _ in self._pending])
        gallery = np.concatenate([g for _, g in self._pending])
        self._pending = []
        canonical, metric = self.prepared.canonical, self.prepared.metric
        low, high = _widened(*score_bounds.rescore(canonical, canonical, query, gallery, metric))
        before = high < self.positives.low[query]
        tied = ~before & (low <= self.positives.high[query])
        np.add.at(self.ranks, query[before], 1)
        for q, g in zip(query[tied].tolist(), gallery[tied].tolist(), strict=True):
            p = int(self.positives.index[q])
            key_g, key_p = score_bounds.exact_keys(canonical, canonical, [q, q], [g, p], metric)
            # Paper §4.1 is silent: exact ties go to the smaller index (as in the ranking).
            self.ranks[q] += (key_g, g) < (key_p, p)
