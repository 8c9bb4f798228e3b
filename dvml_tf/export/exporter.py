"""`export_run`: a trained run -> everything a deployment needs, in one folder written atomically.

    E/
      saved_model/<version>/     TF Serving's layout (older versions in E are kept)
      model.tflite               LiteRT float32, raw uint8 image in, embedding out
      model_dynamic_range.tflite LiteRT, int8 weights
      model_int8.tflite          LiteRT full-integer, calibrated on raw training images
      retrieval.tflite           LiteRT retriever with the gallery embeddings baked in
      retrieval_gallery.json     labels (and class names) of the retriever's gallery rows
      export_report.json         what is where, input/output contracts, sizes, parity, R@1, latency

The new folder is assembled next to E and moved into place only when complete
(`utils.atomic.AtomicDirectory`), so an interrupted or failed export leaves E as it was.
"""

import dataclasses
import os
import platform
import shutil

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dvml_tf.export import litert
from dvml_tf.export import measure
from dvml_tf.export import raw_data
from dvml_tf.export import raw_input
from dvml_tf.export import retrieval
from dvml_tf.export import saved_model as saved_model_lib
from dvml_tf.training import run_loader
from dvml_tf.utils import atomic

SAVED_MODEL_DIR = "saved_model"
REPORT_FILE = "export_report.json"
# Parity bounds of the issue: per image, against the Keras model.
SAVED_MODEL_MIN_COSINE = 0.99999
LITERT_FLOAT_MIN_COSINE = 0.9999


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
        return os.path.join(self.export_dir, SAVED_MODEL_DIR, str(self.version))


