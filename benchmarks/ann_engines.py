"""Graph-index engines for the gallery index, side by side (benchmarks/ann_real.py uses them).

Each adapter wraps one library behind the same small interface, on L2-normalised float32
vectors with the inner product as the score (= cosine similarity), keys 0..n-1 in row order:

    engine = ENGINES[name](dim, options)      # options: graph and storage settings
    engine.build(vectors, threads)            # all rows at once, on `threads` cores
    engine.save(folder) / ENGINES[name].load(folder, dim, options)
    engine.set_search(setting)                # e.g. {"ef_search": 128}
    engine.search(queries, k, threads)        # int64 [Q, k] keys, -1 where fewer were found
    engine.remove(keys)                       # deletes rows; later searches must skip them

The adapters live with the benchmark, not in dvml_tf/, until one engine is chosen for the
product. Every HNSW adapter takes the same graph settings: "M" (level 0 keeps 2M links per
node in all four libraries), "ef_construction" and, at search time, "ef_search".

| adapter | library | vectors stored as | delete |
| --- | --- | --- | --- |
| faiss_hnsw_f16, _f32 | faiss IndexHNSWSQ fp16, IndexHNSWFlat | float16, float32 | (1) |
| usearch_f32, _f16, _i8 | usearch Index(metric="cos") | float32, float16, int8 | `remove` |
| voyager_f32, _e4m3 | voyager Index(Space.InnerProduct) | float32, 8-bit float | tombstone |
| hnswlib_f32 | hnswlib Index(space="ip") | float32 | tombstone |
| faiss_ivf_pq | faiss IVF-PQ + float16 re-ranking (2) | PQ codes + float16 | (3) |

(1) faiss HNSW cannot delete: the product (dvml_tf/index/backends.py) keeps tombstones and skips
them with an IDSelector, and so does the adapter. (2) As the product's ivf_pq. (3) faiss's
IndexRefine has no remove_ids; the product removes from its own arrays.
"""

import os
from typing import ClassVar

import numpy as np

HNSW_DEFAULTS = {"M": 32, "ef_construction": 80, "ef_search": 128}
# ef_search values of the recall/latency curve (search time only: one build per engine).
EF_SWEEP = (16, 32, 64, 96, 128, 192, 256, 384)


def _import(module, pip_name):
    try:
        return __import__(module)
    except ImportError as error:
        raise ImportError(
            f"This engine needs {pip_name}: pip install {pip_name} (benchmark only; not a "
            "dvml_tf requirement)."
        ) from error


def _merge(defaults, options, name):
    unknown = sorted(set(options or {}) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown options {unknown} for engine {name!r}; valid: "
                         f"{sorted(defaults)}.")
    return {**defaults, **(options or {})}


class _HNSWEngine:
    """Shared option handling of the HNSW adapters (see the module docstring).

    Args:
        dim: vector dimension.
        options: dict among DEFAULTS (graph settings, ef_search).
    """

    name = ""
    DEFAULTS: ClassVar[dict] = HNSW_DEFAULTS
    SWEEP: ClassVar[list] = [{"ef_search": ef} for ef in EF_SWEEP]
    DELETE = ""

    def __init__(self, dim, options=None):
        self.dim = dim
        self.options = _merge(self.DEFAULTS, options, self.name)
        self.ef_search = self.options["ef_search"]

    def set_search(self, setting):
        """Applies {"ef_search": int}."""
        if set(setting) != {"ef_search"}:
            raise ValueError(f"{self.name} takes {{'ef_search': int}}; got {setting}.")
        self.ef_search = int(setting["ef_search"])
        self._apply_ef()

    def setting(self):
        """The search-time setting in force."""
        return {"ef_search": self.ef_search}

    def _apply_ef(self):
        """Hands ef_search to the library when it is a property of the index."""


