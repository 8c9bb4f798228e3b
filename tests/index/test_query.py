"""Searching an index with image files: results against a numpy brute force, matched flags,
undecodable queries, the same answers through TF Serving's REST API (the test double), and the
worked example of docs/deployment.md run against it."""

import os
import pathlib
import re

import numpy as np
import pytest

from dvml_tf.evaluation import runner
from dvml_tf.export import layout
from dvml_tf.index import GalleryIndex
from dvml_tf.index import builder
from dvml_tf.index import query
from dvml_tf.testing import serving

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(catalogue_export, tmp_path_factory):
    output = tmp_path_factory.mktemp("query") / "I"
    builder.build_index(catalogue_export.version_dir, output,
                        data_dir=str(catalogue_export.manifest), progress=False)
    index = GalleryIndex.load(output)
    index.saved_at = output
    return index


def image_paths(export, names):
    return [os.path.join(os.path.dirname(export.manifest), "img", name) for name in names]


def test_results_are_the_nearest_gallery_images_with_labels_and_matches(catalogue_export, built,
                                                                        tmp_path):
    embedder = query.QueryEmbedder.from_saved_model(built)
    embedder.matching = {"thresholds": {"0.9": 0.99, "0.95": 0.999}}
    paths = image_paths(catalogue_export, ["c0_1.png", "c7_3.png"])  # a train and a test image
    (tmp_path / "text.png").write_text("not an image")
    answers = query.search_files(built, embedder, [paths[0], str(tmp_path / "text.png"),
                                                   paths[1]], k=4)
    assert answers[1]["query"] == str(tmp_path / "text.png") and "error" in answers[1]
    # Reference: the SavedModel's embeddings of the queries and of the gallery, numpy cosine.
    signature = runner.load_embed_bytes(catalogue_export.version_dir)
    queries = runner.run_embed_bytes(signature, [pathlib.Path(p).read_bytes() for p in paths])
    report = layout.read_version_report(catalogue_export.version_dir)
    catalog, _ = runner.saved_model_catalog(report, "test", data_dir=str(catalogue_export.manifest))
    gallery, labels = runner.saved_model_embeddings(signature, catalog)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    similarity = unit(queries) @ unit(gallery).T
    for answer, row in zip((answers[0], answers[2]), similarity, strict=True):
        order = np.argsort(-row, kind="stable")[:4]
        results = answer["results"]
        assert [r["id"] for r in results] == order.tolist()
        assert [r["label"] for r in results] == labels[order].tolist()
        assert [r["class_name"] for r in results] == [f"glyph_{c}" for c in labels[order]]
        np.testing.assert_allclose([r["score"] for r in results], row[order], atol=1e-5)
        # Default target 0.95: threshold 0.999.
        assert [r["matched"] for r in results] == [bool(s >= 0.999) for s in row[order]]
    assert answers[2]["results"][0]["path"] == paths[1]  # a gallery image finds itself
    assert answers[2]["results"][0]["matched"] is True
    strict = query.search_files(built, embedder, paths[:1], k=2, precision=0.9)
    assert [r["matched"] for r in strict[0]["results"]] == [
        s >= 0.99 for s in (r["score"] for r in strict[0]["results"])]
    embedder.matching = {"thresholds": {"0.99": None}}  # a target no threshold reached
    assert not any(r["matched"] for r in query.search_files(
        built, embedder, paths[1:], k=3, precision=0.99)[0]["results"])


def test_the_same_answers_through_tf_servings_rest_api(catalogue_export, built):
    paths = image_paths(catalogue_export, ["c6_2.png", "c8_0.png"])
    local = query.search_files(built, query.QueryEmbedder.from_saved_model(built), paths, k=5)
    base = os.path.dirname(catalogue_export.version_dir)
    with serving.serve_rest(base) as server:
        remote = query.search_files(
            built, query.QueryEmbedder.from_serving(built, server.address), paths, k=5)
    for a, b in zip(local, remote, strict=True):
        assert [r["id"] for r in a["results"]] == [r["id"] for r in b["results"]]
        np.testing.assert_allclose([r["score"] for r in a["results"]],
                                   [r["score"] for r in b["results"]], atol=1e-5)
    down = query.QueryEmbedder.from_serving(built, "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(ConnectionError, match=r"Cannot reach TF Serving at http://127\.0\.0\.1:9"):
        query.search_files(built, down, paths[:1])


def test_the_worked_example_of_the_docs_runs_against_a_rest_server(catalogue_export, built,
                                                                   tmp_path):
    text = (ROOT / "docs" / "deployment.md").read_text()
    block = re.search(r"<!-- worked-example -->\n```python\n(.*?)```", text, re.S)
    assert block, "docs/deployment.md needs the worked example's python block"
    # The index with calibrated thresholds in its info, as a build after evaluate.py
    # --calibrate records them.
    index = GalleryIndex.load(built.saved_at)
    index.info = dict(index.info, matching={"thresholds": {"0.9": 0.2, "0.95": 0.5}})
    index_dir = index.save(tmp_path / "I")
    image = image_paths(catalogue_export, ["c7_4.png"])[0]
    base = os.path.dirname(catalogue_export.version_dir)
    with serving.serve_rest(base) as server:
        code = (block.group(1).replace("indexes/omniglot", str(index_dir))
                .replace("glyph.png", image).replace("http://localhost:8501", server.address))
        namespace = {}
        exec(code, namespace)
    assert namespace["names"][0] == "glyph_7"
    assert namespace["matched"][0] is True  # the image itself, score 1 >= 0.5



def test_an_index_of_the_older_contract_is_told_to_rebuild(catalogue_export, built, tmp_path):
    import json
    import shutil

    # An index written before the fingerprint covered the weights: its contract fingerprints
    # the export report's fields and has no "weights" (index.json is not among the digested
    # files, so the rest of the index still loads).
    old = tmp_path / "old"
    shutil.copytree(built.saved_at, old)
    header = json.loads((old / "index.json").read_text())
    contract = header["contract"]
    header["contract"] = {"fingerprint": "sha256:" + "0" * 64, "dim": contract["dim"],
                          "normalized": contract["normalized"], "version": 1,
                          "saved_model": contract["saved_model"], "metric": contract["metric"]}
    (old / "index.json").write_text(json.dumps(header))
    with pytest.raises(ValueError) as refused:
        query.QueryEmbedder.from_saved_model(GalleryIndex.load(old))
    assert str(refused.value) == (
        f"This index ({contract['saved_model']}) was built by an older dvml_tf, whose contract "
        "fingerprint did not cover the model's weights: nothing proves that its vectors come "
        "from this model. Rebuild it (index.py build --overwrite).")
