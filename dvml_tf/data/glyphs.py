"""The `glyphs` dataset: characters rendered from font files, as a prepared folder that
`load_dataset("glyphs", data_dir=DIR)` reads (the builder is `glyph_builder.py`).

Classes are characters, instances are font designs: every design draws every character, so a
design's style is intra-class variation shared by all classes (DVML's premise, by
construction). The folder holds:

* `images.npy`: uint8 [N, S, S], gray, ink bright (255) on 0, like the stored Omniglot images;
* `labels.npy`: int64 [N], the class (character) of each image, an index into
  `manifest["characters"]`;
* `designs.npy`: int32 [N], the design (a font face, faces drawing the same design counted once)
  of each image, an index into `manifest["designs"]`;
* `copies.npy`: int32 [N], the augmented copy of that design (0 without augmentation); image i
  is instance `designs[i] * copies_per_design + copies[i]` of its class, and every class's
  instance j got the same augmentation (`manifest["instances"][j]`);
* `manifest.json`: the fonts (SHA-256, Debian package, faces), the designs, the characters and
  their split, the rendering rule, the augmentation of every instance, the counts.

The images are ordered by class, then design, then copy. The splits are by class: `train`,
`validation` (held-out training classes, for model selection), `test`, and `pretrain` (a pool
of further characters, never used by `load_dataset`).

`load_glyphs` (through `load_dataset`): with `validation_classes=0` the training split is every
training class (`train` + `validation`), as the Omniglot test protocol trains on all background
classes; with `validation_classes` equal to the built validation split's size, `train` and
`validation` are the built splits. The raw form (what a client of an exported model sends) is
Omniglot's: RGB, dark ink on white, S x S (`RawForm("omniglot_ink", ...)`); stored = 255 - gray
of it, exactly the built image.
"""

import hashlib
import io
import json
import os

import numpy as np
from absl import logging
from PIL import Image

from dvml_tf.data.catalog import DatasetSplits
from dvml_tf.data.catalog import ImageCatalog
from dvml_tf.data.catalog import materialize
from dvml_tf.data.raw_form import OMNIGLOT_INK
from dvml_tf.data.raw_form import RawForm

FORMAT = "dvml_tf glyphs"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGES = "images.npy"
LABELS = "labels.npy"
DESIGNS = "designs.npy"
COPIES = "copies.npy"
ARRAY_FILES = (IMAGES, LABELS, DESIGNS, COPIES)
SPLITS = ("train", "validation", "test", "pretrain")
# The image side of the default build (`raw_form_of` without the data at hand).
DEFAULT_IMAGE_SIZE = 32
_BUILD_HINT = ("Build one with `python -m dvml_tf.data.glyph_builder --fonts=FONTS "
               "--output=DIR` (docs/glyphs.md).")


def read_manifest(data_dir):
    """Reads and checks a glyph folder's manifest.

    Args:
        data_dir: the folder the builder wrote.

    Returns:
        dict, the manifest.

    Raises:
        FileNotFoundError: no such folder, or no manifest.json in it.
        ValueError: a manifest of another format or version.
    """
    if data_dir is None:
        raise ValueError(f"dataset=glyphs needs --data_dir=<a glyph folder>. {_BUILD_HINT}")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"Glyph folder {data_dir!r} does not exist. {_BUILD_HINT}")
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {data_dir!r} is not a glyph folder. "
                                f"{_BUILD_HINT}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON manifest: {error}") from error
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT!r} manifest of version {FORMAT_VERSION} "
                         f"(format {manifest.get('format')!r}, version "
                         f"{manifest.get('format_version')!r}); rebuild the folder.")
    return manifest


