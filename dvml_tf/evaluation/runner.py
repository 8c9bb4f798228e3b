"""Evaluating a model on a split: embed every image once, then compute the retrieval and
clustering metrics on the embeddings (dvml_tf.evaluation.metrics).

    embedded = embed_run("runs/omniglot_npair_dvml_seed0", split="test")       # a run folder
    embedded = embed_saved_model("exports/omniglot", split="test")             # what TF Serving
    metrics = evaluate_embeddings(embedded.embeddings, embedded.labels,        # returns
                                  recall_ks=embedded.recall_ks, metric=embedded.metric)

`evaluate.py` is these calls plus printing and writing.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from dvml_tf import configs
from dvml_tf import data as data_lib
from dvml_tf import models
from dvml_tf import task
from dvml_tf.evaluation import metrics as metrics_lib
from dvml_tf.training.config import TrainConfig


def distance_metric(normalized):
    """The distance a model's retrieval is evaluated with: "cosine" when it L2-normalizes its
    embeddings (the loss trained on the unit sphere), "euclidean" otherwise.

    Args:
        normalized: bool (`DVMLModel.normalize_embeddings`, or an export report's
            `model.normalized`).

    Returns:
        str.
    """
    return "cosine" if normalized else "euclidean"


def default_recall_ks(dataset):
    """The K of Recall@K reported for a dataset: its preset's (SOP: 1, 10, 100, 1000)."""
    if dataset in configs.PRESETS:
        return tuple(configs.get_preset(dataset).recall_ks)
    return TrainConfig().recall_ks


