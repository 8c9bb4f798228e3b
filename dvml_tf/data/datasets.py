"""`load_dataset`: the named datasets (TFDS builders, zero-shot class splits), the folder layout,
CSV manifests and glyph folders (`folder.py`, `manifest.py`, `glyphs.py`).

| name     | TFDS builder             | train                       | test                        |
| -------- | ------------------------ | --------------------------- | --------------------------- |
| omniglot | omniglot 3.0.0           | split train: 964 cl./19,280 | split test: 659 cl./13,180  |
| cub200   | caltech_birds2011        | labels 0-99: 5,864 images   | labels 100-199: 5,924       |
| cars196  | cars196                  | labels 0-97: 8,054 images   | labels 98-195: 8,131        |
| sop      | stanford_online_products | train: 11,318 cl./59,551    | test: 11,316 cl./60,502     |

The builders are used through `tfds.builder(...).as_dataset(...)`, so `tfds.testing.mock_data`
works. TFDS's own split of Omniglot and SOP is class-disjoint, with the training classes below a
label boundary; the loader keeps only the images on the right side of that boundary, which
changes nothing on the real data and keeps the splits class-disjoint under mock data (whose labels
are random and whose splits hold the same examples).

Offline: a real `tfds.load` of a dataset that is not prepared locally hangs on DNS retries, so
before TFDS downloads anything the loader checks (~3 s) that the download host is reachable and
otherwise raises `FileNotFoundError` explaining how to point TFDS at a prepared copy. `mock_data`
replaces `DatasetBuilder.download_and_prepare` with a no-op; the check is skipped when that
method is not TFDS's own, so mocked loads never touch the network.
"""

import contextlib
import dataclasses
import os
import re
import socket
import threading
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from dvml_tf.data import folder
from dvml_tf.data import glyphs
from dvml_tf.data import manifest
from dvml_tf.data import pixel_limit
from dvml_tf.data.catalog import DatasetSplits
from dvml_tf.data.catalog import ImageCatalog
from dvml_tf.data.catalog import carve_validation
from dvml_tf.data.catalog import check_training_classes
from dvml_tf.data.catalog import host_tensor
from dvml_tf.data.catalog import materialize
from dvml_tf.data.raw_form import NO_CONVERSION
from dvml_tf.data.raw_form import OMNIGLOT_INK
from dvml_tf.data.raw_form import RawForm

DATASETS = ("omniglot", "cub200", "cars196", "sop", "folder", "csv", "glyphs")
# Datasets read from the user's files (data_dir is required): an image folder, a CSV manifest,
# a glyph folder (built by `glyph_builder`).
FILE_DATASETS = ("folder", "csv", "glyphs")
# Grayscale stroke data: stored as gray, and never flipped (a mirrored glyph is another glyph).
GRAYSCALE_DATASETS = ("omniglot", "glyphs")
# Default side of the in-memory Omniglot images: the training recipe random-crops 28 from 32.
OMNIGLOT_IMAGE_SIZE = 32
NETWORK_TIMEOUT_SECONDS = 3.0
# Largest decoded copy `image_size` may create for the photo datasets: CUB (2.3 GB) and Cars
# (3.2 GB) fit at 256 px, SOP (23.6 GB at 256 px) stays encoded.
MAX_DECODED_BYTES = 4 * 1024**3


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
    tfds_name: str
    label_key: str
    # Labels below `boundary` are training classes (the zero-shot split of paper §4).
    boundary: int
    # True: TFDS's own train/test splits are the protocol's (each filtered to its side of the
    # boundary). False: all splits are merged and re-split by the boundary.
    own_splits: bool
    # Where the TFDS builder (4.9.10) downloads from: (host, port).
    download_host: tuple
    # Train + test images of the real dataset (the table above): the memory rule of
    # `raw_form_of` when the dataset itself is not loaded.
    num_images: int
    # (height, width) of every raw image when the dataset fixes it, else None.
    raw_size: tuple | None = None


_SPECS = {
    "omniglot": _TfdsSpec("omniglot", "label", 964, True, ("github.com", 443), 32460,
                          raw_size=(105, 105)),
    "cub200": _TfdsSpec("caltech_birds2011", "label", 100, False, ("data.caltech.edu", 443),
                        11788),
    "cars196": _TfdsSpec("cars196", "label", 98, False, ("ai.stanford.edu", 80), 16185),
    "sop": _TfdsSpec("stanford_online_products", "class_id", 11318, True,
                     ("cs.stanford.edu", 21), 120053),
}

