"""A run's dataset in its raw form (what clients of the exported models send), and embedding it
through the serving conversion.

`load_dataset` hands out converted images (Omniglot: gray, inverted, 32 px); the exported models
take the raw ones, which `load_dataset(..., raw=True)` hands out: the same records in the same
order, decoded as RGB at their original size, with the loader's `stored_form` to convert them.
"""

import os

import numpy as np
import tensorflow as tf
from absl import logging

from dvml_tf import data as data_lib
from dvml_tf.export import raw_input


def load_raw_splits(config, data_dir=None):
    """The splits of a run's dataset, decoded as raw RGB images.

    `data.load_dataset(..., raw=True)` with the run's arguments, so row i of each raw split is
    row i of the run's split (same validation classes too), and `stored_form` is how the run's
    loader stored the images.

    Args:
        config: the run's `TrainConfig`.
        data_dir: TFDS data dir or image folder; default: `config.data_dir`, then TFDS's default
            (which honours TFDS_DATA_DIR).

    Returns:
        raw `data.DatasetSplits` whose catalogs yield uint8 [H, W, 3] raw images.

    Raises:
        FileNotFoundError: when the data is not available (the message says what to do).
    """
    data_dir = data_dir or config.data_dir
    return data_lib.load_dataset(
        config.dataset,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        image_size=config.resize_size,
        validation_classes=config.validation_classes,
        seed=config.seed,
        raw=True,
    )


def spec_for_splits(config, raw_splits=None):
    """The run's `RawInputSpec`, from the raw splits' `stored_form` when they are at hand.

    Args:
        config: `TrainConfig`.
        raw_splits: optional raw `DatasetSplits` of the dataset (`load_raw_splits`).

    Returns:
        `raw_input.RawInputSpec`.

    Raises:
        ValueError: `raw_splits` that are not raw.
    """
    if raw_splits is not None:
        if not raw_splits.raw:
            raise ValueError(f"raw_splits of {raw_splits.name!r} hold converted images; pass "
                             "raw ones: load_dataset(..., raw=True) or raw_data.load_raw_splits.")
        return raw_input.raw_input_spec(config, raw_splits.stored_form)
    if config.dataset == "folder":
        # Unknown folder size: assume the loader holds it decoded (the usual case); the only
        # difference otherwise is a rounding to uint8 after the resize.
        logging.warning("Folder size unknown: assuming the loader holds the images decoded.")
        return raw_input.raw_input_spec(
            config, data_lib.stored_form("folder", config.resize_size, num_images=0))
    return raw_input.raw_input_spec(config)