def read_arrays(data_dir, mmap=True):
    """The arrays of a glyph folder, checked against each other and the manifest.

    Args:
        data_dir: the folder the builder wrote.
        mmap: map `images.npy` instead of reading it (the other arrays are read).

    Returns:
        dict: "images" uint8 [N, S, S], "labels" int64 [N], "designs" int32 [N], "copies"
        int32 [N], "manifest" dict.

    Raises:
        FileNotFoundError: a missing file.
        ValueError: inconsistent files.
    """
    manifest = read_manifest(data_dir)
    arrays = {"manifest": manifest}
    for name in ARRAY_FILES:
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: the glyph folder {data_dir!r} is "
                                    f"incomplete. {_BUILD_HINT}")
        try:
            arrays[name[:-4]] = np.load(path, mmap_mode="r" if mmap and name == IMAGES
                                        else None, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is not a readable .npy array: {error}") from error
    size = manifest["image_size"]
    count = manifest["counts"]["images"]
    images = arrays["images"]
    if images.dtype != np.uint8 or images.shape != (count, size, size):
        raise ValueError(f"{data_dir}/{IMAGES} holds {images.dtype} {images.shape}; the manifest "
                         f"says uint8 ({count}, {size}, {size}).")
    for name in ("labels", "designs", "copies"):
        if arrays[name].shape != (count,):
            raise ValueError(f"{data_dir}/{name}.npy has shape {arrays[name].shape}, not "
                             f"({count},).")
    if count and (arrays["labels"].min() < 0
                  or arrays["labels"].max() >= len(manifest["characters"])):
        raise ValueError(f"{data_dir}/{LABELS} holds labels outside the manifest's "
                         f"{len(manifest['characters'])} characters.")
    return arrays


def split_classes(manifest):
    """The class ids (labels) of each built split.

    Args:
        manifest: a glyph folder's manifest.

    Returns:
        dict split -> np.int64 array of labels (sorted).
    """
    by_split = {split: [] for split in SPLITS}
    for character in manifest["characters"]:
        by_split[character["split"]].append(character["label"])
    return {split: np.asarray(sorted(labels), np.int64) for split, labels in by_split.items()}


def class_name(character):
    """"U+6C38 永": the name of a class in messages and figures."""
    return f"{character['code_point']} {character['character']}"


def raw_images(stored):
    """The raw form of stored glyph images: RGB, dark ink on white.

    Args:
        stored: uint8 [N, S, S] (ink bright).

    Returns:
        uint8 [N, S, S, 3]; `RawForm("omniglot_ink").to_stored` maps it back exactly (the gray
        of (v, v, v) is v).
    """
    return np.repeat((255 - np.asarray(stored, np.uint8))[..., None], 3, axis=-1)


def encode_png(stored):
    """PNG bytes of the raw form (gray, dark ink on white) of stored glyph images, for the
    exports' `embed_bytes` path; decoding with 3 channels gives `raw_images`.

    Args:
        stored: uint8 [N, S, S].

    Returns:
        list of bytes.
    """
    encoded = []
    for image in np.asarray(stored, np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(255 - image, mode="L").save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def load_glyphs(data_dir, image_size=None, validation_classes=0, raw=False):
    """Loads a glyph folder as zero-shot train / [validation] / test catalogs.

    Args:
        data_dir: the folder `glyph_builder` wrote.
        image_size: optional int; the stored images are resized to it (antialiased bilinear,
            as the loader resizes Omniglot) when it differs from the built size.
        validation_classes: 0 (train on every training class, `train` + `validation`) or the
            size of the built validation split (train on `train`, validate on `validation`).
        raw: hold the raw images (PNG bytes of the dark-on-white images, decoded as RGB)
            instead, for exports and their clients; same records in the same order.

    Returns:
        `DatasetSplits` (name "glyphs"; `raw_form` and `identity` set).

    Raises:
        FileNotFoundError, ValueError: a missing or broken folder, or a `validation_classes`
            that is neither 0 nor the built validation split's size.
    """
    data_dir = None if data_dir is None else os.fspath(data_dir)
    arrays = read_arrays(data_dir)
    manifest = arrays["manifest"]
    classes = split_classes(manifest)
    built_validation = len(classes["validation"])
    if validation_classes not in (0, built_validation):
        raise ValueError(
            f"validation_classes={validation_classes}: the glyph folder {data_dir!r} was built "
            f"with {built_validation} validation classes (a split fixed at build time); pass 0 "
            f"(train on train + validation) or {built_validation}.")
    if validation_classes:
        members = {"train": classes["train"], "validation": classes["validation"]}
    else:
        members = {"train": np.concatenate([classes["train"], classes["validation"]])}
    members["test"] = classes["test"]
    size = int(manifest["image_size"])
    form = RawForm(OMNIGLOT_INK, int(image_size or size), (size, size))
    names = [class_name(c) for c in manifest["characters"]]
    labels = arrays["labels"]
    catalogs = {}
    for split, split_labels in members.items():
        rows = np.flatnonzero(np.isin(labels, split_labels))
        images = np.asarray(arrays["images"][rows])
        if raw:
            catalog = ImageCatalog(labels[rows], sources=encode_png(images), num_channels=3,
                                   class_names=names, name=split)
        elif form.stored_size == size:
            catalog = ImageCatalog(labels[rows], images=images[..., None], num_channels=1,
                                   class_names=names, name=split)
        else:
            catalog = materialize(ImageCatalog(labels[rows], images=raw_images(images),
                                               num_channels=3, class_names=names, name=split),
                                  form)
        catalogs[split] = catalog
    with open(os.path.join(data_dir, MANIFEST), "rb") as f:
        manifest_digest = hashlib.sha256(f.read()).hexdigest()
    identity = {"dataset": "glyphs", "manifest_sha256": manifest_digest,
                **{split: {"images": int(c.num_images), "classes": int(c.num_classes)}
                   for split, c in catalogs.items()}}
    logging.info("glyphs: %s (%d designs, %d px, built by dvml_tf glyph builder %s).",
                 data_dir, manifest["counts"]["designs"], size, manifest["builder_version"])
    return DatasetSplits(name="glyphs", train=catalogs["train"], test=catalogs["test"],
                         validation=catalogs.get("validation"),
                         num_channels=3 if raw else 1, grayscale=True, raw=bool(raw),
                         raw_form=form, identity=identity)
