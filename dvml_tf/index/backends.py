"""Search backends of `GalleryIndex`: exact search (flat) and two faiss ANN indexes.

A backend stores the vectors of the gallery rows in insertion order and answers a search with
row *positions* (0..n-1 in insertion order; -1 pads a row that has fewer results than asked)
and scores (higher is better; -inf pads). `GalleryIndex` maps positions to ids, labels and
metadata. Vectors reach a backend validated (finite float32 [n, dim]) and, when the index
normalises, already L2-normalised.

Scores: metric "cosine" gives the inner product of the normalised vectors, i.e. the cosine
similarity; "euclidean" gives the negative squared Euclidean distance. Within a result row,
equal scores are ordered by position (the earlier added row first).

* ``flat``: exact search with `dvml_tf.evaluation.exact_search` (the engine of
  `knn.nearest_neighbors`: a float32 or bfloat16 candidate pass with a proven error bound, exact
  re-scoring where the bound leaves the order open), so it returns exactly the neighbours of
  `knn.nearest_neighbors` on the same rows, ties included. faiss's IndexFlat is not used: it
  ranks near-ties by float roundings and breaks exact ties by heap order.
* ``hnsw``: faiss IndexHNSWFlat (float32 vectors) or IndexHNSWSQ (float16 vectors). HNSW cannot
  delete nodes: removed rows become tombstones that searches skip through a faiss IDSelector
  (the graph keeps them as stepping stones, so recall does not drop), and the graph is rebuilt
  from the live vectors once tombstones exceed `max_tombstone_fraction` of the nodes. A save
  keeps the tombstones (rebuilding a 1M-node graph takes minutes; a save should not).
* ``ivf_pq``: faiss IndexIVFPQ, trained on (a sample of) the first added rows, with an optional
  exact re-ranking of `k_factor * k` candidates from a float16 or float32 copy of the vectors
  (kept here in numpy, so that removal stays a faiss `remove_ids` plus an array deletion).
"""

import logging
import math
from typing import ClassVar

import numpy as np

from dvml_tf.evaluation import exact_search
from dvml_tf.evaluation import knn
from dvml_tf.evaluation import score_bounds
from dvml_tf.index import storage

BACKENDS = ("flat", "hnsw", "ivf_pq")
PAD_POSITION = -1
# Query rows per re-ranking block of ivf_pq: bounds the gathered [rows, candidates, dim] copy.
_REFINE_BLOCK_BYTES = 1 << 27
# Rows per faiss call when a graph is rebuilt from its live vectors: bounds the float32 copy.
_REBUILD_CHUNK_ROWS = 1 << 17
# Upper bounds of the options, far above any useful value (faiss's own guides use M <= 64,
# nlist <= 2^20): a typo such as M=100000000 fails when the index is created, before a build
# spends its time embedding, instead of as a MemoryError when the rows are added.
MAX_HNSW_M = 256
MAX_CANDIDATES = 1 << 16
MAX_LISTS = 1 << 22
MAX_TRAIN_ROWS = 1 << 26
MAX_THREADS = 1024
MAX_MEMORY_BUDGET_BYTES = 1 << 40


def _faiss():
    # faiss's loader tries its AVX512/AVX2 builds first and logs each missing one at INFO
    # ("No module named 'faiss.swigfaiss_avx512'") before falling back to one that works: noise
    # on every command. Its warnings and errors, and a failing import, stay visible.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "The 'hnsw' and 'ivf_pq' backends need faiss: pip install faiss-cpu==1.15.1 "
            "(the 'flat' backend needs only numpy)."
        ) from error
    return faiss


def _merge_options(backend, given, defaults):
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ValueError(
            f"backend_options must be a dict or None; got {type(given).__name__}."
        )
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"Unknown backend_options {unknown} for backend {backend!r}; valid: "
            f"{sorted(defaults)}."
        )
    return {**defaults, **given}


def _check_int(options, name, minimum=1, allow_none=False, maximum=None, why=""):
    """Checks an int option; `maximum` bounds what the memory or time of one row or query can
    afford (so that e.g. M=100000000 fails here, not as a MemoryError after the embedding)."""
    value = options[name]
    if value is None and allow_none:
        return
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum
            or (maximum is not None and value > maximum)):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(
            f"backend_options[{name!r}] must be an int {bounds}"
            f"{' or None' if allow_none else ''}; got {value!r}{why}."
        )
    options[name] = int(value)


