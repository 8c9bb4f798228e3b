"""`ImageCatalog` (one split: labels + where each image lives) and `DatasetSplits` (train/test/val).

Three storages, chosen by the loaders, behind one in-graph accessor `ImageCatalog.fetch_fn()`:

* decoded: `images` uint8 [N, H, W, C] held in memory (small datasets such as Omniglot).
* encoded: `sources` holds the encoded JPEG/PNG bytes of every image (TFDS datasets); they are
  decoded inside the tf.data map, so 60k SOP images cost ~1.5 GB of bytes, not ~11 GB of pixels.
* files: `sources` holds file paths, read and decoded inside the tf.data map (the folder loader).
  A file that TF's decoder cannot read but PIL can is converted once at load time and its PNG
  bytes take its place (`source_is_path` is then False for that image).

The in-memory arrays become one eager CPU tensor each, captured *by reference* by the tf.data
functions. Measured on TF 2.21 with 60,000 synthetic strings of 42 kB (2.5 GB): iteration,
`MirroredStrategy.experimental_distribute_dataset`, the auto-shard rewrite, iterator checkpoints and
iterating inside a `tf.function` all work, whereas building the same bytes into a graph constant
(`tf.constant` inside a `tf.function`, or a numpy array referenced inside a map function) hits the
2 GB GraphDef limit. Serializing the dataset graph itself (tf.data service, `Dataset.save`,
snapshot) aborts the process above 2 GB whatever holds the bytes (a constant, a lookup table or a
variable); for such uses keep the images on disk and use the `folder` layout (paths only).
"""

import dataclasses

import numpy as np
import tensorflow as tf
from absl import logging

from dvml_tf.data import pixel_limit
from dvml_tf.data.raw_form import RawForm


