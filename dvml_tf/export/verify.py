"""Grading an export against the Keras model it came from: embedding parity of every artifact,
Recall@1 of the LiteRT models on the gallery split, and latency.

    figures = verify_export(export_dir, model, config, raw_splits)   # export.py --verify

Kept apart from the exporter (which only writes), like Model Garden's export libraries: the
tests, `export.py --verify` and `benchmarks/export_latency.py` call it.
"""

import os
import time

import numpy as np
import tensorflow as tf

from dvml_tf import data as data_lib
from dvml_tf import models
from dvml_tf import task
from dvml_tf.evaluation import metrics as metrics_lib
from dvml_tf.evaluation import runner
from dvml_tf.export import inference as inference_lib
from dvml_tf.export import layout
from dvml_tf.export import litert
from dvml_tf.export import retrieval
from dvml_tf.export import saved_model as saved_model_lib

# Per image, against the Keras model.
SAVED_MODEL_MIN_COSINE = 0.99999
LITERT_FLOAT_MIN_COSINE = 0.9999
# Points of Recall@1 the full-integer model may lose against float32.
INT8_MAX_RECALL_LOSS_POINTS = 1.0


def cosine_rows(a, b):
    """Cosine similarity of each row of `a` with the same row of `b`.

    Args:
        a: float array [N, D].
        b: float array [N, D].

    Returns:
        float64 array [N].
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Shapes differ: {a.shape} vs {b.shape}.")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)


def parity(reference, candidate):
    """Summary of per-image agreement with a reference.

    Args:
        reference: float array [N, D] (the Keras embeddings).
        candidate: float array [N, D].

    Returns:
        dict: `cosine_min`, `cosine_mean`, `max_abs_diff`, `num_images`.
    """
    cosines = cosine_rows(reference, candidate)
    return {
        "cosine_min": float(cosines.min()),
        "cosine_mean": float(cosines.mean()),
        "max_abs_diff": float(np.max(np.abs(np.asarray(reference) - np.asarray(candidate)))),
        "num_images": len(cosines),
    }


def recall_at_1(embeddings, labels, normalized):
    """Recall@1 of a split against itself (each query excluded), as `evaluate.py` computes it.

    Args:
        embeddings: float array [N, D].
        labels: int array [N].
        normalized: cosine distance (the model L2-normalizes) or Euclidean.

    Returns:
        float in [0, 1].
    """
    result = metrics_lib.evaluate_embeddings(
        embeddings, labels, recall_ks=(1,), metric=runner.distance_metric(normalized),
        compute_clustering=False, compute_map=False,
    )
    return result["recall@1"]


def median_latency_ms(fn, runs=50, warmup=5):
    """Median wall time of `fn()` in milliseconds, after `warmup` untimed calls.

    Args:
        fn: callable without arguments (it must block until its result exists).
        runs: timed calls (>= 1).
        warmup: untimed calls first.

    Returns:
        float.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1; got {runs}.")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def whole_classes(labels, max_images):
    """Indices of the first classes (in label order) whose images fit in `max_images`.

    Args:
        labels: int labels.
        max_images: cap; None or a cap above len(labels) returns every index.

    Returns:
        np.int64 indices in catalog order.
    """
    labels = np.asarray(labels)
    if max_images is None or len(labels) <= max_images:
        return np.arange(len(labels), dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    keep = classes[np.cumsum(counts) <= max_images]
    if len(keep) < 2:
        keep = classes[:2]
    return np.flatnonzero(np.isin(labels, keep)).astype(np.int64)


def encode_png(image):
    """PNG bytes of a uint8 [H, W, 3] image (what `embed_bytes` accepts)."""
    return tf.io.encode_png(image).numpy()


def _litert_embeddings(path, images, normalize, chunk=1024):
    model = litert.LiteRTModel(path, normalize=normalize)
    return np.concatenate([model(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def verify_export(export_dir, model, config, raw_splits, split="test", parity_images=64,
                  recall_max_images=20000, latency_runs=0):
    """Measures an export against the model it came from.

    Args:
        export_dir: the export folder E (its latest SavedModel version is measured).
        model: the trained `DVMLModel` (the reference).
        config: its `TrainConfig`.
        raw_splits: raw `DatasetSplits` of its dataset (`task.load_splits(config, raw=True)`).
        split: the split whose images are used.
        parity_images: images of the parity checks, spread over the split.
        recall_max_images: cap (whole classes) on the images of the Recall@1 comparison; None
            = all; 0 skips it.
        latency_runs: timed runs per latency figure (batch 1); 0 skips latency.

    Returns:
        dict: `saved_model_version` (the version measured), `parity_vs_keras`, `recall_at_1`
        (when LiteRT models exist), `latency_ms_per_image` (when asked), `bounds` and `checks`
        (name -> bool).
    """
    version_dir, version = layout.resolve_saved_model(export_dir)
    raw_form = task.raw_form(config, raw_splits)
    preprocess = task.preprocess_config(config)
    normalized = bool(model.normalize_embeddings)
    catalog = raw_splits.splits()[split]
    fixed_size = raw_form.fixed_size(preprocess)
    count = min(parity_images, catalog.num_images)
    indices = np.unique(np.linspace(0, catalog.num_images - 1, count).astype(np.int64))
    images = data_lib.fixed_size_images(catalog, indices, fixed_size)

    keras_fn = models.inference_function(model)
    model_inputs = raw_form.to_model_input(tf.constant(images), preprocess)
    reference = keras_fn(model_inputs).numpy()
    loaded = tf.saved_model.load(version_dir)
    serve = loaded.signatures[saved_model_lib.SERVING_DEFAULT]
    embed_bytes = loaded.signatures[saved_model_lib.EMBED_BYTES]
    encoded = tf.constant([encode_png(image) for image in images])
    key = saved_model_lib.EMBEDDING_KEY
    parities = {
        "images": f"{len(images)} images of the {split} split",
        "saved_model_serving_default": parity(
            reference, serve(images=tf.constant(images))[key].numpy()),
        "saved_model_embed_bytes_png": parity(
            reference, embed_bytes(image_bytes=encoded)[key].numpy()),
    }
    latency = {}
    if latency_runs:
        one = images[:1]
        latency = {
            "keras_preprocessed_input": median_latency_ms(
                lambda: keras_fn(model_inputs[:1]).numpy(), latency_runs),
            "saved_model_serving_default": median_latency_ms(
                lambda: serve(images=tf.constant(one))[key].numpy(), latency_runs),
            "saved_model_embed_bytes_png": median_latency_ms(
                lambda: embed_bytes(image_bytes=encoded[:1])[key].numpy(), latency_runs),
        }
    paths = {q: os.path.join(export_dir, litert.FILE_NAMES[q]) for q in litert.QUANTIZATIONS}
    has_litert = all(os.path.isfile(p) for p in paths.values())
    recall = None
    if has_litert:
        for quantization, path in paths.items():
            runner = litert.LiteRTModel(path, normalize=normalized and quantization == litert.INT8)
            parities[f"litert_{quantization}"] = parity(reference, runner(images))
            if latency_runs:
                latency[f"litert_{quantization}"] = runner.latency_ms(images[:1],
                                                                      runs=latency_runs)
        retriever_path = os.path.join(export_dir, retrieval.RETRIEVAL_FILE)
        if latency_runs and os.path.isfile(retriever_path):
            latency["litert_retrieval"] = retrieval.Retriever(retriever_path).latency_ms(
                images[:1], runs=latency_runs)
        if recall_max_images != 0:
            recall = _recall(model, raw_form, preprocess, catalog, paths, normalized,
                             recall_max_images)
    result = {"saved_model_version": version, "parity_vs_keras": parities}
    if recall is not None:
        result["recall_at_1"] = recall
    if latency:
        result["latency_ms_per_image"] = latency
        result["latency_setup"] = (
            f"batch 1, median of {latency_runs} runs after 5 warm-up runs, {os.cpu_count()} CPU "
            "cores, LiteRT default threads (XNNPACK)")
    result["bounds"] = {
        "saved_model_cosine_min": SAVED_MODEL_MIN_COSINE,
        "litert_float32_cosine_min": LITERT_FLOAT_MIN_COSINE,
        "int8_max_recall_loss_points": INT8_MAX_RECALL_LOSS_POINTS,
    }
    result["checks"] = checks(parities, recall)
    return result


def _recall(model, raw_form, preprocess, catalog, paths, normalized, max_images):
    """Recall@1 of the Keras inference model and of every LiteRT embedding model."""
    indices = whole_classes(catalog.labels, max_images)
    inference = inference_lib.inference_model(model, raw_form, preprocess)
    embeddings, labels = inference_lib.embed_raw(inference, catalog, indices)
    result = {
        "split": catalog.name,
        "num_images": len(indices),
        "num_classes": len(np.unique(labels)),
        "keras": recall_at_1(embeddings, labels, normalized),
    }
    images = data_lib.fixed_size_images(catalog, indices, raw_form.fixed_size(preprocess))
    for quantization, path in paths.items():
        normalize = normalized and quantization == litert.INT8
        result[f"litert_{quantization}"] = recall_at_1(
            _litert_embeddings(path, images, normalize), labels, normalized)
    result["int8_minus_float32_points"] = 100.0 * (
        result[f"litert_{litert.INT8}"] - result[f"litert_{litert.FLOAT32}"]
    )
    return result


def checks(parities, recall):
    """The acceptance bounds, evaluated on measured figures.

    Args:
        parities: the `parity_vs_keras` dict of `verify_export`.
        recall: its `recall_at_1` dict, or None.

    Returns:
        dict check name -> bool.
    """
    result = {
        f"saved_model_cosine_min>={SAVED_MODEL_MIN_COSINE}": all(
            parities[key]["cosine_min"] >= SAVED_MODEL_MIN_COSINE
            for key in ("saved_model_serving_default", "saved_model_embed_bytes_png")
        ),
    }
    if "litert_float32" in parities:
        result[f"litert_float32_cosine_min>={LITERT_FLOAT_MIN_COSINE}"] = (
            parities["litert_float32"]["cosine_min"] >= LITERT_FLOAT_MIN_COSINE
        )
    if recall is not None:
        result["int8_recall_at_1_within_1_point_of_float32"] = (
            abs(recall["int8_minus_float32_points"]) <= INT8_MAX_RECALL_LOSS_POINTS
        )
    return result