def _check_choice(options, name, choices):
    if options[name] not in choices:
        raise ValueError(
            f"backend_options[{name!r}] must be one of {choices}; got {options[name]!r}."
        )


def _check_fraction(options, name):
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"backend_options[{name!r}] must be a number in (0, 1]; got {value!r}.")
    options[name] = float(value)


def order_rows(positions, scores, k):
    """The best `k` entries of each row, by score (descending) then position (ascending).

    Args:
        positions: int64 [Q, M] candidate positions, -1 for missing entries.
        scores: float32 [Q, M] their scores, -inf for missing entries.
        k: number of entries to keep per row (k <= M).

    Returns:
        (positions, scores) int64 / float32 [Q, k]; missing entries last.
    """
    # -inf pads sort after every finite score; their position key is irrelevant.
    order = np.lexsort((positions, -scores), axis=1)[:, :k]
    return np.take_along_axis(positions, order, axis=1), np.take_along_axis(scores, order, axis=1)


def pad_columns(positions, scores, k):
    """Pads [Q, k'] results to [Q, k] with PAD_POSITION / -inf columns.

    Args:
        positions: int64 [Q, k'].
        scores: float32 [Q, k'].
        k: the requested number of columns, k >= k'.

    Returns:
        (positions, scores) of shape [Q, k].
    """
    missing = k - positions.shape[1]
    if missing <= 0:
        return positions, scores
    rows = positions.shape[0]
    return (
        np.concatenate([positions, np.full((rows, missing), PAD_POSITION, np.int64)], axis=1),
        np.concatenate([scores, np.full((rows, missing), -np.inf, np.float32)], axis=1),
    )


class FlatBackend:
    """Exact search with `dvml_tf.evaluation.exact_search`: the same neighbours, order and
    ties (exact ties to the smaller position, i.e. the earlier added row) as
    `knn.nearest_neighbors` on the same rows, whatever the memory budget or product format.

    Scores are the float64 re-scored exact scores rounded to float32: the inner product of the
    (normalised) vectors for "cosine", the negative squared distance for "euclidean".

    Args:
        dim: vector dimension.
        metric: "cosine" or "euclidean".
        options: dict with "memory_budget_bytes" (scratch memory of a search, as in knn.py),
            "num_threads" (threads for the certification; None: the usable cores) and
            "precision" (product format of the candidate pass: "auto", "float32" or
            "bfloat16"; the results are the same).
    """

    name = "flat"
    DEFAULTS: ClassVar[dict] = {
        "memory_budget_bytes": knn.DEFAULT_MEMORY_BUDGET_BYTES,
        "num_threads": None,
        "precision": "auto",
    }
    SEARCH_OPTIONS = ("memory_budget_bytes", "num_threads", "precision")
    FILES = ("flat_vectors.npy",)

    def __init__(self, dim, metric, options=None):
        self.dim = dim
        self.metric = metric
        self.options = _merge_options(self.name, options, self.DEFAULTS)
        _check_int(self.options, "memory_budget_bytes", maximum=MAX_MEMORY_BUDGET_BYTES)
        _check_int(self.options, "num_threads", allow_none=True, maximum=MAX_THREADS)
        _check_choice(self.options, "precision", score_bounds.PRECISIONS)
        self._vectors = np.empty((0, dim), dtype=np.float32)
        # The gallery's prepared rows (centring, norms, bound weights), kept until the next add
        # or remove: preparing 1M rows costs more than searching one query.
        self._prepared = None

    def __len__(self):
        return self._vectors.shape[0]

    def state(self):
        """Backend state for index.json (none: the vectors file says it all)."""
        return {}

    def add(self, vectors):
        """Appends rows; `vectors` (float32 [n, dim]) becomes the backend's when it is empty."""
        self._vectors = vectors if len(self) == 0 else np.concatenate([self._vectors, vectors])
        self._prepared = None

    def remove(self, positions):
        """Deletes the rows at `positions` (sorted, unique); the others keep their order."""
        self._vectors = np.delete(self._vectors, positions, axis=0)
        self._prepared = None

    def search(self, queries, k):
        """Exact top-k positions and scores (see the class docstring), padded to k columns."""
        k_eff = min(k, len(self))
        positions = np.empty((len(queries), k_eff), dtype=np.int64)
        scores = np.empty((len(queries), k_eff), dtype=np.float32)
        # The stored vectors are the canonical rows (normalised already for cosine).
        search = exact_search.Search(
            queries, self._vectors, k_eff, self.metric, self.options["memory_budget_bytes"],
            self.options["precision"], knn.resolve_threads(self.options["num_threads"]),
            prepared_gallery=self._prepared)
        self._prepared = search.gallery
        for start, ids, values in search:
            positions[start:start + len(ids)] = ids
            # exact_search scores are smaller-is-nearer: -||q - g||^2, or -q.g for cosine.
            scores[start:start + len(ids)] = -values
        return pad_columns(positions, scores, k)

    def save(self, folder):
        """Writes the backend's files into `folder`; returns their names."""
        np.save(f"{folder}/{self.FILES[0]}", self._vectors, allow_pickle=False)
        return list(self.FILES)

    def load(self, folder, count, state):
        """Reads what `save` wrote (the index checks the files exist and are intact)."""
        del state
        self._vectors = storage.load_array(folder, self.FILES[0], np.float32, (count, self.dim))
        self._prepared = None


