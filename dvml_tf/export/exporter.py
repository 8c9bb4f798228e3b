"""`export_run`: a trained run -> the artifacts a deployment needs and their contracts.

    E/
      saved_model/<version>/     TF Serving's layout (older versions in E are kept)
        assets.extra/export_report.json   the report of this export, inside the SavedModel
        assets.extra/tf_serving_warmup_requests   requests TF Serving replays at load time
      model.tflite               LiteRT float32, raw uint8 image in, embedding out
      model_dynamic_range.tflite LiteRT, int8 weights
      model_int8.tflite          LiteRT full-integer, calibrated on raw training images
      retrieval.tflite           LiteRT retriever with the gallery embeddings baked in
      retrieval_gallery.json     labels (and class names) of the retriever's gallery rows
      export_report.json         what is where: files, input/output contracts, sizes, the model

Every artifact is a conversion of one inference model (`inference.inference_model`: the
raw-form preprocessing layer, then the model's embedder). Exporting writes; it does not grade:
parity with Keras, Recall@1 of the LiteRT models and latency are `verify.verify_export`
(`export.py --verify`, the tests, `benchmarks/export_latency.py`).

Writing is safe for what E already holds: everything is assembled in a hidden staging folder
inside E and moved into place (each file by an atomic rename, the report last) only when
complete; files of E that the export does not write are never touched. Exports into one E take
turns (a lock file), so concurrent exports land as distinct versions. A staging folder left by
a killed export is reported and removed by the next export.

Artifacts of an earlier export that this one does not rewrite (the LiteRT models after a
re-export with `--skip_litert`, an older `verification.json`) stay in E, and the report says so:
`files_from_earlier_exports` maps each such file to its role and the version of the export that
wrote it (whose report is `saved_model/<version>/assets.extra/export_report.json`).
"""

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import socket
import tempfile
import time

import keras
import tensorflow as tf
from absl import logging

from dvml_tf import task
from dvml_tf.data import pixel_limit
from dvml_tf.export import fingerprint
from dvml_tf.export import inference as inference_lib
from dvml_tf.export import layout
from dvml_tf.export import litert
from dvml_tf.export import retrieval
from dvml_tf.export import saved_model as saved_model_lib
from dvml_tf.export import warmup
from dvml_tf.utils import atomic
from dvml_tf.utils import locks
from dvml_tf.utils import write_errors

LOCK_FILE = ".export.lock"
STAGING_PREFIX = ".export-staging-"
_OWNER_FILE = "owner.json"


@dataclasses.dataclass
class ExportResult:
    """What `export_model` wrote.

    Args:
        export_dir: the export folder.
        version: the SavedModel version written.
        report: the content of export_report.json.
    """

    export_dir: str
    version: int
    report: dict

    @property
    def saved_model_dir(self):
        return os.path.join(self.export_dir, layout.SAVED_MODEL_DIR, str(self.version))


def check_export_dir(export_dir):
    """Refuses an export folder that is a file, or a non-empty folder that is not an export.

    Raises:
        ValueError: with the reason.
    """
    if not os.path.exists(export_dir):
        return
    if not os.path.isdir(export_dir):
        raise ValueError(f"--export_dir {export_dir!r} is a file, not a folder.")
    entries = [e for e in os.listdir(export_dir) if not e.startswith(".")]
    if entries and layout.SAVED_MODEL_DIR not in entries and layout.REPORT_FILE not in entries:
        raise ValueError(
            f"--export_dir {export_dir!r} is a non-empty folder that is not a dvml_tf export (no "
            f"{layout.SAVED_MODEL_DIR}/ or {layout.REPORT_FILE}); choose a new or empty folder."
        )