class FaissHNSW(_HNSWEngine):
    """faiss IndexHNSWSQ (float16) or IndexHNSWFlat (float32): today's product backend.

    Args:
        dim: vector dimension.
        options: see _HNSWEngine.
        storage: "float16" or "float32".
    """

    FILE = "index.faiss"
    DELETE = "tombstones skipped through an IDSelectorBitmap (faiss HNSW cannot delete)"

    def __init__(self, dim, options=None, storage="float16"):
        super().__init__(dim, options)
        self.storage = storage
        self._index = None
        self._alive = None  # bool per key once something was removed
        self._selector = None

    @staticmethod
    def library():
        return _import("faiss", "faiss-cpu")

    def build(self, vectors, threads):
        faiss = self.library()
        faiss.omp_set_num_threads(threads)
        metric, m = faiss.METRIC_INNER_PRODUCT, self.options["M"]
        if self.storage == "float16":
            index = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_fp16, m, metric)
        else:
            index = faiss.IndexHNSWFlat(self.dim, m, metric)
        index.hnsw.efConstruction = self.options["ef_construction"]
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self._index = index

    def save(self, folder):
        self.library().write_index(self._index, os.path.join(folder, self.FILE))

    @classmethod
    def load(cls, folder, dim, options=None, **kwargs):
        engine = cls(dim, options, **kwargs)
        engine._index = cls.library().read_index(os.path.join(folder, cls.FILE))
        return engine

    def search(self, queries, k, threads):
        faiss = self.library()
        faiss.omp_set_num_threads(threads)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, k)
        if self._selector is not None:
            params.sel = self._selector[1]
        return self._index.search(queries, k, params=params)[1]

    def remove(self, keys):
        faiss = self.library()
        if self._alive is None:
            self._alive = np.ones(self._index.ntotal, dtype=bool)
        self._alive[keys] = False
        bitmap = np.packbits(self._alive, bitorder="little")
        # The bitmap must outlive the selector that points into it.
        self._selector = (bitmap, faiss.IDSelectorBitmap(len(self._alive),
                                                          faiss.swig_ptr(bitmap)))


class FaissHNSW32(FaissHNSW):
    """FaissHNSW with float32 vectors (IndexHNSWFlat)."""

    def __init__(self, dim, options=None, storage="float32"):
        super().__init__(dim, options, storage)


class USearchHNSW(_HNSWEngine):
    """usearch Index with metric "cos" (int8 quantisation assumes unit vectors).

    Args:
        dim: vector dimension.
        options: see _HNSWEngine.
        dtype: "f32", "f16" or "i8" storage of the vectors.
    """

    FILE = "index.usearch"
    DELETE = "Index.remove (keys unlinked lazily; compact=True would relink the graph)"
    DTYPE = "f32"

    def __init__(self, dim, options=None):
        super().__init__(dim, options)
        self._index = None

    @staticmethod
    def library():
        return _import("usearch.index", "usearch==2.26.6").index

    def _new(self):
        return self.library().Index(
            ndim=self.dim, metric="cos", dtype=self.DTYPE, connectivity=self.options["M"],
            expansion_add=self.options["ef_construction"], expansion_search=self.ef_search)

    def build(self, vectors, threads):
        self._index = self._new()
        self._index.add(np.arange(len(vectors), dtype=np.uint64),
                        np.ascontiguousarray(vectors, dtype=np.float32), threads=threads)

    def save(self, folder):
        self._index.save(os.path.join(folder, self.FILE))

    @classmethod
    def load(cls, folder, dim, options=None):
        engine = cls(dim, options)
        engine._index = cls.library().Index.restore(os.path.join(folder, cls.FILE))
        engine._apply_ef()
        return engine

    def _apply_ef(self):
        if self._index is not None:
            self._index.expansion_search = self.ef_search

    def search(self, queries, k, threads):
        matches = self._index.search(queries, k, threads=threads)
        if len(queries) == 1:  # usearch answers one query with a Matches of the found keys
            keys = np.full((1, k), -1, dtype=np.int64)
            keys[0, :len(matches.keys)] = matches.keys
            return keys
        keys = matches.keys.astype(np.int64)
        keys[np.arange(k)[None, :] >= matches.counts[:, None]] = -1
        return keys

    def remove(self, keys):
        self._index.remove(np.asarray(keys, dtype=np.uint64))


class USearchF16(USearchHNSW):
    """usearch with float16 vectors."""

    DTYPE = "f16"