def _load_keys(folder, name, count, upper):
    """Saved faiss ids of the rows: strictly increasing, in [0, upper)."""
    keys = storage.load_array(folder, name, np.int64, (count,))
    if count and (keys[0] < 0 or keys[-1] >= upper or (np.diff(keys) <= 0).any()):
        raise ValueError(
            f"{folder}/{name} is corrupt: faiss ids must increase strictly within [0, {upper})."
        )
    return keys


def _read_faiss(folder, name):
    faiss = _faiss()
    path = f"{folder}/{name}"
    try:
        return faiss.read_index(path)
    except RuntimeError as error:
        raise ValueError(f"{path} is not a readable faiss index: {error}") from None


def _to_positions(keys, labels):
    """Maps faiss ids (-1 for none) to positions through the sorted `keys`."""
    positions = np.searchsorted(keys, labels)
    positions[labels < 0] = PAD_POSITION
    return positions.astype(np.int64, copy=False)


class HNSWBackend:
    """faiss HNSW graph; removed rows are tombstones (see the module docstring).

    Defaults reach recall@10 >= 0.95 on `benchmarks/ann_scale.py` (1M x 512, SOP-like classes);
    the figures are in benchmarks/results/ann_scale.json.

    Args:
        dim: vector dimension.
        metric: "cosine" (faiss inner product on normalised vectors) or "euclidean" (L2).
        options: dict with
            "M": graph degree (level 0 keeps 2M links per node; memory 8M bytes per row);
            "ef_construction": candidate list size while building (build time vs graph quality);
            "ef_search": candidate list size while searching (latency vs recall; at least k);
            "storage": "float32" (IndexHNSWFlat) or "float16" (IndexHNSWSQ fp16: half the
            memory, scores rounded to float16 inputs);
            "max_tombstone_fraction": rebuild the graph once removed rows exceed this fraction.
    """

    name = "hnsw"
    DEFAULTS: ClassVar[dict] = {
        "M": 32,
        "ef_construction": 80,
        "ef_search": 128,
        "storage": "float16",
        "max_tombstone_fraction": 0.25,
    }
    SEARCH_OPTIONS = ("ef_search",)
    FILES = ("hnsw.faiss", "hnsw_keys.npy")

    def __init__(self, dim, metric, options=None):
        self.dim = dim
        self.metric = metric
        self.options = _merge_options(self.name, options, self.DEFAULTS)
        _check_int(self.options, "M", maximum=MAX_HNSW_M,
                   why=" (each row keeps 2M links: 8M bytes)")
        for name in ("ef_construction", "ef_search"):
            _check_int(self.options, name, maximum=MAX_CANDIDATES)
        _check_choice(self.options, "storage", ("float32", "float16"))
        _check_fraction(self.options, "max_tombstone_fraction")
        self._index = self._new_index()
        self._keys = np.empty(0, dtype=np.int64)  # faiss id of each row, increasing
        self._alive = np.empty(0, dtype=bool)  # per faiss id
        self._selector = None  # (bitmap, IDSelectorBitmap): the bitmap must outlive the selector

    def _faiss_metric(self):
        faiss = _faiss()
        return faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2

    def _new_index(self):
        faiss = _faiss()
        if self.options["storage"] == "float16":
            index = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_fp16, self.options["M"],
                                      self._faiss_metric())
        else:
            index = faiss.IndexHNSWFlat(self.dim, self.options["M"], self._faiss_metric())
        index.hnsw.efConstruction = self.options["ef_construction"]
        return index

    def __len__(self):
        return self._keys.shape[0]

    @property
    def tombstones(self):
        """Removed rows still in the graph."""
        return int(self._index.ntotal) - len(self)

    def state(self):
        """Backend state for index.json."""
        return {"graph_nodes": int(self._index.ntotal), "tombstones": self.tombstones}

    def add(self, vectors):
        """Appends rows to the graph."""
        if not self._index.is_trained:
            self._index.train(vectors)  # A no-op for fp16 (no parameters), but faiss wants it.
        start = int(self._index.ntotal)
        self._index.add(vectors)
        self._keys = np.concatenate([self._keys, np.arange(start, start + len(vectors))])
        self._alive = np.concatenate([self._alive, np.ones(len(vectors), dtype=bool)])
        self._selector = None

    def remove(self, positions):
        """Tombstones the rows at `positions`; rebuilds the graph when tombstones pile up."""
        self._alive[self._keys[positions]] = False
        self._keys = np.delete(self._keys, positions)
        self._selector = None
        if self.tombstones > self.options["max_tombstone_fraction"] * self._index.ntotal:
            self.rebuild()

    def rebuild(self):
        """Rebuilds the graph from the live rows only (faiss ids become 0..n-1)."""
        fresh = self._new_index()
        if len(self) and not fresh.is_trained:
            fresh.train(self._index.reconstruct_batch(self._keys[:1]))
        for start in range(0, len(self), _REBUILD_CHUNK_ROWS):
            fresh.add(self._index.reconstruct_batch(self._keys[start:start + _REBUILD_CHUNK_ROWS]))
        self._index = fresh
        self._keys = np.arange(len(self), dtype=np.int64)
        self._alive = np.ones(len(self), dtype=bool)
        self._selector = None

    def _search_once(self, queries, k, ef):
        faiss = _faiss()
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef
        if self.tombstones:
            if self._selector is None:
                # faiss tests bit (id & 7) of byte (id >> 3): little bit order.
                bitmap = np.packbits(self._alive, bitorder="little")
                self._selector = (bitmap, faiss.IDSelectorBitmap(len(self._alive),
                                                                 faiss.swig_ptr(bitmap)))
            params.sel = self._selector[1]
        distances, labels = self._index.search(queries, k, params=params)
        positions = _to_positions(self._keys, labels)
        scores = distances if self.metric == "cosine" else -distances
        scores[labels < 0] = -np.inf
        return order_rows(positions, scores, k)

    def search(self, queries, k):
        """Approximate top-k positions and scores, padded to k columns."""
        k_eff = min(k, len(self))
        ef = max(self.options["ef_search"], k_eff)
        positions, scores = self._search_once(queries, k_eff, ef)
        # With tombstones, a small candidate list can be all tombstones; widen it for the rows
        # that came back short (the graph still links every live row, so ef = nodes finds all).
        short = (positions < 0).any(axis=1)
        while short.any() and ef < self._index.ntotal:
            ef = min(2 * ef, int(self._index.ntotal))
            positions[short], scores[short] = self._search_once(queries[short], k_eff, ef)
            short = (positions < 0).any(axis=1)
        return pad_columns(positions, scores, k)

    def save(self, folder):
        """Writes the graph and the faiss ids of the rows; returns the file names."""
        _faiss().write_index(self._index, f"{folder}/{self.FILES[0]}")
        np.save(f"{folder}/{self.FILES[1]}", self._keys, allow_pickle=False)
        return list(self.FILES)

    def load(self, folder, count, state):
        """Reads what `save` wrote and checks it against the options and index.json."""
        faiss = _faiss()
        index = _read_faiss(folder, self.FILES[0])
        kind = faiss.IndexHNSWSQ if self.options["storage"] == "float16" else faiss.IndexHNSWFlat
        if not isinstance(index, kind) or index.d != self.dim:
            raise ValueError(
                f"{folder}/{self.FILES[0]} holds a {type(index).__name__} of dim {index.d}; "
                f"index.json describes a {kind.__name__} of dim {self.dim}."
            )
        if index.metric_type != self._faiss_metric():
            raise ValueError(f"{folder}/{self.FILES[0]} does not use the {self.metric} metric.")
        if index.ntotal != state.get("graph_nodes"):
            raise ValueError(
                f"{folder}/{self.FILES[0]} holds {index.ntotal} nodes; index.json says "
                f"{state.get('graph_nodes')}."
            )
        self._keys = _load_keys(folder, self.FILES[1], count, index.ntotal)
        index.hnsw.efConstruction = self.options["ef_construction"]
        self._index = index
        self._alive = np.zeros(index.ntotal, dtype=bool)
        self._alive[self._keys] = True
        self._selector = None