def existing_versions(export_dir):
    """Numeric version folders under `<export_dir>/saved_model`, ascending.

    Args:
        export_dir: an export folder (may not exist).

    Returns:
        list of int.
    """
    base = os.path.join(export_dir, SAVED_MODEL_DIR)
    if not os.path.isdir(base):
        return []
    return sorted(
        int(name)
        for name in os.listdir(base)
        if name.isdigit() and os.path.isdir(os.path.join(base, name))
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
    if os.path.exists(export_dir):
        if not os.path.isdir(export_dir):
            raise ValueError(f"--export_dir {export_dir!r} is a file, not a folder.")
        entries = os.listdir(export_dir)
        is_export = SAVED_MODEL_DIR in entries or REPORT_FILE in entries
        if entries and not is_export:
            raise ValueError(
                f"--export_dir {export_dir!r} is a non-empty folder that is not a dvml_tf export "
                f"(no {SAVED_MODEL_DIR}/ or {REPORT_FILE}); the export replaces the folder as a "
                "whole, so choose a new or empty folder."
            )
    versions = existing_versions(export_dir)
    if version is None:
        return versions[-1] + 1 if versions else 1
    if int(version) != version or version < 1:
        raise ValueError(f"--version must be an integer >= 1; got {version!r}.")
    if version in versions and not overwrite:
        raise FileExistsError(
            f"{os.path.join(export_dir, SAVED_MODEL_DIR, str(version))} exists; pass --overwrite "
            f"to replace it, or omit --version to write version {versions[-1] + 1}."
        )
    return int(version)


def encode_png(image):
    """PNG bytes of a uint8 [H, W, 3] image (what `embed_bytes` accepts).

    Args:
        image: uint8 array [H, W, 3].

    Returns:
        bytes.
    """
    return tf.io.encode_png(image).numpy()


def _keras_embeddings(model, model_inputs):
    embed = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return np.concatenate(
        [embed(model_inputs[i : i + 256]).numpy() for i in range(0, len(model_inputs), 256)]
    )


def _litert_embeddings(path, catalog, indices, spec, normalize, chunk=1024):
    model = litert.LiteRTModel(path, normalize=normalize)
    out = []
    for start in range(0, len(indices), chunk):
        out.append(model(litert.litert_inputs(catalog, indices[start : start + chunk], spec)))
    return np.concatenate(out)


def _signature_contracts(spec, normalized, litert_written, top_k):
    height, width = spec.raw_size or (None, None)
    contracts = {
        "serving_default": {
            "inputs": {saved_model_lib.IMAGES_KEY: f"uint8 [None, {height}, {width}, 3]"},
            "outputs": {saved_model_lib.EMBEDDING_KEY: "float32 [None, D]"},
            "input_form": spec.describe(),
        },
        "embed_bytes": {
            "inputs": {saved_model_lib.IMAGE_BYTES_KEY: "string [None] (encoded JPEG/PNG/...)"},
            "outputs": {saved_model_lib.EMBEDDING_KEY: "float32 [None, D]"},
        },
        "embedding_normalized": bool(normalized),
    }
    if litert_written:
        h, w = spec.litert_input_size
        contracts["litert"] = {
            "input": f"uint8 [1, {h}, {w}, 3] (signature serving_default, input 'images')",
            "model.tflite": "float32 [1, D] 'embedding', as serving_default",
            "model_dynamic_range.tflite": "float32 [1, D] 'embedding', as serving_default",
            "model_int8.tflite": (
                "float32 [1, D] 'embedding' (dequantized) before L2 normalization"
                + ("; L2-normalize it" if normalized else "")
            ),
            "retrieval.tflite": (
                f"'indices' int32 [1, {top_k}] gallery rows, best first; 'scores' float32 "
                f"[1, {top_k}] {retrieval.score_name(normalized)}; rows described in "
                f"{retrieval.GALLERY_FILE}"
            ),
        }
        if spec.raw_size is None:
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
    parity_images=64,
    latency_runs=50,
    recall_max_images=20000,
    source=None,
):
    """Exports a trained model (see the module docstring for the layout).

    Args:
        model: a `DVMLModel`.
        config: its `TrainConfig`.
        export_dir: the export folder E.
        version: SavedModel version (default: next free integer).
        overwrite: replace an existing version folder.
        raw_splits: optional raw `DatasetSplits` (default: `raw_data.load_raw_splits`).
        data_dir: data location for `load_raw_splits`.
        litert_models: also write the LiteRT models (needs the data: calibration and gallery).
        gallery_split: "test" or "train", the retriever's gallery.
        top_k: results per retrieval query.
        calibration_images: raw training images for the int8 calibration (>= 1).
        parity_images: images of the parity checks.
        latency_runs: timed runs per latency figure.
        recall_max_images: cap (whole classes) on the gallery images used for the Recall@1
            comparison of the LiteRT models; None = all.
        source: where the weights came from (for the report).

    Returns:
        `ExportResult`.

    Raises:
        ValueError, FileExistsError: bad folder or version (nothing written).
        FileNotFoundError: LiteRT export without available data.
    """
    export_dir = os.path.abspath(os.fspath(export_dir))
    version = resolve_version(export_dir, version, overwrite)
    if gallery_split not in ("test", "train"):
        raise ValueError(f"gallery_split must be 'test' or 'train'; got {gallery_split!r}.")
    if calibration_images < 1:
        raise ValueError(f"calibration_images must be >= 1; got {calibration_images}.")
    if raw_splits is None:
        try:
            raw_splits = raw_data.load_raw_splits(config, data_dir)
        except FileNotFoundError as error:
            if litert_models:
                raise FileNotFoundError(
                    "The LiteRT export needs the dataset (int8 calibration images from the "
                    f"training split, the retrieval gallery): {error} Pass --data_dir, or "
                    "--skip_litert to export the SavedModel only."
                ) from error
            logging.warning("Dataset unavailable (%s); parity is measured on generated images.",
                            error)
    if litert_models:
        gallery_size = raw_splits.splits()[gallery_split].num_images
        if not 1 <= top_k <= gallery_size:
            raise ValueError(
                f"--top_k must be in [1, {gallery_size}] (the {gallery_split} split's size); "
                f"got {top_k}."
            )
    spec = raw_data.spec_for_splits(config, raw_splits)
    normalized = bool(model.normalize_embeddings)

    with atomic.AtomicDirectory(export_dir, overwrite=True) as tmp:
        for kept in existing_versions(export_dir):
            if kept != version:
                shutil.copytree(
                    os.path.join(export_dir, SAVED_MODEL_DIR, str(kept)),
                    os.path.join(tmp, SAVED_MODEL_DIR, str(kept)),
                )
        version_dir = os.path.join(tmp, SAVED_MODEL_DIR, str(version))
        saved_model_lib.write_saved_model(model, spec, version_dir)
        logging.info("Wrote the SavedModel (version %d).", version)

        files = {"saved_model": f"{SAVED_MODEL_DIR}/{version}"}
        gallery = None
        if litert_models:
            gallery = _write_litert(model, config, spec, raw_splits, tmp, gallery_split, top_k,
                                    calibration_images, files)
        report = {
            "version": version,
            "files": files,
            "signatures": _signature_contracts(spec, normalized, litert_models, top_k),
            "raw_input": spec.to_dict(),
            "model": {
                "source": source,
                "dataset": config.dataset,
                "backbone": config.backbone,
                "loss": config.loss,
                "dvml": config.dvml,
                "embedding_dim": config.embedding_dim,
                "normalized": normalized,
            },
            "environment": {
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
            },
        }
        report.update(
            _measure(model, spec, raw_splits, tmp, version_dir, gallery, gallery_split,
                     parity_images, latency_runs, recall_max_images, litert_models)
        )
        atomic.write_json(os.path.join(tmp, REPORT_FILE), report)
    logging.info("Export complete: %s", export_dir)
    return ExportResult(export_dir, version, report)