class USearchI8(USearchHNSW):
    """usearch with int8 vectors (scaled by 127: unit vectors only)."""

    DTYPE = "i8"


class VoyagerHNSW(_HNSWEngine):
    """voyager Index in inner-product space (distance 1 - dot).

    Args:
        dim: vector dimension.
        options: see _HNSWEngine.
    """

    FILE = "index.voy"
    DELETE = "Index.mark_deleted per key (tombstone; Spotify's docs advise a rebuild)"
    STORAGE = "Float32"

    def __init__(self, dim, options=None):
        super().__init__(dim, options)
        self._index = None

    @staticmethod
    def library():
        return _import("voyager", "voyager==2.2.3")

    def build(self, vectors, threads):
        voyager = self.library()
        self._index = voyager.Index(
            voyager.Space.InnerProduct, self.dim, M=self.options["M"],
            ef_construction=self.options["ef_construction"], max_elements=len(vectors),
            storage_data_type=getattr(voyager.StorageDataType, self.STORAGE))
        self._index.add_items(np.ascontiguousarray(vectors, dtype=np.float32),
                              ids=np.arange(len(vectors)), num_threads=threads)

    def save(self, folder):
        self._index.save(os.path.join(folder, self.FILE))

    @classmethod
    def load(cls, folder, dim, options=None):
        engine = cls(dim, options)
        engine._index = cls.library().Index.load(os.path.join(folder, cls.FILE))
        return engine

    def search(self, queries, k, threads):
        keys, _ = self._index.query(queries, k=k, num_threads=threads,
                                    query_ef=max(self.ef_search, k))
        return keys.astype(np.int64).reshape(len(queries), k)

    def remove(self, keys):
        for key in np.asarray(keys).tolist():  # voyager deletes one id per call
            self._index.mark_deleted(key)


class VoyagerE4M3(VoyagerHNSW):
    """voyager with 8-bit floating-point (E4M3) vectors."""

    STORAGE = "E4M3"


class HnswlibHNSW(_HNSWEngine):
    """hnswlib Index in inner-product space (distance 1 - dot).

    Args:
        dim: vector dimension.
        options: see _HNSWEngine.
    """

    FILE = "index.hnswlib"
    DELETE = "Index.mark_deleted per key (tombstone; allow_replace_deleted reuses slots)"

    def __init__(self, dim, options=None):
        super().__init__(dim, options)
        self._index = None

    @staticmethod
    def library():
        return _import("hnswlib", "hnswlib==0.8.0")

    def build(self, vectors, threads):
        index = self.library().Index(space="ip", dim=self.dim)
        index.init_index(max_elements=len(vectors), M=self.options["M"],
                         ef_construction=self.options["ef_construction"], random_seed=0)
        index.add_items(np.ascontiguousarray(vectors, dtype=np.float32),
                        np.arange(len(vectors)), num_threads=threads)
        self._index = index
        self._apply_ef()

    def save(self, folder):
        self._index.save_index(os.path.join(folder, self.FILE))

    @classmethod
    def load(cls, folder, dim, options=None):
        engine = cls(dim, options)
        engine._index = cls.library().Index(space="ip", dim=dim)
        engine._index.load_index(os.path.join(folder, cls.FILE))
        engine._apply_ef()
        return engine

    def _apply_ef(self):
        if self._index is not None:
            self._index.set_ef(self.ef_search)

    def search(self, queries, k, threads):
        keys, _ = self._index.knn_query(queries, k=k, num_threads=threads)
        return keys.astype(np.int64)

    def remove(self, keys):
        for key in np.asarray(keys).tolist():  # hnswlib deletes one label per call
            self._index.mark_deleted(key)