class IVFPQBackend:
    """faiss IndexIVFPQ with optional exact re-ranking (see the module docstring).

    The coarse quantizer and the product quantizer are trained on the first add (a random
    sample of at most `train_size` of its rows), so the first add should be representative of
    the gallery; later adds are encoded with those codebooks. Cosine indexes use L2 on the
    normalised vectors (same ranking; k-means and PQ residuals behave better under L2).

    Args:
        dim: vector dimension.
        metric: "cosine" or "euclidean".
        options: dict with
            "nlist": inverted lists (None: the power of two nearest to sqrt(rows of the first
            add), at most training rows / 39 so that k-means has 39 points per centroid);
            "m": PQ sub-quantizers, a divisor of dim (None: the largest divisor <= dim / 8,
            i.e. 8 dimensions per byte of code at nbits = 8);
            "nbits": bits per sub-quantizer code;
            "nprobe": lists visited per query (None: nlist / 8, at least min(16, nlist)).
            Data whose classes spread over many dimensions need a large share of the lists:
            on benchmarks/ann_scale.py's SOP-like data, recall@10 reaches 0.95 only at about
            nlist / 4 (see benchmarks/results/ann_scale.json);
            "train_size": rows sampled for training;
            "refine": "float16", "float32" or "none": the stored copy used to re-rank
            candidates exactly (scores then come from it), or no re-ranking (PQ scores);
            "k_factor": candidates per requested neighbour when re-ranking;
            "seed": seed of the training sample and of faiss's k-means.
    """

    name = "ivf_pq"
    DEFAULTS: ClassVar[dict] = {
        "nlist": None,
        "m": None,
        "nbits": 8,
        "nprobe": None,
        "train_size": 100_000,
        "refine": "float16",
        "k_factor": 8,
        "seed": 0,
    }
    SEARCH_OPTIONS = ("nprobe", "k_factor")
    FILES = ("ivf_pq.faiss", "ivf_pq_keys.npy", "ivf_pq_refine.npy")

    def __init__(self, dim, metric, options=None):
        self.dim = dim
        self.metric = metric
        self.options = _merge_options(self.name, options, self.DEFAULTS)
        for name in ("nlist", "nprobe"):
            _check_int(self.options, name, allow_none=True, maximum=MAX_LISTS)
        _check_int(self.options, "m", allow_none=True, maximum=dim)
        _check_int(self.options, "train_size", maximum=MAX_TRAIN_ROWS)
        _check_int(self.options, "k_factor", maximum=MAX_CANDIDATES)
        _check_int(self.options, "nbits")
        _check_int(self.options, "seed", minimum=0)
        _check_choice(self.options, "refine", ("float16", "float32", "none"))
        if self.options["nbits"] > 16:
            raise ValueError(
                f"backend_options['nbits'] must be <= 16; got {self.options['nbits']}."
            )
        m = self.options["m"]
        if m is None:
            m = max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
        elif dim % m:
            raise ValueError(f"backend_options['m']={m} must divide the dimension {dim}.")
        self.m = m
        self.nlist = None  # Set by training.
        self._index = None
        self._keys = np.empty(0, dtype=np.int64)  # faiss id of each row, increasing
        self._next_key = 0
        refine_dtype = {"float16": np.float16, "float32": np.float32}.get(self.options["refine"])
        self._refine_dtype = refine_dtype
        self._refine = None if refine_dtype is None else np.empty((0, dim), dtype=refine_dtype)

    def __len__(self):
        return self._keys.shape[0]

    @property
    def nprobe(self):
        """Lists visited per query (the option, or its default), at most nlist."""
        nprobe = self.options["nprobe"] or max(16, self.nlist // 8)
        return min(nprobe, self.nlist)

    def state(self):
        """Backend state for index.json."""
        return {"trained": self._index is not None, "nlist": self.nlist, "m": self.m,
                "next_key": self._next_key}

    def _train(self, vectors):
        faiss = _faiss()
        rng = np.random.default_rng(self.options["seed"])
        sample = vectors
        if len(vectors) > self.options["train_size"]:
            rows = np.sort(rng.choice(len(vectors), self.options["train_size"], replace=False))
            sample = vectors[rows]
        codes = 1 << self.options["nbits"]
        if len(sample) < codes:
            raise ValueError(
                f"The ivf_pq backend trains its product quantizer on the first add, which needs "
                f"at least 2**nbits = {codes} rows; got {len(sample)}. Add more rows at once, "
                "lower backend_options['nbits'] or use backend='flat'."
            )
        nlist = self.options["nlist"]
        if nlist is None:
            nlist = min(2 ** round(math.log2(math.sqrt(len(vectors)))), max(1, len(sample) // 39))
        elif nlist > len(sample):
            raise ValueError(
                f"backend_options['nlist']={nlist} exceeds the {len(sample)} training rows."
            )
        index = faiss.index_factory(self.dim, f"IVF{nlist},PQ{self.m}x{self.options['nbits']}",
                                    faiss.METRIC_L2)
        faiss.extract_index_ivf(index).cp.seed = self.options["seed"]
        index.pq.cp.seed = self.options["seed"]
        # index_factory turns on polysemous training, a code reordering for Hamming filtering
        # that search never uses here; it takes 30x the PQ training itself.
        index.do_polysemous_training = False
        index.train(sample)
        self._index = index
        self.nlist = nlist

    def add(self, vectors):
        """Appends rows (training the quantizers on the first add)."""
        if self._index is None:
            self._train(vectors)
        keys = np.arange(self._next_key, self._next_key + len(vectors), dtype=np.int64)
        self._index.add_with_ids(vectors, keys)
        self._next_key += len(vectors)
        self._keys = np.concatenate([self._keys, keys])
        if self._refine is not None:
            self._refine = np.concatenate([self._refine, vectors.astype(self._refine_dtype)])

    def remove(self, positions):
        """Deletes the rows at `positions` from the inverted lists and the re-ranking copy."""
        removed = self._index.remove_ids(np.ascontiguousarray(self._keys[positions]))
        if removed != len(positions):
            raise RuntimeError(f"faiss removed {removed} of {len(positions)} rows.")
        self._keys = np.delete(self._keys, positions)
        if self._refine is not None:
            self._refine = np.delete(self._refine, positions, axis=0)

    def _search_once(self, queries, k, nprobe):
        faiss = _faiss()
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        distances, labels = self._index.search(queries, k, params=params)
        return distances, labels

    def search(self, queries, k):
        """Approximate top-k positions and scores, padded to k columns."""
        k_eff = min(k, len(self))
        width = k_eff
        if self._refine is not None:
            width = min(len(self), k_eff * self.options["k_factor"])
        nprobe = self.nprobe
        distances, labels = self._search_once(queries, width, nprobe)
        # Visited lists may hold fewer than `width` rows (small galleries, or a removal that
        # emptied them); visit more lists for those rows, up to all of them.
        short = (labels < 0).any(axis=1)
        while short.any() and nprobe < self.nlist:
            nprobe = min(2 * nprobe, self.nlist)
            distances[short], labels[short] = self._search_once(queries[short], width, nprobe)
            short = (labels < 0).any(axis=1)
        positions = _to_positions(self._keys, labels)
        if self._refine is None:
            # L2 on unit vectors: ||q - g||^2 = 2 - 2 cos.
            scores = 1.0 - distances / 2.0 if self.metric == "cosine" else -distances
            scores = scores.astype(np.float32, copy=False)
        else:
            scores = self._exact_scores(queries, positions)
        scores[positions < 0] = -np.inf
        return pad_columns(*order_rows(positions, scores, k_eff), k)

    def _exact_scores(self, queries, positions):
        """Scores of the candidate positions from the stored copy, in float32."""
        num_queries, width = positions.shape
        scores = np.empty((num_queries, width), dtype=np.float32)
        block = max(1, _REFINE_BLOCK_BYTES // (4 * width * self.dim))
        for start in range(0, num_queries, block):
            stop = min(start + block, num_queries)
            candidates = self._refine[np.maximum(positions[start:stop], 0)].astype(np.float32)
            if self.metric == "cosine":
                scores[start:stop] = np.einsum("qkd,qd->qk", candidates, queries[start:stop])
            else:
                candidates -= queries[start:stop, None, :]
                scores[start:stop] = -np.einsum("qkd,qkd->qk", candidates, candidates)
        return scores

    def save(self, folder):
        """Writes the trained index, the faiss ids and the re-ranking copy; returns the names."""
        if self._index is None:
            return []
        _faiss().write_index(self._index, f"{folder}/{self.FILES[0]}")
        np.save(f"{folder}/{self.FILES[1]}", self._keys, allow_pickle=False)
        names = list(self.FILES[:2])
        if self._refine is not None:
            np.save(f"{folder}/{self.FILES[2]}", self._refine, allow_pickle=False)
            names.append(self.FILES[2])
        return names

    def load(self, folder, count, state):
        """Reads what `save` wrote and checks it against the options and index.json."""
        faiss = _faiss()
        if not state.get("trained"):
            if count:
                raise ValueError(
                    f"{folder}/index.json is corrupt: an untrained ivf_pq index with {count} rows."
                )
            return
        index = _read_faiss(folder, self.FILES[0])
        expected = (self.dim, state.get("nlist"), state.get("m"), self.options["nbits"])
        if not isinstance(index, faiss.IndexIVFPQ) or (
            index.d, index.nlist, index.pq.M, index.pq.nbits) != expected:
            raise ValueError(
                f"{folder}/{self.FILES[0]} is not the IndexIVFPQ (dim, nlist, m, nbits) = "
                f"{expected} that index.json describes."
            )
        if index.ntotal != count:
            raise ValueError(
                f"{folder}/{self.FILES[0]} holds {index.ntotal} rows; index.json says {count}."
            )
        next_key = state.get("next_key")
        if isinstance(next_key, bool) or not isinstance(next_key, int) or next_key < count:
            raise ValueError(f"{folder}/index.json has an invalid next_key {next_key!r}.")
        self._keys = _load_keys(folder, self.FILES[1], count, next_key)
        if self._refine is not None:
            self._refine = storage.load_array(folder, self.FILES[2], self._refine_dtype,
                                       (count, self.dim))
        self._index = index
        self.nlist = int(index.nlist)
        self._next_key = next_key


_CLASSES = {"flat": FlatBackend, "hnsw": HNSWBackend, "ivf_pq": IVFPQBackend}


def update_search_options(backend, options):
    """Changes search-time options of a built backend (no rebuild), e.g. HNSW's ef_search.

    Args:
        backend: a backend object.
        options: dict of options among the backend's SEARCH_OPTIONS.

    Raises:
        ValueError: on options that are not search-time options of the backend, or invalid
            values (the backend is then unchanged).
    """
    if not isinstance(options, dict):
        raise ValueError(f"options must be a dict; got {type(options).__name__}.")
    fixed = sorted(set(options) - set(backend.SEARCH_OPTIONS))
    if fixed:
        raise ValueError(
            f"{fixed} cannot change after the {backend.name!r} index is built; search-time "
            f"options: {list(backend.SEARCH_OPTIONS)}."
        )
    # A throw-away empty backend validates the merged options with the constructor's checks.
    checked = type(backend)(backend.dim, backend.metric, {**backend.options, **options})
    backend.options.update({name: checked.options[name] for name in options})


def make_backend(name, dim, metric, options=None):
    """A new, empty backend.

    Args:
        name: one of `BACKENDS`.
        dim: vector dimension.
        metric: "cosine" or "euclidean".
        options: backend options (see each backend class), or None for the defaults.

    Returns:
        the backend object.

    Raises:
        ValueError: on an unknown backend name or invalid options.
    """
    if name not in _CLASSES:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}.")
    return _CLASSES[name](dim, metric, options)