_CARS196_HINT = (
    "TFDS's cars196 download URL (ai.stanford.edu/~jkrause) has been broken upstream since 2023 "
    "(tensorflow/datasets#4932), so cars196 cannot be downloaded by TFDS: use an already prepared "
    "TFDS copy (a data dir containing cars196/2.1.0/), or the folder layout: "
    "load_dataset('folder', data_dir=DIR) (--dataset=folder --data_dir=DIR) with one sub-folder "
    "per car model; the first 98 sorted class folders are the training classes.")


def load_dataset(name, data_dir=None, image_size=None, validation_classes=0, seed=0,
                 raw=False, max_pixels=pixel_limit.DEFAULT_MAX_PIXELS):
    """Loads a dataset as zero-shot (class-disjoint) train / [validation] / test catalogs.

    Args:
        name: one of `DATASETS`.
        data_dir: for TFDS datasets, the TFDS data dir (default: TFDS's default, which honours
            the TFDS_DATA_DIR environment variable); for "folder", the image folder; for
            "csv", the CSV manifest file; for "glyphs", the glyph folder.
        image_size: optional int. Omniglot is always held decoded, at this size (default 32;
            105 is the original); glyphs too (default: the built size). Other datasets are
            kept encoded and decoded on the fly, unless
            `image_size` is given and the decoded copy fits in `MAX_DECODED_BYTES`: then they
            are decoded once and held in memory at image_size x image_size (faster epochs;
            with a warning and no effect when it does not fit). See `raw_form_of`.
        validation_classes: int; carve this many training classes out as a validation split
            (never test classes). Glyph folders fix their validation split when they are
            built: 0 or its size.
        seed: int, picks the validation classes.
        raw: bool. True returns the same splits (same records in the same order, same
            validation classes) holding the raw images instead: the encoded bytes or file paths,
            decoded as RGB at the original size, with neither conversion nor resize (nothing is
            decoded at load time). `raw_form` still says what the loader stores with these
            arguments, and `raw_form.to_stored` maps raw images to it.
        max_pixels: the pixel limit (width x height, `pixel_limit`): the folder and CSV loaders
            skip larger files unread, and every catalog's decoder refuses them.

    Returns:
        `DatasetSplits` (`raw` and `raw_form` set).

    Raises:
        ValueError: for an unknown name or bad arguments.
        FileNotFoundError: when the data is not available (see the message for what to do).
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}.")
    if image_size is not None and (int(image_size) != image_size or image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}.")
    data_dir = None if data_dir is None else os.fspath(data_dir)
    max_pixels = pixel_limit.check_max_pixels(max_pixels, "max_pixels")
    if name == "glyphs":  # arrays rendered by the builder: no image file to bound
        splits = glyphs.load_glyphs(data_dir, image_size=image_size,
                                    validation_classes=validation_classes, raw=raw)
        return _checked(splits, name)
    if name == "folder":
        splits = folder.load_folder(data_dir, max_pixels=max_pixels)
    elif name == "csv":
        splits = manifest.load_manifest(data_dir, max_pixels=max_pixels)
        if splits.validation is not None and validation_classes:
            raise ValueError(f"The CSV manifest {data_dir} has validation rows; validation_classes "
                             f"must then be 0 (got {validation_classes}).")
    else:
        splits = _load_tfds(name, data_dir, max_pixels)
    num_images = splits.train.num_images + splits.test.num_images
    form = raw_form_of(name, image_size, num_images)
    if image_size is not None and not form.resized and not raw:
        decoded_bytes = num_images * image_size * image_size * splits.num_channels
        logging.warning("%s: %d images at %d px would take %.1f GB decoded (limit %.1f GB): "
                        "keeping them encoded and decoding on the fly.", name, num_images,
                        image_size, decoded_bytes / 1e9, MAX_DECODED_BYTES / 1e9)
    splits = dataclasses.replace(splits, grayscale=is_grayscale(name), raw=bool(raw),
                                 raw_form=form)
    if form.resized and not raw:
        splits = dataclasses.replace(
            splits, train=materialize(splits.train, form), test=materialize(splits.test, form),
            num_channels=form.num_channels)
    # Omniglot validates on whole held-out alphabets, like its test split (see carve_validation).
    splits = carve_validation(splits, validation_classes, seed, last=name == "omniglot")
    return _checked(splits, name)


def _checked(splits, name):
    """The training-class check and the per-split log line of every loaded dataset."""
    # Paper §4 is silent on single-image classes: left out of training batches (they have no
    # positive), kept in the evaluation splits (their images are gallery distractors).
    check_training_classes(splits.train, name)
    for split, catalog in splits.splits().items():
        logging.info("%s %s%s: %d classes, %d images (%s).", name, "raw " if splits.raw else "",
                     split, catalog.num_classes, catalog.num_images, catalog.storage)
    return splits


def is_grayscale(name):
    """Whether a dataset is grayscale stroke data (Omniglot): stored gray, never flipped.

    Args:
        name: one of `DATASETS`.

    Returns:
        bool.
    """
    return name in GRAYSCALE_DATASETS


def raw_form_of(name, image_size=None, num_images=None):
    """The `RawForm` of `load_dataset(name, image_size=image_size)`: how it stores the images.

    Omniglot is converted to inverted gray ("omniglot_ink") and always held decoded at
    `image_size` (default `OMNIGLOT_IMAGE_SIZE`); so are glyph folders (default: the default
    build's size; `load_dataset` knows the built size and raw size, this function does not).
    The other datasets keep RGB; they are held
    decoded at `image_size` when it is given and `num_images` RGB images of that size fit in
    `MAX_DECODED_BYTES`, else kept encoded at their original size.

    Args:
        name: one of `DATASETS`.
        image_size: optional int, as passed to `load_dataset`.
        num_images: train + test images; default: the real TFDS dataset's count (required for
            "folder" and "csv"; unused for the decoded ones).

    Returns:
        `RawForm`.

    Raises:
        ValueError: an unknown name, or "folder"/"csv" without `num_images`.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}.")
    spec = _SPECS.get(name)
    raw_size = spec.raw_size if spec else None
    if name == "glyphs":
        return RawForm(OMNIGLOT_INK, image_size or glyphs.DEFAULT_IMAGE_SIZE, None)
    if is_grayscale(name):
        return RawForm(OMNIGLOT_INK, image_size or OMNIGLOT_IMAGE_SIZE, raw_size)
    if image_size is None:
        return RawForm(NO_CONVERSION, None, raw_size)
    if num_images is None:
        if spec is None:
            raise ValueError(f"num_images is needed to know how the loader holds {name!r} "
                             "(decoded or encoded).")
        num_images = spec.num_images
    decoded_bytes = num_images * image_size * image_size * 3
    size = image_size if decoded_bytes <= MAX_DECODED_BYTES else None
    return RawForm(NO_CONVERSION, size, raw_size)


