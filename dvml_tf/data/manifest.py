"""The `csv` dataset: a CSV manifest listing image files and their classes.

    path,label,split,is_query,is_gallery
    img/00001.jpg,sneaker_12,train,,
    img/00042.jpg,boot_7,test,1,0
    img/00043.jpg,boot_7,test,0,1

Columns (a header row is required; other columns are ignored):

* `path` (required): the image file, relative to the CSV's folder (or absolute).
* `label` (required): the class, an integer id or a class name. When every label is a number,
  they must all be integers and are kept as the class ids; otherwise every label is a class name
  and names are numbered (training classes first, then validation, then test, each sorted).
* `split` (optional): `train`, `validation` or `test`; the splits must be class-disjoint (the
  zero-shot protocol). Without it, the folder layout's rule applies: the first half of the
  sorted classes trains, the rest tests.
* `is_query`, `is_gallery` (optional): 1/0 (also true/false, yes/no) for the images of the
  evaluation splits: the In-Shop protocol, where queries search a separate gallery. Without a
  column, every image is a query (resp. in the gallery); an evaluation image must be at least
  one of the two. Training rows may leave them empty.

Every file is checked once at load time like the folder layout's (`folder.check_image_files`):
unreadable files are skipped and reported, listed in `DatasetSplits.unreadable`. Missing files,
missing columns, empty or non-integer numeric labels, unknown split names, bad role values and
duplicate paths are `ValueError`s (`FileNotFoundError` for missing files) naming the rows.
"""

import csv
import os
import re

import numpy as np
from absl import logging

from dvml_tf.data import folder
from dvml_tf.data import pixel_limit
from dvml_tf.data.catalog import DatasetSplits
from dvml_tf.data.catalog import ImageCatalog

REQUIRED_COLUMNS = ("path", "label")
ROLE_COLUMNS = ("is_query", "is_gallery")
SPLIT_COLUMN = "split"
SPLITS = ("train", "validation", "test")
_TRUE = frozenset({"1", "true", "yes", "y", "t"})
_FALSE = frozenset({"0", "false", "no", "n", "f"})
_INTEGER = re.compile(r"^[+-]?\d+$")
_LISTED_ROWS = 5


def _rows_text(rows):
    """'line 3: a.jpg, line 9: b.jpg, ... (12 in all)' for (line, text) pairs."""
    shown = ", ".join(f"line {line}: {text}" for line, text in rows[:_LISTED_ROWS])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > _LISTED_ROWS else "")


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _first_bad_utf8(path):
    """(line number, byte) of the first byte of a file that is not UTF-8."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, line[error.start]
    return None, None


def _csv_rows(path):
    """The records of a CSV file as (first line, last line, fields), blank records skipped.

    Raises:
        ValueError: a file that is not UTF-8 or a record the csv module cannot read (a field
            over its size limit), naming the line.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        while True:
            first = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                line, byte = _first_bad_utf8(path)
                raise ValueError(
                    f"CSV manifest {path} is not UTF-8 text: line {line} holds the byte "
                    f"0x{byte:02x} (Latin-1 or another encoding?). Save it as UTF-8; file names "
                    "that are not UTF-8 cannot be listed in a manifest (rename them, or use the "
                    "folder layout, which keeps any name).") from None
            except csv.Error as error:
                raise ValueError(
                    f"CSV manifest {path}, line {first}: {error}. A field that opens a quote "
                    "(\") must close it (an unmatched quote swallows the lines after it), and "
                    "a path cannot be that long.") from None
            if any(cell.strip() for cell in row):
                yield first, reader.line_num, row


