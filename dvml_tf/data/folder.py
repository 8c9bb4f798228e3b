"""The `folder` dataset: one sub-folder of images per class, checked once at load time.

Layouts:

    data_dir/<class>/**/<image>                 sorted classes: first half train, rest test
    data_dir/train/<class>/..., data_dir/test/<class>/...    explicit class-disjoint splits

Every JPEG/PNG/BMP/GIF file is decoded once, in parallel, with the decoder the training pipeline
uses (`catalog.decode_image`), so a bad file is skipped here (counted and logged) instead of
crashing an epoch. Images TF cannot decode correctly but PIL can (1/4/8-bit palette BMPs, which
TF reads as their raw palette indices or rejects, and whatever else TF rejects) are converted to
RGB once and kept in memory as PNG bytes; all other images stay on disk and are read by path.
"""

import concurrent.futures
import io
import os
import struct
import time

import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image

from dvml_tf.data.catalog import DatasetSplits
from dvml_tf.data.catalog import ImageCatalog
from dvml_tf.data.catalog import decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_LISTED_PATHS = 5


def load_folder(data_dir, check_images=True):
    """Loads a class-per-folder image collection as class-disjoint train and test catalogs.

    Args:
        data_dir: the folder (str or path-like).
        check_images: decode every file once at load time (recommended; see module docstring).
            Without it a corrupt file fails the input pipeline when it is first drawn.

    Returns:
        `DatasetSplits` with file-backed catalogs of 3-channel images; labels index
        `class_names` = train classes then test classes, each sorted.

    Raises:
        FileNotFoundError: if `data_dir` does not exist.
        ValueError: no data_dir, an empty folder, fewer than 2 classes, overlapping explicit
            splits, or no decodable image.
    """
    if data_dir is None:
        raise ValueError("The folder dataset needs data_dir: a folder with one sub-folder of "
                         "images per class (or train/ and test/ folders of class sub-folders).")
    root = os.path.abspath(os.fspath(data_dir))
    if not os.path.exists(root):
        raise FileNotFoundError(f"data_dir {root!r} does not exist.")
    if not os.path.isdir(root):
        raise ValueError(f"data_dir {root!r} is not a directory.")

    split_dirs = {s: os.path.join(root, s) for s in ("train", "test")}
    explicit = [s for s, path in split_dirs.items() if os.path.isdir(path)]
    if len(explicit) == 1:
        raise ValueError(f"data_dir {root!r} has a {explicit[0]}/ folder but no "
                         f"{({'train', 'test'} - set(explicit)).pop()}/ folder: give both (each "
                         "with class sub-folders) or neither (class sub-folders directly).")
    if explicit:
        train_classes = _class_dirs(split_dirs["train"])
        test_classes = _class_dirs(split_dirs["test"])
        overlap = sorted(set(train_classes) & set(test_classes))
        if overlap:
            raise ValueError(f"Classes {overlap[:10]} appear in both {split_dirs['train']!r} and "
                             f"{split_dirs['test']!r}; the zero-shot splits must be "
                             "class-disjoint.")
        class_dirs = ([os.path.join(split_dirs["train"], c) for c in train_classes]
                      + [os.path.join(split_dirs["test"], c) for c in test_classes])
    else:
        classes = _class_dirs(root)
        train_classes, test_classes = split_classes(classes)
        class_dirs = [os.path.join(root, c) for c in classes]
    class_names = list(train_classes) + list(test_classes)
    if not class_names:
        raise ValueError(f"data_dir {root!r} is empty: it has no class sub-folders (expected one "
                         "sub-folder of images per class, or train/ and test/ folders of them).")
    if len(class_names) < 2 or not train_classes or not test_classes:
        raise ValueError(f"data_dir {root!r} has {len(class_names)} class folder(s) "
                         f"({len(train_classes)} train, {len(test_classes)} test); at least 2 "
                         "are needed, with at least one in each split.")

    paths, labels, ignored = [], [], 0
    for label, class_dir in enumerate(class_dirs):
        files, other = _image_files(class_dir)
        ignored += other
        paths.extend(files)
        labels.extend([label] * len(files))
    labels = np.asarray(labels, np.int64)
    if ignored:
        logging.info("folder %s: ignored %d files without an image extension %s.", root, ignored,
                     IMAGE_EXTENSIONS)

    sources = np.array([os.fsencode(p) for p in paths], dtype=object)
    is_path = np.ones(len(paths), bool)
    paths = np.asarray(paths, dtype=str)
    unreadable = ()
    if check_images and len(paths):
        ok, converted = check_image_files(paths)
        for index, png in converted.items():
            sources[index], is_path[index] = png, False
        keep = np.flatnonzero(ok)
        unreadable = tuple(paths[~ok].tolist())
        sources, is_path, labels, paths = sources[keep], is_path[keep], labels[keep], paths[keep]
    if not len(labels):
        raise ValueError(f"data_dir {root!r} holds no decodable image ({IMAGE_EXTENSIONS}) in "
                         f"its {len(class_names)} class folders.")

    present = set(np.unique(labels).tolist())
    empty = [class_names[c] for c in range(len(class_names)) if c not in present]
    if empty:
        logging.warning("folder %s: %d class folder(s) without a decodable image are left out: "
                        "%s.", root, len(empty), empty[:10])
    is_train = labels < len(train_classes)
    splits = {}
    for split, mask in (("train", is_train), ("test", ~is_train)):
        if not mask.any():
            raise ValueError(f"data_dir {root!r}: no decodable image in any {split} class.")
        splits[split] = ImageCatalog(labels[mask], sources=sources[mask],
                                     source_is_path=is_path[mask], class_names=class_names,
                                     name=split, paths=paths[mask])
    return DatasetSplits(name="folder", train=splits["train"], test=splits["test"],
                         unreadable=unreadable)


