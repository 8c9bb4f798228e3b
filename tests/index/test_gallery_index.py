"""Tests of GalleryIndex: exactness against knn.py, add/remove/search, persistence, contracts,
ANN recall, bad inputs, and saves that race or fail half-way (with real processes)."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dvml_tf.evaluation import knn
from dvml_tf.index import PAD_INT_ID
from dvml_tf.index import PAD_STR_ID
from dvml_tf.index import GalleryIndex
from dvml_tf.index import contract_from_report
from dvml_tf.index import storage
from tests import faults

ROOT = pathlib.Path(__file__).resolve().parents[2]
BACKENDS = ("flat", "hnsw", "ivf_pq")
# Small galleries: ivf_pq needs 2**nbits rows to train its product quantizer, so use 6 bits.
SMALL_OPTIONS = {"flat": None, "hnsw": None, "ivf_pq": {"nbits": 6, "m": 4}}
REPORT = {
    "version": 3,
    "model": {"source": "runs/sop", "dataset": "sop", "backbone": "googlenet", "loss": "npair",
              "dvml": True, "embedding_dim": 16, "normalized": True,
              "weights": "sha256:" + "ab" * 32},
    "raw_input": {"raw_size": [256, 256]},
}


def gallery_with_ties(num=600, dim=16, seed=0):
    """Gaussian rows, with runs of exact duplicates (ties) and integer rows (exact products)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, dim)).astype(np.float32)
    x[10:20] = x[3]  # a row duplicated 11 times: every query near it sees an 11-way tie
    x[40:43] = x[41 + 100]
    x[200:260] = rng.integers(-2, 3, size=(60, dim))  # small integers: many exactly equal scores
    x[200:260] = np.where((x[200:260] == 0).all(axis=1, keepdims=True), 1, x[200:260])
    x[300:310] = x[205]
    return x


def queries_for(x, num=50, seed=1):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((num, x.shape[1])).astype(np.float32)
    q[:5] = x[[3, 141, 205, 10, 0]]  # queries equal to duplicated rows: the ties come first
    q[5:10] = np.round(q[5:10])
    return q


def build(backend="flat", x=None, ids=None, metric="cosine", **kwargs):
    x = gallery_with_ties() if x is None else x
    options = kwargs.pop("backend_options", SMALL_OPTIONS[backend])
    index = GalleryIndex(x.shape[1], metric, backend, backend_options=options, **kwargs)
    index.add(np.arange(len(x)) if ids is None else ids, x)
    return index


def recall(found, truth):
    return np.mean([len(np.intersect1d(a, b)) / truth.shape[1]
                    for a, b in zip(found, truth, strict=True)])


# ------------------------------------------------------------------- flat == knn.py exactly

@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("offset", [0.0, 50.0])  # 50: knn.py centres the data (Euclidean)
@pytest.mark.parametrize(("k", "options"), [
    (1, None),
    (12, None),  # knn's candidate-filter path; the 11-way tie straddles k for some queries
    (12, {"memory_budget_bytes": 60_000, "num_threads": 2}),  # many chunks, two threads
    (400, None),  # knn's full-row path
])
def test_flat_returns_exactly_the_neighbours_of_knn(metric, offset, k, options):
    x = gallery_with_ties() + np.float32(offset)
    q = queries_for(x) + np.float32(offset)
    q[:5] = x[[3, 141, 205, 10, 0]]
    index = GalleryIndex(16, metric, "flat", backend_options=options)
    # Several adds: the rows keep their insertion order, which is knn's gallery order.
    ids = np.arange(len(x)) * 7 + 3
    for part in np.array_split(np.arange(len(x)), 3):
        index.add(ids[part], x[part])
    found, scores = index.search(q, k)
    # The same options: BLAS may round a product differently in chunks of another number of
    # rows (see knn.py), and exact ties are only exact within one chunking.
    ref, dist = knn.nearest_neighbors(q, k, gallery=x, metric=metric, **(options or {}))
    np.testing.assert_array_equal(found, ids[ref])
    expected = 1.0 - dist if metric == "cosine" else -(dist.astype(np.float64) ** 2)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4 * (1 + offset**2))
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_flat_precision_option_changes_speed_not_results(metric):
    x = gallery_with_ties()
    q = queries_for(x)
    found = {}
    for precision in ("float32", "bfloat16"):
        index = build("flat", x, metric=metric, backend_options={"precision": precision})
        found[precision] = index.search(q, 12)
        index.search(q[:3], 12)  # a second search reuses the prepared gallery
    np.testing.assert_array_equal(found["float32"][0], found["bfloat16"][0])
    np.testing.assert_array_equal(found["float32"][1], found["bfloat16"][1])
    with pytest.raises(ValueError, match="precision"):
        GalleryIndex(16, metric, "flat", backend_options={"precision": "int8"})


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_flat_ties_go_to_the_earlier_row_and_survive_removal(metric):
    x = gallery_with_ties()
    index = build("flat", x, metric=metric)
    found, scores = index.search(x[[3]], 11)
    # Hand-made reference: rows 3 and 10..19 are the same vector, so they tie at the top and
    # come in insertion order.
    np.testing.assert_array_equal(found[0], [3, *range(10, 20)])
    assert len(set(scores[0].tolist())) == 1
    removed = [3, 12, 141, 205, 300, 599]
    index.remove(removed)
    keep = np.setdiff1d(np.arange(len(x)), removed)
    q = queries_for(x)
    found, _ = index.search(q, 15)
    ref, _ = knn.nearest_neighbors(q, 15, gallery=x[keep], metric=metric)
    np.testing.assert_array_equal(found, keep[ref])


