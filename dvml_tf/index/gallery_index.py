"""`GalleryIndex`: a searchable, persistent gallery of embeddings with ids, labels and metadata.

    index = GalleryIndex(dim=512, metric="cosine", backend="hnsw",
                         contract=contract_from_report(report, saved_model=path))
    index.add(ids, embeddings, labels=labels, metadata={"path": paths})
    index.check_contract(query_model_contract)      # ValueError if the queries' model differs
    ids, scores = index.search(query_embeddings, k=10)
    index.save("gallery/")                           # atomic; GalleryIndex.load("gallery/")

Rows keep their insertion order: that order breaks ties between equal scores (the earlier added
row first) and is what the exact `flat` backend shares with `dvml_tf.evaluation.knn`. The
search backends are described in `dvml_tf.index.backends`.

A saved index is a folder:

    index.json      format version, backend, its options and state, dim, metric, normalize,
                    count, id kind, contract, info, and the SHA-256 and size of every other file
    ids.npy         int64 or unicode ids, in row order
    labels.npy      int64 labels (only when the index has labels)
    metadata.json   one JSON object (or null) per row
    <backend files> e.g. flat_vectors.npy, hnsw.faiss + hnsw_keys.npy, ivf_pq.faiss + ...

`save` assembles the folder in a temporary sibling and swaps it in only when it is complete,
under an exclusive lock on ``<parent>/.<name>.lock`` (a concurrent save waits for the first to
finish, then replaces its result whole; the lock file is removed by its last holder); other files
a user keeps in the folder survive the swap. `load` reads under a shared lock and verifies every
file against index.json.

Not thread-safe: use one index per thread, or a lock around mutations.
"""

import copy
import json
import os

import numpy as np

from dvml_tf.evaluation import knn
from dvml_tf.index import backends
from dvml_tf.index import contract as contract_lib
from dvml_tf.index import storage
from dvml_tf.utils import atomic

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
METADATA_FILE = "metadata.json"
# Search results are padded with these ids (and score -inf) when the index holds fewer than k
# rows; they are therefore not valid ids.
PAD_INT_ID = -1
PAD_STR_ID = ""
# Seconds a save or load waits for another process's save of the same folder.
DEFAULT_LOCK_TIMEOUT = 600.0
_MAX_LISTED = 10  # ids quoted in an error message


def _quote(values):
    values = list(values)
    shown = ", ".join(repr(v.item() if isinstance(v, np.generic) else v)
                      for v in values[:_MAX_LISTED])
    more = f", ... ({len(values)} in all)" if len(values) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _as_id_array(ids, name):
    """(ids as an int64 or unicode array, "int" or "str"); ValueError for anything else."""
    # Python sequences go through dtype=object: np.asarray([1, "a"]) would silently turn the
    # int into the str "1".
    array = np.asarray(ids) if isinstance(ids, np.ndarray) else np.asarray(ids, dtype=object)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of int or str ids; got shape "
                         f"{array.shape}.")
    if array.dtype.kind == "O":
        values = array.tolist()
        if all(isinstance(v, str) for v in values):
            array = np.asarray(values, dtype=str)
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            array = np.asarray(values, dtype=np.int64)
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} must fit in int64; got {array.max()}.")
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False), "int"
    if array.dtype.kind == "U":
        return array, "str"
    if array.size == 0:
        return array.astype(np.int64), "int"
    raise ValueError(
        f"{name} must all be ints or all be strs; got dtype {array.dtype} "
        f"(e.g. {_quote(array[:3])})."
    )