def _reprepare_advice(folder):
    return (f"Prepare it again: remove {folder} and load the dataset once with network access "
            "(or copy a good prepared copy there).")


def _open_builder(spec, data_dir):
    """The TFDS builder, or a clear error when its prepared files cannot even be described."""
    try:
        return tfds.builder(spec.tfds_name, data_dir=data_dir)
    except Exception as error:  # protobuf's ParseError and the like: no common base class
        root = data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
        folder = os.path.join(os.path.expanduser(root), spec.tfds_name)
        if not os.path.isdir(folder):
            raise
        message = " ".join(str(error).split())
        raise ValueError(f"The prepared TFDS dataset {spec.tfds_name!r} in {folder} is corrupt: "
                         f"its dataset_info.json (or features.json) cannot be read ({message}). "
                         f"{_reprepare_advice(folder)}") from None


def _load_tfds(name, data_dir, max_pixels=pixel_limit.DEFAULT_MAX_PIXELS):
    spec = _SPECS[name]
    builder = _open_builder(spec, data_dir)
    _ensure_prepared(builder, name, spec)
    label_feature = builder.info.features[spec.label_key]
    class_names = getattr(label_feature, "names", None)
    if spec.own_splits:
        train = _read_split(builder, "train", spec, keep=lambda labels: labels < spec.boundary)
        test = _read_split(builder, "test", spec, keep=lambda labels: labels >= spec.boundary)
    else:
        parts = [_read_split(builder, split, spec) for split in ("train", "test")]
        with tf.device("/cpu:0"):
            images = tf.concat([p[0] for p in parts], axis=0)
        labels = np.concatenate([p[1] for p in parts])
        is_train = labels < spec.boundary
        with tf.device("/cpu:0"):
            train = (tf.boolean_mask(images, is_train), labels[is_train])
            test = (tf.boolean_mask(images, ~is_train), labels[~is_train])
    # The raw form: every dataset is decoded as RGB; load_dataset converts Omniglot's gray
    # strokes itself (`RawForm.to_stored`), so that exported graphs can do the same.
    catalogs = {
        split: ImageCatalog(labels, sources=images, num_channels=3,
                            class_names=class_names, name=split, max_pixels=max_pixels)
        for split, (images, labels) in (("train", train), ("test", test))}
    identity = {"dataset": name, "tfds": f"{builder.name}/{builder.version}",
                **{split: {"images": int(catalog.num_images), "classes": int(catalog.num_classes)}
                   for split, catalog in catalogs.items()}}
    return DatasetSplits(name=name, train=catalogs["train"], test=catalogs["test"],
                         identity=identity)