def compute_embeddings(embed_fn, dataset):
    """Runs `embed_fn` over a dataset of `(images, labels)` batches.

    Args:
        embed_fn: callable mapping a batch of images to embeddings `[B, D]`
            (`models.inference_function(model)`, a SavedModel signature wrapper, ...).
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

    Args:
        model: a `DVMLModel` (or any model whose `call` returns the embedding and that has
            `normalize_embeddings`).
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
    embeddings, labels = compute_embeddings(models.inference_function(model), dataset)
    return metrics_lib.evaluate_embeddings(
        embeddings,
        labels,
        recall_ks=tuple(recall_ks),
        metric=distance_metric(model.normalize_embeddings),
        compute_clustering=compute_clustering,
        kmeans_seed=kmeans_seed,
        is_query=catalog.is_query,
        is_gallery=catalog.is_gallery,
    )


@dataclasses.dataclass
class EmbeddedSplit:
    """The embeddings of one split and what evaluating them needs.

    Args:
        embeddings: float32 [N, D].
        labels: int64 [N].
        metric: "cosine" or "euclidean" (`distance_metric`).
        catalog: the split's `data.ImageCatalog` (thumbnails for figures and the projector).
        recall_ks: the K of Recall@K of the run (or the dataset's preset).
        features: callable returning the backbone features f(x) [N, F] of the same images (for
            the central-latent-space figure), or None when only the embedding is available.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    metric: str
    catalog: data_lib.ImageCatalog
    recall_ks: tuple
    features: object = None


def embed_run(model_dir, split="test", data_dir=None, batch_size=256, dataset=None):
    """Embeds a split of a trained run's dataset through its own preprocessing.

    Args:
        model_dir: a run folder written by train.py.
        split: "test", "validation" or "train".
        data_dir: overrides the run's data location.
        batch_size: images per batch.
        dataset: optional dataset name; it must be the run's (a guard against mix-ups).

    Returns:
        `EmbeddedSplit`.

    Raises:
        ValueError: another dataset, or a split the run does not have.
        FileNotFoundError: no run or no data.
    """
    run = task.load_run(model_dir)
    config = run.config
    if dataset and dataset != config.dataset:
        raise ValueError(f"--dataset={dataset} but the run was trained on {config.dataset}; "
                         "omit --dataset.")
    catalog = getattr(task.load_splits(config, data_dir=data_dir), split)
    if catalog is None:
        raise ValueError(f"The run has no {split} split (validation_classes=0).")
    eval_dataset = data_lib.make_eval_dataset(catalog, task.preprocess_config(config),
                                              batch_size)
    embeddings, labels = compute_embeddings(models.inference_function(run.model), eval_dataset)

    def features():
        backbone = models.inference_function(run.model.backbone)
        return compute_embeddings(backbone, eval_dataset)[0]

    return EmbeddedSplit(embeddings, labels, distance_metric(run.model.normalize_embeddings),
                         catalog, tuple(config.recall_ks), features)


def saved_model_catalog(report, split="test", dataset=None, data_dir=None,
                        validation_classes=None, max_pixels=None):
    """The raw catalog of a split of the dataset an export was trained on (or of another one).

    Args:
        report: the export report (`export.layout.read_version_report`).
        split: "test", "validation" or "train".
        dataset: the dataset; default: the one the report names.
        data_dir: TFDS data dir, image folder or CSV manifest.
        validation_classes: training classes held out as the validation split; default: the
            run's (the report's "model.validation_classes", 0 for older exports). The report's
            seed picks them, as the run did.
        max_pixels: the loader's pixel limit (width x height); default: `data`'s default.

    Returns:
        (`data.ImageCatalog` of encoded images or file paths, its `data.DatasetSplits`).

    Raises:
        ValueError: an unknown split, or a validation split the dataset does not have.
    """
    if split not in ("test", "validation", "train"):
        raise ValueError(f"split must be test, validation or train; got {split!r}.")
    model = report.get("model", {})
    dataset = dataset or model["dataset"]
    if validation_classes is None:
        validation_classes = model.get("validation_classes", 0) if dataset == model.get(
            "dataset") else 0
    config = TrainConfig(dataset=dataset, data_dir=data_dir,
                         validation_classes=validation_classes, seed=model.get("seed", 0),
                         max_image_pixels=max_pixels or data_lib.DEFAULT_MAX_PIXELS)
    splits = task.load_splits(config, raw=True)
    catalog = getattr(splits, split)
    if catalog is None:
        raise ValueError(
            f"{dataset} has no validation split: the run held out no validation classes "
            "(train with --validation_classes=N), or pass --validation_classes=N (those "
            "classes were then seen in training, which flatters what is measured on them).")
    return catalog, splits


def embed_saved_model(path, split="test", dataset=None, data_dir=None, batch_size=256,
                      validation_classes=None):
    """Embeds a split through an exported SavedModel's `embed_bytes` signature on the dataset's
    encoded images: exactly what a TF Serving client gets back.

    Args:
        path: a SavedModel version folder, a base path of versions, or an export folder (see
            `export.layout.resolve_saved_model`: the highest version).
        split: "test", "validation" or "train".
        dataset: the dataset; default: the one the export's report names.
        data_dir: TFDS data dir, image folder or CSV manifest.
        batch_size: images per request.
        validation_classes: see `saved_model_catalog`.

    Returns:
        `EmbeddedSplit` (without backbone features).
    """
    from dvml_tf.export import layout  # export imports evaluation, not the other way round

    version_dir, _ = layout.resolve_saved_model(path)
    report = layout.read_version_report(version_dir)
    embed_bytes = load_embed_bytes(version_dir)
    catalog, splits = saved_model_catalog(report, split, dataset, data_dir, validation_classes,
                                          layout.max_image_pixels(report))
    embeddings, labels = saved_model_embeddings(embed_bytes, catalog, batch_size)
    return EmbeddedSplit(embeddings, labels, distance_metric(report["model"]["normalized"]),
                         catalog, default_recall_ks(splits.name))


def load_embed_bytes(version_dir):
    """Loads a SavedModel and returns its `embed_bytes` signature, checking the contract.

    Raises:
        ValueError: a SavedModel without the signatures export.py writes.
    """
    loaded = tf.saved_model.load(version_dir)
    signatures = dict(loaded.signatures)
    if "embed_bytes" not in signatures or "serving_default" not in signatures:
        raise ValueError(
            f"{version_dir} has signatures {sorted(signatures)}; evaluation needs the "
            "'serving_default' and 'embed_bytes' signatures that export.py writes."
        )
    embed_bytes = signatures["embed_bytes"]
    inputs = embed_bytes.structured_input_signature[1]
    if (len(inputs) != 1 or next(iter(inputs.values())).dtype != tf.string
            or "embedding" not in embed_bytes.structured_outputs):
        raise ValueError(
            f"{version_dir}: signature 'embed_bytes' must map one string input to an "
            f"'embedding' output; it maps {inputs} to {sorted(embed_bytes.structured_outputs)}."
        )
    # Keep the loaded object alive with the signature (its variables belong to it).
    embed_bytes.saved_model = loaded
    return embed_bytes


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


def encoded_images(catalog, indices, errors=None):
    """The encoded files (bytes) of some catalog entries: what a serving client would send.

    Args:
        catalog: an `ImageCatalog` holding encoded bytes or file paths (not decoded pixels).
        indices: sequence of ints.
        errors: None to raise on a file that cannot be read (FileNotFoundError; ValueError for
            a file that became empty); or a dict that collects {index: message} of such files
            (their entries are then None).

    Returns:
        list of bytes (or None for the files `errors` collected).
    """
    if catalog.sources is None:
        raise ValueError(f"{catalog.name!r} holds decoded pixels, not encoded image files.")
    sources = catalog.sources.numpy()
    encoded = []
    for i in indices:
        if not catalog.source_is_path[i]:
            encoded.append(bytes(sources[i]))
            continue
        path = os.fsdecode(sources[i])
        contents = None
        try:
            with open(sources[i], "rb") as f:
                contents = f.read()
        except FileNotFoundError:
            problem = (f"file disappeared since the dataset was loaded (deleted or moved): "
                       f"{path}")
        except OSError as error:
            problem = f"cannot read {path}: {error.strerror}"
        else:
            # The loader decoded every file it kept: an empty one changed since then.
            problem = None if contents else (
                "file is empty now, though it was a readable image when the dataset was "
                f"loaded (truncated or replaced since): {path}")
        if problem is None:
            encoded.append(contents)
        elif errors is None:
            raise (FileNotFoundError if contents is None else ValueError)(problem)
        else:
            errors[int(i)] = problem
            encoded.append(None)
    return encoded


def run_embed_bytes(embed_bytes, encoded):
    """One call of an `embed_bytes` signature.

    Args:
        embed_bytes: the concrete signature function (`load_embed_bytes`).
        encoded: list of bytes, encoded image files.

    Returns:
        float32 [len(encoded), D].

    Raises:
        tf.errors.InvalidArgumentError: a string that is not a decodable image.
    """
    (input_name,) = embed_bytes.structured_input_signature[1]
    outputs = embed_bytes(**{input_name: tf.constant(encoded, dtype=tf.string)})
    return outputs["embedding"].numpy().astype(np.float32, copy=False)


def saved_model_embeddings(embed_bytes, catalog, batch_size=256):
    """Embeds a catalog of encoded images through a SavedModel's `embed_bytes` signature.

    Args:
        embed_bytes: the concrete signature function (`loaded.signatures["embed_bytes"]`).
        catalog: `ImageCatalog` of encoded images (`task.load_splits(config, raw=True)`).
        batch_size: int.

    Returns:
        `(embeddings float32 [N, D], labels int64 [N])`.
    """
    parts = []
    for start in range(0, catalog.num_images, batch_size):
        batch = encoded_images(catalog, range(start, min(start + batch_size, catalog.num_images)))
        parts.append(run_embed_bytes(embed_bytes, batch))
    if not parts:
        raise ValueError("The evaluation split is empty.")
    return np.concatenate(parts).astype(np.float32), catalog.labels.copy()
