"""The data layer: datasets, class-balanced sampling, preprocessing and tf.data pipelines.

Typical use (the training loop and the evaluation build on exactly this):

    splits = load_dataset("omniglot")                      # DatasetSplits(train, test, [val])
    sampler = ClassBalancedSampler(splits.train.labels, classes_per_batch=64,
                                   images_per_class=2, seed=0)
    config = PreprocessConfig.for_splits(splits)           # omniglot: 32 -> 28, no flip
    train = make_train_dataset(splits.train, sampler, config, start_step=step)
    test = make_eval_dataset(splits.test, config, batch_size=256)

Interface:

* `load_dataset(name, data_dir=None, image_size=None, validation_classes=0, seed=0)
  -> DatasetSplits` for `name` in `DATASETS` = omniglot, cub200, cars196, sop, folder.
  `DatasetSplits` has `train`, `test`, optional `validation` (each an `ImageCatalog`),
  `num_channels` (1 for Omniglot, else 3) and `grayscale` (Omniglot-like data).
* `ImageCatalog`: `labels` (np.int64 [N]), `num_images`, `num_classes`, `classes`,
  `class_names`, `class_counts()`, `subset(indices)`, `take_classes(classes)`, `image(i)` and
  `fetch_fn()` (index -> uint8 [H, W, C] inside tf.data). Images are held decoded (Omniglot),
  as encoded bytes (TFDS datasets: decoded in the map) or as file paths (folder).
* `ClassBalancedSampler(labels, classes_per_batch, images_per_class, seed=0)`:
  `batch_indices(step)` is a pure function of (seed, step), class-major P x K;
  `dataset(start_step, num_steps, replica_id, num_replicas)`; `replica_slice(...)`.
* `PreprocessConfig`, `preprocess_train(image, seed, config)`, `preprocess_test(image, config)`
  and `preprocess_test_batch(images, config)` (the in-graph serving transform).
* `make_train_dataset(catalog, sampler, config, start_step=0, num_steps=None, ...)` ->
  (float32 [P*K, S, S, 3] in [0, 255], int64 [P*K]); `make_eval_dataset(catalog, config,
  batch_size)`; `load_thumbnails(catalog, indices, size)`; `representative_dataset(...)`.
"""

from dvml_tf.data.catalog import DatasetSplits
from dvml_tf.data.catalog import ImageCatalog
from dvml_tf.data.catalog import carve_validation
from dvml_tf.data.catalog import decode_image
from dvml_tf.data.datasets import DATASETS
from dvml_tf.data.datasets import load_dataset
from dvml_tf.data.folder import load_folder
from dvml_tf.data.pipeline import load_thumbnails
from dvml_tf.data.pipeline import make_eval_dataset
from dvml_tf.data.pipeline import make_train_dataset
from dvml_tf.data.pipeline import representative_dataset
from dvml_tf.data.preprocessing import PreprocessConfig
from dvml_tf.data.preprocessing import preprocess_test
from dvml_tf.data.preprocessing import preprocess_test_batch
from dvml_tf.data.preprocessing import preprocess_train
from dvml_tf.data.sampler import ClassBalancedSampler
from dvml_tf.data.sampler import replica_slice

__all__ = [
    "DATASETS",
    "ClassBalancedSampler",
    "DatasetSplits",
    "ImageCatalog",
    "PreprocessConfig",
    "carve_validation",
    "decode_image",
    "load_dataset",
    "load_folder",
    "load_thumbnails",
    "make_eval_dataset",
    "make_train_dataset",
    "preprocess_test",
    "preprocess_test_batch",
    "preprocess_train",
    "replica_slice",
    "representative_dataset",
]