def _read_split(builder, split, spec, keep=None):
    """The encoded images (string tensor [N]) and labels (np.int64 [N]) of one TFDS split."""
    # Only the image bytes and the label are parsed: no pixel decoding, no bbox/mask features.
    decoders = tfds.decode.PartialDecoding({"image": True, spec.label_key: True},
                                           decoders={"image": tfds.decode.SkipDecoding()})
    dataset = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    images, labels = [], []
    try:
        for batch in dataset.batch(4096):
            images.append(batch["image"])
            labels.append(batch[spec.label_key].numpy())
    except tf.errors.OpError as error:  # DataLossError (truncated, corrupt), NotFoundError
        # Without TF's framing: "{{function_node ...}} <message> [Op:IteratorGetNext] ...".
        message = re.sub(r"\{\{function_node [^}]*\}\}|\[Op:.*$", "", error.message).strip()
        raise ValueError(f"The prepared TFDS dataset {spec.tfds_name!r} in {builder.data_dir} is "
                         f"damaged: its {split} split cannot be read ({message}). "
                         f"{_reprepare_advice(builder.data_dir)}") from None
    with tf.init_scope(), tf.device("/cpu:0"):
        images = tf.concat(images, axis=0) if images else host_tensor(np.zeros([0], object))
    labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros([0], np.int64)
    if keep is not None:
        mask = keep(labels)
        if not mask.all():
            # Never happens with the real data; with mock data (random labels) it does.
            logging.warning("%s: dropped %d of %d images of TFDS split %r whose labels belong to "
                            "the other side of the zero-shot class split (label boundary %d).",
                            spec.tfds_name, int(np.sum(~mask)), len(mask), split, spec.boundary)
            with tf.device("/cpu:0"):
                images = tf.boolean_mask(images, mask)
            labels = labels[mask]
    return images, labels


def tfds_is_mocked():
    """Whether `tfds.testing.mock_data` (or another patch) replaced `download_and_prepare`.

    Returns:
        bool.
    """
    method = tfds.core.DatasetBuilder.download_and_prepare
    return getattr(method, "__module__", None) != "tensorflow_datasets.core.dataset_builder"


def download_host_reachable(host, port, timeout=NETWORK_TIMEOUT_SECONDS):
    """Whether a TCP connection to `host:port` can be opened within `timeout` seconds in total.

    The DNS lookup runs in a daemon thread because `getaddrinfo` has no timeout of its own (an
    unreachable resolver makes it retry for tens of seconds).

    Args:
        host: host name.
        port: int port.
        timeout: seconds for the lookup and the connection together.

    Returns:
        bool.
    """
    deadline = time.monotonic() + timeout
    found = []

    def resolve():
        with contextlib.suppress(OSError):
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))

    thread = threading.Thread(target=resolve, daemon=True, name=f"resolve-{host}")
    thread.start()
    thread.join(timeout)
    for family, kind, proto, _, address in list(found):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(remaining)
                sock.connect(address)
                return True
        except OSError:
            continue
    return False


def _ensure_prepared(builder, name, spec):
    """Prepares the TFDS dataset, or fails within seconds when that would need a network."""
    if builder.is_prepared():
        return
    if tfds_is_mocked():
        builder.download_and_prepare()  # A no-op under mock_data.
        return
    host, port = spec.download_host
    advice = (f"Point TFDS at a prepared copy (a directory containing "
              f"{spec.tfds_name}/{builder.version}/): set the TFDS_DATA_DIR environment variable "
              "before starting Python, or pass data_dir= (--data_dir=).")
    if name == "cars196":
        advice += " " + _CARS196_HINT
    started = time.monotonic()
    if not download_host_reachable(host, port):
        raise FileNotFoundError(
            f"TFDS dataset {spec.tfds_name!r} {builder.version} is not prepared in "
            f"{builder.data_dir} and its download host {host}:{port} cannot be reached "
            f"(checked for {time.monotonic() - started:.1f} s; offline?). {advice}")
    logging.info("Downloading and preparing TFDS %s into %s.", spec.tfds_name, builder.data_dir)
    try:
        builder.download_and_prepare()
    except Exception as error:
        if name == "cars196":
            raise FileNotFoundError(f"TFDS could not download cars196 ({error}). "
                                    f"{_CARS196_HINT}") from error
        raise
