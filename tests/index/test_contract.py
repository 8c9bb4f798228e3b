"""Tests of the embedding contract helpers (fingerprint of an export report, mismatches)."""

import hashlib
import json

import pytest

from dvml_tf.index import contract_fingerprint
from dvml_tf.index import contract_from_report
from dvml_tf.index import embedding_contract_fields
from dvml_tf.index.contract import contract_mismatches

REPORT = {
    "version": 2,
    "files": {"saved_model": "saved_model/2"},
    "raw_input": {"raw_size": (256, 256), "preprocess": {"mean": [0.5, 0.5, 0.5]}},
    "model": {"source": "runs/cub", "dataset": "cub200", "backbone": "googlenet",
              "loss": "triplet", "dvml": True, "embedding_dim": 512, "normalized": True},
    "environment": {"tensorflow": "2.21.0", "cpu_count": 2},
    "latency_ms_per_image": {"saved_model": 12.5},
}


def test_fingerprint_is_sha256_of_the_canonical_contract_fields():
    fields = {"dim": 512, "normalized": True, "version": 2,
              "raw_input": {"raw_size": [256, 256], "preprocess": {"mean": [0.5, 0.5, 0.5]}},
              "source": "runs/cub", "dataset": "cub200", "backbone": "googlenet",
              "loss": "triplet", "dvml": True}
    assert embedding_contract_fields(REPORT) == {**fields, "raw_input": REPORT["raw_input"]}
    # Independent reference: sorted keys, compact separators, sha256 of the UTF-8 bytes.
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    assert contract_fingerprint(REPORT) == "sha256:" + hashlib.sha256(
        canonical.encode()).hexdigest()


def test_fingerprint_ignores_formatting_and_non_model_fields():
    fingerprint = contract_fingerprint(REPORT)
    # A report read back from report.json (tuples become lists, keys reordered).
    reread = json.loads(json.dumps(dict(reversed(list(REPORT.items())))))
    assert contract_fingerprint(reread) == fingerprint
    other_machine = {**REPORT, "environment": {"cpu_count": 64}, "latency_ms_per_image": {}}
    assert contract_fingerprint(other_machine) == fingerprint
    # A flat dict with the same fields is the same contract.
    flat = {"dim": 512, "normalized": True, "version": 2, "raw_input": REPORT["raw_input"],
            **{k: REPORT["model"][k] for k in ("source", "dataset", "backbone", "loss", "dvml")}}
    assert contract_fingerprint(flat) == fingerprint


@pytest.mark.parametrize("change", [
    {"version": 3},
    {"model": {**REPORT["model"], "backbone": "resnet50"}},
    {"model": {**REPORT["model"], "embedding_dim": 128}},
    {"model": {**REPORT["model"], "normalized": False}},
    {"raw_input": {"raw_size": [224, 224]}},
])
def test_fingerprint_changes_with_the_model(change):
    assert contract_fingerprint({**REPORT, **change}) != contract_fingerprint(REPORT)


def test_contract_from_report_and_bad_reports():
    contract = contract_from_report(REPORT, saved_model="/exports/cub/saved_model/2")
    assert contract == {"fingerprint": contract_fingerprint(REPORT), "dim": 512,
                        "normalized": True, "version": 2,
                        "saved_model": "/exports/cub/saved_model/2"}
    with pytest.raises(ValueError, match=r"'dim' or 'model.embedding_dim'"):
        contract_fingerprint({"normalized": True})
    with pytest.raises(ValueError, match="'normalized'"):
        contract_fingerprint({"dim": 8})
    with pytest.raises(ValueError, match="report must be a dict"):
        contract_fingerprint("report.json")
    with pytest.raises(ValueError, match="JSON data"):
        contract_fingerprint({"dim": 8, "normalized": True, "source": object()})


def test_mismatches_list_every_difference():
    stored = contract_from_report(REPORT)
    assert contract_mismatches(stored, stored, 512, "cosine") == []
    other = {"fingerprint": "sha256:00", "dim": 128, "normalized": False, "metric": "euclidean"}
    problems = contract_mismatches(stored, other, 512, "cosine")
    assert len(problems) == 4
    assert problems[0].startswith("fingerprint sha256:00 != the index's sha256:")
    assert problems[1:] == ["dim 128 != the index's 512",
                            "metric 'euclidean' != the index's 'cosine'",
                            "normalized False != the index's True"]