def raw_dataset(catalog, spec, indices=None, batch_size=256):
    """Raw images of a catalog converted to the model input (the serving conversion).

    Args:
        catalog: raw `ImageCatalog`.
        spec: `raw_input.RawInputSpec`.
        indices: optional image indices (default: all, in order).
        batch_size: int.

    Returns:
        `tf.data.Dataset` of (float32 [B, S, S, 3], int64 labels [B]).
    """
    fetch = catalog.fetch_fn()
    indices = np.arange(catalog.num_images) if indices is None else np.asarray(indices)
    labels = tf.constant(catalog.labels)

    def load(index):
        image = raw_input.to_model_input(fetch(index)[tf.newaxis], spec)[0]
        return image, tf.gather(labels, index)

    return (
        tf.data.Dataset.from_tensor_slices(indices.astype(np.int64))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def embed_catalog(embedder, catalog, spec, indices=None, batch_size=256):
    """Embeds raw images as `serving_default` does (Keras model, serving conversion).

    Args:
        embedder: callable on float32 [B, S, S, 3] (e.g. `saved_model.EmbeddingModel`).
        catalog: raw `ImageCatalog`.
        spec: `raw_input.RawInputSpec`.
        indices: optional image indices.
        batch_size: int.

    Returns:
        `(embeddings float32 [N, D], labels int64 [N])`.
    """
    embed = tf.function(embedder, reduce_retracing=True)
    embeddings, labels = [], []
    for images, batch_labels in raw_dataset(catalog, spec, indices, batch_size):
        embeddings.append(embed(images).numpy())
        labels.append(batch_labels.numpy())
    if not embeddings:
        raise ValueError(f"{catalog!r}: nothing to embed.")
    return np.concatenate(embeddings).astype(np.float32), np.concatenate(labels)


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


def _draw_strokes(segments, height, width, shift=(0.0, 0.0)):
    """Dark line segments on white: uint8 [H, W]. Segments are (y0, x0, y1, x1, thickness) with
    coordinates in fractions of the image size."""
    image = np.full([height, width], 255, np.uint8)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    for y0, x0, y1, x1, thickness in segments:
        y0, y1 = (y0 + shift[0]) * height, (y1 + shift[0]) * height
        x0, x1 = (x0 + shift[1]) * width, (x1 + shift[1]) * width
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((rows - y0) * dy + (cols - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
        image[np.hypot(rows - (y0 + t * dy), cols - (x0 + t * dx)) < thickness] = 0
    return image


def _random_segments(rng):
    count = int(rng.integers(2, 6))
    ends = rng.uniform(0.15, 0.85, (count, 4))
    return np.concatenate([ends, rng.uniform(1.5, 4.0, (count, 1))], axis=1)


def _photo(rng, height, width, base=None):
    coarse = rng.uniform(0, 255, [4, 4, 3]) if base is None else base
    image = tf.image.resize(coarse[np.newaxis].astype(np.float32), [height, width],
                            method="bicubic").numpy()[0]
    return np.clip(np.round(image + rng.normal(0, 8, image.shape)), 0, 255).astype(np.uint8)


def synthetic_raw_images(spec, num_images, seed=0):
    """Generated raw images in a dataset's raw form (when the dataset itself is not at hand).

    Omniglot-like data gets dark strokes (random line segments) on white, R = G = B; photos get
    smooth random colour fields with noise. Sized `spec.litert_input_size`.

    Args:
        spec: `raw_input.RawInputSpec`.
        num_images: int.
        seed: int.

    Returns:
        np.uint8 [num_images, H, W, 3].
    """
    rng = np.random.default_rng(seed)
    height, width = spec.litert_input_size
    if spec.ink:
        images = [_draw_strokes(_random_segments(rng), height, width) for _ in range(num_images)]
        return np.repeat(np.stack(images)[..., np.newaxis], 3, axis=-1)
    return np.stack([_photo(rng, height, width) for _ in range(num_images)])


def synthetic_raw_splits(spec, train_classes=8, test_classes=6, images_per_class=4, seed=0):
    """A generated dataset in raw form: each class is a prototype (strokes or a colour field),
    each image a jittered copy.

    Args:
        spec: `raw_input.RawInputSpec` (ink or photos, size `litert_input_size`).
        train_classes: classes of the train split (labels 0..).
        test_classes: classes of the test split (labels after the train ones).
        images_per_class: int >= 2.
        seed: int.

    Returns:
        raw `data.DatasetSplits` of decoded raw catalogs (uint8 [N, H, W, 3]), with the
        `stored_form` of `spec`.
    """
    rng = np.random.default_rng(seed)
    height, width = spec.litert_input_size
    catalogs = {}
    first = 0
    for split, classes in (("train", train_classes), ("test", test_classes)):
        images, labels = [], []
        for label in range(first, first + classes):
            if spec.ink:
                segments = _random_segments(rng)
                for _ in range(images_per_class):
                    shift = tuple(rng.uniform(-0.05, 0.05, 2))
                    gray = _draw_strokes(segments, height, width, shift)
                    images.append(np.repeat(gray[..., np.newaxis], 3, axis=-1))
            else:
                base = rng.uniform(0, 255, [4, 4, 3])
                images.extend(_photo(rng, height, width, base) for _ in range(images_per_class))
            labels.extend([label] * images_per_class)
        catalogs[split] = data_lib.ImageCatalog(labels, images=np.stack(images), num_channels=3,
                                                name=split)
        first += classes
    return data_lib.DatasetSplits(name=spec.dataset, train=catalogs["train"],
                                  test=catalogs["test"], grayscale=spec.ink, raw=True,
                                  stored_form=spec.stored_form)