def _write_litert(model, config, spec, raw_splits, folder, gallery_split, top_k, num_calibration,
                  files):
    """Writes the LiteRT models and the gallery sidecar; returns the gallery (embeddings, labels,
    catalog)."""
    for quantization in (litert.FLOAT32, litert.DYNAMIC_RANGE):
        content = litert.convert_embedding_model(model, spec, quantization)
        with open(os.path.join(folder, litert.FILE_NAMES[quantization]), "wb") as f:
            f.write(content)
    calibration = litert.calibration_images(
        raw_splits.train,
        spec,
        num_calibration,
        classes_per_batch=config.classes_per_batch,
        images_per_class=config.images_per_class,
        seed=config.seed,
    )
    content = litert.convert_embedding_model(model, spec, litert.INT8, calibration)
    with open(os.path.join(folder, litert.FILE_NAMES[litert.INT8]), "wb") as f:
        f.write(content)
    logging.info("Wrote the LiteRT models (int8 calibrated on %d training images).",
                 len(calibration))

    catalog = raw_splits.splits()[gallery_split]
    embedder = saved_model_lib.EmbeddingModel(model)
    embeddings, labels = raw_data.embed_catalog(embedder, catalog, spec)
    content = retrieval.convert_retrieval_model(
        model, spec, embeddings, top_k, gallery_labels=labels
    )
    with open(os.path.join(folder, retrieval.RETRIEVAL_FILE), "wb") as f:
        f.write(content)
    retrieval.write_gallery_json(
        os.path.join(folder, retrieval.GALLERY_FILE),
        labels,
        catalog=catalog,
        split=gallery_split,
        dataset=config.dataset,
        top_k=top_k,
        normalized=embedder.normalize,
    )
    files.update({q: litert.FILE_NAMES[q] for q in litert.QUANTIZATIONS})
    files["retrieval"] = retrieval.RETRIEVAL_FILE
    files["retrieval_gallery"] = retrieval.GALLERY_FILE
    files["int8_calibration_images"] = len(calibration)
    return embeddings, labels, catalog