def test_euclidean_with_normalize_matches_knn_on_unit_vectors():
    x = gallery_with_ties()
    q = queries_for(x)
    index = build("flat", x, metric="euclidean", normalize=True)
    found, scores = index.search(q, 9)
    ref, dist = knn.nearest_neighbors(knn.l2_normalize(q), 9, gallery=knn.l2_normalize(x),
                                      metric="euclidean")
    np.testing.assert_array_equal(found, ref)
    np.testing.assert_allclose(scores, -(dist**2), atol=1e-5)
    assert (scores >= -4.0 - 1e-5).all()  # unit vectors: squared distance <= 4


# -------------------------------------------------------------------- add / remove / search

@pytest.mark.parametrize("backend", BACKENDS)
def test_search_shapes_padding_and_removal(backend):
    x = gallery_with_ties()
    index = build(backend, x, ids=np.arange(len(x)) + 1000)
    assert len(index) == 600 and 1000 in index and 5 not in index
    found, scores = index.search(x[:4], 5)
    assert found.shape == scores.shape == (4, 5)
    assert found.dtype == np.int64 and scores.dtype == np.float32
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # Removing rows, including a query's own row and its duplicates: never returned again.
    removed = np.concatenate([[1003], np.arange(1010, 1020), np.arange(1100, 1200)])
    index.remove(removed)
    assert len(index) == 600 - len(removed) and 1003 not in index
    found, scores = index.search(queries_for(x), 20)
    assert not np.isin(found, removed).any()
    assert (found != PAD_INT_ID).all() and np.isfinite(scores).all()
    # Fewer rows than k: the rows are padded at the end with the sentinel id and -inf.
    index.remove(index.ids[3:])
    found, scores = index.search(x[:2], 5)
    assert (found[:, :3] != PAD_INT_ID).all() and (found[:, 3:] == PAD_INT_ID).all()
    assert np.isfinite(scores[:, :3]).all() and (scores[:, 3:] == -np.inf).all()
    assert set(found[0, :3].tolist()) == {1000, 1001, 1002}


def test_hnsw_tombstones_are_skipped_then_compacted():
    x = gallery_with_ties()
    options = {"max_tombstone_fraction": 0.5}
    index = build("hnsw", x, backend_options=options)
    exact = build("flat", x)
    removed = np.arange(0, 280)
    index.remove(removed)
    exact.remove(removed)
    assert index._backend.tombstones == 280  # below the fraction: still in the graph
    q = queries_for(x)
    found, _ = index.search(q, 10)
    truth, _ = exact.search(q, 10)
    assert not np.isin(found, removed).any() and (found != PAD_INT_ID).all()
    assert recall(found, truth) >= 0.95
    index.remove(np.arange(280, 330))  # 330 / 600 > 0.5: the graph is rebuilt without them
    exact.remove(np.arange(280, 330))
    assert index._backend.tombstones == 0 and len(index) == 270
    found, _ = index.search(q, 10)
    truth, _ = exact.search(q, 10)
    assert recall(found, truth) >= 0.95
    np.testing.assert_array_equal(np.sort(index.ids), np.arange(330, 600))