def resolve_version(export_dir, version=None, overwrite=False):
    """Checks the export folder and picks the version to write.

    Args:
        export_dir: the export folder.
        version: int >= 1, or None for 1 / one more than the highest existing version.
        overwrite: allow replacing an existing version folder.

    Returns:
        int, the version.

    Raises:
        ValueError: `export_dir` is a file, or a non-empty folder that is not an export.
        FileExistsError: the version exists and `overwrite` is False.
    """
    check_export_dir(export_dir)
    versions = layout.existing_versions(os.path.join(export_dir, layout.SAVED_MODEL_DIR))
    if version is None:
        return versions[-1] + 1 if versions else 1
    if isinstance(version, bool) or int(version) != version or version < 1:
        raise ValueError(f"--version must be an integer >= 1; got {version!r}.")
    if version in versions and not overwrite:
        raise FileExistsError(
            f"{os.path.join(export_dir, layout.SAVED_MODEL_DIR, str(version))} exists; pass "
            f"--overwrite to replace it, or omit --version to write version {versions[-1] + 1}."
        )
    return int(version)


def _export_lock(export_dir):
    """E's lock (a context manager): exports into one folder take turns. The kernel releases it
    when its process dies, so a killed export never blocks the next; the last holder removes
    the lock file."""
    return locks.FileLock(
        os.path.join(export_dir, LOCK_FILE), timeout=None, what="the export's lock file",
        waiting=f"Another export is writing into {export_dir}; waiting for it to finish.")


def update_report(version_dir, key, value):
    """Sets one top-level entry of an export's report, e.g. the matching thresholds of
    `evaluate.py --calibrate`: in the report inside the version folder and, when E's
    export_report.json describes that version, there too. Each write is atomic and happens
    under E's export lock, so a concurrent export never interleaves with it.

    Args:
        version_dir: a SavedModel version folder written by export_model.
        key: str.
        value: JSON data.

    Returns:
        list of the report files written.
    """
    export_dir = layout.export_dir_of(version_dir)
    lock = _export_lock(export_dir) if export_dir else contextlib.nullcontext()
    with lock:
        report = layout.read_version_report(version_dir)
        report[key] = value
        reports = {os.path.join(version_dir, layout.ASSETS_EXTRA_DIR, layout.REPORT_FILE): report}
        if export_dir and layout.export_dir_of(version_dir) == export_dir:
            path = os.path.join(export_dir, layout.REPORT_FILE)
            with open(path) as f:
                outer = json.load(f)
            outer[key] = value
            reports[path] = outer
        # Together: a full disk leaves both copies as they were, never one of them updated.
        atomic.write_json_files(reports)
    return list(reports)