def decode_image(contents, channels, max_pixels=None, name="image"):
    """Decodes one encoded image (JPEG, PNG, BMP, GIF) the way the whole project does.

    The folder loader checks every file with exactly this function at load time, so a file that
    passes the check cannot fail in the training pipeline.

    Args:
        contents: scalar string tensor, the encoded file.
        channels: 1 or 3; the decoder converts grayscale, palette, alpha and CMYK images to it
            (alpha is dropped, 16-bit PNGs are scaled to 8 bits).
        max_pixels: optional pixel limit: an image whose header says it is larger fails with an
            InvalidArgumentError naming it, before anything is decoded (`pixel_limit`).
        name: scalar string (tensor): what the image is, for that message (a file path).

    Returns:
        uint8 tensor [H, W, channels]; for an animated GIF, its first frame.
    """
    if max_pixels is not None:
        contents = pixel_limit.within_limit(contents, max_pixels, name)
    # Paper §3 is silent on alpha and EXIF: alpha is dropped (not composited), EXIF orientation
    # is ignored (TF's decoders do both; PIL-converted files are handled the same way).
    image = tf.io.decode_image(contents, channels=channels, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def host_tensor(value, dtype=None):
    """Copies an array into one eager tensor on the host CPU, even when called inside a graph.

    Args:
        value: array-like (numpy array, list of bytes, ...).
        dtype: optional tf dtype.

    Returns:
        An eager `tf.Tensor` on `/cpu:0`. tf.data functions capture it by reference, so its size
        is not limited by the 2 GB GraphDef limit.
    """
    with tf.init_scope(), tf.device("/cpu:0"):
        return tf.constant(value, dtype=dtype)


class ImageCatalog:
    """One split of a dataset: integer labels plus where each image lives.

    Exactly one of `images` and `sources` is given.

    Args:
        labels: int array [N], the dataset-wide class id of each image (ids of different splits
            never coincide for a class-disjoint split).
        images: optional uint8 array [N, H, W, C], decoded images held in memory.
        sources: optional [N] array (or string tensor) of encoded image bytes or file paths.
        source_is_path: for `sources`: bool, or bool array [N]; True where the source is a file
            path to read, False where it holds the encoded bytes themselves.
        num_channels: 1 or 3, the channels of the images the catalog yields.
        class_names: optional sequence of class names indexed by label id.
        name: split name, for messages.
        paths: optional [N] str array, the file each image was read from (folder and CSV
            datasets; kept when a converted image's bytes replace its path in `sources`).
        is_query, is_gallery: optional bool arrays [N]: the images that are queries and those
            that form the gallery of a retrieval protocol with separate sets (In-Shop). None
            (the default) means every image is both: each query searches all other images.
        max_pixels: the pixel limit of the encoded images (`pixel_limit`): a larger one fails
            the pipeline with an error naming it, before it is decoded.
    """

    def __init__(self, labels, *, images=None, sources=None, source_is_path=False,
                 num_channels=3, class_names=None, name="split", paths=None, is_query=None,
                 is_gallery=None, max_pixels=pixel_limit.DEFAULT_MAX_PIXELS):
        labels = np.asarray(labels)
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(f"labels of split {name!r} must be a 1-D integer array, got "
                             f"shape {labels.shape} and dtype {labels.dtype}.")
        if (images is None) == (sources is None):
            raise ValueError(f"Split {name!r}: give exactly one of `images` and `sources`.")
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
        self.labels = labels.astype(np.int64)
        self.num_channels = int(num_channels)
        self.class_names = None if class_names is None else tuple(class_names)
        self.name = name
        self.max_pixels = pixel_limit.check_max_pixels(max_pixels, "max_pixels")
        self.images = None
        self.sources = None
        self.source_is_path = None
        self._tensors = None
        n = len(self.labels)
        if images is not None:
            images = np.asarray(images)
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != num_channels:
                raise ValueError(f"images of split {name!r} must be uint8 [N, H, W, "
                                 f"{num_channels}], got {images.dtype} {images.shape}.")
            if len(images) != n:
                raise ValueError(f"Split {name!r}: {len(images)} images but {n} labels.")
            self.images = images
        else:
            self.sources = sources if isinstance(sources, tf.Tensor) else host_tensor(
                np.asarray(sources, dtype=object) if n else np.zeros([0], dtype=object),
                dtype=tf.string)
            if int(self.sources.shape[0]) != n:
                raise ValueError(f"Split {name!r}: {self.sources.shape[0]} sources but {n} "
                                 "labels.")
            self.source_is_path = np.broadcast_to(np.asarray(source_is_path, dtype=bool),
                                                  [n]).copy()
        self.paths = None if paths is None else np.asarray(paths, dtype=str)
        if self.paths is not None and self.paths.shape != (n,):
            raise ValueError(f"Split {name!r}: {self.paths.shape} paths for {n} labels.")
        self.is_query, self.is_gallery = (
            None if mask is None else _role_mask(mask, n, role, name)
            for mask, role in ((is_query, "is_query"), (is_gallery, "is_gallery")))

    # ----------------------------------------------------------------------------- description
    @property
    def has_query_gallery(self):
        """bool: whether the split has separate query and gallery sets (`is_query`,
        `is_gallery`), instead of every image searching all the others."""
        return self.is_query is not None or self.is_gallery is not None

    def query_gallery(self):
        """The query and gallery masks, all True where the split does not set them.

        Returns:
            (is_query, is_gallery): two bool arrays [N].
        """
        everything = np.ones(self.num_images, bool)
        return (everything if self.is_query is None else self.is_query,
                everything if self.is_gallery is None else self.is_gallery)

    @property
    def num_images(self):
        """int: number of images."""
        return len(self.labels)

    @property
    def classes(self):
        """np.int64 [C]: the sorted distinct labels."""
        return np.unique(self.labels)

    @property
    def num_classes(self):
        """int: number of distinct labels."""
        return len(self.classes)

    @property
    def storage(self):
        """str: "decoded", "encoded", "files" or "mixed" (files plus converted bytes)."""
        if self.images is not None:
            return "decoded"
        if not self.source_is_path.any():
            return "encoded"
        return "files" if self.source_is_path.all() else "mixed"

    def class_counts(self):
        """Images per class.

        Returns:
            (classes, counts): two int64 arrays [C], classes sorted.
        """
        classes, counts = np.unique(self.labels, return_counts=True)
        return classes, counts.astype(np.int64)

    def class_name(self, label):
        """The name of a label id, or its number when the dataset has no names.

        Args:
            label: int label id.

        Returns:
            str.
        """
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return str(label)

    def __repr__(self):
        return (f"ImageCatalog({self.name!r}, {self.num_classes} classes, {self.num_images} "
                f"images, {self.storage}, {self.num_channels} channel(s))")

    # ----------------------------------------------------------------------------- subsets
    def subset(self, indices, name=None):
        """A catalog of some of the images, in the given order.

        Args:
            indices: int array of image indices.
            name: optional name of the new split.

        Returns:
            `ImageCatalog`.
        """
        indices = np.asarray(indices, dtype=np.int64)
        common = dict(num_channels=self.num_channels, class_names=self.class_names,
                      name=name or self.name, max_pixels=self.max_pixels,
                      **self._row_fields(indices))
        if self.images is not None:
            return ImageCatalog(self.labels[indices], images=self.images[indices], **common)
        with tf.init_scope(), tf.device("/cpu:0"):
            sources = tf.gather(self.sources, indices)
        return ImageCatalog(self.labels[indices], sources=sources,
                            source_is_path=self.source_is_path[indices], **common)

    def _row_fields(self, indices=None):
        """The optional per-image fields (paths, query/gallery roles), of some rows or all."""
        return {field: value if value is None or indices is None else value[indices]
                for field, value in (("paths", self.paths), ("is_query", self.is_query),
                                     ("is_gallery", self.is_gallery))}

    def take_classes(self, classes, name=None):
        """The images of the given classes, in catalog order.

        Args:
            classes: label ids to keep.
            name: optional name of the new split.

        Returns:
            `ImageCatalog`.
        """
        keep = np.isin(self.labels, np.asarray(classes, dtype=np.int64))
        return self.subset(np.flatnonzero(keep), name=name)

    # ----------------------------------------------------------------------------- access
    def fetch_fn(self):
        """The in-graph accessor of one image, for tf.data map functions.

        Returns:
            A function `index (int64 scalar tensor) -> uint8 tensor [H, W, num_channels]`.
        """
        if self._tensors is None:
            if self.images is not None:
                self._tensors = (host_tensor(self.images),)
            else:
                self._tensors = (self.sources, host_tensor(self.source_is_path))
        channels = self.num_channels
        if self.images is not None:
            (images,) = self._tensors
            return lambda index: tf.gather(images, index)
        sources, is_path = self._tensors
        storage = self.storage
        max_pixels, split = self.max_pixels, self.name

        def fetch(index):
            source = tf.gather(sources, index)
            # What the image is, for a message: its file, or its row in the split.
            row = tf.strings.join(["#", tf.strings.as_string(index), f" of split {split}"])
            if storage == "files":
                contents, name = tf.io.read_file(source), source
            elif storage == "mixed":
                from_file = tf.gather(is_path, index)
                contents = tf.cond(from_file, lambda: tf.io.read_file(source), lambda: source)
                name = tf.where(from_file, source, row)
            else:
                contents, name = source, row
            return decode_image(contents, channels, max_pixels, name)

        return fetch

    def image(self, index):
        """One decoded image, eagerly (for figures and checks).

        Args:
            index: int image index.

        Returns:
            np.uint8 [H, W, num_channels].
        """
        if not 0 <= index < self.num_images:
            raise ValueError(f"index {index} out of range for {self!r}.")
        if self.images is not None:
            return self.images[index]
        return self.fetch_fn()(tf.constant(index, tf.int64)).numpy()


def _role_mask(mask, count, role, split):
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (count,):
        raise ValueError(f"{role} of split {split!r} must be a bool array [{count}]; got "
                         f"{mask.dtype} {mask.shape}.")
    return mask.copy()


def materialize(catalog, raw_form, batch_size=256):
    """Decodes every image once, converts it to its stored form and keeps the pixels in memory.

    Each image becomes `raw_form.to_stored(image)`: the conversion, then a resize to
    `raw_form.stored_size` squared (aspect ratio ignored, as in the paper's 256x256) rounded to
    uint8.

    Args:
        catalog: `ImageCatalog` of raw images (3 channels for the "omniglot_ink" conversion).
        raw_form: the dataset's `RawForm`, with a `stored_size`.
        batch_size: decoding batch size.

    Returns:
        A decoded `ImageCatalog` with images uint8 [N, S, S, C], C = `raw_form.num_channels`
        for raw RGB input.
    """
    if raw_form.ink and catalog.num_channels != 3:
        raise ValueError(f"conversion={raw_form.conversion!r} needs raw RGB images; {catalog!r} "
                         f"has {catalog.num_channels} channel(s).")
    if not raw_form.resized:
        raise ValueError(f"{raw_form} keeps the images encoded: nothing to materialize.")
    num_channels = 1 if raw_form.ink else catalog.num_channels
    size = raw_form.stored_size
    fetch = catalog.fetch_fn()
    images = np.zeros([catalog.num_images, size, size, num_channels], np.uint8)
    dataset = (tf.data.Dataset.range(catalog.num_images)
               .map(lambda index: raw_form.to_stored(fetch(index)),
                    num_parallel_calls=tf.data.AUTOTUNE)
               .batch(batch_size))
    start = 0
    for batch in dataset.as_numpy_iterator():
        images[start:start + len(batch)] = batch
        start += len(batch)
    return ImageCatalog(catalog.labels, images=images, num_channels=num_channels,
                        class_names=catalog.class_names, name=catalog.name,
                        max_pixels=catalog.max_pixels, **catalog._row_fields())


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """The splits of one dataset and what the preprocessing needs to know about its images.

    Args:
        name: dataset name ("omniglot", "cub200", "cars196", "sop", "folder", "csv", "glyphs").
        train: `ImageCatalog` of the training classes.
        test: `ImageCatalog` of the test classes (class-disjoint from train and validation).
        validation: optional `ImageCatalog` of classes carved out of the training classes.
        num_channels: channels of the images the catalogs yield (1 for stored Omniglot, 3 for
            photos and for every raw split).
        grayscale: True for Omniglot-like data (grayscale strokes, Omniglot and glyphs; stored
            ink bright on black):
            such images use the small-image recipe (resize 32, crop 28, no flip).
        raw: True when the catalogs yield the raw images (`load_dataset(..., raw=True)`):
            decoded RGB at the original size, to be mapped to the stored images with
            `raw_form.to_stored`.
        raw_form: `RawForm`, how the loader stores (or, for raw splits, would store) the
            images: conversion kind, load-time resize, fixed raw size.
        identity: optional dict, what the loader loaded, independent of where it lies (see
            `data.identity`): a resumed run compares it with the one it was trained on.
        unreadable: paths of the files the loader skipped because they could not be read or
            decoded (folder and CSV datasets; any split).
    """

    name: str
    train: ImageCatalog
    test: ImageCatalog
    validation: ImageCatalog | None = None
    num_channels: int = 3
    grayscale: bool = False
    raw: bool = False
    raw_form: RawForm = dataclasses.field(default_factory=RawForm)
    identity: dict | None = None
    unreadable: tuple = ()

    def splits(self):
        """Returns: dict split name -> `ImageCatalog` (validation only when present)."""
        out = {"train": self.train}
        if self.validation is not None:
            out["validation"] = self.validation
        out["test"] = self.test
        return out

    def summary(self):
        """Returns: one line per split, "split: C classes, N images (storage)"."""
        return "; ".join(f"{split}: {c.num_classes} classes, {c.num_images} images ({c.storage})"
                         for split, c in self.splits().items())


def carve_validation(splits, validation_classes, seed=0, last=False):
    """Moves `validation_classes` training classes into a validation split.

    The test classes are never touched, so the zero-shot test protocol stays the paper's.

    Args:
        splits: `DatasetSplits` without a validation split.
        validation_classes: int >= 0; 0 returns `splits` unchanged.
        seed: int; the same seed picks the same classes (random choice).
        last: bool. Take the classes with the highest ids instead of a random choice. Omniglot
            numbers its classes alphabet by alphabet, so this holds out whole alphabets, as its
            test split does (161 classes = background alphabets 25-29); a random choice would
            validate on alphabets seen in training, a much easier task than the test.

    Returns:
        `DatasetSplits`.

    Raises:
        ValueError: if the count is negative or leaves fewer than 2 training classes.
    """
    if validation_classes < 0:
        raise ValueError(f"validation_classes must be >= 0, got {validation_classes}.")
    if validation_classes == 0:
        return splits
    classes = splits.train.classes
    if validation_classes > len(classes) - 2:
        raise ValueError(f"validation_classes={validation_classes} leaves fewer than 2 of the "
                         f"{len(classes)} training classes of {splits.name!r} for training.")
    # Paper §4 is silent (no validation split): a seeded random choice among training classes.
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x7A1])
    if last:
        chosen = np.sort(classes)[-validation_classes:]
    else:
        chosen = np.sort(rng.choice(classes, size=validation_classes, replace=False))
    train_classes = np.setdiff1d(classes, chosen)
    return dataclasses.replace(
        splits,
        train=splits.train.take_classes(train_classes, name="train"),
        validation=splits.train.take_classes(chosen, name="validation"))


def check_training_classes(catalog, dataset_name, max_listed=10):
    """Warns about training classes with a single image and fails if fewer than 2 are usable.

    Args:
        catalog: the training `ImageCatalog`.
        dataset_name: for messages.
        max_listed: how many single-image classes to name in the warning.

    Raises:
        ValueError: if fewer than 2 classes have at least 2 images.
    """
    classes, counts = catalog.class_counts()
    single = classes[counts < 2]
    if len(single):
        names = ", ".join(repr(catalog.class_name(c)) for c in single[:max_listed])
        more = f" and {len(single) - max_listed} more" if len(single) > max_listed else ""
        logging.warning("%s %s: %d class(es) have a single image and cannot form a positive pair, "
                        "so the training sampler leaves them out: %s%s.", dataset_name,
                        catalog.name, len(single), names, more)
    usable = int(np.sum(counts >= 2))
    if usable < 2:
        raise ValueError(f"{dataset_name} {catalog.name}: only {usable} class(es) have at least 2 "
                         f"images ({len(classes)} classes, {catalog.num_images} images); metric "
                         "learning needs at least 2 such classes.")