def _measure(model, spec, raw_splits, folder, version_dir, gallery, gallery_split, parity_images,
             latency_runs, recall_max_images, litert_written):
    """Sizes, parity with Keras, Recall@1 of the LiteRT models and per-image latency."""
    normalized = bool(model.normalize_embeddings)
    if raw_splits is not None:
        catalog = raw_splits.splits()[gallery_split]
        count = min(parity_images, catalog.num_images)
        indices = np.unique(np.linspace(0, catalog.num_images - 1, count).astype(np.int64))
        images = litert.litert_inputs(catalog, indices, spec)
        parity_source = f"{len(images)} images of the {gallery_split} split"
    else:
        images = raw_data.synthetic_raw_images(spec, parity_images)
        parity_source = f"{len(images)} generated images"
    model_inputs = raw_input.to_model_input(tf.constant(images), spec)
    reference = _keras_embeddings(model, model_inputs)

    loaded = tf.saved_model.load(version_dir)
    serve = loaded.signatures[saved_model_lib.SERVING_DEFAULT]
    embed_bytes = loaded.signatures[saved_model_lib.EMBED_BYTES]
    served = serve(images=tf.constant(images))[saved_model_lib.EMBEDDING_KEY].numpy()
    encoded = tf.constant([encode_png(image) for image in images])
    from_bytes = embed_bytes(image_bytes=encoded)[saved_model_lib.EMBEDDING_KEY].numpy()
    parity = {
        "images": parity_source,
        "saved_model_serving_default": measure.parity(reference, served),
        "saved_model_embed_bytes_png": measure.parity(reference, from_bytes),
    }
    sizes = {"saved_model": measure.path_size(version_dir)}
    one = images[:1]
    latency = {
        "keras_tf_function_preprocessed_input": measure.median_latency_ms(
            _keras_latency_fn(model, model_inputs[:1]), latency_runs
        ),
        "saved_model_serving_default": measure.median_latency_ms(
            lambda: serve(images=tf.constant(one))[saved_model_lib.EMBEDDING_KEY].numpy(),
            latency_runs,
        ),
        "saved_model_embed_bytes_png": measure.median_latency_ms(
            lambda: embed_bytes(image_bytes=encoded[:1])[saved_model_lib.EMBEDDING_KEY].numpy(),
            latency_runs,
        ),
    }
    recall = None
    if litert_written:
        for quantization in litert.QUANTIZATIONS:
            path = os.path.join(folder, litert.FILE_NAMES[quantization])
            sizes[litert.FILE_NAMES[quantization]] = measure.path_size(path)
            runner = litert.LiteRTModel(path, normalize=normalized and quantization == litert.INT8)
            parity[f"litert_{quantization}"] = measure.parity(reference, runner(images))
            latency[f"litert_{quantization}"] = runner.latency_ms(one, runs=latency_runs)
        path = os.path.join(folder, retrieval.RETRIEVAL_FILE)
        sizes[retrieval.RETRIEVAL_FILE] = measure.path_size(path)
        sizes[retrieval.GALLERY_FILE] = measure.path_size(
            os.path.join(folder, retrieval.GALLERY_FILE)
        )
        latency["litert_retrieval"] = retrieval.Retriever(path).latency_ms(one, runs=latency_runs)
        recall = _recall(folder, spec, gallery, normalized, recall_max_images)
    report = {
        "sizes_bytes": sizes,
        "parity_vs_keras": parity,
        "parity_bounds": {
            "saved_model_cosine_min": SAVED_MODEL_MIN_COSINE,
            "litert_float32_cosine_min": LITERT_FLOAT_MIN_COSINE,
        },
        "latency_ms_per_image": latency,
        "latency_setup": (
            f"batch 1, median of {latency_runs} runs after 5 warm-up runs, "
            f"{os.cpu_count()} CPU cores, LiteRT default threads (XNNPACK)"
        ),
    }
    if recall is not None:
        report["recall_at_1"] = recall
    report["checks"] = _checks(parity, recall)
    for name, ok in report["checks"].items():
        if not ok:
            logging.warning("Export check failed: %s (see %s).", name, REPORT_FILE)
    return report


def _checks(parity, recall):
    """The issue's acceptance bounds, evaluated on this export's figures."""
    checks = {
        "saved_model_cosine_min>=0.99999": all(
            parity[key]["cosine_min"] >= SAVED_MODEL_MIN_COSINE
            for key in ("saved_model_serving_default", "saved_model_embed_bytes_png")
        ),
    }
    if "litert_float32" in parity:
        checks["litert_float32_cosine_min>=0.9999"] = (
            parity["litert_float32"]["cosine_min"] >= LITERT_FLOAT_MIN_COSINE
        )
    if recall is not None:
        checks["int8_recall_at_1_within_1_point_of_float32"] = (
            abs(recall["int8_minus_float32_points"]) <= 1.0
        )
    return checks


def _keras_latency_fn(model, model_input):
    embed = tf.function(lambda x: model(x, training=False))
    return lambda: embed(model_input).numpy()


def _recall(folder, spec, gallery, normalized, max_images):
    """Recall@1 of Keras and of every LiteRT embedding model on the gallery split."""
    embeddings, labels, catalog = gallery
    indices = raw_data.whole_classes(labels, max_images)
    result = {
        "split": catalog.name,
        "num_images": len(indices),
        "num_classes": len(np.unique(labels[indices])),
        "keras": measure.recall_at_1(embeddings[indices], labels[indices], normalized),
    }
    for quantization in litert.QUANTIZATIONS:
        path = os.path.join(folder, litert.FILE_NAMES[quantization])
        normalize = normalized and quantization == litert.INT8
        litert_embeddings = _litert_embeddings(path, catalog, indices, spec, normalize)
        result[f"litert_{quantization}"] = measure.recall_at_1(
            litert_embeddings, labels[indices], normalized
        )
    result["int8_minus_float32_points"] = 100.0 * (
        result[f"litert_{litert.INT8}"] - result[f"litert_{litert.FLOAT32}"]
    )
    return result


def export_run(model_dir, export_dir, **kwargs):
    """Loads a trained run (`run_loader.load_run`) and exports it (`export_model`).

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
    run = run_loader.load_run(model_dir)
    return export_model(run.model, run.config, export_dir, source=run.source, **kwargs)