def _process_alive(pid, host):
    if host != socket.gethostname():
        return True  # another machine's export: not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(export_dir):
    """Removes staging folders of exports that were killed (their process is gone).

    Only folders with this module's staging prefix and owner file are considered; anything else
    in E is left alone.

    Args:
        export_dir: the export folder (its lock must be held).

    Returns:
        list of removed paths.
    """
    removed = []
    for name in sorted(os.listdir(export_dir)):
        path = os.path.join(export_dir, name)
        owner_path = os.path.join(path, _OWNER_FILE)
        if not name.startswith(STAGING_PREFIX) or not os.path.isfile(owner_path):
            continue
        try:
            with open(owner_path) as f:
                owner = json.load(f)
            alive = _process_alive(int(owner["pid"]), owner["host"])
        except (ValueError, KeyError, TypeError, OSError):
            continue
        if not alive:
            logging.warning("Removing %s, left by an export (pid %s, started %s) that was "
                            "interrupted.", path, owner["pid"], owner.get("started"))
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def earlier_artifacts(export_dir, written):
    """The artifact files in E written by earlier exports and not by this one.

    Read from E's current export_report.json (its `files` and its own
    `files_from_earlier_exports`), plus verification.json (its `saved_model_version`).

    Args:
        export_dir: the export folder.
        written: the file names this export writes.

    Returns:
        dict file name -> {"role": ..., "version": int or None}, for the files that exist.
    """
    earlier = {}
    report_path = os.path.join(export_dir, layout.REPORT_FILE)
    try:
        with open(report_path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        previous = {}
    if isinstance(previous, dict):
        for name, info in (previous.get("files_from_earlier_exports") or {}).items():
            if isinstance(info, dict):
                earlier[name] = {"role": info.get("role"), "version": info.get("version")}
        for role, path in (previous.get("files") or {}).items():
            if role != "saved_model" and isinstance(path, str):
                earlier[path] = {"role": role, "version": previous.get("version")}
    verification = os.path.join(export_dir, layout.VERIFICATION_FILE)
    if os.path.isfile(verification):
        try:
            with open(verification) as f:
                version = json.load(f).get("saved_model_version")
        except (OSError, ValueError, AttributeError):
            version = None
        earlier[layout.VERIFICATION_FILE] = {"role": "verification", "version": version}
    return {name: info for name, info in sorted(earlier.items())
            if name not in written and os.path.isfile(os.path.join(export_dir, name))}


def _signature_contracts(model, raw_form, preprocess, litert_written, top_k, max_pixels):
    height, width = raw_form.raw_size or (None, None)
    normalized = bool(model.normalize_embeddings)
    dim = model.embedding_dim
    contracts = {
        "serving_default": {
            "inputs": {saved_model_lib.IMAGES_KEY: f"uint8 [None, {height}, {width}, 3]"},
            "outputs": {saved_model_lib.EMBEDDING_KEY: f"float32 [None, {dim}]"},
            "input_form": raw_form.describe(),
        },
        "embed_bytes": {
            "inputs": {saved_model_lib.IMAGE_BYTES_KEY: "string [None] (encoded JPEG/PNG/...)"},
            "outputs": {saved_model_lib.EMBEDDING_KEY: f"float32 [None, {dim}]"},
            # Larger images (width x height, from the header) fail the request unread.
            "max_image_pixels": max_pixels,
        },
        "embedding_normalized": normalized,
    }
    if litert_written:
        h, w = raw_form.fixed_size(preprocess)
        contracts["litert"] = {
            "input": f"uint8 [1, {h}, {w}, 3] (signature serving_default, input 'images')",
            "model.tflite": f"float32 [1, {dim}] 'embedding', as serving_default",
            "model_dynamic_range.tflite": f"float32 [1, {dim}] 'embedding', as serving_default",
            "model_int8.tflite": (
                f"float32 [1, {dim}] 'embedding' (dequantized) before L2 normalization"
                + ("; L2-normalize it" if normalized else "")
            ),
            "retrieval.tflite": (
                f"'indices' int32 [1, {top_k}] gallery rows, best first; 'scores' float32 "
                f"[1, {top_k}] {retrieval.score_name(normalized)}; 'labels' int32 [1, {top_k}]; "
                f"rows described in {retrieval.GALLERY_FILE}"
            ),
        }
        if raw_form.raw_size is None:
            contracts["litert"]["note"] = (
                f"photos are first resized to {h}x{w} (bilinear, antialiased, as the loader does)"
            )
    return contracts


def export_model(
    model,
    config,
    export_dir,
    *,
    version=None,
    overwrite=False,
    raw_splits=None,
    data_dir=None,
    litert_models=True,
    gallery_split="test",
    top_k=10,
    calibration_images=200,
    source=None,
    max_image_pixels=None,
):
    """Exports a trained model (see the module docstring for the layout).

    Args:
        model: a `DVMLModel`.
        config: its `TrainConfig`.
        export_dir: the export folder E.
        version: SavedModel version (default: next free integer).
        overwrite: replace an existing version folder.
        raw_splits: optional raw `DatasetSplits` (default: `task.load_splits(config, raw=True)`).
        data_dir: data location for loading the raw splits.
        litert_models: also write the LiteRT models (needs the data: calibration and gallery).
        gallery_split: "test" or "train", the retriever's gallery.
        top_k: results per retrieval query.
        calibration_images: raw training images for the int8 calibration (>= 1).
        source: where the weights came from (for the report).
        max_image_pixels: `embed_bytes` refuses larger images (width x height) before decoding
            them; default: the run's `config.max_image_pixels`.

    Returns:
        `ExportResult`.

    Raises:
        ValueError, FileExistsError: bad folder or version (nothing written).
        FileNotFoundError: LiteRT export without available data.
    """
    export_dir = os.path.abspath(os.fspath(export_dir))
    resolve_version(export_dir, version, overwrite)  # fail before any work
    if gallery_split not in ("test", "train"):
        raise ValueError(f"gallery_split must be 'test' or 'train'; got {gallery_split!r}.")
    if calibration_images < 1:
        raise ValueError(f"calibration_images must be >= 1; got {calibration_images}.")
    max_image_pixels = pixel_limit.check_max_pixels(
        config.max_image_pixels if max_image_pixels is None else max_image_pixels)
    if raw_splits is None:
        try:
            raw_splits = task.load_splits(config, raw=True, data_dir=data_dir)
        except FileNotFoundError as error:
            if litert_models:
                raise FileNotFoundError(
                    "The LiteRT export needs the dataset (int8 calibration images from the "
                    f"training split, the retrieval gallery): {error} Pass --data_dir, or "
                    "--skip_litert to export the SavedModel only."
                ) from error
            logging.warning("Dataset unavailable (%s); the export's input form follows the "
                            "loader's rule for the dataset.", error)
    elif not raw_splits.raw:
        raise ValueError(f"raw_splits of {raw_splits.name!r} hold converted images; pass raw "
                         "ones: task.load_splits(config, raw=True).")
    if litert_models:
        gallery_size = raw_splits.splits()[gallery_split].num_images
        if not 1 <= top_k <= gallery_size:
            raise ValueError(
                f"--top_k must be in [1, {gallery_size}] (the {gallery_split} split's size); "
                f"got {top_k}."
            )
    raw_form = task.raw_form(config, raw_splits)
    preprocess = task.preprocess_config(config)

    with _export_lock(export_dir):
        remove_stale_staging(export_dir)
        # Chosen under the lock: a concurrent export got the previous number.
        version = resolve_version(export_dir, version, overwrite)
        with write_errors.reported(export_dir, f"the export (version {version})",
                                   kept="What the folder held before is intact.", replace=True):
            staging = tempfile.mkdtemp(dir=export_dir, prefix=STAGING_PREFIX)
            try:
                atomic.write_json(os.path.join(staging, _OWNER_FILE), {
                    "pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")})
                report = _write_artifacts(model, config, raw_form, preprocess, raw_splits,
                                          staging, version, litert_models, gallery_split, top_k,
                                          calibration_images, source, export_dir,
                                          max_image_pixels)
                _move_into_place(staging, export_dir, version, report)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    logging.info("Export complete: %s (version %d)", export_dir, version)
    return ExportResult(export_dir, version, report)


