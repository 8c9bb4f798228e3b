"""The export folder's layout, and finding SavedModel versions in it (one rule for the exporter,
`evaluate.py`, the index and the test servers).

    E/
      saved_model/<version>/               TF Serving's layout (older versions are kept)
        assets.extra/export_report.json    a copy of the report of the export that wrote it
      model.tflite, model_dynamic_range.tflite, model_int8.tflite, retrieval.tflite
      retrieval_gallery.json               what each row of retrieval.tflite's gallery is
      export_report.json                   contracts, files, sizes, the model, the environment
      verification.json                    (export.py --verify) parity and Recall@1 checks
"""

import json
import os

from dvml_tf.utils import atomic

SAVED_MODEL_DIR = "saved_model"
REPORT_FILE = "export_report.json"
VERIFICATION_FILE = "verification.json"
# TF Serving reads extra files of a version from here (e.g. warm-up requests); so do we.
ASSETS_EXTRA_DIR = "assets.extra"


def existing_versions(base):
    """Numeric SavedModel version folders (holding saved_model.pb) under a base path, ascending.

    Args:
        base: a SavedModel base path (`E/saved_model`); may not exist.

    Returns:
        list of int.
    """
    if not os.path.isdir(base):
        return []
    return sorted(
        int(name) for name in os.listdir(base)
        if name.isdigit() and os.path.isfile(os.path.join(base, name, "saved_model.pb"))
    )


def resolve_saved_model(path):
    """A SavedModel version folder from what a user passes.

    Args:
        path: a version folder (holding saved_model.pb), a base path of version folders
            (`E/saved_model`: its highest version), or an export folder E (its highest version).

    Returns:
        `(version_dir, version)`; version is None when `path` is a bare SavedModel folder whose
        name is not a number.

    Raises:
        FileNotFoundError: no SavedModel there.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        name = os.path.basename(os.path.normpath(path))
        return path, int(name) if name.isdigit() else None
    for base in (path, os.path.join(path, SAVED_MODEL_DIR)):
        versions = existing_versions(base)
        if versions:
            return os.path.join(base, str(versions[-1])), versions[-1]
    raise FileNotFoundError(
        f"{path} is neither a SavedModel (no saved_model.pb) nor a folder of numeric version "
        f"folders (export.py writes EXPORT_DIR/{SAVED_MODEL_DIR}/<version>/)."
    )


def write_version_report(version_dir, report):
    """Stores the export report inside a SavedModel version folder (TF Serving ignores it), so
    that the SavedModel carries its contract wherever it is copied.

    Args:
        version_dir: a version folder.
        report: dict (written atomically: a reader sees the old or the new report).
    """
    atomic.write_json(os.path.join(version_dir, ASSETS_EXTRA_DIR, REPORT_FILE), report)


def read_version_report(version_dir):
    """The export report stored inside a SavedModel version folder.

    Args:
        version_dir: a version folder written by export.py.

    Returns:
        dict.

    Raises:
        FileNotFoundError: a SavedModel without the report (not written by this project's
            export.py, or by an older version of it).
    """
    path = os.path.join(version_dir, ASSETS_EXTRA_DIR, REPORT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {version_dir} was not written by dvml_tf's export.py (or by an "
            "older version of it); export the run again."
        )
    with open(path) as f:
        return json.load(f)


def export_dir_of(version_dir):
    """The export folder E of a version folder `E/saved_model/<v>`, when E's own report
    describes that version (so that a change to the version's report belongs in both).

    Args:
        version_dir: a SavedModel version folder.

    Returns:
        str or None.
    """
    version_dir = os.path.abspath(os.fspath(version_dir))
    base, name = os.path.split(version_dir)
    if os.path.basename(base) != SAVED_MODEL_DIR or not name.isdigit():
        return None
    export_dir = os.path.dirname(base)
    try:
        with open(os.path.join(export_dir, REPORT_FILE)) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(report, dict) and report.get("version") == int(name):
        return export_dir
    return None


def max_image_pixels(report):
    """The pixel limit an export's `embed_bytes` enforces (exports older than the limit: the
    default, which their graph does not enforce).

    Args:
        report: an export report (`read_version_report`).

    Returns:
        int.
    """
    from dvml_tf.data import pixel_limit  # the data layer loads TensorFlow

    embed_bytes = (report.get("signatures") or {}).get("embed_bytes") or {}
    return int(embed_bytes.get("max_image_pixels") or pixel_limit.DEFAULT_MAX_PIXELS)
