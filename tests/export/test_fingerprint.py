"""The digest of a SavedModel's weights: an independent reading of the variables agrees, the same
weights exported again keep it, one changed weight changes it, and unreadable files are named."""

import hashlib
import os
import shutil

import pytest
import tensorflow as tf

from dvml_tf.export import exporter
from dvml_tf.export import fingerprint


def reference_digest(version_dir):
    """The digest from the variables of the loaded SavedModel (TF's loader, not the files)."""
    loaded = tf.saved_model.load(str(version_dir))
    entries = []
    # ExportArchive tracks the variables its endpoints use as `_all_variables`.
    assert loaded._all_variables
    for variable in loaded._all_variables:
        value = variable.numpy()
        name = variable.name.rsplit(":", 1)[0]
        entries.append(f"{name}\0{value.dtype.str}\0{list(value.shape)}\0"
                       f"{hashlib.sha256(value.tobytes()).hexdigest()}")
    return "sha256:" + hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


def test_the_digest_hashes_every_variable_by_name(tiny_export):
    version_dir = tiny_export.result.saved_model_dir
    assert fingerprint.weights_digest(version_dir) == reference_digest(version_dir)
    assert tiny_export.result.report["model"]["weights"] == fingerprint.weights_digest(
        version_dir)


def test_the_same_weights_keep_the_digest_and_one_changed_weight_changes_it(tiny_export,
                                                                            tmp_path):
    model, config, splits = tiny_export.model, tiny_export.config, tiny_export.splits
    first = fingerprint.weights_digest(tiny_export.result.saved_model_dir)
    again = exporter.export_model(model, config, tmp_path / "E", version=7, raw_splits=splits,
                                  litert_models=False)
    # Another folder, version number and variable order in the checkpoint: the same weights.
    assert fingerprint.weights_digest(again.saved_model_dir) == first
    variable = model.embedder.trainable_variables[-1]
    original = variable.numpy()
    try:
        variable.assign(original + 1e-3)  # as one more training step would
        changed = exporter.export_model(model, config, tmp_path / "E", raw_splits=splits,
                                        litert_models=False)
    finally:
        variable.assign(original)
    assert fingerprint.weights_digest(changed.saved_model_dir) != first
    assert changed.report["model"]["weights"] != again.report["model"]["weights"]


def test_unreadable_weights_are_a_clear_error(tiny_export, tmp_path):
    version_dir = tmp_path / "1"
    shutil.copytree(tiny_export.result.saved_model_dir, version_dir)
    data = [name for name in os.listdir(version_dir / "variables") if ".data-" in name]
    (version_dir / "variables" / data[0]).write_bytes(b"truncated")
    with pytest.raises(ValueError, match=f"Cannot read the weights of the SavedModel "
                                         f"{version_dir}: .*Export the run again."):
        fingerprint.weights_digest(version_dir)