def split_classes(classes):
    """The class split of a dataset without explicit splits: the first half of the sorted
    classes trains, the rest tests.

    Args:
        classes: the sorted class names (or ids).

    Returns:
        (train classes, test classes), slices of `classes`.
    """
    # Paper §4 is silent on odd class counts (it halves 200 and 196): train gets one more.
    num_train = (len(classes) + 1) // 2
    return classes[:num_train], classes[num_train:]


def _class_dirs(path):
    """Sorted names of the non-hidden sub-folders of `path`."""
    return sorted(e.name for e in os.scandir(path)
                  if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir):
    """All image files below a class folder (recursively, sorted) and the count of other files."""
    files, other = [], 0
    for directory, subdirs, names in os.walk(class_dir, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(directory, name))
            else:
                other += 1
    return files, other


def _needs_pil(path):
    """True for BMPs with fewer than 24 bits per pixel: TF ignores their palette or fails."""
    if not path.lower().endswith(".bmp"):
        return False
    try:
        with open(path, "rb") as f:
            header = f.read(30)
    except OSError:
        return False
    if len(header) < 30 or header[:2] != b"BM":
        return False
    info_size = struct.unpack("<I", header[14:18])[0]
    bits = struct.unpack("<H", header[24:26] if info_size == 12 else header[28:30])[0]
    return bits < 24


def _tf_decodable(paths, channels=3):
    """Indices of the files TF's pipeline decoder reads, checked in parallel with tf.data."""
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(paths), dtype=tf.int64), tf.constant([os.fsencode(p) for p in paths])))

    def check(index, path):
        # The shape depends on the decoded pixels, so the decode cannot be pruned away.
        return index, tf.shape(decode_image(tf.io.read_file(path), channels))

    dataset = dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    good = [int(i) for i, _ in dataset.ignore_errors().as_numpy_iterator()]
    return np.asarray(good, np.int64)


def convert_with_pil(path):
    """Decodes a file with PIL and re-encodes it as an 8-bit RGB PNG.

    Args:
        path: file path.

    Returns:
        PNG bytes, or None when PIL cannot read the whole image either.
    """
    try:
        with Image.open(path) as image:
            image.load()  # Decodes everything: truncated or corrupt files raise here.
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit integer gray: keep the high byte, as TF does for 16-bit PNGs.
                pixels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
                image = Image.fromarray(pixels.astype(np.uint8), "L")
            elif image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            # Alpha is dropped (not composited), as TF's decoder does for the other files.
            rgb = image.convert("RGB")
            buffer = io.BytesIO()
            rgb.save(buffer, format="PNG")
            return buffer.getvalue()
    except Exception:  # Any failure means "not an image we can use".
        return None


def check_image_files(paths):
    """Decodes every file once and says which ones the pipeline can use.

    Args:
        paths: list of file paths.

    Returns:
        (ok, converted): ok is a bool array [len(paths)]; converted maps the index of each file
        that needed PIL to its RGB PNG bytes (also marked ok).
    """
    started = time.monotonic()
    paths = [os.fspath(p) for p in paths]
    pil_first = np.array([_needs_pil(p) for p in paths], bool)
    tf_candidates = np.flatnonzero(~pil_first)
    ok = np.zeros(len(paths), bool)
    if len(tf_candidates):
        ok[tf_candidates[_tf_decodable([paths[i] for i in tf_candidates])]] = True
    retry = np.flatnonzero(~ok)
    converted = {}
    if len(retry):
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            results = pool.map(convert_with_pil, [paths[i] for i in retry])
            for index, png in zip(retry, results, strict=True):
                if png is not None:
                    converted[int(index)] = png
                    ok[index] = True
    bad = [paths[i] for i in np.flatnonzero(~ok)]
    seconds = time.monotonic() - started
    logging.info("Checked %d image files in %.1f s (%.0f files/s): %d converted with PIL, %d "
                 "unreadable.", len(paths), seconds, len(paths) / max(seconds, 1e-9),
                 len(converted), len(bad))
    if converted:
        logging.info("Converted with PIL (TF cannot decode them correctly): %s%s",
                     [paths[i] for i in list(converted)[:_LISTED_PATHS]],
                     " ..." if len(converted) > _LISTED_PATHS else "")
    if bad:
        logging.warning("Skipped %d unreadable or corrupt image file(s), e.g. %s%s", len(bad),
                        bad[:_LISTED_PATHS], " ..." if len(bad) > _LISTED_PATHS else "")
    return ok, converted
