"""The export folder's layout: SavedModel versions, resolving what a user passes, and the report
inside a version folder."""

import json

import pytest

from dvml_tf.export import layout


def _version(base, name):
    folder = base / name
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"")
    return folder


def test_existing_versions_are_numeric_folders_with_a_saved_model(tmp_path):
    base = tmp_path / "E" / layout.SAVED_MODEL_DIR
    assert layout.existing_versions(base) == []  # missing base
    for name in ("2", "10", "1"):
        _version(base, name)
    (base / "3").mkdir()  # no saved_model.pb: an interrupted copy, not a version
    _version(base, "latest")  # not a number
    (base / "7").write_text("a file")
    assert layout.existing_versions(base) == [1, 2, 10]


def test_resolve_saved_model_from_a_version_a_base_or_an_export_folder(tmp_path):
    export_dir = tmp_path / "E"
    base = export_dir / layout.SAVED_MODEL_DIR
    _version(base, "1")
    newest = _version(base, "12")
    assert layout.resolve_saved_model(export_dir) == (str(newest), 12)
    assert layout.resolve_saved_model(base) == (str(newest), 12)
    assert layout.resolve_saved_model(base / "1") == (str(base / "1"), 1)
    bare = _version(tmp_path, "my_model")
    assert layout.resolve_saved_model(bare) == (str(bare), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no saved_model\.pb"):
        layout.resolve_saved_model(tmp_path / "empty")


def test_the_report_travels_inside_the_version_folder(tmp_path):
    version_dir = _version(tmp_path, "3")
    with pytest.raises(FileNotFoundError, match=r"not written by dvml_tf's export\.py"):
        layout.read_version_report(version_dir)
    report = {"version": 3, "model": {"dataset": "omniglot", "normalized": True}}
    layout.write_version_report(version_dir, report)
    path = version_dir / layout.ASSETS_EXTRA_DIR / layout.REPORT_FILE
    assert json.loads(path.read_text()) == report
    assert layout.read_version_report(version_dir) == report


def test_update_report_writes_both_copies_of_the_versions_report(tmp_path):
    from dvml_tf.export import exporter

    export_dir = tmp_path / "E"
    versions = {}
    for version in (1, 2):
        versions[version] = _version(export_dir / layout.SAVED_MODEL_DIR, str(version))
        layout.write_version_report(versions[version], {"version": version, "model": {}})
    outer = export_dir / layout.REPORT_FILE
    outer.write_text(json.dumps({"version": 2, "model": {}, "files": {"x": "y"}}))
    assert layout.export_dir_of(versions[2]) == str(export_dir)
    assert layout.export_dir_of(versions[1]) is None  # E's report describes version 2
    assert layout.export_dir_of(_version(tmp_path, "9")) is None  # not inside E/saved_model
    written = exporter.update_report(versions[2], "matching", {"thresholds": {"0.9": 0.5}})
    assert len(written) == 2
    assert json.loads(outer.read_text()) == {"version": 2, "model": {}, "files": {"x": "y"},
                                             "matching": {"thresholds": {"0.9": 0.5}}}
    assert layout.read_version_report(versions[2])["matching"] == {"thresholds": {"0.9": 0.5}}
    # An older version: only its own copy (E's report is about another version).
    exporter.update_report(versions[1], "matching", {"thresholds": {}})
    assert layout.read_version_report(versions[1])["matching"] == {"thresholds": {}}
    assert json.loads(outer.read_text())["matching"] == {"thresholds": {"0.9": 0.5}}
    # Atomic writes: no temporary file is left next to either report.
    assert sorted(p.name for p in (versions[2] / layout.ASSETS_EXTRA_DIR).iterdir()) == [
        layout.REPORT_FILE]
    assert not [p for p in export_dir.iterdir() if p.name.startswith(".export_report")]