def test_string_ids_labels_and_metadata():
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    index = GalleryIndex(16, "cosine")
    names = [f"img_{i:03d}.jpg" for i in range(40)]
    index.add(names[:30], x[:30], labels=np.arange(30) % 4,
              metadata={"class_name": [f"c{i % 4}" for i in range(30)],
                        "size": np.arange(30, dtype=np.int32)})
    index.add(names[30:], x[30:], labels=np.zeros(10, np.int64),
              metadata=[{"path": "/a", "tags": ("x", "y")}] + [None] * 9)
    found, _ = index.search(x[[7]], 3)
    assert found.dtype.kind == "U" and found[0, 0] == "img_007.jpg"
    assert index.get_metadata(["img_007.jpg", "img_030.jpg", "img_031.jpg"]) == [
        {"class_name": "c3", "size": 7}, {"path": "/a", "tags": ["x", "y"]}, {}]
    np.testing.assert_array_equal(index.get_labels(["img_005.jpg", "img_039.jpg"]), [1, 0])
    index.remove(["img_000.jpg", "img_030.jpg"])
    assert index.get_metadata(["img_031.jpg"]) == [{}]
    found, scores = index.search(x[[1]], 45)
    assert (found[0, 38:] == PAD_STR_ID).all() and (scores[0, 38:] == -np.inf).all()
    # Returned metadata are copies.
    index.get_metadata(["img_001.jpg"])[0]["class_name"] = "changed"
    assert index.get_metadata(["img_001.jpg"])[0]["class_name"] == "c1"


def test_set_search_options_changes_only_search_time_settings():
    index = build("hnsw")
    index.set_search_options(ef_search=200)
    assert index.backend_options["ef_search"] == 200
    with pytest.raises(ValueError, match="cannot change after"):
        index.set_search_options(M=8)
    with pytest.raises(ValueError, match="ef_search"):
        index.set_search_options(ef_search=0)
    assert index.backend_options["ef_search"] == 200


# ---------------------------------------------------------------------- save / load round trip

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_kind", ["int", "str"])
def test_save_load_round_trip(tmp_path, backend, id_kind):
    x = gallery_with_ties()
    ids = np.arange(600) * 3 if id_kind == "int" else np.array([f"id-{i}" for i in range(600)])
    metric = "euclidean" if backend == "hnsw" else "cosine"
    contract = contract_from_report({**REPORT, "metric": metric}, saved_model="exports/3")
    index = GalleryIndex(16, metric, backend, contract=contract,
                         backend_options=SMALL_OPTIONS[backend])
    index.add(ids, x, labels=np.arange(600) % 7, metadata={"path": [f"/d/{i}" for i in range(600)]})
    index.remove(ids[100:150])  # hnsw keeps them as tombstones through the save
    q = queries_for(x)
    before = index.search(q, 10)
    path = index.save(tmp_path / "gallery")
    loaded = GalleryIndex.load(path)
    after = loaded.search(q, 10)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(loaded.ids, index.ids)
    assert (loaded.dim, loaded.metric, loaded.normalize, loaded.backend) == (
        index.dim, index.metric, index.normalize, index.backend)
    assert loaded.backend_options == index.backend_options
    assert loaded.contract == contract
    some = ids[[0, 99, 150, 599]]
    assert loaded.get_metadata(some) == index.get_metadata(some)
    np.testing.assert_array_equal(loaded.get_labels(some), index.get_labels(some))
    # The loaded index keeps working: add, remove, search, save again over the first save.
    loaded.remove(ids[:10])
    loaded.add(ids[100:110], x[100:110], labels=np.zeros(10, np.int64))
    assert len(loaded) == 550
    loaded.save(path)
    assert len(GalleryIndex.load(path)) == 550
    assert sorted(os.listdir(tmp_path)) == ["gallery"]  # the lock file is removed on release
    header = json.loads((tmp_path / "gallery" / "index.json").read_text())
    assert header["format_version"] == 1 and header["count"] == 550
    assert set(header["files"]) == set(os.listdir(path)) - {"index.json"}


