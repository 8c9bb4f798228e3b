"""The `folder` dataset: one sub-folder of images per class, checked once at load time.

Layouts:

    data_dir/<class>/**/<image>                 sorted classes: first half train, rest test
    data_dir/train/<class>/..., data_dir/test/<class>/...    explicit class-disjoint splits

Every JPEG/PNG/BMP/GIF file is decoded once, in parallel, with the decoder the training pipeline
uses (`catalog.decode_image`), so a bad file is skipped here (counted and logged) instead of
crashing an epoch. Images TF cannot decode correctly but PIL can (1/4/8-bit palette BMPs, which
TF reads as their raw palette indices or rejects, and whatever else TF rejects) are converted to
RGB once and kept in memory as PNG bytes; all other images stay on disk and are read by path.

Symbolic links. A class folder is listed without ever leaving it for another part of the
dataset: a link (to a folder or a file) is followed only when its target lies inside the class
folder that holds it, or entirely outside the dataset folder (an external photo store linked in).
A link that leads back to the class folder or above it (`class_03/loop -> ..`, `a -> .`), into
another class folder or elsewhere in the dataset folder, a folder already listed (any loop, also
outside the dataset), a file already listed (one image, one label) and a broken link are
skipped; the count and the first of them are logged. So every image file is listed once, under
the class folder it is in, and a listing always ends.

The identity of what was loaded (`DatasetSplits.identity`: the class names of each split and,
per class, the number of images and a digest of their paths relative to the class folder and
their sizes) lets a resumed run check that it trains on the same images, wherever they moved.
"""

import concurrent.futures
import functools
import hashlib
import io
import os
import struct
import time

import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image

from dvml_tf.data import pixel_limit
from dvml_tf.data.catalog import DatasetSplits
from dvml_tf.data.catalog import ImageCatalog
from dvml_tf.data.catalog import decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_LISTED_PATHS = 5