def _json_default(value):
    """json.dumps hook: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _check_metadata(metadata, count):
    """Per-row metadata (list of dict or None) from rows or a column dict, JSON round-tripped."""
    if metadata is None:
        return [None] * count
    if isinstance(metadata, dict):
        columns = {}
        for name, values in metadata.items():
            if not isinstance(name, str):
                raise ValueError(f"metadata column names must be strs; got {name!r}.")
            values = values.tolist() if isinstance(values, np.ndarray) else list(values)
            if len(values) != count:
                raise ValueError(
                    f"metadata column {name!r} has {len(values)} values for {count} rows."
                )
            columns[name] = values
        rows = [{name: values[i] for name, values in columns.items()} for i in range(count)]
    elif isinstance(metadata, (list, tuple)):
        if len(metadata) != count:
            raise ValueError(f"metadata has {len(metadata)} rows for {count} embeddings.")
        for i, row in enumerate(metadata):
            if row is not None and not isinstance(row, dict):
                raise ValueError(f"metadata[{i}] must be a dict or None; got "
                                 f"{type(row).__name__}.")
        rows = list(metadata)
    else:
        raise ValueError(
            "metadata must be None, a list of per-row dicts, or a dict of columns (name -> one "
            f"value per row); got {type(metadata).__name__}."
        )
    # The round trip makes what get_metadata returns now what it returns after save/load
    # (tuples become lists, numpy scalars Python numbers), and rejects non-JSON values here
    # rather than at save time.
    try:
        text = json.dumps(rows, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must hold JSON data (str, number, bool, None, list, dict): "
                         f"{error}") from None
    return json.loads(text)


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an int >= 1; got {k!r}.")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}.")
    return int(k)


class GalleryIndex:
    """Embeddings with ids, optional labels and metadata, searchable by one of three backends.

    Args:
        dim: embedding dimension (int >= 1).
        metric: "cosine" (scores are cosine similarities) or "euclidean" (scores are negative
            squared Euclidean distances). Higher scores are better either way.
        backend: "flat" (exact, identical to `dvml_tf.evaluation.knn`), "hnsw" or "ivf_pq"
            (faiss approximate search); see `dvml_tf.index.backends`.
        normalize: L2-normalise added embeddings and queries. Default: True for cosine, False
            for Euclidean. Cosine always normalises (False is a ValueError); True with
            Euclidean ranks unit vectors by Euclidean distance.
        contract: JSON dict describing the model whose embeddings the index holds, e.g.
            `contract_from_report(report, saved_model=path)`; stored with the index and used by
            `check_contract`. Its "dim" and "metric", when given, must match the index's.
        backend_options: dict of options of the backend (see its class), or None for the
            defaults.
    """

    def __init__(self, dim, metric="cosine", backend="flat", normalize=None, contract=None,
                 backend_options=None):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be an int >= 1; got {dim!r}.")
        if metric not in knn.METRICS:
            raise ValueError(f"metric must be one of {knn.METRICS}; got {metric!r}.")
        if normalize is None:
            normalize = metric == "cosine"
        if not isinstance(normalize, (bool, np.bool_)):
            raise ValueError(f"normalize must be a bool or None; got {normalize!r}.")
        if metric == "cosine" and not normalize:
            raise ValueError(
                "normalize=False is only valid with metric='euclidean': cosine similarity is the "
                "inner product of L2-normalised vectors, so metric='cosine' always normalises."
            )
        self._dim = int(dim)
        self._metric = metric
        self._normalize = bool(normalize)
        self._backend = backends.make_backend(backend, self._dim, metric, backend_options)
        self._contract = contract_lib.validate_contract(contract, self._dim, metric)
        self._ids = np.empty(0, dtype=np.int64)
        self._id_kind = None  # "int" or "str", fixed by the first add into an empty index
        self._labels = None  # int64 [n] when the index has labels
        self._metadata = []  # one dict or None per row
        self._lookup = None  # (sorted ids, their positions), rebuilt after a change
        self._info = None  # free-form JSON about the index (how it was built), or None

    # ------------------------------------------------------------------------------ properties

    @property
    def dim(self):
        """Embedding dimension."""
        return self._dim

    @property
    def metric(self):
        """"cosine" or "euclidean"."""
        return self._metric

    @property
    def normalize(self):
        """Whether embeddings and queries are L2-normalised."""
        return self._normalize

    @property
    def backend(self):
        """Backend name."""
        return self._backend.name

    @property
    def backend_options(self):
        """The backend's options, defaults filled in."""
        return dict(self._backend.options)

    @property
    def contract(self):
        """A copy of the stored contract (or None)."""
        return copy.deepcopy(self._contract)

    @property
    def info(self):
        """A copy of the index's free-form description (a JSON dict, e.g. how and from what
        data `dvml_tf.index.builder` built it), or None. Saved in index.json."""
        return copy.deepcopy(self._info)

    @info.setter
    def info(self, value):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"info must be a dict or None; got {type(value).__name__}.")
        self._info = None if value is None else json.loads(
            contract_lib._json_safe(value, "info"))

    @property
    def ids(self):
        """A copy of the ids, in row (insertion) order."""
        return self._ids.copy()

    @property
    def has_labels(self):
        """Whether the rows carry class labels."""
        return self._labels is not None

    def __len__(self):
        return len(self._ids)

    def __contains__(self, id_):
        try:
            array, kind = _as_id_array([id_], "id")
        except ValueError:
            return False
        return kind == self._id_kind and bool(self._find(array)[0] >= 0)

    def __repr__(self):
        return (f"GalleryIndex(dim={self._dim}, metric={self._metric!r}, "
                f"backend={self.backend!r}, rows={len(self)})")

    # ----------------------------------------------------------------------------- id lookup

    def _find(self, ids):
        """Positions of `ids` (an array of this index's id kind); -1 where absent."""
        if len(self) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        if self._lookup is None:
            sorter = np.argsort(self._ids, kind="stable")
            self._lookup = (self._ids[sorter], sorter)
        sorted_ids, sorter = self._lookup
        where = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        return np.where(sorted_ids[where] == ids, sorter[where], -1)

    def _positions(self, ids, name="ids"):
        """Positions of existing ids, in the given order; ValueError naming unknown ids."""
        array, kind = _as_id_array(ids, name)
        if array.size == 0:
            raise ValueError(f"{name} is empty.")
        positions = (self._find(array) if kind == self._id_kind
                     else np.full(len(array), -1, dtype=np.int64))
        unknown = array[positions < 0]
        if unknown.size:
            raise ValueError(f"Unknown {name} ({unknown.size} of {array.size}): "
                             f"{_quote(unknown)}.")
        return positions

    # ------------------------------------------------------------------------------ mutation

    def _prepare_vectors(self, embeddings, name, own=False):
        vectors = knn.check_embeddings(embeddings, name)
        if vectors.shape[1] != self._dim:
            raise ValueError(
                f"{name} have dimension {vectors.shape[1]}; this index has dim={self._dim}."
            )
        if self._normalize:
            return knn.l2_normalize(vectors)
        # The backend keeps what add gives it: never the caller's (mutable) array.
        if own and isinstance(embeddings, np.ndarray) and np.may_share_memory(vectors,
                                                                              embeddings):
            vectors = np.array(vectors, copy=True)
        return vectors

    def _check_new_ids(self, ids, count):
        array, kind = _as_id_array(ids, "ids")
        if len(array) != count:
            raise ValueError(f"ids has {len(array)} entries for {count} embeddings.")
        if kind == "int" and (array < 0).any():
            raise ValueError(f"ids must be >= 0 ({PAD_INT_ID} pads search results); got "
                             f"{_quote(array[array < 0])}.")
        if kind == "str" and (array == PAD_STR_ID).any():
            raise ValueError("ids must not be the empty string (it pads search results).")
        unique, counts = np.unique(array, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"ids contain duplicates: {_quote(unique[counts > 1])}.")
        if len(self):
            if kind != self._id_kind:
                raise ValueError(f"ids are {kind}s but this index holds {self._id_kind} ids.")
            existing = array[self._find(array) >= 0]
            if existing.size:
                raise ValueError(
                    f"ids already in the index ({existing.size}): {_quote(existing)}; remove "
                    "them first to replace their rows."
                )
        return array, kind

    def _check_labels(self, labels, count):
        if labels is None:
            if len(self) and self._labels is not None:
                raise ValueError("labels is required: the rows of this index have labels.")
            return None
        if len(self) and self._labels is None:
            raise ValueError("labels must be None: the rows of this index have no labels.")
        array = np.asarray(labels)
        if array.ndim != 1 or len(array) != count:
            raise ValueError(f"labels must be 1-D with one label per embedding ({count}); got "
                             f"shape {array.shape}.")
        if array.dtype.kind not in "iu":
            raise ValueError(f"labels must be ints; got dtype {array.dtype}.")
        return array.astype(np.int64)

    def add(self, ids, embeddings, labels=None, metadata=None):
        """Adds rows. Either every row is added or, on any error, none.

        Args:
            ids: 1-D sequence of unique ids, all ints >= 0 (stored as int64) or all non-empty
                strs, of the same kind as the ids already in the index, none of them present.
            embeddings: float array [n, dim], finite.
            labels: optional int class labels [n]. The first add into an empty index decides
                whether the rows have labels; later adds must follow it.
            metadata: optional per-row metadata: a list of n dicts (or None), or a dict of
                columns, e.g. {"class_name": [...], "path": [...]}, each with n values. Values
                must be JSON data (numpy scalars are converted).

        Raises:
            ValueError: on a wrong shape, dimension, NaN/Inf values, duplicate or existing ids,
                labels or metadata that do not fit, or (ivf_pq) too few rows to train.
        """
        vectors = self._prepare_vectors(embeddings, "embeddings", own=True)
        count = len(vectors)
        ids_array, kind = self._check_new_ids(ids, count)
        labels_array = self._check_labels(labels, count)
        rows = _check_metadata(metadata, count)
        self._backend.add(vectors)  # May raise (ivf_pq training) before anything changed.
        if len(self) == 0:
            self._ids, self._id_kind, self._labels = ids_array, kind, labels_array
        else:
            self._ids = np.concatenate([self._ids, ids_array])
            if labels_array is not None:
                self._labels = np.concatenate([self._labels, labels_array])
        self._metadata.extend(rows)
        self._lookup = None

    def remove(self, ids):
        """Removes rows by id; the remaining rows keep their order.

        Args:
            ids: 1-D sequence of ids present in the index, without repeats.

        Raises:
            ValueError: naming the ids that are not in the index, or repeated ids.
        """
        positions = self._positions(ids)
        unique, counts = np.unique(positions, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"ids to remove contain duplicates: "
                             f"{_quote(self._ids[unique[counts > 1]])}.")
        self._backend.remove(unique)
        keep = np.ones(len(self), dtype=bool)
        keep[unique] = False
        self._ids = self._ids[keep]
        if self._labels is not None:
            self._labels = self._labels[keep]
        self._metadata = [row for row, kept in zip(self._metadata, keep, strict=True) if kept]
        self._lookup = None

    # -------------------------------------------------------------------------------- queries

    def search(self, queries, k):
        """The k best rows for each query, best first.

        Args:
            queries: float array [Q, dim], finite (a single query is [1, dim]).
            k: int >= 1. When the index holds fewer than k rows, each result row is padded at
                the end with id PAD_INT_ID (-1; int ids) or PAD_STR_ID ("", str ids) and
                score -inf.

        Returns:
            (ids, scores): ids [Q, k] (int64, or unicode for str ids) and float32 scores
            [Q, k], descending; equal scores are ordered by insertion (earlier row first).
            Scores are cosine similarities (metric "cosine") or negative squared Euclidean
            distances (metric "euclidean").

        Raises:
            ValueError: on an empty index, k < 1, or queries of the wrong shape or dimension
                or with NaN/Inf values.
        """
        k = _check_k(k)
        if len(self) == 0:
            raise ValueError("Cannot search an empty index: add embeddings first.")
        queries = self._prepare_vectors(queries, "queries")
        positions, scores = self._backend.search(queries, k)
        pad = PAD_INT_ID if self._id_kind == "int" else PAD_STR_ID
        ids = np.full(positions.shape, pad, dtype=self._ids.dtype)
        found = positions >= 0
        ids[found] = self._ids[positions[found]]
        return ids, scores

    def get_metadata(self, ids):
        """Metadata of rows by id.

        Args:
            ids: 1-D sequence of ids present in the index.

        Returns:
            list of dicts (copies; {} for rows added without metadata), in the order of `ids`.

        Raises:
            ValueError: naming unknown ids.
        """
        return [copy.deepcopy(self._metadata[p]) or {} for p in self._positions(ids)]

    def get_labels(self, ids):
        """Class labels of rows by id.

        Args:
            ids: 1-D sequence of ids present in the index.

        Returns:
            int64 array, in the order of `ids`.

        Raises:
            ValueError: naming unknown ids, or if the index has no labels.
        """
        if self._labels is None:
            raise ValueError("This index has no labels (they were not given to add).")
        return self._labels[self._positions(ids)]

    def set_search_options(self, **options):
        """Changes search-time backend options without rebuilding.

        Args:
            **options: "ef_search" (hnsw); "nprobe", "k_factor" (ivf_pq);
                "memory_budget_bytes", "num_threads" (flat).

        Raises:
            ValueError: on an option that is fixed at build time, or an invalid value.
        """
        backends.update_search_options(self._backend, options)

    def check_contract(self, contract):
        """Raises unless `contract` describes the model the index was built with.

        Args:
            contract: the contract of the model producing the queries (e.g.
                `contract_from_report` of its export report). Its "fingerprint" must equal the
                stored one; its "dim", "metric" and "normalized", when given, must match too.

        Raises:
            ValueError: listing every mismatch (or saying the index has no contract).
        """
        problems = contract_lib.contract_mismatches(self._contract, contract, self._dim,
                                                    self._metric)
        if problems:
            built_with = ""
            if self._contract and self._contract.get("saved_model"):
                built_with = f" ({self._contract['saved_model']})"
            if contract_lib.predates_weights(self._contract, contract):
                raise ValueError(
                    f"This index{built_with} was built by an older dvml_tf, whose contract "
                    "fingerprint did not cover the model's weights: nothing proves that its "
                    "vectors come from this model. Rebuild it (index.py build --overwrite).")
            raise ValueError(
                "The queries come from another model than the one this index was built "
                f"with{built_with}: {'; '.join(problems)}. Embed the queries with the index's "
                "model, or rebuild the index with the new model's embeddings."
            )

    # --------------------------------------------------------------------------- persistence

    def save(self, directory, lock_timeout=DEFAULT_LOCK_TIMEOUT):
        """Writes the index to a folder, atomically (see the module docstring).

        Args:
            directory: the folder; an existing saved index there is replaced only once the new
                one is complete, and files in it that are not the index's (a README, an eval/
                folder) are kept.
            lock_timeout: seconds to wait for another process's save or load of the folder.

        Returns:
            The folder's absolute path.

        Raises:
            ValueError: if `directory` exists and is not a saved index (never overwritten).
            TimeoutError: if another process holds the folder's lock for too long.
        """
        directory = os.path.abspath(os.fspath(directory))
        with storage.exclusive_lock(directory, lock_timeout):
            if os.path.lexists(directory) and (
                not os.path.isdir(directory)
                or (os.listdir(directory)
                    and not os.path.isfile(os.path.join(directory, INDEX_FILE)))
            ):
                raise ValueError(
                    f"Refusing to replace {directory}: it exists and is not a saved GalleryIndex "
                    f"(no {INDEX_FILE}). Choose another directory."
                )
            with atomic.AtomicDirectory(directory, overwrite=True, owned=_files_of(directory),
                                        what="the index") as tmp:
                self._write(tmp)
                storage.fsync_folder(tmp)
        return directory

    def _write(self, folder):
        names = self._backend.save(folder)
        np.save(os.path.join(folder, IDS_FILE), self._ids, allow_pickle=False)
        names.append(IDS_FILE)
        if self._labels is not None:
            np.save(os.path.join(folder, LABELS_FILE), self._labels, allow_pickle=False)
            names.append(LABELS_FILE)
        with open(os.path.join(folder, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(self._metadata, f, allow_nan=False)
        names.append(METADATA_FILE)
        header = {
            "format_version": FORMAT_VERSION,
            "backend": self._backend.name,
            "backend_options": self._backend.options,
            "backend_state": self._backend.state(),
            "dim": self._dim,
            "metric": self._metric,
            "normalize": self._normalize,
            "count": len(self),
            "id_kind": self._id_kind,
            "has_labels": self._labels is not None,
            "contract": self._contract,
            "info": self._info,
            "files": {name: storage.file_digest(os.path.join(folder, name)) for name in names},
        }
        # index.json is written last: a folder without it is never a complete index.
        with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(header, f, indent=2)

    @classmethod
    def load(cls, directory, verify=True, lock_timeout=DEFAULT_LOCK_TIMEOUT):
        """Reads an index written by `save`.

        Args:
            directory: the folder.
            verify: check every file's SHA-256 against index.json (sizes are always checked);
                False skips a full read of large files.
            lock_timeout: seconds to wait for a save into the folder to finish.

        Returns:
            `GalleryIndex`.

        Raises:
            FileNotFoundError: if the folder, index.json or a file it lists is missing.
            ValueError: on another format version, an invalid index.json, or a corrupt file.
        """
        directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(directory):
            hint = ""
            if os.path.isdir(directory + ".old"):
                hint = (f"; a save interrupted during its final swap left the previous index "
                        f"at {directory}.old (rename it back)")
            raise FileNotFoundError(f"No saved GalleryIndex at {directory}{hint}.")
        with storage.shared_lock(directory, lock_timeout):
            return cls._read(directory, verify)

    @classmethod
    def _read(cls, directory, verify):
        header_path = os.path.join(directory, INDEX_FILE)
        if not os.path.isfile(header_path):
            raise FileNotFoundError(
                f"{header_path} is missing: {directory} is not a saved GalleryIndex."
            )
        try:
            with open(header_path, encoding="utf-8") as f:
                header = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{header_path} is corrupt: {error}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{header_path} is corrupt: not a JSON object.")
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{header_path} has format_version {version!r}; this version of dvml_tf reads "
                f"format_version {FORMAT_VERSION} only."
            )
        required = ("backend", "backend_options", "backend_state", "dim", "metric", "normalize",
                    "count", "id_kind", "has_labels", "contract", "files")
        missing = [key for key in required if key not in header]
        if missing:
            raise ValueError(f"{header_path} is corrupt: missing keys {missing}.")
        count = header["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{header_path} is corrupt: count {count!r}.")
        if header["id_kind"] not in ("int", "str", None) or (count and not header["id_kind"]):
            raise ValueError(f"{header_path} is corrupt: id_kind {header['id_kind']!r}.")
        _verify_files(directory, header["files"], verify, header["has_labels"])
        try:
            index = cls(header["dim"], header["metric"], header["backend"], header["normalize"],
                        header["contract"], header["backend_options"])
        except ValueError as error:
            raise ValueError(f"{header_path} is invalid: {error}") from None
        index._backend.load(directory, count, header["backend_state"])
        ids_path = os.path.join(directory, IDS_FILE)
        try:
            ids = np.load(ids_path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"{ids_path} is corrupt: {error}") from None
        kind_ok = ids.dtype.kind == "U" if header["id_kind"] == "str" else ids.dtype == np.int64
        if ids.shape != (count,) or not kind_ok or len(np.unique(ids)) != count:
            raise ValueError(f"{ids_path} is corrupt: expected {count} unique "
                             f"{header['id_kind']} ids; got {ids.dtype} {ids.shape}.")
        if header["has_labels"]:
            index._labels = storage.load_array(directory, LABELS_FILE, np.int64, (count,))
        metadata_path = os.path.join(directory, METADATA_FILE)
        try:
            with open(metadata_path, encoding="utf-8") as f:
                metadata = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{metadata_path} is corrupt: {error}") from None
        if not isinstance(metadata, list) or len(metadata) != count or not all(
            row is None or isinstance(row, dict) for row in metadata
        ):
            raise ValueError(f"{metadata_path} is corrupt: expected {count} objects or nulls.")
        index._ids = ids
        index._id_kind = header["id_kind"]
        index._metadata = metadata
        info = header.get("info")  # absent in indexes saved before `info` existed
        if info is not None and not isinstance(info, dict):
            raise ValueError(f"{header_path} is corrupt: info is not an object.")
        index._info = info
        return index


def _files_of(directory):
    """The entries of a saved index's folder that `save` wrote: index.json, the files it lists
    and the standard ones. Anything else there (a README, an eval/ folder) is the user's, and a
    new save into the folder keeps it."""
    names = {INDEX_FILE, IDS_FILE, LABELS_FILE, METADATA_FILE}
    try:
        with open(os.path.join(directory, INDEX_FILE), encoding="utf-8") as f:
            files = json.load(f).get("files")
        names.update(files if isinstance(files, dict) else ())
    except (OSError, ValueError, AttributeError):
        pass  # no or a corrupt index.json: its backend files are kept, never lost
    return names


def _verify_files(directory, files, verify, has_labels):
    """Checks that the files listed in index.json exist, with their recorded size and hash."""
    if not isinstance(files, dict):
        raise ValueError(f"{directory}/{INDEX_FILE} is corrupt: 'files' is not an object.")
    needed = {IDS_FILE, METADATA_FILE} | ({LABELS_FILE} if has_labels else set())
    unlisted = sorted(needed - set(files))
    if unlisted:
        raise ValueError(f"{directory}/{INDEX_FILE} is corrupt: it does not list {unlisted}.")
    for name, recorded in files.items():
        if os.path.basename(name) != name or name in (".", ".."):
            raise ValueError(f"{directory}/{INDEX_FILE} is corrupt: file name {name!r}.")
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing (listed in {INDEX_FILE}).")
        if not isinstance(recorded, dict):
            raise ValueError(f"{directory}/{INDEX_FILE} is corrupt: entry of {name!r}.")
        size = os.path.getsize(path)
        if size != recorded.get("bytes"):
            raise ValueError(f"{path} is corrupt: {size} bytes; {INDEX_FILE} records "
                             f"{recorded.get('bytes')}.")
        if verify and storage.file_digest(path)["sha256"] != recorded.get("sha256"):
            raise ValueError(f"{path} is corrupt: its SHA-256 differs from {INDEX_FILE}'s.")