def test_empty_index_round_trip(tmp_path):
    for backend in BACKENDS:
        GalleryIndex(8, backend=backend).save(tmp_path / backend)
        loaded = GalleryIndex.load(tmp_path / backend)
        assert len(loaded) == 0 and loaded.backend == backend
        with pytest.raises(ValueError, match="empty index"):
            loaded.search(np.ones((1, 8)), 1)


# ---------------------------------------------------------------------------------- contract

def test_check_contract_refuses_another_model():
    contract = contract_from_report(REPORT, saved_model="exports/3")
    index = build("flat", gallery_with_ties(), contract=contract)
    index.check_contract(contract)
    index.check_contract(contract_from_report(json.loads(json.dumps(REPORT))))  # same model
    index.check_contract(contract_from_report({**REPORT, "version": 4}))  # exported again
    retrained = {**REPORT, "model": {**REPORT["model"], "weights": "sha256:" + "cd" * 32}}
    with pytest.raises(ValueError, match=r"another model.*exports/3.*fingerprint.*other weights"):
        index.check_contract(contract_from_report(retrained))
    wrong_dim = {**contract, "dim": 32}
    with pytest.raises(ValueError, match="dim 32 != the index's 16"):
        index.check_contract(wrong_dim)
    with pytest.raises(ValueError, match="normalized False"):
        index.check_contract({**contract, "normalized": False})
    with pytest.raises(ValueError, match="no 'fingerprint'"):
        index.check_contract({"dim": 16})
    with pytest.raises(ValueError, match="without a contract"):
        build("flat").check_contract(contract)
    with pytest.raises(ValueError, match="contract has dim=16 but the index has dim=8"):
        GalleryIndex(8, contract=contract)


# ------------------------------------------------------------------------------- ANN recall

