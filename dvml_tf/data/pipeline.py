"""tf.data pipelines: class-balanced training batches, catalog-order evaluation and figure
thumbnails.

Every training image's augmentation is seeded by `[seed, step * P * K + position in the global
batch]`, so a batch depends only on (seed, step): a resumed run, a run with another number of
parallel calls, and the replicas of a distributed run all see the same pixels.
"""

import numpy as np
import tensorflow as tf

from dvml_tf.data import preprocessing
from dvml_tf.data.catalog import host_tensor
from dvml_tf.data.sampler import replica_slice


def make_train_dataset(catalog, sampler, preprocess_config, start_step=0, num_steps=None,
                       seed=None, replica_id=0, num_replicas=1):
    """Class-balanced, augmented training batches.

    Args:
        catalog: training `ImageCatalog`; `sampler` must be built on `catalog.labels`.
        sampler: `ClassBalancedSampler`.
        preprocess_config: `PreprocessConfig`.
        start_step: first step (to resume a run).
        num_steps: optional number of batches; None repeats forever.
        seed: augmentation seed; defaults to `sampler.seed`.
        replica_id: which contiguous slice of each global batch to yield.
        num_replicas: R; 1 yields whole global batches. Use R > 1 with
            `distribute_datasets_from_function` (each worker computes its own slice).

    Returns:
        `tf.data.Dataset` of (images float32 [P*K/R, S, S, 3] in [0, 255], labels int64 [P*K/R]).
    """
    if sampler.num_images != catalog.num_images:
        raise ValueError(f"The sampler was built on {sampler.num_images} labels but {catalog!r} "
                         f"has {catalog.num_images} images: build it on this catalog's labels.")
    seed = sampler.seed if seed is None else int(seed)
    batch = sampler.batch_size
    local = batch // num_replicas
    fetch = catalog.fetch_fn()
    labels = host_tensor(catalog.labels)
    offset = replica_slice(np.arange(batch), replica_id, num_replicas,
                           sampler.images_per_class)[0]

    def spread(step, indices):
        # Global position of every image: augmentation does not depend on the replica split.
        counters = step * batch + offset + tf.range(local, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((counters, indices))

    def load(counter, index):
        image_seed = tf.stack([tf.constant(seed, tf.int64), counter])
        image = preprocessing.preprocess_train(fetch(index), image_seed, preprocess_config)
        return image, tf.gather(labels, index)

    dataset = sampler.steps_and_indices(start_step, num_steps, replica_id, num_replicas)
    return (dataset.flat_map(spread)
            .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(local, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


def make_eval_dataset(catalog, preprocess_config, batch_size):
    """Every image of a catalog exactly once, in catalog order, with the test transform.

    Args:
        catalog: `ImageCatalog`.
        preprocess_config: `PreprocessConfig`.
        batch_size: images per batch (the last batch may be smaller).

    Returns:
        `tf.data.Dataset` of (images float32 [B, S, S, 3] in [0, 255], labels int64 [B]).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    fetch = catalog.fetch_fn()
    labels = host_tensor(catalog.labels)

    def load(index):
        image = preprocessing.preprocess_test(fetch(index), preprocess_config)
        return image, tf.gather(labels, index)

    return (tf.data.Dataset.range(catalog.num_images)
            .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))


def load_thumbnails(catalog, indices, size=64):
    """Raw images of some catalog entries, resized for figures (no crop, no augmentation).

    Args:
        catalog: `ImageCatalog`.
        indices: int image indices.
        size: side of the square thumbnails (aspect ratio ignored, as the model sees them).

    Returns:
        np.uint8 [len(indices), size, size, 3].
    """
    fetch = catalog.fetch_fn()

    def load(index):
        image = tf.cast(tf.round(preprocessing.resize_square(fetch(index), size)), tf.uint8)
        return tf.repeat(image, 3, axis=-1) if catalog.num_channels == 1 else image

    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) == 0:
        return np.zeros([0, size, size, 3], np.uint8)
    if indices.min() < 0 or indices.max() >= catalog.num_images:
        raise ValueError(f"indices must be in [0, {catalog.num_images}) for {catalog!r}.")
    dataset = tf.data.Dataset.from_tensor_slices(indices).map(
        load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(len(indices))
    return next(iter(dataset)).numpy()
