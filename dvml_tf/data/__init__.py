"""The data layer: datasets, class-balanced sampling, preprocessing and tf.data pipelines.

Typical use (the training loop and the evaluation build on exactly this):

    splits = load_dataset("omniglot")                      # DatasetSplits(train, test, [val])
    sampler = ClassBalancedSampler(splits.train.labels, classes_per_batch=64,
                                   images_per_class=2, seed=0)
    config = PreprocessConfig.omniglot()                   # 32 -> 28, no flip
    train = make_train_dataset(splits.train, sampler, config, start_step=step)
    test = make_eval_dataset(splits.test, config, batch_size=256)

Raw images (what a client of an exported model sends), row for row the same splits:

    raw = load_dataset("omniglot", raw=True)               # RGB 105 x 105, dark ink on white
    stored = raw.raw_form.to_stored(raw_images)            # == what load_dataset stores (in-graph)
    inputs = RawImagePreprocessor(raw.raw_form, config)(raw_images)   # == make_eval_dataset
    calibration = calibration_images(raw.train, sampler, num_images=200)

Interface:

* `load_dataset(name, data_dir=None, image_size=None, validation_classes=0, seed=0, raw=False)
  -> DatasetSplits` for `name` in `DATASETS` = omniglot, cub200, cars196, sop, folder, csv
  (a CSV manifest: `path,label[,split,is_query,is_gallery]`, module `manifest`), glyphs (a
  folder of characters rendered from fonts, module `glyphs`; built by
  `python -m dvml_tf.data.glyph_builder`, module `glyph_builder`, with `glyph_render`).
  `DatasetSplits` has `train`, `test`, optional `validation` (each an `ImageCatalog`),
  `num_channels` (1 for stored Omniglot, else 3), `grayscale` (Omniglot-like data,
  `is_grayscale(name)`), `raw` and `raw_form`. With `raw=True` the catalogs hold the same
  records in the same order (same class split, same validation classes) decoded as RGB at their
  original size, unconverted.
* `RawForm(conversion, stored_size, raw_size)` (`DatasetSplits.raw_form`, or
  `raw_form_of(name, image_size, num_images)` without loading), module `raw_form`: how a
  client's raw image relates to what the loader stores: the conversion kind ("omniglot_ink":
  libpng's gray, inverted; "none"), the load-time resize (None when kept encoded at the
  original size) and the fixed raw size. `RawForm.to_stored` (functional core `convert_raw`)
  maps raw uint8 images to the stored ones eagerly, in tf.data and in SavedModels: the loader
  itself stores `to_stored(decoded RGB image)`. `RawImagePreprocessor` is the Keras layer raw
  image -> model input that every export puts in front of the embedder; `fixed_size_images`
  and `calibration_images` give raw images for fixed-size (LiteRT) models.
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
  batch_size)`; `load_thumbnails(catalog, indices, size)`.
* `dataset_identity(splits)` / `identity_changes(old, new)` (module `identity`): what was loaded,
  independent of where it lies, and how two such records differ (a resumed run's check).
* `pixel_limit` (`DEFAULT_MAX_PIXELS`, `load_dataset(..., max_pixels=)`): an encoded image's size
  read from its header in-graph, and the limit every loader, `decode_image` and the exported
  `embed_bytes` signature enforce before decoding anything.
"""

from dvml_tf.data.catalog import DatasetSplits
from dvml_tf.data.catalog import ImageCatalog
from dvml_tf.data.catalog import carve_validation
from dvml_tf.data.catalog import decode_image
from dvml_tf.data.datasets import DATASETS
from dvml_tf.data.datasets import FILE_DATASETS
from dvml_tf.data.datasets import is_grayscale
from dvml_tf.data.datasets import load_dataset
from dvml_tf.data.datasets import raw_form_of
from dvml_tf.data.folder import load_folder
from dvml_tf.data.identity import dataset_identity
from dvml_tf.data.identity import identity_changes
from dvml_tf.data.manifest import load_manifest
from dvml_tf.data.pipeline import load_thumbnails
from dvml_tf.data.pipeline import make_eval_dataset
from dvml_tf.data.pipeline import make_train_dataset
from dvml_tf.data.pixel_limit import DEFAULT_MAX_PIXELS
from dvml_tf.data.preprocessing import PreprocessConfig
from dvml_tf.data.preprocessing import preprocess_test
from dvml_tf.data.preprocessing import preprocess_test_batch
from dvml_tf.data.preprocessing import preprocess_train
from dvml_tf.data.raw_form import CONVERSIONS
from dvml_tf.data.raw_form import NO_CONVERSION
from dvml_tf.data.raw_form import OMNIGLOT_INK
from dvml_tf.data.raw_form import RawForm
from dvml_tf.data.raw_form import RawImagePreprocessor
from dvml_tf.data.raw_form import calibration_images
from dvml_tf.data.raw_form import convert_raw
from dvml_tf.data.raw_form import fixed_size_images
from dvml_tf.data.raw_form import png_gray
from dvml_tf.data.sampler import ClassBalancedSampler
from dvml_tf.data.sampler import replica_slice

__all__ = [
    "CONVERSIONS",
    "DATASETS",
    "DEFAULT_MAX_PIXELS",
    "FILE_DATASETS",
    "NO_CONVERSION",
    "OMNIGLOT_INK",
    "ClassBalancedSampler",
    "DatasetSplits",
    "ImageCatalog",
    "PreprocessConfig",
    "RawForm",
    "RawImagePreprocessor",
    "calibration_images",
    "carve_validation",
    "convert_raw",
    "dataset_identity",
    "decode_image",
    "fixed_size_images",
    "identity_changes",
    "is_grayscale",
    "load_dataset",
    "load_folder",
    "load_manifest",
    "load_thumbnails",
    "make_eval_dataset",
    "make_train_dataset",
    "png_gray",
    "preprocess_test",
    "preprocess_test_batch",
    "preprocess_train",
    "raw_form_of",
    "replica_slice",
]
