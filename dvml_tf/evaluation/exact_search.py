"""Exact k-nearest-neighbour search over tiles of the score matrix, with candidate bounds.

Neighbours are ranked by their exact distance (the real number the float32 inputs define, see
`score_bounds`), exact ties by the smaller gallery index. The result therefore does not depend
on the memory budget, the thread count, the BLAS or the product format.

Work plan:

1. Candidate pass. The score matrix is computed tile by tile (`score_bounds.candidate_block`,
   float32 or bfloat16 GEMM) and each tile is filtered at once, while it is in cache: a pair
   stays a candidate if its lower bound ``s~ - w_i - w_j`` can still reach the row's *limit*,
   an upper bound of the row's exact k-th score (the k-th smallest upper bound ``s~ + w_i +
   w_j`` seen so far; a strided sample of the gallery gives the first limit). Every true
   neighbour passes, since its exact score is at most the k-th exact score.
2. Symmetric blocks (queries are the gallery): tile (i, j), i <= j, is computed once; its rows
   feed the candidates of row block i and its columns (the transposed tile) those of row block
   j. Blocks are finished in order, so results still stream out chunk by chunk. The per-row
   state of the blocks not yet finished is the price: about (k + 32) entries of 12 bytes
   (int32 row, int32 column, float32 score) per row, up to 2x between prunings; for 60,502
   rows that is 68 MB at k = 12 (R@1 + MAP@R on SOP) and 1.5 GB at k = 1001 (a list of 1,000
   neighbours per row; Recall@1000 does not need one: `positive_rank` counts each row's rank
   of its nearest positive during this pass instead). When it exceeds half the memory budget,
   blocks of query rows (a tile's worth, fewer if the budget is small) are searched one after
   the other against the whole gallery instead (the full product, no reuse).
3. Certification. Per row, the candidates are sorted by lower bound and split into groups of
   overlapping intervals: the order between groups is proven. Groups that reach the first k
   positions and hold several members (or, for reported distances, every such group) are
   re-scored in float64; float64 intervals that still overlap (exact ties, near-ties below
   ~1e-13) are ordered by exact integer scores, then by index. For the retrieval metrics only
   the same-class / other-class pattern of the ranking matters, so groups whose members are all
   of one kind are left in candidate order (`codes`).
"""

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dvml_tf.evaluation import score_bounds

# Tiles are at most this many rows/columns: a 2048 x 2048 float32 tile (16 MB) stays in the L3
# cache while it is filtered, and the GEMM is already at full speed at that size.
_MAX_TILE = 2048
_MIN_TILE = 128
# Entries kept per row beyond k before a pruning (ties and bound overlaps need slack).
_SLACK = 32
_BYTES_PER_ENTRY = 12
# A block's entries are pruned once they reach this multiple of what the last pruning kept.
_PRUNE_GROWTH = 2
# Certification works on padded [rows, width] tables of about this many bytes per entry (ids,
# values, bounds, group bookkeeping), in parts of at most _CERTIFY_BYTES.
_CERTIFY_BYTES_PER_ENTRY = 128
_CERTIFY_BYTES = 1 << 26
# Gallery rows sampled for the first limits: at least this many, and 2 (k + 1).
_MIN_SAMPLE = 1024