def _write_artifacts(model, config, raw_form, preprocess, raw_splits, staging, version,
                     litert_models, gallery_split, top_k, calibration_images, source,
                     export_dir, max_pixels):
    """Writes every artifact into `staging` (same names as in E); returns the report."""
    version_dir = os.path.join(staging, layout.SAVED_MODEL_DIR, str(version))
    saved_model_lib.write_saved_model(model, raw_form, preprocess, version_dir, max_pixels)
    images, images_source = warmup.warmup_images(raw_form, preprocess, raw_splits)
    warmup_record = warmup.write_warmup_requests(version_dir, images)
    if warmup_record["file"]:
        warmup_record["images"] = images_source
    logging.info("Wrote the SavedModel (version %d).", version)
    files = {"saved_model": f"{layout.SAVED_MODEL_DIR}/{version}"}
    if litert_models:
        _write_litert(model, config, raw_form, preprocess, raw_splits, staging, gallery_split,
                      top_k, calibration_images, files)
    report = {
        "version": version,
        "files": files,
        "signatures": _signature_contracts(model, raw_form, preprocess, litert_models, top_k,
                                           max_pixels),
        "raw_input": {"raw_form": raw_form.to_dict(),
                      "preprocess": dataclasses.asdict(preprocess)},
        "model": {
            "source": source,
            "dataset": config.dataset,
            "backbone": config.backbone,
            "loss": config.loss,
            "dvml": config.dvml,
            "embedding_dim": config.embedding_dim,
            "normalized": bool(model.normalize_embeddings),
            # The digest of the SavedModel's variables: with the raw input and the output, what
            # the fingerprint of an index's contract covers (dvml_tf.index.contract).
            "weights": fingerprint.weights_digest(version_dir),
            # Which training classes the run held out: evaluate.py --calibrate picks matching
            # thresholds on them (never on the test classes).
            "validation_classes": config.validation_classes,
            "seed": config.seed,
        },
        "warmup": warmup_record,
        "environment": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "sizes_bytes": {
            name: _path_size(os.path.join(staging, path))
            for name, path in files.items() if isinstance(path, str)
        },
    }
    written = {path for path in files.values() if isinstance(path, str)}
    earlier = earlier_artifacts(export_dir, written)
    if earlier:
        report["files_from_earlier_exports"] = earlier
        logging.warning("%s keeps files of earlier exports that this one does not rewrite: %s "
                        "(export_report.json lists them under files_from_earlier_exports).",
                        export_dir, ", ".join(f"{name} (version {info['version']})"
                                              for name, info in earlier.items()))
    layout.write_version_report(version_dir, report)
    return report