@pytest.fixture(scope="module")
def sop_like():
    """20k x 64 SOP-like embeddings (benchmarks/eval_scale.py's generator) and 200 queries."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_scale", ROOT / "benchmarks" /
                                                  "eval_scale.py")
    eval_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_scale)
    x, _ = eval_scale.make_embeddings(20_200, 3_778, 64, seed=0)
    return x[:20_000], x[20_000:]


@pytest.mark.parametrize(("backend", "options", "bound"), [
    ("hnsw", None, 0.95),
    ("hnsw", {"storage": "float32", "M": 16}, 0.95),
    ("ivf_pq", {"nprobe": 64}, 0.95),  # half of the 128 lists: this data needs many
])
def test_ann_recall_against_flat(sop_like, backend, options, bound):
    gallery, queries = sop_like
    exact = GalleryIndex(64, "cosine", "flat")
    exact.add(np.arange(len(gallery)), gallery)
    truth, _ = exact.search(queries, 10)
    index = GalleryIndex(64, "cosine", backend, backend_options=options)
    index.add(np.arange(len(gallery)), gallery)
    found, scores = index.search(queries, 10)
    assert recall(found, truth) >= bound
    # Scores are cosine similarities of the returned rows (float16 storage rounds them).
    rows = knn.l2_normalize(gallery)[found]
    expected = np.einsum("qkd,qd->qk", rows, knn.l2_normalize(queries))
    np.testing.assert_allclose(scores, expected, atol=2e-3)


# -------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_give_clear_errors():
    x = gallery_with_ties()
    index = build("flat", x)
    with pytest.raises(ValueError, match="embeddings have dimension 8; this index has dim=16"):
        index.add([9999], np.ones((1, 8)))
    with pytest.raises(ValueError, match="queries have dimension 8"):
        index.search(np.ones((1, 8)), 3)
    nan = np.ones((2, 16))
    nan[1, 3] = np.nan
    with pytest.raises(ValueError, match="embeddings contains NaN or Inf values in 1 of 2 rows"):
        index.add([9998, 9999], nan)
    with pytest.raises(ValueError, match="queries contains NaN"):
        index.search(nan, 3)
    with pytest.raises(ValueError, match=r"ids already in the index \(2\): \[5, 7\]"):
        index.add([5, 7, 9999], np.ones((3, 16)))
    with pytest.raises(ValueError, match=r"ids contain duplicates: \[9999\]"):
        index.add([9999, 9999], np.ones((2, 16)))
    with pytest.raises(ValueError, match="ids has 1 entries for 2 embeddings"):
        index.add([9999], np.ones((2, 16)))
    with pytest.raises(ValueError, match="ids must be >= 0"):
        index.add([-1], np.ones((1, 16)))
    with pytest.raises(ValueError, match="ids are strs but this index holds int ids"):
        index.add(["a"], np.ones((1, 16)))
    for bad in ([1.5], [9999, "a"], [True]):
        with pytest.raises(ValueError, match="all be ints or all be strs"):
            index.add(bad, np.ones((len(bad), 16)))
    with pytest.raises(ValueError, match="labels must be None"):
        index.add([9999], np.ones((1, 16)), labels=[1])
    with pytest.raises(ValueError, match="metadata column 'path' has 2 values for 1 rows"):
        index.add([9999], np.ones((1, 16)), metadata={"path": ["a", "b"]})
    with pytest.raises(ValueError, match="metadata must hold JSON data"):
        index.add([9999], np.ones((1, 16)), metadata=[{"bad": object()}])
    assert len(index) == 600 and 9999 not in index  # every failed add left the index unchanged
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            index.search(x[:1], k)
    with pytest.raises(ValueError, match="2-D array"):
        index.search(x[0], 3)
    with pytest.raises(ValueError, match=r"Unknown ids \(1 of 1\): \['a'\]"):
        index.get_metadata(["a"])
    with pytest.raises(ValueError, match="no labels"):
        index.get_labels([1])
    with pytest.raises(ValueError, match="Cannot search an empty index"):
        GalleryIndex(16).search(x[:1], 1)
    with pytest.raises(ValueError, match="metric must be one of"):
        GalleryIndex(16, metric="dot")
    with pytest.raises(ValueError, match="backend must be one of"):
        GalleryIndex(16, backend="annoy")
    with pytest.raises(ValueError, match=r"Unknown backend_options \['ef'\]"):
        GalleryIndex(16, backend="hnsw", backend_options={"ef": 3})
    with pytest.raises(ValueError, match="m'\\]=5 must divide the dimension 16"):
        GalleryIndex(16, backend="ivf_pq", backend_options={"m": 5})
    # Bounds: a typo fails when the index is made, not as a MemoryError once rows are added.
    for backend, options, message in (
        ("hnsw", {"M": 10**8}, r"'M'\] must be an int in \[1, 256\]; got 100000000 \(each row "
                               r"keeps 2M links: 8M bytes\)"),
        ("hnsw", {"ef_search": 10**7}, r"'ef_search'\] must be an int in \[1, 65536\]"),
        ("ivf_pq", {"nlist": 10**9}, r"'nlist'\] must be an int in \[1, 4194304\] or None"),
        ("ivf_pq", {"m": 32}, r"'m'\] must be an int in \[1, 16\] or None"),
        ("flat", {"memory_budget_bytes": 2**50}, r"'memory_budget_bytes'\] must be an int in"),
    ):
        with pytest.raises(ValueError, match=message):
            GalleryIndex(16, backend=backend, backend_options=options)
    with pytest.raises(ValueError, match="normalize=False is only valid"):
        GalleryIndex(16, metric="cosine", normalize=False)
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        GalleryIndex(0)
    small = GalleryIndex(16, backend="ivf_pq")
    with pytest.raises(ValueError, match="at least 2\\*\\*nbits = 256 rows; got 100"):
        small.add(np.arange(100), x[:100])
    assert len(small) == 0


def test_unknown_ids_are_named():
    index = build("flat", gallery_with_ties())
    with pytest.raises(ValueError, match=r"Unknown ids \(2 of 3\): \[700, 800\]"):
        index.remove([1, 700, 800])
    assert 1 in index


# ------------------------------------------------------------------------- load validation

def test_load_rejects_missing_corrupt_and_foreign_folders(tmp_path):
    index = build("hnsw")
    path = pathlib.Path(index.save(tmp_path / "g"))
    with pytest.raises(FileNotFoundError, match="No saved GalleryIndex"):
        GalleryIndex.load(tmp_path / "nothing")
    header = json.loads((path / "index.json").read_text())

    def rewrite(**changes):
        (path / "index.json").write_text(json.dumps({**header, **changes}))

    rewrite(format_version=2)
    with pytest.raises(ValueError, match="format_version 2; this version of dvml_tf reads "
                                         "format_version 1"):
        GalleryIndex.load(path)
    (path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"index.json is corrupt"):
        GalleryIndex.load(path)
    rewrite()
    ids = (path / "ids.npy").read_bytes()
    (path / "ids.npy").write_bytes(ids[:-8] + b"\x01" * 8)  # same size, other content
    with pytest.raises(ValueError, match=r"ids.npy is corrupt: its SHA-256 differs"):
        GalleryIndex.load(path)
    (path / "ids.npy").write_bytes(ids[:-8])
    with pytest.raises(ValueError, match=r"ids.npy is corrupt: .* bytes"):
        GalleryIndex.load(path, verify=False)
    (path / "ids.npy").write_bytes(ids)
    graph = (path / "hnsw.faiss").read_bytes()
    (path / "hnsw.faiss").write_bytes(b"junk" + graph[4:])
    with pytest.raises(ValueError, match=r"hnsw.faiss is not a readable faiss index"):
        GalleryIndex.load(path, verify=False)
    (path / "hnsw.faiss").unlink()
    with pytest.raises(FileNotFoundError, match=r"hnsw.faiss is missing"):
        GalleryIndex.load(path)
    (path / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"index.json is missing"):
        GalleryIndex.load(path)
    # save never replaces a folder that is not a saved index.
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ValueError, match=r"Refusing to replace .*photos"):
        index.save(tmp_path / "photos")
    assert os.listdir(tmp_path / "photos") == ["cat.jpg"]


def test_planted_files_with_matching_digests_are_refused_and_never_run(tmp_path):
    # Whoever can write the folder can also rewrite index.json's digests: the checks below
    # must hold on their own. A pickled object array in place of ids.npy (np.load would run
    # it with allow_pickle=True), and file names that point outside the folder.
    path = pathlib.Path(build("flat").save(tmp_path / "g"))
    header = json.loads((path / "index.json").read_text())
    marker = tmp_path / "payload_ran"
    ids = (path / "ids.npy").read_bytes()
    count = len(np.load(path / "ids.npy"))
    np.save(path / "ids.npy", np.array([faults.PickledPayload(marker)] * count, dtype=object),
            allow_pickle=True)
    planted = storage.file_digest(path / "ids.npy")
    (path / "index.json").write_text(json.dumps(
        {**header, "files": {**header["files"], "ids.npy": planted}}))
    with pytest.raises(ValueError, match=r"ids\.npy is corrupt: Object arrays cannot be loaded "
                                         "when allow_pickle=False"):
        GalleryIndex.load(path)
    assert not marker.exists()
    (path / "ids.npy").write_bytes(ids)
    (tmp_path / "secret").write_text("not the index's")
    for name in ("../secret", str(tmp_path / "secret"), ".."):
        (path / "index.json").write_text(json.dumps(
            {**header, "files": {**header["files"], name: storage.file_digest(
                tmp_path / "secret")}}))
        with pytest.raises(ValueError, match=rf"index\.json is corrupt: file name "
                                             rf"{re.escape(repr(name))}\."):
            GalleryIndex.load(path)


# ------------------------------------------------------------- saves that fail or race

def test_interrupted_save_leaves_the_previous_index_intact(tmp_path, monkeypatch):
    x = gallery_with_ties()
    good = build("ivf_pq", x)
    path = good.save(tmp_path / "g")
    newer = build("ivf_pq", x[:300])
    calls = []

    def crash(*args, **kwargs):
        calls.append(args)
        raise OSError("disk full")

    # The backend files are written; the first checksum then fails: a half-assembled index.
    monkeypatch.setattr(storage, "file_digest", crash)
    with pytest.raises(OSError, match="disk full"):
        newer.save(path)
    monkeypatch.undo()
    assert calls
    loaded = GalleryIndex.load(path)
    assert len(loaded) == 600
    np.testing.assert_array_equal(loaded.search(x[:5], 4)[0], good.search(x[:5], 4)[0])
    assert sorted(os.listdir(tmp_path)) == ["g"]  # no temporary folder, no lock file


CHILD = textwrap.dedent("""
    import os, sys, time, types
    import numpy as np
    # Import the index without dvml_tf/__init__ (TensorFlow): ~5 s per process saved.
    package = types.ModuleType("dvml_tf")
    package.__path__ = [os.path.join({root!r}, "dvml_tf")]
    sys.modules["dvml_tf"] = package
    from dvml_tf.index import GalleryIndex
    from dvml_tf.index import gallery_index

    name, count, folder, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    rng = np.random.default_rng(count)
    index = GalleryIndex(8, backend="flat")
    index.add(np.arange(count) + 10_000 * (name == "b"), rng.standard_normal((count, 8)))
    write = GalleryIndex._write

    def slow_write(self, tmp):
        # Log when this process assembles a folder; the sleep widens the window in which the
        # other process would step in without the lock.
        with open(log, "a") as f:
            f.write(f"{{name}} start {{time.time()!r}}\\n")
        write(self, tmp)
        with open(log, "a") as f:
            f.write(f"{{name}} written {{time.time()!r}}\\n")
        time.sleep(float(os.environ.get("SLOW_WRITE", "0.15")))
        with open(log, "a") as f:
            f.write(f"{{name}} end {{time.time()!r}}\\n")

    GalleryIndex._write = slow_write
    open(f"{{folder}}.ready-{{name}}", "w").close()
    while not os.path.exists(f"{{folder}}.go"):
        time.sleep(0.01)
    for _ in range(4):
        index.save(folder)
