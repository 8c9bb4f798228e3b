"""Evaluating a model on a split: embed every image once, then compute the retrieval and
clustering metrics on the embeddings (dvml_tf.evaluation.metrics)."""

import numpy as np
import tensorflow as tf

from dvml_tf import data as data_lib
from dvml_tf.evaluation import metrics as metrics_lib


def compute_embeddings(embed_fn, dataset):
    """Runs `embed_fn` over a dataset of `(images, labels)` batches.

    Args:
        embed_fn: callable mapping a batch of images to embeddings `[B, D]` (a Keras model, a
            SavedModel signature wrapper, ...).
        dataset: `tf.data.Dataset` of `(images, labels)`.

    Returns:
        `(embeddings float32 [N, D], labels int64 [N])` in dataset order.
    """
    embeddings, labels = [], []
    for images, batch_labels in dataset:
        embeddings.append(np.asarray(embed_fn(images), dtype=np.float32))
        labels.append(batch_labels.numpy())
    if not embeddings:
        raise ValueError("The evaluation split is empty.")
    return np.concatenate(embeddings), np.concatenate(labels).astype(np.int64)


def model_embed_fn(model):
    """A compiled inference function of a Keras model (z_I, in inference mode)."""
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def distance_metric(model):
    """"cosine" when the model L2-normalizes its embeddings (the loss trained on the unit
    sphere), "euclidean" otherwise: the distance its retrieval is evaluated with."""
    return "cosine" if getattr(model, "normalize_embeddings", False) else "euclidean"


def evaluate_model(
    model,
    catalog,
    preprocess,
    batch_size=256,
    recall_ks=(1, 2, 4, 8),
    compute_clustering=True,
    kmeans_seed=0,
):
    """Embeds a split with `model` and computes its metrics.

    Distances are cosine when the model's embeddings are L2-normalized (the loss trained on the
    unit sphere), Euclidean otherwise.

    Args:
        model: a `DVMLModel` (or any model whose `call` returns the embedding).
        catalog: the `data.ImageCatalog` of the split.
        preprocess: the `data.PreprocessConfig` of the run (test-time transform).
        batch_size: int.
        recall_ks: the K of Recall@K.
        compute_clustering: also run k-means for NMI and F1.
        kmeans_seed: int.

    Returns:
        dict of floats: `recall@K`, `map@r`, and (with clustering) `nmi`, `f1`.
    """
    dataset = data_lib.make_eval_dataset(catalog, preprocess, batch_size)
    embeddings, labels = compute_embeddings(model_embed_fn(model), dataset)
    metric = distance_metric(model)
    return metrics_lib.evaluate_embeddings(
        embeddings,
        labels,
        recall_ks=tuple(recall_ks),
        metric=metric,
        compute_clustering=compute_clustering,
        kmeans_seed=kmeans_seed,
    )


def _ordered(metrics):
    recall = sorted((k for k in metrics if k.startswith("recall@")), key=lambda k: int(k[7:]))
    return (
        [k for k in ("nmi", "f1") if k in metrics]
        + recall
        + [k for k in metrics if k not in recall and k not in ("nmi", "f1")]
    )


def format_metrics(metrics):
    """One line: `nmi=0.871 f1=0.402 recall@1=0.803 ...`."""
    return " ".join(f"{key}={metrics[key]:.4f}" for key in _ordered(metrics))


def metrics_table(metrics, title="metrics"):
    """A Markdown table of the metrics in percent, in the paper's column order."""
    keys = _ordered(metrics)
    header = " | ".join(
        key.upper() if key in ("nmi", "f1") else key.replace("recall", "R") for key in keys
    )
    values = " | ".join(f"{100 * metrics[key]:.1f}" for key in keys)
    return f"{title}\n| {header} |\n|{'---|' * len(keys)}\n| {values} |"


def backbone_embed_fn(model):
    """The pooled backbone feature f(x) of a DVMLModel, in inference mode (for the figures)."""
    return tf.function(lambda images: model.backbone(images, training=False),
                       reduce_retracing=True)


def encoded_images(catalog, indices):
    """The encoded files (bytes) of some catalog entries: what a serving client would send.

    Args:
        catalog: an `ImageCatalog` holding encoded bytes or file paths (not decoded pixels).
        indices: sequence of ints.

    Returns:
        list of bytes.
    """
    if catalog.sources is None:
        raise ValueError(f"{catalog.name!r} holds decoded pixels, not encoded image files.")
    sources = catalog.sources.numpy()
    encoded = []
    for i in indices:
        if catalog.source_is_path[i]:
            with open(sources[i], "rb") as f:
                encoded.append(f.read())
        else:
            encoded.append(bytes(sources[i]))
    return encoded


def saved_model_embeddings(embed_bytes, catalog, batch_size=256):
    """Embeds a catalog of encoded images through a SavedModel's `embed_bytes` signature.

    Args:
        embed_bytes: the concrete signature function (`loaded.signatures["embed_bytes"]`).
        catalog: `ImageCatalog` of encoded images (e.g. from `export.raw_data.load_raw_splits`).
        batch_size: int.

    Returns:
        `(embeddings float32 [N, D], labels int64 [N])`.
    """
    (input_name,) = embed_bytes.structured_input_signature[1]
    parts = []
    for start in range(0, catalog.num_images, batch_size):
        batch = encoded_images(catalog, range(start, min(start + batch_size, catalog.num_images)))
        outputs = embed_bytes(**{input_name: tf.constant(batch)})
        parts.append(outputs["embedding"].numpy())
    if not parts:
        raise ValueError("The evaluation split is empty.")
    return np.concatenate(parts).astype(np.float32), catalog.labels.copy()