def _write_litert(model, config, raw_form, preprocess, raw_splits, folder, gallery_split, top_k,
                  num_calibration, files):
    """Writes the LiteRT models and the gallery sidecar."""
    for quantization in (litert.FLOAT32, litert.DYNAMIC_RANGE):
        content = litert.convert_embedding_model(model, raw_form, preprocess, quantization)
        atomic.write_bytes(os.path.join(folder, litert.FILE_NAMES[quantization]), content)
    calibration = litert.int8_calibration_images(
        raw_splits.train, raw_form, preprocess, num_calibration,
        classes_per_batch=config.classes_per_batch, images_per_class=config.images_per_class,
        seed=config.seed,
    )
    content = litert.convert_embedding_model(model, raw_form, preprocess, litert.INT8,
                                             calibration)
    atomic.write_bytes(os.path.join(folder, litert.FILE_NAMES[litert.INT8]), content)
    logging.info("Wrote the LiteRT models (int8 calibrated on %d training images).",
                 len(calibration))

    catalog = raw_splits.splits()[gallery_split]
    inference = inference_lib.inference_model(model, raw_form, preprocess)
    embeddings, labels = inference_lib.embed_raw(inference, catalog)
    content = retrieval.convert_retrieval_model(model, raw_form, preprocess, embeddings, top_k,
                                                gallery_labels=labels)
    atomic.write_bytes(os.path.join(folder, retrieval.RETRIEVAL_FILE), content)
    retrieval.write_gallery_json(
        os.path.join(folder, retrieval.GALLERY_FILE), labels, catalog=catalog,
        split=gallery_split, dataset=config.dataset, top_k=top_k,
        normalized=bool(model.normalize_embeddings),
    )
    files.update({q: litert.FILE_NAMES[q] for q in litert.QUANTIZATIONS})
    files["retrieval"] = retrieval.RETRIEVAL_FILE
    files["retrieval_gallery"] = retrieval.GALLERY_FILE
    files["int8_calibration_images"] = len(calibration)


def _move_into_place(staging, export_dir, version, report):
    """Moves the staged artifacts into E: the version folder, then each file, the report last.

    Each step is one rename on one filesystem; an existing version folder (--overwrite) is
    moved aside first and removed only once the new one is in place. The report is written into
    the staging folder first: renames need no space, so a full disk fails before E changes.
    """
    staged_report = atomic.write_json(os.path.join(staging, layout.REPORT_FILE), report)
    base = os.path.join(export_dir, layout.SAVED_MODEL_DIR)
    os.makedirs(base, exist_ok=True)
    target = os.path.join(base, str(version))
    replaced = None
    if os.path.exists(target):
        replaced = os.path.join(staging, "replaced_version")
        os.replace(target, replaced)
    os.replace(os.path.join(staging, layout.SAVED_MODEL_DIR, str(version)), target)
    for name, path in report["files"].items():
        if name != "saved_model" and isinstance(path, str):
            os.replace(os.path.join(staging, path), os.path.join(export_dir, path))
    os.replace(staged_report, os.path.join(export_dir, layout.REPORT_FILE))
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _path_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def export_run(model_dir, export_dir, **kwargs):
    """Loads a trained run (`task.load_run`) and exports it (`export_model`).

    Args:
        model_dir: the run folder written by train.py.
        export_dir: the export folder.
        **kwargs: forwarded to `export_model`.

    Returns:
        `ExportResult`.
    """
    # Fail on the folder before spending time on loading.
    resolve_version(os.path.abspath(os.fspath(export_dir)), kwargs.get("version"),
                    kwargs.get("overwrite", False))
    run = task.load_run(model_dir)
    return export_model(run.model, run.config, export_dir, source=run.source, **kwargs)