""")


def _spawn(script, *args, env=None):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_concurrent_saves_from_two_processes_never_interleave(tmp_path):
    folder = tmp_path / "gallery"
    log = tmp_path / "log.txt"
    script = CHILD.format(root=str(ROOT))
    procs = [_spawn(script, name, count, folder, log) for name, count in (("a", 300), ("b", 500))]
    deadline = time.time() + 60
    while not all(os.path.exists(f"{folder}.ready-{n}") for n in "ab"):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [
            p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    open(f"{folder}.go", "w").close()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    events = [line.split() for line in log.read_text().splitlines() if "written" not in line]
    assert len(events) == 16 and {name for name, _, _ in events} == {"a", "b"}
    # Under the lock each start is followed by the same process's end: no two assemblies and
    # swaps overlap.
    for (name1, what1, t1), (name2, what2, t2) in zip(events[::2], events[1::2], strict=True):
        assert (what1, what2) == ("start", "end") and name1 == name2 and float(t2) > float(t1)
    loaded = GalleryIndex.load(folder)  # checksums verified: a complete index from one writer
    last = events[-1][0]
    assert len(loaded) == {"a": 300, "b": 500}[last]
    assert loaded.ids[0] == {"a": 0, "b": 10_000}[last]
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".gallery.")]
    assert leftovers == []  # the last holder removed the lock file


@pytest.mark.slow
def test_a_save_killed_mid_way_leaves_the_previous_index_intact(tmp_path):
    folder = tmp_path / "gallery"
    original = build("flat", gallery_with_ties())
    original.save(folder)
    script = CHILD.format(root=str(ROOT))
    # The child assembles its folder, then sleeps inside the save (SLOW_WRITE): kill it there.
    proc = _spawn(script, "b", 50, folder, tmp_path / "log.txt",
                  env={**os.environ, "SLOW_WRITE": "60"})
    deadline = time.time() + 60
    while not os.path.exists(f"{folder}.ready-b"):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    open(f"{folder}.go", "w").close()
    log = tmp_path / "log.txt"
    while not (log.exists() and "written" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    # Its temporary folder is complete, the swap not done: the worst moment to die.
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    loaded = GalleryIndex.load(folder)
    assert len(loaded) == 600
    np.testing.assert_array_equal(loaded.ids, original.ids)
    # The dead process's flock died with it: the next save goes through.
    original.save(folder, lock_timeout=5)


def test_faiss_loader_notices_are_silenced_and_its_warnings_kept():
    # faiss's loader logs each missing AVX512/AVX2 build at INFO ("No module named
    # 'faiss.swigfaiss_avx512'") before falling back; the commands log at INFO.
    # As the commands run: absl's app, which logs Python's loggers at INFO.
    script = ("import logging as std\n"
              "from absl import app, logging\n"
              "def main(argv):\n"
              "    logging.set_verbosity(logging.INFO)\n"
              "    from dvml_tf.index import backends\n"
              "    backends._faiss()\n"
              "    std.getLogger('faiss.loader').warning('a real warning stays visible')\n"
              "app.run(main)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "swigfaiss" not in result.stderr and "Loading faiss" not in result.stderr
    assert "a real warning stays visible" in result.stderr