def load_folder(data_dir, check_images=True, max_pixels=pixel_limit.DEFAULT_MAX_PIXELS):
    """Loads a class-per-folder image collection as class-disjoint train and test catalogs.

    Args:
        data_dir: the folder (str or path-like).
        check_images: decode every file once at load time (recommended; see module docstring).
            Without it a corrupt file fails the input pipeline when it is first drawn.
        max_pixels: the pixel limit (width x height): larger images are skipped unread at load
            time (`check_image_files`) and refused by the pipeline's decoder.

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
        train_classes = _class_dirs(split_dirs["train"], root)
        test_classes = _class_dirs(split_dirs["test"], root)
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

    listing = _Listing(root, class_dirs)
    paths, labels, relative = [], [], []
    for label, class_dir in enumerate(class_dirs):
        files = listing.image_files(class_dir)
        paths.extend(files)
        labels.extend([label] * len(files))
        relative.extend(os.path.relpath(path, class_dir) for path in files)
    labels = np.asarray(labels, np.int64)
    if listing.ignored:
        logging.info("folder %s: ignored %d files without an image extension %s.", root,
                     listing.ignored, IMAGE_EXTENSIONS)
    listing.report()

    sources = np.array([os.fsencode(p) for p in paths], dtype=object)
    is_path = np.ones(len(paths), bool)
    paths = np.asarray(paths, dtype=str)
    keep = np.arange(len(paths))
    unreadable = ()
    if check_images and len(paths):
        ok, converted = check_image_files(paths, max_pixels)
        for index, png in converted.items():
            sources[index], is_path[index] = png, False
        keep = np.flatnonzero(ok)
        unreadable = tuple(paths[~ok].tolist())
        sources, is_path, labels = sources[keep], is_path[keep], labels[keep]
    identity = folder_identity(class_names, len(train_classes), labels,
                               [relative[i] for i in keep], paths[keep].tolist())
    paths = paths[keep]
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
                                     name=split, paths=paths[mask], max_pixels=max_pixels)
    return DatasetSplits(name="folder", train=splits["train"], test=splits["test"],
                         identity=identity, unreadable=unreadable)


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


def _class_dirs(path, root=None):
    """Sorted names of the non-hidden sub-folders of `path`, without links that lead back to
    the dataset folder `root` (default: `path`) or to a class folder listed before."""
    root_real = os.path.realpath(root or path)
    names, reals = [], {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        try:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
        except OSError:  # e.g. a link that points to itself
            continue
        real = os.path.realpath(entry.path)
        if _within(root_real, real):
            logging.warning("folder %s: skipped %s -> %s: it leads back to the dataset folder.",
                            root_real, entry.path, real)
        elif real in reals:
            logging.warning("folder %s: skipped %s: it is the same folder as class %r.",
                            root_real, entry.path, reals[real])
        else:
            names.append(entry.name)
            reals[real] = entry.name
    return names


def _within(path, folder):
    """Whether `path` is `folder` or lies below it (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Listing:
    """Lists the image files of the class folders of one dataset, following symbolic links only
    where they cannot list a file twice or under another class (see the module docstring).

    Args:
        root: the dataset folder.
        class_dirs: every class folder of the dataset.
    """

    def __init__(self, root, class_dirs):
        self.root = os.path.realpath(root)
        self.class_reals = {os.path.realpath(d) for d in class_dirs}
        self.seen_dirs = set()  # (st_dev, st_ino) of every folder listed
        self.seen_files = set()  # real paths of every image file listed
        self.skipped = []  # (path, reason)
        self.ignored = 0

    def _link_problem(self, target, class_real):
        """Why a link to `target` (a real path) inside the class folder `class_real` is not
        followed, or None."""
        if _within(class_real, target) or _within(self.root, target):
            return "leads back to its class folder or above it"
        if any(_within(target, other) or _within(other, target)
               for other in self.class_reals if other != class_real):
            return "leads into another class folder"
        if _within(target, self.root) and not _within(target, class_real):
            return "leads elsewhere in the dataset folder"
        return None

    def image_files(self, class_dir):
        """The image files below one class folder, depth first, each folder's files sorted
        before its sub-folders (sorted): the order of `os.walk`."""
        files = []
        class_real = os.path.realpath(class_dir)
        stack = [(class_dir, class_real)]
        while stack:
            directory, real = stack.pop()
            try:
                info = os.stat(directory)
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError as error:
                self.skipped.append((directory, f"cannot be read ({error.strerror})"))
                continue
            if (info.st_dev, info.st_ino) in self.seen_dirs:
                self.skipped.append((directory, "is a folder already listed"))
                continue
            self.seen_dirs.add((info.st_dev, info.st_ino))
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                target = os.path.join(real, entry.name)
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if not os.path.exists(target):
                        self.skipped.append((entry.path, "is a broken link"))
                        continue
                    problem = self._link_problem(target, class_real)
                    if problem:
                        self.skipped.append((entry.path, f"-> {target} {problem}"))
                        continue
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    subdirs.append((entry.path, target))
                elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    self.ignored += 1
                elif target in self.seen_files:
                    self.skipped.append((entry.path, f"is {target}, already listed"))
                else:
                    self.seen_files.add(target)
                    files.append(entry.path)
            stack.extend(reversed(subdirs))
        return files

    def report(self):
        """Logs what was skipped (count and the first paths with the reason)."""
        if self.skipped:
            shown = "; ".join(f"{path} {reason}" for path, reason in self.skipped[:_LISTED_PATHS])
            more = " ..." if len(self.skipped) > _LISTED_PATHS else ""
            logging.warning("folder %s: skipped %d symbolic link(s) or folder(s) that would list "
                            "files twice or under another class: %s%s", self.root,
                            len(self.skipped), shown, more)


def folder_identity(class_names, num_train, labels, relative_paths, paths):
    """What a folder dataset is, independent of where it lies: per split, per class (by name),
    the number of images and a digest of their paths relative to the class folder and sizes.

    Args:
        class_names: names indexed by label.
        num_train: the first `num_train` labels are training classes.
        labels: int array, the label of each kept image.
        relative_paths: each kept image's path relative to its class folder.
        paths: each kept image's path (for its size).

    Returns:
        dict (JSON-serializable).
    """
    digests = [hashlib.sha256() for _ in class_names]
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(class_names))
    for label, relative, path in zip(labels, relative_paths, paths, strict=True):
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1
        # A name that is not UTF-8 is kept as its bytes (os lists it with surrogateescape).
        digests[label].update(f"{relative}\0{size}\n".encode("utf-8", "surrogateescape"))
    identity = {"dataset": "folder"}
    for split, labels_of_split in (("train", range(num_train)),
                                   ("test", range(num_train, len(class_names)))):
        identity[split] = {class_names[c]: {"images": int(counts[c]),
                                            "files": digests[c].hexdigest()[:16]}
                           for c in labels_of_split if counts[c]}
    return identity


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


