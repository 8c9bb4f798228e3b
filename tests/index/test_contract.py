"""Tests of the embedding contract helpers (fingerprint of an export report, mismatches)."""

import hashlib
import json

import pytest

from dvml_tf.index import contract_fingerprint
from dvml_tf.index import contract_from_report
from dvml_tf.index import embedding_contract_fields
from dvml_tf.index.contract import contract_mismatches

WEIGHTS = "sha256:" + "ab" * 32
REPORT = {
    "version": 2,
    "files": {"saved_model": "saved_model/2"},
    "raw_input": {"raw_size": (256, 256), "preprocess": {"mean": [0.5, 0.5, 0.5]}},
    "model": {"source": "runs/cub", "dataset": "cub200", "backbone": "googlenet",
              "loss": "triplet", "dvml": True, "embedding_dim": 512, "normalized": True,
              "weights": WEIGHTS, "seed": 0},
    "environment": {"tensorflow": "2.21.0", "cpu_count": 2},
    "latency_ms_per_image": {"saved_model": 12.5},
}


def test_fingerprint_is_sha256_of_the_weights_input_and_output():
    fields = {"weights": WEIGHTS, "dim": 512, "normalized": True, "metric": "cosine",
              "raw_input": {"raw_size": [256, 256], "preprocess": {"mean": [0.5, 0.5, 0.5]}}}
    assert embedding_contract_fields(REPORT) == {**fields, "raw_input": REPORT["raw_input"]}
    # Independent reference: sorted keys, compact separators, sha256 of the UTF-8 bytes.
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    assert contract_fingerprint(REPORT) == "sha256:" + hashlib.sha256(
        canonical.encode()).hexdigest()


@pytest.mark.parametrize("change", [
    {"version": 3},  # the same weights exported again as another version
    {"files": {"saved_model": "saved_model/3"}},
    {"model": {**REPORT["model"], "source": "/elsewhere/runs/cub"}},  # a copied run folder
    {"model": {**REPORT["model"], "seed": 7, "dataset": "cub200_copy"}},
    {"environment": {"cpu_count": 64}, "latency_ms_per_image": {}},
])
def test_fingerprint_ignores_version_paths_training_metadata_and_machine(change):
    assert contract_fingerprint({**REPORT, **change}) == contract_fingerprint(REPORT)


def test_fingerprint_ignores_formatting():
    # A report read back from its JSON file (tuples become lists, keys reordered).
    reread = json.loads(json.dumps(dict(reversed(list(REPORT.items())))))
    assert contract_fingerprint(reread) == contract_fingerprint(REPORT)
    flat = {"weights": WEIGHTS, "dim": 512, "normalized": True, "raw_input": REPORT["raw_input"]}
    assert contract_fingerprint(flat) == contract_fingerprint(REPORT)


@pytest.mark.parametrize("change", [
    {"model": {**REPORT["model"], "weights": "sha256:" + "cd" * 32}},  # retrained
    {"model": {**REPORT["model"], "embedding_dim": 128}},
    {"model": {**REPORT["model"], "normalized": False}},
    {"raw_input": {"raw_size": [224, 224]}},
    {"metric": "euclidean"},
])
def test_fingerprint_changes_with_what_the_model_computes(change):
    assert contract_fingerprint({**REPORT, **change}) != contract_fingerprint(REPORT)


def test_contract_from_report_and_bad_reports():
    contract = contract_from_report(REPORT, saved_model="/exports/cub/saved_model/2")
    assert contract == {"fingerprint": contract_fingerprint(REPORT), "weights": WEIGHTS,
                        "dim": 512, "normalized": True, "metric": "cosine", "version": 2,
                        "saved_model": "/exports/cub/saved_model/2"}
    with pytest.raises(ValueError, match=r"'weights' or 'model.weights'"):
        contract_fingerprint({"dim": 8, "normalized": True})
    with pytest.raises(ValueError, match=r"'dim' or 'model.embedding_dim'"):
        contract_fingerprint({"weights": WEIGHTS, "normalized": True})
    with pytest.raises(ValueError, match="'normalized'"):
        contract_fingerprint({"weights": WEIGHTS, "dim": 8})
    with pytest.raises(ValueError, match="report must be a dict"):
        contract_fingerprint("report.json")
    with pytest.raises(ValueError, match="JSON data"):
        contract_fingerprint({"weights": WEIGHTS, "dim": 8, "normalized": True,
                              "raw_input": object()})


def test_mismatches_list_every_difference_and_say_why():
    stored = contract_from_report(REPORT)
    assert contract_mismatches(stored, stored, 512, "cosine") == []
    other = {"fingerprint": "sha256:00", "dim": 128, "normalized": False, "metric": "euclidean"}
    problems = contract_mismatches(stored, other, 512, "cosine")
    assert len(problems) == 4
    assert problems[0] == f"fingerprint sha256:00 != the index's {stored['fingerprint']}"
    assert problems[1:] == ["dim 128 != the index's 512",
                            "metric 'euclidean' != the index's 'cosine'",
                            "normalized False != the index's True"]
    retrained = contract_from_report({**REPORT, "model": {**REPORT["model"],
                                                          "weights": "sha256:" + "cd" * 32}})
    (problem,) = contract_mismatches(stored, retrained, 512, "cosine")
    assert problem.endswith("(other weights: another or a retrained model)")
    resized = contract_from_report({**REPORT, "raw_input": {"raw_size": [224, 224]}})
    (problem,) = contract_mismatches(stored, resized, 512, "cosine")
    assert problem.endswith("(the same weights with another input preprocessing or output)")


def test_an_index_of_the_older_contract_is_told_to_rebuild():
    # Contracts written before the fingerprint covered the weights have no "weights".
    old = {"fingerprint": "sha256:" + "0" * 64, "dim": 512, "normalized": True, "version": 2}
    (problem,) = contract_mismatches(old, contract_from_report(REPORT), 512, "cosine")
    assert "older dvml_tf whose fingerprint did not cover the model's weights" in problem
    assert "index.py build --overwrite" in problem