class Plan:
    """Tile side, symmetric or not, and rows per query block for a budget.

    Args:
        num_queries: Q.
        num_gallery: G.
        k: neighbours per query.
        self_search: queries are the gallery.
        memory_budget_bytes: scratch memory allowed.
    """

    def __init__(self, num_queries, num_gallery, k, self_search, memory_budget_bytes):
        per_row_state = int((k + _SLACK) * _BYTES_PER_ENTRY * _PRUNE_GROWTH) + 64
        # Tile scratch: the float32 tile (4 bytes per cell), the masks of the two filters (1 byte
        # each) and their index arrays, with room to spare.
        self.tile = int(np.clip(int(np.sqrt(memory_budget_bytes / 48)), _MIN_TILE, _MAX_TILE))
        tile_bytes = 9 * self.tile * self.tile
        self.symmetric = (self_search
                          and num_queries * per_row_state <= memory_budget_bytes // 2)
        room = max(memory_budget_bytes - tile_bytes, per_row_state)
        # Rows per query block of the non-symmetric search: a tile's worth, fewer if the
        # budget cannot hold their candidates.
        self.chunk = max(1, min(num_queries, self.tile, room // per_row_state))
        self.sample = min(num_gallery, max(_MIN_SAMPLE, 2 * (k + 1)))
        # A sample that covers most of the gallery costs a full extra pass for little gain.
        if self.sample > num_gallery // 2:
            self.sample = 0


class _Candidates:
    """Candidate entries of a block of query rows and the rows' limits.

    Args:
        start: first query row of the block.
        stop: end of the block.
        limits: float64 [rows], an upper bound of each row's exact k-th score (inf if none).
    """

    def __init__(self, start, stop, limits):
        self.start = start
        self.rows = stop - start
        self.limits = limits
        self._parts = []
        self._pending = 0
        self._next_prune = 0

    def add(self, rows, cols, scores):
        self._parts.append((rows.astype(np.int32), cols.astype(np.int32), scores))
        self._pending += len(rows)

    def entries(self):
        """(rows int32, cols int32, scores float32), all entries, as one part."""
        if len(self._parts) != 1:
            parts = self._parts or [(np.empty(0, np.int32), np.empty(0, np.int32),
                                     np.empty(0, np.float32))]
            self._parts = [tuple(np.concatenate(p) for p in zip(*parts, strict=True))]
        return self._parts[0]

    def maybe_prune(self, k, query_weights, gallery_weights):
        # Pruning as soon as the entries double keeps the limits tight from the first tiles on,
        # which is what keeps the later tiles' candidates few.
        if self._pending <= max(self._next_prune, k * self.rows):
            return
        rows, cols, scores = self.entries()
        width = query_weights[rows + self.start] + gallery_weights[cols]
        values = scores.astype(np.float64)
        upper = values + width
        self.limits = np.minimum(self.limits, _kth_per_row(rows, upper, k, self.rows))
        keep = values - width <= self.limits[rows]
        self._parts = [(rows[keep], cols[keep], scores[keep])]
        self._pending = int(keep.sum())
        self._next_prune = _PRUNE_GROWTH * self._pending

    def thresholds(self, query_weights, max_gallery_weight):
        """float32 score thresholds of the rows for a tile whose columns weigh at most
        max_gallery_weight."""
        rows = slice(self.start, self.start + self.rows)
        return score_bounds.round_up_float32(
            self.limits + query_weights[rows] + max_gallery_weight).astype(np.float32)


def _group_by_row(rows, num_rows):
    """(order, counts, slots): entries grouped by row in a stable order, in O(n).

    numpy's stable sort is a radix sort for 16-bit keys (a block has at most 65,535 rows, the
    usual case) and a merge sort otherwise.
    """
    keys = rows.astype(np.uint16) if num_rows <= np.iinfo(np.uint16).max else rows
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(rows, minlength=num_rows)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    slots = np.arange(len(rows)) - np.repeat(starts, counts)
    return order, counts, slots


def _kth_per_row(rows, values, k, num_rows):
    """k-th smallest value of each row's entries (inf for rows with fewer than k)."""
    order, counts, slots = _group_by_row(rows, num_rows)
    width = int(counts.max(initial=0))
    if width < k:
        return np.full(num_rows, np.inf)
    table = np.full((num_rows, width), np.inf)
    table[rows[order], slots] = values[order]
    kth = np.partition(table, k - 1, axis=1)[:, k - 1]
    kth[counts < k] = np.inf
    return kth


def _filter(block, thresholds):
    """(rows, cols, scores) of the entries of `block` at or below `thresholds` (broadcast).

    np.flatnonzero is about 13x faster than the 2-D np.nonzero on a sparse mask (measured on
    2048 x 2048 tiles), and the filter runs on every tile.
    """
    flat = np.flatnonzero(block <= thresholds)
    rows, cols = np.divmod(flat, block.shape[1])
    return rows, cols, block.ravel()[flat]


class Search:
    """One exact search: validated inputs, prepared rows and the plan.

    Args:
        queries: float32 [Q, D] canonical rows (L2-normalised for cosine).
        gallery: float32 [G, D] canonical rows, or None for a self-search.
        k: neighbours per query (validated by the caller).
        metric: "euclidean" or "cosine".
        memory_budget_bytes: scratch memory.
        precision: "auto", "float32" or "bfloat16".
        num_threads: threads for the certification of finished blocks.
        codes: None, or (query_codes, gallery_codes) int arrays: only the same-code /
            other-code pattern of each ranking needs to be exact (retrieval metrics), and no
            distances are computed.
        prepared_gallery: the `score_bounds.Prepared` gallery of an earlier search of the same
            rows (reused when its precision is the one resolved here), or None.
        rank_counter: None, or (self-search only) a `positive_rank.RankCounter`: it is bound
            to the prepared rows, sees every candidate tile and is settled before each block
            is yielded, so that its `ranks` of the yielded rows are final.
    """

    def __init__(self, queries, gallery, k, metric, memory_budget_bytes, precision,
                 num_threads, codes=None, prepared_gallery=None, rank_counter=None):
        self.self_search = gallery is None
        if rank_counter is not None and not self.self_search:
            raise ValueError("rank_counter needs a self-search (gallery=None).")
        gallery = queries if self.self_search else gallery
        self.k = k
        self.metric = metric
        self.codes = codes
        self.threads = num_threads
        self.rank_counter = rank_counter
        if rank_counter is not None and precision == "auto":
            # The count's undecided band is the bound's width around every row's threshold:
            # bfloat16's is 257x float32's, and the pairs in it are re-scored one by one.
            precision = "float32"
        self.precision = score_bounds.resolve_precision(precision, k)
        if prepared_gallery is None or prepared_gallery.precision != self.precision:
            centre = score_bounds.centre_for(gallery) if metric == "euclidean" else None
            prepared_gallery = score_bounds.prepare(gallery, metric, self.precision, centre)
        self.gallery = prepared_gallery
        self.queries = (self.gallery if self.self_search
                        else score_bounds.prepare(queries, metric, self.precision,
                                                  prepared_gallery.centre))
        self.plan = Plan(len(queries), len(gallery), k, self.self_search, memory_budget_bytes)
        if rank_counter is not None:
            rank_counter.bind(self.queries)

    def __iter__(self):
        """Yields (start, ids int64 [rows, k], scores float64 [rows, k] or None) per block."""
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            blocks = self._symmetric() if self.plan.symmetric else self._chunked()
            for state in blocks:
                if self.rank_counter is not None:
                    self.rank_counter.settle()
                yield (state.start, *self._certify(state, pool))

    # --- candidate pass -------------------------------------------------------------------

    def _initial_limits(self, start, stop):
        """Limits of rows start:stop from the strided gallery sample (inf without a sample)."""
        limits = np.full(stop - start, np.inf)
        size = self.plan.sample
        if not size:
            return limits
        columns = np.linspace(0, len(self.gallery.weights) - 1, size).astype(np.int64)
        sample = self.gallery.subset(columns)
        for a in range(start, stop, self.plan.tile):
            b = min(a + self.plan.tile, stop)
            block = score_bounds.candidate_block(self.queries, sample, slice(a, b),
                                                 slice(0, size)).astype(np.float64)
            if self.self_search:
                rows, cols = np.nonzero(columns[None, :] == np.arange(a, b)[:, None])
                block[rows, cols] = np.inf
            block += self.queries.weights[a:b, None]
            block += sample.weights[None, :]
            available = size - (1 if self.self_search else 0)
            if available >= self.k:
                limits[a - start:b - start] = np.partition(block, self.k - 1, axis=1)[:, self.k - 1]
        return limits

    def _tiles(self, count, width=None):
        width = width or self.plan.tile
        return [(a, min(a + width, count)) for a in range(0, count, width)]

    def _symmetric(self):
        """Candidates of each row block from tiles (i, j), i <= j, each computed once."""
        num = len(self.queries.weights)
        weights = self.queries.weights
        tiles = self._tiles(num)
        states = [_Candidates(a, b, self._initial_limits(a, b)) for a, b in tiles]
        tile_weight = [weights[a:b].max() for a, b in tiles]
        for i, (a, b) in enumerate(tiles):
            for j in range(i, len(tiles)):
                c, d = tiles[j]
                block = score_bounds.candidate_block(self.queries, self.gallery, slice(a, b),
                                                     slice(c, d))
                if i == j:
                    np.fill_diagonal(block, np.inf)
                rows, cols, scores = _filter(
                    block, states[i].thresholds(weights, tile_weight[j])[:, None])
                states[i].add(rows, cols + c, scores)
                states[i].maybe_prune(self.k, weights, weights)
                if self.rank_counter is not None:
                    self.rank_counter.count(block, a, c, tile_weight[j])
                    if i != j:
                        self.rank_counter.count(block, c, a, tile_weight[i], transposed=True)
                if i != j:
                    # The transposed tile: its columns are rows of block j.
                    rows, cols, scores = _filter(
                        block, states[j].thresholds(weights, tile_weight[i])[None, :])
                    states[j].add(cols, rows + a, scores)
                    states[j].maybe_prune(self.k, weights, weights)
                del block
            yield states[i]
            states[i] = None

    def _chunked(self):
        """Candidates of query chunks, each against every gallery tile."""
        num_queries = len(self.queries.weights)
        # Few queries (an index search) get wide tiles of the same area: one product per query
        # block rather than a Python loop over hundreds of thin ones.
        rows = min(self.plan.chunk, num_queries)
        gallery_tiles = self._tiles(len(self.gallery.weights), self.plan.tile**2 // rows)
        tile_weight = [self.gallery.weights[c:d].max() for c, d in gallery_tiles]
        # One block of query rows at a time, finished before the next: its state (and every
        # pruning) covers only its rows.
        for a in range(0, num_queries, self.plan.chunk):
            b = min(a + self.plan.chunk, num_queries)
            state = _Candidates(a, b, self._initial_limits(a, b))
            for (c, d), weight in zip(gallery_tiles, tile_weight, strict=True):
                block = score_bounds.candidate_block(self.queries, self.gallery, slice(a, b),
                                                     slice(c, d))
                if self.self_search:
                    rows = np.arange(max(a, c), min(b, d))
                    block[rows - a, rows - c] = np.inf
                rows, cols, scores = _filter(
                    block, state.thresholds(self.queries.weights, weight)[:, None])
                state.add(rows, cols + c, scores)
                state.maybe_prune(self.k, self.queries.weights, self.gallery.weights)
                if self.rank_counter is not None:
                    self.rank_counter.count(block, a, c, weight)
            yield state

    # --- certification ----------------------------------------------------------------------

    def _certify(self, state, pool):
        """Exact (ids, scores or None) of a finished block, rows split over the threads.

        The scores are the float64 re-scored scores (None with `codes`)."""
        rows, cols, scores = state.entries()
        order = np.argsort(rows, kind="stable")
        rows, cols, scores = rows[order], cols[order], scores[order]
        table_bytes = _CERTIFY_BYTES_PER_ENTRY * max(len(rows), self.k * state.rows)
        parts = self.threads * -(-table_bytes // (_CERTIFY_BYTES * self.threads))
        bounds = np.linspace(0, state.rows, min(parts, state.rows) + 1).astype(int)
        cuts = np.searchsorted(rows, bounds)
        jobs = [(state.start + lo, hi - lo, rows[s:e] - lo, cols[s:e], scores[s:e],
                 state.limits[lo:hi])
                for (lo, hi), (s, e) in zip(itertools.pairwise(bounds),
                                            itertools.pairwise(cuts), strict=True)]
        parts = list(pool.map(lambda job: self._certify_rows(*job), jobs))
        ids = np.concatenate([p[0] for p in parts])
        if self.codes is not None:
            return ids, None
        return ids, np.concatenate([p[1] for p in parts])

    def _certify_rows(self, start, num_rows, rows, cols, scores, limits):
        k = self.k
        query_rows = rows.astype(np.int64) + start
        values = scores.astype(np.float64)
        width = self.queries.weights[query_rows] + self.gallery.weights[cols]
        limits = np.minimum(limits, _kth_per_row(rows, values + width, k, num_rows))
        keep = values - width <= limits[rows]
        rows, cols, values, width = rows[keep], cols[keep], values[keep], width[keep]
        table = _Table(rows, cols, values, values - width, values + width, num_rows,
                       pad_id=len(self.gallery.weights))
        # Round 1: candidate intervals.
        table.sort_by_lower()
        groups = table.groups()
        select = groups.reaches(k) & table.real
        if self.codes is not None:
            # Only the same-code / other-code pattern must be exact; reported scores otherwise
            # need the float64 score of every entry that can reach the first k.
            select &= (groups.size >= 2) & groups.mixed(self._relevance(table, start))
        qr, gc = np.nonzero(select)
        if qr.size:
            exact, error = score_bounds.rescore(
                self.queries.canonical, self.gallery.canonical, qr + start, table.ids[qr, gc],
                self.metric)
            table.refine(qr, gc, exact, error)
        # Round 2: float64 intervals (nested in the first ones, so groups only split).
        table.sort_by_lower()
        groups = table.groups()
        tied = groups.reaches(k) & table.real & (groups.size >= 2)
        if self.codes is not None:
            tied &= groups.mixed(self._relevance(table, start))
        ordinal = np.zeros(table.ids.shape, dtype=np.int64)
        qr, gc = np.nonzero(tied)
        if qr.size:
            keys = score_bounds.exact_keys(self.queries.canonical, self.gallery.canonical,
                                           qr + start, table.ids[qr, gc], self.metric)
            group_of = groups.global_id[qr, gc]
            ranked = sorted(range(len(keys)),
                            key=lambda m: (group_of[m], keys[m], table.ids[qr[m], gc[m]]))
            previous, position = None, 0
            for m in ranked:
                position = position + 1 if group_of[m] == previous else 0
                previous = group_of[m]
                ordinal[qr[m], gc[m]] = position
        # Paper §4.1 is silent: exact ties go to the smaller index (deterministic).
        final = np.lexsort((table.ids, table.values, ordinal, groups.local_id), axis=1)[:, :k]
        ids = np.take_along_axis(table.ids, final, axis=1)
        if self.codes is not None:
            return ids, None
        return ids, np.take_along_axis(table.values, final, axis=1)

    def _relevance(self, table, start):
        query_codes, gallery_codes = self.codes
        own = query_codes[start:start + table.ids.shape[0], None]
        return gallery_codes[np.minimum(table.ids, len(gallery_codes) - 1)] == own


class _Table:
    """Per-row padded candidate table: ids, values (candidate or float64 scores), bounds."""

    def __init__(self, rows, cols, values, lower, upper, num_rows, pad_id):
        order, counts, slots = _group_by_row(rows, num_rows)
        rows, cols, values, lower, upper = (a[order] for a in (rows, cols, values, lower, upper))
        width = int(counts.max(initial=0))
        self.ids = np.full((num_rows, width), pad_id, dtype=np.int64)
        self.values = np.full((num_rows, width), np.inf)
        self.lower = np.full((num_rows, width), np.inf)
        self.upper = np.full((num_rows, width), np.inf)
        for table, data in ((self.ids, cols), (self.values, values), (self.lower, lower),
                            (self.upper, upper)):
            table[rows, slots] = data
        self.real = np.zeros((num_rows, width), dtype=bool)
        self.real[rows, slots] = True

    def sort_by_lower(self):
        order = np.lexsort((self.ids, self.lower), axis=1)
        for name in ("ids", "values", "lower", "upper", "real"):
            setattr(self, name, np.take_along_axis(getattr(self, name), order, axis=1))

    def refine(self, rows, cols, exact, error):
        self.values[rows, cols] = exact
        self.lower[rows, cols] = np.maximum(self.lower[rows, cols], exact - error)
        self.upper[rows, cols] = np.minimum(self.upper[rows, cols], exact + error)

    def groups(self):
        return _Groups(self.lower, self.upper)


class _Groups:
    """Groups of overlapping intervals in rows sorted by lower bound."""

    def __init__(self, lower, upper):
        num_rows, width = lower.shape
        reach = np.maximum.accumulate(upper, axis=1)
        starts = np.ones((num_rows, width), dtype=bool)
        starts[:, 1:] = lower[:, 1:] > reach[:, :-1]
        self.local_id = np.cumsum(starts, axis=1) - 1
        self.global_id = self.local_id + (width * np.arange(num_rows))[:, None]
        positions = np.where(starts, np.arange(width), 0)
        self.first = np.maximum.accumulate(positions, axis=1)
        self.size = np.bincount(self.global_id.ravel(),
                                minlength=num_rows * width)[self.global_id]

    def reaches(self, k):
        """Entries of groups that start within the first k positions."""
        return self.first < k

    def mixed(self, relevant):
        """Entries of groups holding both relevant and other entries."""
        count = np.bincount(self.global_id.ravel(), weights=relevant.ravel(),
                            minlength=self.global_id.size)[self.global_id]
        return (count > 0) & (count < self.size)