class FaissIVFPQ:
    """faiss IVF + PQ with exact re-ranking from float16 vectors, as the product's ivf_pq.

    index_factory "IVF{nlist},PQ{m}x8,Refine(SQfp16)" in inner-product space; nlist and m
    follow the product's defaults (the power of two nearest to sqrt(rows); the largest divisor
    of dim <= dim / 8).

    Args:
        dim: vector dimension.
        options: dict with "nlist" and "m" (None: the defaults above), "nprobe" (None: nlist / 8,
            at least 16) and "k_factor" (re-ranked candidates per neighbour).
    """

    name = ""
    FILE = "index.faiss"
    DEFAULTS: ClassVar[dict] = {"nlist": None, "m": None, "nprobe": None, "k_factor": 8}
    SWEEP: ClassVar[list] = [{"nprobe": nprobe, "k_factor": k_factor}
                             for nprobe in (8, 16, 32, 64, 128) for k_factor in (2, 8)]
    DELETE = "IndexRefine has no remove_ids: a rebuild (the product removes from its own lists)"

    def __init__(self, dim, options=None):
        self.dim = dim
        self.options = _merge(self.DEFAULTS, options, "faiss_ivf_pq")
        self._index = None
        self.nprobe, self.k_factor = self.options["nprobe"], self.options["k_factor"]

    library = staticmethod(FaissHNSW.library)

    def build(self, vectors, threads):
        faiss = self.library()
        faiss.omp_set_num_threads(threads)
        nlist = self.options["nlist"] or 2 ** round(np.log2(np.sqrt(len(vectors))))
        m = self.options["m"] or max(d for d in range(1, self.dim // 8 + 1) if self.dim % d == 0)
        index = faiss.index_factory(self.dim, f"IVF{nlist},PQ{m}x8,Refine(SQfp16)",
                                    faiss.METRIC_INNER_PRODUCT)
        # index_factory turns on polysemous training, which search never uses here and which
        # takes 30x the PQ training itself (the product's ivf_pq turns it off too).
        faiss.downcast_index(index.base_index).do_polysemous_training = False
        index.train(np.ascontiguousarray(vectors, dtype=np.float32))
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self._index = index

    def save(self, folder):
        self.library().write_index(self._index, os.path.join(folder, self.FILE))

    @classmethod
    def load(cls, folder, dim, options=None):
        engine = cls(dim, options)
        engine._index = cls.library().read_index(os.path.join(folder, cls.FILE))
        return engine

    @property
    def nlist(self):
        return self.library().extract_index_ivf(self._index).nlist

    def set_search(self, setting):
        """Applies {"nprobe": int, "k_factor": int}."""
        if set(setting) != {"nprobe", "k_factor"}:
            raise ValueError(f"faiss_ivf_pq takes nprobe and k_factor; got {setting}.")
        nprobe = setting["nprobe"]  # None: the default share of the lists
        self.nprobe = None if nprobe is None else int(nprobe)
        self.k_factor = int(setting["k_factor"])

    def setting(self):
        """The search-time setting in force (the default nprobe resolved)."""
        nprobe = self.nprobe or max(min(16, self.nlist), self.nlist // 8)
        return {"nprobe": nprobe, "k_factor": self.k_factor}

    def search(self, queries, k, threads):
        faiss = self.library()
        faiss.omp_set_num_threads(threads)
        params = faiss.IndexRefineSearchParameters(
            k_factor=self.k_factor,
            base_index_params=faiss.SearchParametersIVF(nprobe=self.setting()["nprobe"]))
        return self._index.search(queries, k, params=params)[1]

    def remove(self, keys):
        self._index.remove_ids(np.asarray(keys, dtype=np.int64))


ENGINES = {
    "faiss_hnsw_f16": FaissHNSW,
    "faiss_hnsw_f32": FaissHNSW32,
    "usearch_f32": USearchHNSW,
    "usearch_f16": USearchF16,
    "usearch_i8": USearchI8,
    "voyager_f32": VoyagerHNSW,
    "voyager_e4m3": VoyagerE4M3,
    "hnswlib_f32": HnswlibHNSW,
    "faiss_ivf_pq": FaissIVFPQ,
}
for _name, _cls in ENGINES.items():
    _cls.name = _name  # Each class serves under one name: the table is where it is spelled.
# The Python package each engine imports, for the versions a results file records.
PACKAGES = {"faiss": "faiss-cpu", "usearch": "usearch", "numkong": "numkong",
            "voyager": "voyager", "hnswlib": "hnswlib"}