def _tf_check(paths, max_pixels, decode, channels=3):
    """Reads every file's size from its header and decodes those within the pixel limit, in
    parallel with tf.data, with TF's pipeline decoder.

    Returns:
        (indices of the files TF decodes, {index: (height, width, pixels)} of the files above
        the limit, which are never decoded).
    """
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(paths), dtype=tf.int64), tf.constant([os.fsencode(p) for p in paths]),
         tf.constant(decode)))

    def check(index, path, decode_it):
        contents = tf.io.read_file(path)
        size = pixel_limit.image_size(contents)
        fits = size[2] <= max_pixels
        # The shape depends on the decoded pixels, so the decode cannot be pruned away.
        decoded = tf.cond(tf.logical_and(fits, decode_it),
                          lambda: tf.shape(decode_image(contents, channels))[0] >= 0,
                          lambda: tf.constant(False))
        return index, size, fits, decoded

    dataset = dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    good, oversized = [], {}
    for index, size, fits, decoded in dataset.ignore_errors().as_numpy_iterator():
        if not fits:
            oversized[int(index)] = tuple(int(v) for v in size)
        elif decoded:
            good.append(int(index))
    return np.asarray(good, np.int64), oversized


def convert_with_pil(path, max_pixels=pixel_limit.DEFAULT_MAX_PIXELS):
    """Decodes a file with PIL and re-encodes it as an 8-bit RGB PNG.

    Args:
        path: file path.
        max_pixels: images with more pixels (width x height, read from the header) are not
            decoded.

    Returns:
        PNG bytes, or None when PIL cannot read the whole image either (or it is above
        `max_pixels`).
    """
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                return None
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


def check_image_files(paths, max_pixels=pixel_limit.DEFAULT_MAX_PIXELS):
    """Decodes every file once and says which ones the pipeline can use.

    Files whose header says they are above `max_pixels` are never decoded (by TF or PIL); they
    are left out like unreadable files and logged apart, with their size.

    Args:
        paths: list of file paths.
        max_pixels: the pixel limit (width x height; `pixel_limit`).

    Returns:
        (ok, converted): ok is a bool array [len(paths)]; converted maps the index of each file
        that needed PIL to its RGB PNG bytes (also marked ok).
    """
    max_pixels = pixel_limit.check_max_pixels(max_pixels)
    started = time.monotonic()
    paths = [os.fspath(p) for p in paths]
    pil_first = np.array([_needs_pil(p) for p in paths], bool)
    ok = np.zeros(len(paths), bool)
    oversized = {}
    if paths:
        decodable, oversized = _tf_check(paths, max_pixels, decode=(~pil_first).tolist())
        ok[decodable] = True
    retry = np.array([i for i in np.flatnonzero(~ok) if int(i) not in oversized], np.int64)
    converted = {}
    if len(retry):
        convert = functools.partial(convert_with_pil, max_pixels=max_pixels)
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            results = pool.map(convert, [paths[i] for i in retry])
            for index, png in zip(retry, results, strict=True):
                if png is not None:
                    converted[int(index)] = png
                    ok[index] = True
    bad = [paths[i] for i in np.flatnonzero(~ok) if int(i) not in oversized]
    seconds = time.monotonic() - started
    logging.info("Checked %d image files in %.1f s (%.0f files/s): %d converted with PIL, %d "
                 "unreadable, %d above the pixel limit.", len(paths), seconds,
                 len(paths) / max(seconds, 1e-9), len(converted), len(bad), len(oversized))
    if converted:
        logging.info("Converted with PIL (TF cannot decode them correctly): %s%s",
                     [paths[i] for i in list(converted)[:_LISTED_PATHS]],
                     " ..." if len(converted) > _LISTED_PATHS else "")
    if bad:
        logging.warning("Skipped %d unreadable or corrupt image file(s), e.g. %s%s", len(bad),
                        bad[:_LISTED_PATHS], " ..." if len(bad) > _LISTED_PATHS else "")
    if oversized:
        shown = "; ".join(f"{paths[i]} ({size[1]} x {size[0]})"
                          for i, size in list(oversized.items())[:_LISTED_PATHS])
        logging.warning("Skipped %d image file(s) above the limit of %d pixels (%s; they are "
                        "not decoded): %s%s", len(oversized), max_pixels, pixel_limit.FLAG_NAME,
                        shown, " ..." if len(oversized) > _LISTED_PATHS else "")
    return ok, converted