def read_manifest(path):
    """Reads and checks a manifest's rows (files are not opened).

    Args:
        path: the CSV file.

    Returns:
        dict with "paths" (absolute, str [N]), "labels" (the label texts [N]), "lines" (line
        numbers [N]), and "split", "is_query", "is_gallery" (the column texts [N], or None when
        the column is absent).

    Raises:
        FileNotFoundError: no such file.
        ValueError: no header, a missing column, rows with missing or extra fields, an empty
            path or label, or duplicate paths.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV manifest {path!r} does not exist (--data_dir of "
                                "--dataset=csv is the manifest file).")
    root = os.path.dirname(path)
    rows = _csv_rows(path)
    _, _, header = next(rows, (0, 0, None))
    if header is None:
        raise ValueError(f"CSV manifest {path} is empty: it needs a header row with the "
                         f"columns {', '.join(REQUIRED_COLUMNS)}.")
    header = [name.strip().lower() for name in header]
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ValueError(f"CSV manifest {path} lacks the column(s) {missing}; its header is "
                         f"{header}. Required: {list(REQUIRED_COLUMNS)}; optional: "
                         f"{[SPLIT_COLUMN, *ROLE_COLUMNS]}.")
    repeated = sorted({name for name in header if name and header.count(name) > 1})
    if repeated:
        raise ValueError(f"CSV manifest {path} repeats the column(s) {repeated}.")
    optional = [SPLIT_COLUMN, *ROLE_COLUMNS]
    ignored = [name for name in header if name not in (*REQUIRED_COLUMNS, *optional)]
    if ignored:
        logging.info("CSV manifest %s: ignoring the columns %s.", path, ignored)
    position = {name: header.index(name) for name in (*REQUIRED_COLUMNS, *optional)
                if name in header}
    values = {name: [] for name in position}
    lines, bad = [], []
    for line, last, row in rows:
        if last > line and any("\n" in cell or "\r" in cell for cell in row):
            bad.append((line, f"a quote (\") opened here is never closed: it swallows "
                              f"lines {line}-{last}"))
            continue
        if len(row) != len(header):
            bad.append((line, f"{len(row)} fields, the header has {len(header)}"))
            continue
        cells = {name: row[i].strip() for name, i in position.items()}
        empty = [name for name in REQUIRED_COLUMNS if not cells[name]]
        if empty:
            bad.append((line, f"empty {' and '.join(empty)}"))
            continue
        for name, cell in cells.items():
            values[name].append(cell)
        lines.append(line)
    if bad:
        raise ValueError(f"CSV manifest {path} has {len(bad)} bad row(s): {_rows_text(bad)}.")
    if not lines:
        raise ValueError(f"CSV manifest {path} has a header but no rows.")
    paths = [os.path.normpath(os.path.join(root, p)) for p in values["path"]]
    first_line = {}
    duplicates = []
    for p, line in zip(paths, lines, strict=True):
        if p in first_line:
            duplicates.append((line, f"{p} (also line {first_line[p]})"))
        else:
            first_line[p] = line
    if duplicates:
        raise ValueError(f"CSV manifest {path} lists {len(duplicates)} path(s) twice: "
                         f"{_rows_text(duplicates)}.")
    return {
        "paths": np.asarray(paths, dtype=str),
        "labels": np.asarray(values["label"], dtype=str),
        "lines": np.asarray(lines, dtype=np.int64),
        **{name: (np.asarray(values[name], dtype=str) if name in values else None)
           for name in optional},
    }


def _class_ids(path, labels, lines):
    """(sort keys of the classes, label -> class key): ints when every label is a number."""
    numeric = np.array([_is_number(label) for label in labels])
    if numeric.all():
        not_int = [(int(line), label) for line, label in zip(lines, labels, strict=True)
                   if not _INTEGER.match(label)]
        if not_int:
            raise ValueError(
                f"CSV manifest {path}: labels must be integers or class names; "
                f"{len(not_int)} numeric label(s) are not integers: {_rows_text(not_int)}.")
        ids = [int(label) for label in labels]
        limit = np.iinfo(np.int64)
        too_large = [(int(line), label) for line, label, value in zip(lines, labels, ids,
                                                                       strict=True)
                     if not limit.min <= value <= limit.max]
        if too_large:
            raise ValueError(
                f"CSV manifest {path}: class ids must fit in 64 bits (|id| < 2^63); "
                f"{len(too_large)} label(s) do not: {_rows_text(too_large)}. Use smaller ids, "
                "or class names (a label that is not a number, e.g. with a letter in it).")
        return np.asarray(ids, dtype=np.int64), True
    return labels, False


def _roles(path, manifest, evaluated):
    """The is_query / is_gallery masks of the rows (True where a column is absent)."""
    masks = {}
    for name in ROLE_COLUMNS:
        column = manifest[name]
        if column is None:
            masks[name] = None
            continue
        lowered = np.char.lower(column)
        truth = np.isin(lowered, list(_TRUE))
        bad = evaluated & ~truth & ~np.isin(lowered, list(_FALSE))
        if bad.any():
            rows = [(int(line), repr(str(value))) for line, value in
                    zip(manifest["lines"][bad], column[bad], strict=True)]
            raise ValueError(f"CSV manifest {path}: column {name} must be 1/0 (true/false, "
                             f"yes/no) in every evaluation row; got {_rows_text(rows)}.")
        masks[name] = truth
    if masks["is_query"] is not None or masks["is_gallery"] is not None:
        query = masks["is_query"] if masks["is_query"] is not None else np.ones_like(evaluated)
        gallery = (masks["is_gallery"] if masks["is_gallery"] is not None
                   else np.ones_like(evaluated))
        neither = evaluated & ~query & ~gallery
        if neither.any():
            rows = [(int(line), p) for line, p in
                    zip(manifest["lines"][neither], manifest["paths"][neither], strict=True)]
            raise ValueError(f"CSV manifest {path}: {int(neither.sum())} evaluation row(s) are "
                             f"neither a query nor in the gallery: {_rows_text(rows)}.")
    return masks


def load_manifest(path, check_images=True, max_pixels=pixel_limit.DEFAULT_MAX_PIXELS):
    """Loads a CSV manifest as class-disjoint train / [validation] / test catalogs.

    Args:
        path: the CSV file (see the module docstring for its columns).
        check_images: decode every file once at load time and skip the unreadable ones (see
            `folder.check_image_files`).
        max_pixels: the pixel limit (width x height): larger images are skipped unread.

    Returns:
        `DatasetSplits` named "csv" with file-backed catalogs of 3-channel images (with
        `paths`, and `is_query`/`is_gallery` when the manifest has those columns) and the
        skipped files in `unreadable`.

    Raises:
        FileNotFoundError: the manifest or files it lists do not exist.
        ValueError: see the module docstring.
    """
    if path is None:
        raise ValueError("The csv dataset needs data_dir: the CSV manifest file (columns "
                         "path,label and optionally split,is_query,is_gallery).")
    path = os.path.abspath(os.fspath(path))
    manifest = read_manifest(path)
    paths, lines = manifest["paths"], manifest["lines"]
    missing = [(int(line), p) for line, p in zip(lines, paths, strict=True)
               if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"CSV manifest {path} lists {len(missing)} missing file(s) (paths "
                                f"are relative to the manifest's folder): {_rows_text(missing)}.")
    keys, numeric = _class_ids(path, manifest["labels"], lines)
    classes = np.unique(keys)
    if manifest[SPLIT_COLUMN] is not None:
        split_of = np.char.lower(manifest[SPLIT_COLUMN])
        bad = ~np.isin(split_of, SPLITS)
        if bad.any():
            rows = [(int(line), repr(str(v))) for line, v in
                    zip(lines[bad], manifest[SPLIT_COLUMN][bad], strict=True)]
            raise ValueError(f"CSV manifest {path}: column split must be one of {list(SPLITS)}; "
                             f"got {_rows_text(rows)}.")
        split_classes = {split: np.unique(keys[split_of == split]) for split in SPLITS}
        for i, first in enumerate(SPLITS):
            for second in SPLITS[i + 1:]:
                overlap = np.intersect1d(split_classes[first], split_classes[second])
                if overlap.size:
                    raise ValueError(
                        f"CSV manifest {path}: classes {overlap[:10].tolist()} appear in both "
                        f"the {first} and the {second} split; the splits must be "
                        "class-disjoint (unseen classes are evaluated).")
    else:
        train_classes, _ = folder.split_classes(classes)
        split_of = np.where(np.isin(keys, train_classes), "train", "test")
        split_classes = {split: np.unique(keys[split_of == split]) for split in SPLITS}
    for split in ("train", "test"):
        if not split_classes[split].size:
            raise ValueError(f"CSV manifest {path} has no {split} rows (classes: "
                             f"{classes.size}); it needs at least one train and one test class.")
    ordered = np.concatenate([split_classes[split] for split in SPLITS])
    if numeric:
        ids, class_names = keys, None
    else:
        number = {name: i for i, name in enumerate(ordered.tolist())}
        ids = np.asarray([number[key] for key in keys.tolist()], dtype=np.int64)
        class_names = ordered.tolist()
    roles = _roles(path, manifest, split_of != "train")

    sources = np.array([os.fsencode(p) for p in paths], dtype=object)
    is_path = np.ones(len(paths), bool)
    keep = np.ones(len(paths), bool)
    unreadable = ()
    if check_images:
        ok, converted = folder.check_image_files(paths.tolist(), max_pixels)
        for index, png in converted.items():
            sources[index], is_path[index] = png, False
        keep = ok
        unreadable = tuple(paths[~ok].tolist())
    catalogs = {}
    for split in SPLITS:
        rows = np.flatnonzero((split_of == split) & keep)
        if not rows.size:
            if split == "validation":
                continue
            raise ValueError(f"CSV manifest {path}: no readable image in the {split} split.")
        catalog = ImageCatalog(
            ids[rows], sources=sources[rows], source_is_path=is_path[rows],
            class_names=class_names, name=split, paths=paths[rows], max_pixels=max_pixels,
            **{name: None if split == "train" or roles[name] is None else roles[name][rows]
               for name in ROLE_COLUMNS})
        queries, gallery = catalog.query_gallery()
        if not queries.any() or not gallery.any():
            raise ValueError(f"CSV manifest {path}: the {split} split has "
                             f"{int(queries.sum())} query and {int(gallery.sum())} gallery "
                             "image(s); evaluation needs at least one of each.")
        catalogs[split] = catalog
    return DatasetSplits(name="csv", train=catalogs["train"], test=catalogs["test"],
                         validation=catalogs.get("validation"), unreadable=unreadable)
