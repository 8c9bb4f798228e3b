"""Building a `GalleryIndex` of a dataset split through an exported SavedModel (`index.py build`).

    result = build_index("E/saved_model/1", "indexes/omniglot", dataset="omniglot",
                         split="test", backend="hnsw")
    # or in shards, on any machines (a cluster scheduler runs one command per shard) ...
    build_index("E", "parts/2", num_shards=4, shard_index=2)
    # ... then joined into one index:
    merge_shards(["parts/0", "parts/1", "parts/2", "parts/3"], "indexes/omniglot", "hnsw")

What a build does:

* **Embeds** the split's gallery images (every image, or the `is_gallery` rows of a CSV
  manifest) through the SavedModel's `embed_bytes` signature, i.e. exactly what a TF Serving
  client gets back, in batches, with a progress bar and the images/s in the log.
* **Skips and reports bad images**: files the loader could not decode were already left out (and
  are listed in `DatasetSplits.unreadable`); a file that cannot be read, or whose bytes the
  SavedModel cannot decode, fails its batch, which is then retried one image at a time so that
  only the bad images are skipped. The count and the first paths are logged and kept in the
  index's `info`.
* **Checkpoints** the embeddings in a staging folder next to the output,
  ``<parent>/.<name>.staging/`` (a progress JSON and one .npy file per chunk of
  `chunk_images` images, each written atomically; the JSON records each chunk file's SHA-256
  and a digest of its input images: size and modification time of each file). Running the same
  command again after an interruption (Ctrl-C, SIGKILL, a lost machine, a full disk) resumes
  after the last complete chunk; a chunk whose file is corrupt, or whose images changed since,
  is embedded again. The staging folder is removed once the output is in place. Checkpoints of
  another model (fingerprint), or of other settings, are refused (pass `restart=True` to
  discard them).
* **Locks** the output: ``<parent>/.<name>.build.lock`` is held (`dvml_tf.utils.locks`) for the
  whole build, so a second build or merge into the same output is refused at once with the
  holder's pid, host, start time and command, instead of racing it. The kernel releases the lock
  when its process dies, so a killed build never blocks the next one; the lock file is removed
  when the build ends.
* **Writes atomically**: `GalleryIndex.save` (or, for a shard, an `AtomicDirectory`) puts the
  output in place only when it is complete. An existing output is replaced only with
  `overwrite=True`, and then only the files the build writes: anything else a user keeps in the
  folder stays. A folder that is neither an index nor a shard is never touched. A full disk or
  a read-only folder is a `WriteFailedError` naming the folder; the checkpoints stay.

The index's ids are the row numbers of the split (`int`), its labels the split's labels, and
its metadata the file path of each row when the dataset has files (folder, CSV). Its contract
(`load_model`) fingerprints what the SavedModel computes (its weights, input preprocessing and
output), so queries embedded by another model are refused; its `info` records the dataset,
split, failures, class names, timing and the model's matching thresholds at build time
(`evaluate.py --calibrate`).

A shard output (``num_shards > 1``) is not an index but the embeddings of one shard
(`shard.json`, `embeddings.npy`, `ids.npy`, `labels.npy`, `paths.npy`; shard.json records the
SHA-256 of each array file). `merge_shards` verifies those digests, checks that the shards come
from one model and one build plan and cover it exactly once, and builds the index from them
with the rows in split order (so `flat` still equals the exact evaluation).
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dvml_tf.data import pixel_limit
from dvml_tf.evaluation import runner
from dvml_tf.export import fingerprint
from dvml_tf.export import layout
from dvml_tf.export import saved_model as saved_model_lib
from dvml_tf.index import contract as contract_lib
from dvml_tf.index import gallery_index
from dvml_tf.index import storage
from dvml_tf.utils import atomic
from dvml_tf.utils import locks
from dvml_tf.utils import write_errors

SHARD_FILE = "shard.json"
PROGRESS_FILE = "progress.json"
# progress.json and shard.json record the SHA-256 of every file they describe since format 2.
STAGING_FORMAT = 2
SHARD_FORMAT = 2
_CHUNK_KEYS = {"file", "count", "failures", "sha256", "bytes", "inputs"}
SHARD_ARRAYS = ("embeddings", "ids", "labels", "paths")
SHARD_BY = ("range", "modulo")
DEFAULT_BATCH_SIZE = 256
DEFAULT_CHUNK_IMAGES = 4096
# Failures listed in logs, errors and the index's info (all are counted).
LISTED_FAILURES = 20
_KEPT_FAILURES = 100


# Another process is building into the same output.
BuildLockedError = locks.LockedError


@dataclasses.dataclass
class BuildResult:
    """What a build or merge wrote.

    Args:
        output: the output folder.
        kind: "index" or "shard".
        indexed: rows written.
        failures: list of {"id", "path", "error"} for the images that could not be embedded.
        unreadable: paths the loader skipped (could not be read or decoded at load time).
        seconds: wall time of the whole build or merge.
        embedded_now: images embedded by this run (fewer than `indexed` after a resume).
        embed_seconds: wall time of that embedding.
    """

    output: str
    kind: str
    indexed: int
    failures: list
    unreadable: tuple = ()
    seconds: float = 0.0
    embedded_now: int = 0
    embed_seconds: float = 0.0


# --------------------------------------------------------------------------------- model

def load_model(saved_model):
    """The SavedModel an index is built or queried with.

    Args:
        saved_model: an export folder, its saved_model/ folder or a version folder.

    Returns:
        (version_dir, report, contract, metric): the contract is `contract_from_report` of the
        version's export report with the digest of the SavedModel's weights and the index
        metric ("cosine" for normalised embeddings).

    Raises:
        FileNotFoundError: no SavedModel there.
        ValueError: its weights cannot be read, or differ from those its report records.
    """
    version_dir, _ = layout.resolve_saved_model(saved_model)
    version_dir = os.path.abspath(version_dir)
    report = layout.read_version_report(version_dir)
    # The weights are hashed from the SavedModel's files, not taken from its report: the files
    # are what computes the embeddings.
    weights = fingerprint.weights_digest(version_dir)
    recorded = report["model"].get("weights")
    if recorded is not None and recorded != weights:
        raise ValueError(
            f"The weights of the SavedModel {version_dir} ({weights}) are not the ones its "
            f"export report records ({recorded}): its variables changed after export.py wrote "
            "it. Export the run again.")
    report = {**report, "model": {**report["model"], "weights": weights}}  # older exports
    metric = runner.distance_metric(report["model"]["normalized"])
    contract = contract_lib.contract_from_report({**report, "metric": metric},
                                                 saved_model=version_dir)
    return version_dir, report, contract, metric


def embed_each(embed_fn, encoded, dim, errors=(tf.errors.OpError,), max_pixels=None):
    """Embeds a batch of encoded images; if the batch fails, each image alone, so that one bad
    image costs only itself.

    Args:
        embed_fn: callable list of bytes -> float32 [n, D] (`runner.run_embed_bytes` bound to a
            signature, a serving client's `embed_bytes`).
        encoded: list of bytes.
        dim: D.
        errors: the exception types that mean "an image was refused".
        max_pixels: optional pixel limit: images above it (read from their header) are refused
            here, never sent (also to models exported before the limit, which would decode them).

    Returns:
        (embeddings float32 [n, D] with NaN rows for the failed images, {i: message}).
    """
    if max_pixels is not None:
        refused = pixel_limit.oversized(encoded, max_pixels)
        if refused:
            kept = [i for i in range(len(encoded)) if i not in refused]
            out = np.full((len(encoded), dim), np.nan, np.float32)
            failed = {}
            if kept:
                out[kept], failed = embed_each(embed_fn, [encoded[i] for i in kept], dim, errors)
            return out, {**refused, **{kept[i]: message for i, message in failed.items()}}
    out = np.full((len(encoded), dim), np.nan, np.float32)
    try:
        out[:] = embed_fn(encoded)
        return out, {}
    except errors as error:
        if len(encoded) == 1:
            return out, {0: _error_text(error)}
    failed = {}
    for i, item in enumerate(encoded):
        try:
            out[i] = np.asarray(embed_fn([item]), np.float32)[0]
        except errors as error:
            failed[i] = _error_text(error)
    return out, failed


def _error_text(error):
    """What went wrong, in one line: a TF error without its framing, or a serving error."""
    if isinstance(error, tf.errors.OpError):
        return saved_model_lib.error_message(error)
    return " ".join(str(error).split()) or type(error).__name__


# --------------------------------------------------------------------------- folder safety

def _sibling(output, suffix):
    parent, name = os.path.split(os.path.abspath(output).rstrip(os.sep))
    return os.path.join(parent, f".{name}{suffix}")


def staging_path(output):
    """The staging folder of a build into `output`: ``<parent>/.<name>.staging``."""
    return _sibling(output, ".staging")


def lock_path(output):
    """The build lock of `output`: ``<parent>/.<name>.build.lock``."""
    return _sibling(output, ".build.lock")


def build_lock(output):
    """The build lock of `output`, to hold for a whole build or merge (a context manager):
    refused at once while another process holds it.

    Args:
        output: the output folder.

    Raises (on entry):
        BuildLockedError: another process holds it (the message names that process).
        dvml_tf.utils.write_errors.WriteFailedError: the output's parent cannot be written.
    """
    path = lock_path(output)
    return locks.FileLock(path, what=f"the build lock of {os.path.basename(output)}",
                          busy=lambda holder: (
                              f"Another build is writing {os.path.abspath(output)} ({holder}); "
                              "wait for it to finish, or build into another --output. (Lock "
                              f"file: {path}.)"))


def check_output(output, kind, overwrite):
    """Refuses an output that exists, unless it is an output of the same kind and `overwrite`.

    Args:
        output: the folder.
        kind: "index" or "shard".
        overwrite: bool.

    Raises:
        FileExistsError: an index (or shard) is there and `overwrite` is False.
        ValueError: a file, or a non-empty folder that is no output of this kind.
    """
    output = os.path.abspath(output)
    if not os.path.lexists(output):
        return
    if not os.path.isdir(output):
        raise ValueError(f"--output {output} is a file, not a folder.")
    entries = os.listdir(output)
    if not entries:
        return
    marker = gallery_index.INDEX_FILE if kind == "index" else SHARD_FILE
    other = SHARD_FILE if kind == "index" else gallery_index.INDEX_FILE
    if marker in entries:
        if overwrite:
            return
        raise FileExistsError(f"--output {output} already holds a{'n' if kind == 'index' else ''}"
                              f" {kind}; pass --overwrite to replace it (the new one replaces it "
                              "only once complete).")
    if other in entries:
        raise ValueError(f"--output {output} holds a{' shard' if kind == 'index' else 'n index'}, "
                         f"not a{'n index' if kind == 'index' else ' shard'}; choose another "
                         "folder.")
    raise ValueError(f"--output {output} is a non-empty folder that is not a gallery index or "
                     "shard; it is left untouched: choose another folder.")


# -------------------------------------------------------------------------------- planning

def shard_rows(rows, num_shards, shard_index, shard_by="range"):
    """The rows of one shard.

    Args:
        rows: int [G], the rows to index (in split order).
        num_shards: int >= 1.
        shard_index: int in [0, num_shards).
        shard_by: "range" (contiguous slices of equal size) or "modulo" (every
            num_shards-th row).

    Returns:
        int64 array, a subsequence of `rows`.

    Raises:
        ValueError: bad shard arguments.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) \
            or num_shards < 1:
        raise ValueError(f"--num_shards must be an int >= 1; got {num_shards!r}.")
    if isinstance(shard_index, bool) or not isinstance(shard_index, (int, np.integer)) \
            or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard_index must be in [0, {num_shards}); got {shard_index!r}.")
    if shard_by not in SHARD_BY:
        raise ValueError(f"--shard_by must be one of {SHARD_BY}; got {shard_by!r}.")
    rows = np.asarray(rows, np.int64)
    if shard_by == "modulo":
        return rows[shard_index::num_shards]
    return np.array_split(rows, num_shards)[shard_index]


def _catalog_digest(catalog):
    """A fingerprint of the split's rows (which images, in which order): labels and, when
    known, file paths. What the files hold is checked per checkpoint (`_inputs_digest`)."""
    digest = hashlib.sha256(np.ascontiguousarray(catalog.labels).tobytes())
    if catalog.paths is not None:
        digest.update("\0".join(catalog.paths.tolist()).encode("utf-8", "surrogateescape"))
    return "sha256:" + digest.hexdigest()


def _class_names(catalog, labels):
    return {str(int(label)): catalog.class_name(int(label)) for label in np.unique(labels)}


# ------------------------------------------------------------------------------- embedding

def _inputs_digest(catalog, rows):
    """What the images of some catalog rows are now, as a digest: for a file, its size and
    modification time (a file rewritten since gets another digest, at the cost of one stat per
    file instead of a read); for an image held in memory (TFDS), its bytes.

    Args:
        catalog: the raw `ImageCatalog`.
        rows: int [n] catalog rows.

    Returns:
        str ``"sha256:..."``.
    """
    sources = tf.gather(catalog.sources, rows).numpy()
    digest = hashlib.sha256()
    for source, is_path in zip(sources, catalog.source_is_path[rows], strict=True):
        if is_path:
            try:
                stat = os.stat(source)
                stamp = (stat.st_size, stat.st_mtime_ns)
            except OSError:
                stamp = (-1, -1)  # gone: its embedding (or failure) is redone
            digest.update(np.asarray(stamp, np.int64).tobytes())
        else:
            digest.update(hashlib.sha256(source).digest())
    return "sha256:" + digest.hexdigest()


def _model_change(path, stored, given):
    """The error for checkpoints of a build with another model (both fingerprints, what to do)."""
    stored_model = stored.get("saved_model") or "unknown"
    why = contract_lib.fingerprint_difference(stored, given)
    return ValueError(
        f"{path} holds the checkpoints of an interrupted build with another model: fingerprint "
        f"{stored.get('fingerprint')} ({stored_model}), not {given['fingerprint']} "
        f"({given.get('saved_model')}){f'; {why}' if why else ''}. Resume it with the model it "
        f"started with (--saved_model={stored_model}), or pass --restart to discard its "
        "checkpoints and build with this model.")


class _Staging:
    """The checkpoints of one build: a progress JSON listing the complete chunk files, each with
    the SHA-256 and size of its file and the digest of its input images (`_inputs_digest`).

    Args:
        path: the staging folder.
        plan: what the build embeds (a resume must have the same plan).
        restart: discard checkpoints of another plan.
        model: the contract of the model that embeds (its "fingerprint" is in the plan).
    """

    def __init__(self, path, plan, restart, model=None):
        self.path = path
        self.plan = plan
        self.model = {key: (model or {}).get(key) for key in ("fingerprint", "weights",
                                                              "saved_model")}
        self.arrays = {}  # chunk number -> its verified embeddings
        progress_path = os.path.join(path, PROGRESS_FILE)
        if os.path.isdir(path) and restart:
            if not os.path.isfile(progress_path):
                raise ValueError(f"{path} exists but is no staging folder of index.py (no "
                                 f"{PROGRESS_FILE}); it is left untouched: remove it yourself.")
            logging.warning("--restart: discarding the staging folder %s.", path)
            shutil.rmtree(path)
        self.chunks = []
        if os.path.isdir(path):
            try:
                with open(progress_path) as f:
                    progress = json.load(f)
                stored_plan, chunks = progress["plan"], progress["chunks"]
                if progress.get("format") == STAGING_FORMAT and not all(
                        isinstance(chunk, dict) and set(chunk) >= _CHUNK_KEYS for chunk in chunks):
                    raise KeyError("chunks")
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{path} is not a readable staging folder of index.py (no valid "
                                 f"{PROGRESS_FILE}); it is left untouched: remove it yourself "
                                 "or build into another --output.") from None
            if progress.get("format") != STAGING_FORMAT:
                raise ValueError(
                    f"{path} holds the checkpoints of an interrupted build by an older index.py, "
                    "without checksums of its files; pass --restart to discard them and embed "
                    "again.")
            if stored_plan.get("fingerprint") != plan.get("fingerprint"):
                raise _model_change(path, {**progress.get("model", {}),
                                           "fingerprint": stored_plan.get("fingerprint")},
                                    {**self.model, "fingerprint": plan.get("fingerprint")})
            if stored_plan != plan:
                changed = sorted(key for key in set(plan) | set(stored_plan)
                                 if plan.get(key) != stored_plan.get(key))
                raise ValueError(
                    f"{path} holds the checkpoints of an interrupted build with other settings "
                    f"(differing: {', '.join(changed)}). Rerun that build's command to finish "
                    "it, or pass --restart to discard its checkpoints.")
            for chunk in chunks:
                if not os.path.isfile(os.path.join(path, chunk["file"])):
                    break  # a checkpoint is missing: redo it and what follows
                self.chunks.append(chunk)
        else:
            os.makedirs(path)
            self._write_progress()

    def _write_progress(self):
        atomic.write_json(os.path.join(self.path, PROGRESS_FILE),
                          {"format": STAGING_FORMAT, "plan": self.plan, "model": self.model,
                           "chunks": self.chunks})

    def _read(self, number):
        """The embeddings of chunk `number`, checked against its recorded digest and shape."""
        chunk = self.chunks[number]
        file = os.path.join(self.path, chunk["file"])
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError as error:
            raise ValueError(f"Checkpoint {file} cannot be read ({error.strerror}).") from None
        if len(data) != chunk["bytes"] or hashlib.sha256(data).hexdigest() != chunk["sha256"]:
            raise ValueError(f"Checkpoint {file} is corrupt: its SHA-256 differs from the one "
                             f"{PROGRESS_FILE} recorded when it was written.")
        return np.load(io.BytesIO(data), allow_pickle=False)

    def pending(self, catalog, rows, chunk_images):
        """The chunks still to embed: those after the last checkpoint, and checkpoints whose
        file is corrupt or whose images changed since they were embedded (they are embedded
        again, with a warning).

        Args:
            catalog: the raw `ImageCatalog`.
            rows: int [n], the rows of the build, in order.
            chunk_images: rows per chunk.

        Returns:
            list of chunk numbers, ascending.
        """
        redo = []
        for number, chunk in enumerate(self.chunks):
            chunk_rows = rows[number * chunk_images:(number + 1) * chunk_images]
            try:
                self.arrays[number] = self._read(number)
            except ValueError as error:
                logging.warning("%s Embedding its %d images again.", error, chunk["count"])
                redo.append(number)
                continue
            if chunk["inputs"] != _inputs_digest(catalog, chunk_rows):
                del self.arrays[number]
                logging.warning(
                    "Images of checkpoint %s (rows %d-%d) changed since they were embedded (size "
                    "or modification time): embedding its %d images again.",
                    os.path.join(self.path, chunk["file"]), number * chunk_images,
                    number * chunk_images + len(chunk_rows) - 1, len(chunk_rows))
                redo.append(number)
        total = -(-len(rows) // chunk_images)
        return redo + list(range(len(self.chunks), total))

    def add(self, number, embeddings, failures, inputs):
        """Checkpoints chunk `number` (a new one, or one embedded again)."""
        name = f"chunk-{number:06d}.npy"
        buffer = io.BytesIO()
        np.save(buffer, embeddings, allow_pickle=False)
        data = buffer.getvalue()
        atomic.write_bytes(os.path.join(self.path, name), data)
        entry = {"file": name, "count": len(embeddings), "failures": failures,
                 "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                 "inputs": inputs}
        if number < len(self.chunks):
            self.chunks[number] = entry
        else:
            self.chunks.append(entry)
        self.arrays[number] = embeddings
        self._write_progress()  # after the chunk file: a listed chunk is always complete

    def load(self, dim):
        parts = []
        for number, chunk in enumerate(self.chunks):
            array = self.arrays.get(number)
            if array is None:
                try:
                    array = self._read(number)
                except ValueError as error:
                    raise ValueError(f"{error} Pass --restart to embed again from scratch.") \
                        from None
            if array.shape != (chunk["count"], dim) or array.dtype != np.float32:
                raise ValueError(f"Checkpoint {os.path.join(self.path, chunk['file'])} holds "
                                 f"{array.dtype} {array.shape}, not float32 ({chunk['count']}, "
                                 f"{dim}); pass --restart.")
            parts.append(array)
        return np.concatenate(parts) if parts else np.empty((0, dim), np.float32)

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)


def _progress_bar(target):
    # One line per update on a terminal; a log file gets a line every 30 s (and the last).
    interval = 0.5 if sys.stdout.isatty() else 30.0
    return keras.utils.Progbar(target, unit_name="image", interval=interval)


def embed_rows(embed_bytes, catalog, rows, staging, dim, batch_size=DEFAULT_BATCH_SIZE,
               chunk_images=DEFAULT_CHUNK_IMAGES, progress=True, max_pixels=None):
    """Embeds catalog rows through `embed_bytes`, checkpointing every `chunk_images` images.

    Args:
        embed_bytes: the SavedModel's signature (`runner.load_embed_bytes`).
        catalog: the raw `ImageCatalog` (encoded bytes or file paths).
        rows: int [n] catalog rows, in the order to embed.
        staging: the build's `_Staging` (chunks already there are reused).
        dim: the embedding size.
        batch_size: images per signature call.
        chunk_images: images per checkpoint (part of the staging plan).
        progress: show a progress bar.
        max_pixels: optional pixel limit (see `embed_each`).

    Returns:
        (embeddings float32 [n, dim] with NaN rows for failures, failures list of
        {"id", "path", "error"}, images embedded by this call, seconds it took).
    """
    todo = staging.pending(catalog, rows, chunk_images)
    done = len(rows) - sum(len(rows[k * chunk_images:(k + 1) * chunk_images]) for k in todo)
    if done:
        logging.info("Resuming: %d of %d images are embedded already (%s).", done, len(rows),
                     staging.path)
    bar = _progress_bar(len(rows)) if progress else None
    if bar is not None and done:
        bar.update(done)
    started = time.monotonic()
    paths = catalog.paths

    def embed(encoded):
        return runner.run_embed_bytes(embed_bytes, encoded)

    for number in todo:
        chunk_rows = rows[number * chunk_images:(number + 1) * chunk_images]
        # Taken before the files are read: a file changed after this shows at the next resume.
        inputs = _inputs_digest(catalog, chunk_rows)
        parts, failures = [], []
        for offset in range(0, len(chunk_rows), batch_size):
            batch_rows = chunk_rows[offset:offset + batch_size]
            unreadable = {}
            encoded = runner.encoded_images(catalog, batch_rows, errors=unreadable)
            readable = [i for i, item in enumerate(encoded) if item is not None]
            out = np.full((len(batch_rows), dim), np.nan, np.float32)
            if readable:
                out[readable], failed = embed_each(embed, [encoded[i] for i in readable], dim,
                                                   max_pixels=max_pixels)
                for i, message in failed.items():
                    unreadable[int(batch_rows[readable[i]])] = message
            for row, message in sorted(unreadable.items()):
                failures.append({"id": int(row), "error": message,
                                 "path": None if paths is None else str(paths[row])})
            parts.append(out)
            if bar is not None:
                bar.add(len(batch_rows))
        staging.add(number, np.concatenate(parts), failures, inputs)
    seconds = time.monotonic() - started
    embedded_now = len(rows) - done
    if embedded_now:
        logging.info("Embedded %d images in %.1f s: %.0f images/s.", embedded_now, seconds,
                     embedded_now / max(seconds, 1e-9))
    failures = [f for chunk in staging.chunks for f in chunk["failures"]]
    return staging.load(dim), failures, embedded_now, seconds


def log_failures(failures, unreadable=()):
    """Logs the images a build skipped: count and the first paths (or ids)."""
    if unreadable:
        logging.warning("%d file(s) could not be read or decoded when the dataset was loaded "
                        "and are not indexed, e.g. %s", len(unreadable),
                        list(unreadable[:LISTED_FAILURES]))
    if failures:
        shown = [f"{f['path'] or '#' + str(f['id'])} ({f['error']})"
                 for f in failures[:LISTED_FAILURES]]
        logging.warning("%d image(s) could not be embedded and are not indexed: %s%s",
                        len(failures), "; ".join(shown),
                        " ..." if len(failures) > LISTED_FAILURES else "")


# ---------------------------------------------------------------------------------- builds

def build_index(saved_model, output, *, dataset=None, split="test", data_dir=None,
                backend="flat", backend_options=None, batch_size=DEFAULT_BATCH_SIZE,
                num_shards=1, shard_index=0, shard_by="range", overwrite=False, restart=False,
                chunk_images=DEFAULT_CHUNK_IMAGES, validation_classes=None, progress=True,
                max_pixels=None):
    """Embeds a split through a SavedModel and writes an index (or one shard of it).

    Args:
        saved_model: an export folder, its saved_model/ folder or a version folder.
        output: the index folder (or, with num_shards > 1, this shard's folder).
        dataset: dataset name; default: the export's.
        split: "test", "validation" or "train".
        data_dir: TFDS data dir, image folder or CSV manifest.
        backend: "flat", "hnsw" or "ivf_pq" (not used for a shard).
        backend_options: dict of backend options.
        batch_size: images per SavedModel call.
        num_shards, shard_index, shard_by: embed only one shard (see `shard_rows`).
        overwrite: replace an existing output of the same kind.
        restart: discard the checkpoints of an interrupted build with other settings.
        chunk_images: images per checkpoint.
        validation_classes: see `runner.saved_model_catalog`.
        progress: show a progress bar.
        max_pixels: the pixel limit (width x height): larger images are skipped unread;
            default: the SavedModel's (`layout.max_image_pixels`).

    Returns:
        `BuildResult`.

    Raises:
        BuildLockedError: another build holds the output.
        FileExistsError, ValueError, FileNotFoundError: see the messages.
    """
    output = os.path.abspath(os.fspath(output))
    kind = "index" if num_shards == 1 else "shard"
    shard_rows(np.arange(0), num_shards, shard_index, shard_by)  # checks the arguments
    if batch_size < 1 or chunk_images < 1:
        raise ValueError(f"--batch_size and chunk_images must be >= 1; got {batch_size}, "
                         f"{chunk_images}.")
    check_output(output, kind, overwrite)  # before the data is loaded
    version_dir, report, contract, metric = load_model(saved_model)
    max_pixels = pixel_limit.check_max_pixels(
        layout.max_image_pixels(report) if max_pixels is None else max_pixels)
    if kind == "index":  # bad backend options fail now, not after the embedding
        gallery_index.GalleryIndex(contract["dim"], metric, backend,
                                   backend_options=backend_options)
    started = time.monotonic()
    with build_lock(output), _resume_hint(output):
        check_output(output, kind, overwrite)  # again, now that no other build can write
        catalog, splits = runner.saved_model_catalog(report, split, dataset, data_dir,
                                                     validation_classes, max_pixels)
        _, is_gallery = catalog.query_gallery()
        rows = shard_rows(np.flatnonzero(is_gallery), num_shards, shard_index, shard_by)
        plan = {
            "fingerprint": contract["fingerprint"],
            "dataset": splits.name,
            "split": split,
            "data_dir": None if data_dir is None else os.path.abspath(os.fspath(data_dir)),
            "num_images": int(catalog.num_images),
            "gallery_rows": int(is_gallery.sum()),
            "catalog": _catalog_digest(catalog),
            "num_shards": int(num_shards),
            "shard_index": int(shard_index),
            "shard_by": shard_by,
            "chunk_images": int(chunk_images),
        }
        staging = _Staging(staging_path(output), plan, restart, model=contract)
        embed_bytes = runner.load_embed_bytes(version_dir)
        dim = contract["dim"]
        embeddings, failures, embedded_now, embed_seconds = embed_rows(
            embed_bytes, catalog, rows, staging, dim, batch_size, chunk_images, progress,
            max_pixels)
        unreadable = tuple(splits.unreadable)
        log_failures(failures, unreadable)
        ok = ~np.isnan(embeddings).any(axis=1)
        source = {"saved_model": version_dir, "version": contract.get("version"),
                  "dataset": splits.name, "split": split, "data_dir": plan["data_dir"],
                  "num_images": plan["num_images"], "gallery_rows": plan["gallery_rows"],
                  "catalog": plan["catalog"]}
        record = {"failures": failures, "unreadable": list(unreadable)}
        if kind == "shard":
            _write_shard(output, plan, source, contract, embeddings[ok], rows[ok],
                         catalog.labels[rows[ok]], None if catalog.paths is None
                         else catalog.paths[rows[ok]], _class_names(catalog, catalog.labels[rows]),
                         record)
        else:
            index = _make_index(contract, metric, backend, backend_options, rows[ok],
                                embeddings[ok], catalog.labels[rows[ok]],
                                None if catalog.paths is None else catalog.paths[rows[ok]])
            index.info = _info(source, report, record, _class_names(catalog,
                                                                    catalog.labels[rows]),
                               shards=1, seconds=time.monotonic() - started)
            index.save(output)
        staging.remove()
    seconds = time.monotonic() - started
    logging.info("Wrote %s %s: %d rows (%.1f s).", kind, output, int(ok.sum()), seconds)
    return BuildResult(output, kind, int(ok.sum()), failures, unreadable, seconds, embedded_now,
                       embed_seconds)


@contextlib.contextmanager
def _resume_hint(output):
    """A write the file system refuses during a build also says where its checkpoints are."""
    try:
        yield
    except write_errors.WriteFailedError as error:
        staging = staging_path(output)
        if not os.path.isdir(staging):
            raise
        raise write_errors.WriteFailedError(error.errno, (
            f"{error} The images embedded so far stay checkpointed in {staging}: run the same "
            "command again to resume.")) from None


def _make_index(contract, metric, backend, backend_options, ids, embeddings, labels, paths):
    index = gallery_index.GalleryIndex(contract["dim"], metric, backend, contract=contract,
                                       backend_options=backend_options)
    if not len(ids):
        raise ValueError("No image could be embedded: the index would be empty.")
    metadata = None if paths is None else {"path": [str(p) for p in paths]}
    index.add(ids, embeddings, labels=labels, metadata=metadata)
    return index


def _info(source, report, record, class_names, shards, seconds):
    failures = record["failures"]
    unreadable = record["unreadable"]
    return {
        "built_by": "dvml_tf.index.builder",
        **source,
        "shards": shards,
        "failures": {"count": len(failures), "first": failures[:_KEPT_FAILURES]},
        "unreadable": {"count": len(unreadable), "first": unreadable[:_KEPT_FAILURES]},
        "class_names": class_names,
        # The model's thresholds when the index was built; index.py search reads the
        # SavedModel's current report first.
        "matching": report.get("matching"),
        "seconds": round(seconds, 3),
    }


def _write_shard(output, plan, source, contract, embeddings, ids, labels, paths, class_names,
                 record):
    owned = {SHARD_FILE, *(f"{name}.npy" for name in SHARD_ARRAYS)}
    with atomic.AtomicDirectory(output, overwrite=True, owned=owned, what="the shard") as tmp:
        arrays = {"embeddings": embeddings, "ids": ids.astype(np.int64),
                  "labels": labels.astype(np.int64),
                  "paths": np.asarray([] if paths is None else paths, dtype=str)}
        files = {}
        for name, array in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), array, allow_pickle=False)
            files[f"{name}.npy"] = storage.file_digest(os.path.join(tmp, f"{name}.npy"))
        # shard.json last: a folder without it is never a complete shard.
        atomic.write_json(os.path.join(tmp, SHARD_FILE), {
            "format": SHARD_FORMAT, "plan": plan, "source": source, "contract": contract,
            "count": len(ids), "has_paths": paths is not None, "class_names": class_names,
            "files": files, **record})
        storage.fsync_folder(tmp)


def read_shard(folder):
    """A shard written by `build_index(..., num_shards > 1)`, its files checked against the
    SHA-256 digests recorded when they were written.

    Returns:
        (header dict, arrays dict with embeddings, ids, labels and paths (or None)).

    Raises:
        FileNotFoundError: no shard there.
        ValueError: a corrupt shard, or one written by an older index.py without checksums.
    """
    folder = os.path.abspath(os.fspath(folder))
    path = os.path.join(folder, SHARD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a shard written by index.py build "
                                f"--num_shards=N (no {SHARD_FILE}); unfinished shards have no "
                                f"{SHARD_FILE} yet.")
    rebuild = ("rebuild it (index.py build with its --num_shards and --shard_index, and "
               "--overwrite)")
    try:
        with open(path) as f:
            header = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"Shard {folder} is corrupt: {SHARD_FILE}: {error}; {rebuild}.") from None
    if not isinstance(header, dict) or header.get("format") != SHARD_FORMAT:
        raise ValueError(f"Shard {folder} was written by an older index.py, without checksums of "
                         f"its files: {rebuild}.")
    try:
        files = header["files"]
        if set(files) != {f"{name}.npy" for name in SHARD_ARRAYS}:
            raise KeyError("files")
        for name, recorded in files.items():
            if storage.file_digest(os.path.join(folder, name)) != recorded:
                raise ValueError(f"{name} differs from the SHA-256 and size {SHARD_FILE} recorded "
                                 "when it was written")
        arrays = {name: np.load(os.path.join(folder, f"{name}.npy"), allow_pickle=False)
                  for name in SHARD_ARRAYS}
        count = header["count"]
        if not {"num_shards", "shard_index", "fingerprint"} <= set(header["plan"]):
            raise KeyError("plan")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"Shard {folder} is corrupt: {error}; {rebuild}.") from None
    dim = header["contract"]["dim"]
    if (arrays["embeddings"].shape != (count, dim) or arrays["ids"].shape != (count,)
            or arrays["labels"].shape != (count,)
            or arrays["paths"].shape != ((count,) if header["has_paths"] else (0,))):
        raise ValueError(f"Shard {folder} is corrupt: its arrays do not hold {count} rows.")
    if not header["has_paths"]:
        arrays["paths"] = None
    return header, arrays


def merge_shards(shards, output, backend="flat", backend_options=None, overwrite=False):
    """Joins the shards of one build plan into an index.

    Args:
        shards: the shard folders (any order).
        output: the index folder.
        backend: "flat", "hnsw" or "ivf_pq".
        backend_options: dict of backend options.
        overwrite: replace an existing index.

    Returns:
        `BuildResult`.

    Raises:
        ValueError: shards of different builds, missing or repeated shards.
        BuildLockedError, FileExistsError: see `build_index`.
    """
    output = os.path.abspath(os.fspath(output))
    if not shards:
        raise ValueError("--inputs lists no shard folder.")
    check_output(output, "index", overwrite)
    started = time.monotonic()
    read = [(os.path.abspath(s), *read_shard(s)) for s in shards]
    first_path, first, _ = read[0]
    gallery_index.GalleryIndex(first["contract"]["dim"], first["contract"]["metric"], backend,
                               backend_options=backend_options)

    def common(plan):
        return {k: v for k, v in plan.items() if k != "shard_index"}

    for path, header, _ in read[1:]:
        if header["plan"]["fingerprint"] != first["plan"]["fingerprint"]:
            why = contract_lib.fingerprint_difference(first["contract"], header["contract"])
            raise ValueError(
                f"Shards {first_path} and {path} were embedded by different models: fingerprint "
                f"{first['plan']['fingerprint']} ({first['contract'].get('saved_model')}) vs "
                f"{header['plan']['fingerprint']} ({header['contract'].get('saved_model')})"
                f"{f'; {why}' if why else ''}. Rebuild the shards of one model with the model "
                "of the others, then merge.")
        if common(header["plan"]) != common(first["plan"]):
            changed = sorted(k for k in common(first["plan"])
                             if header["plan"].get(k) != first["plan"].get(k))
            raise ValueError(f"Shards {first_path} and {path} come from different builds "
                             f"(differing: {', '.join(changed)}).")
    num_shards = first["plan"]["num_shards"]
    seen = {}
    for path, header, _ in read:
        index_ = header["plan"]["shard_index"]
        if index_ in seen:
            raise ValueError(f"Shard {index_} of {num_shards} is given twice: {seen[index_]} and "
                             f"{path}.")
        seen[index_] = path
    missing = sorted(set(range(num_shards)) - set(seen))
    if missing:
        raise ValueError(f"Shard(s) {missing} of {num_shards} are missing (given: "
                         f"{sorted(seen)}); build them with --num_shards={num_shards} "
                         "--shard_index=i first.")
    ids = np.concatenate([a["ids"] for _, _, a in read])
    order = np.argsort(ids, kind="stable")
    pick = {name: np.concatenate([a[name] for _, _, a in read])[order]
            for name in ("embeddings", "ids", "labels")}
    paths = None
    if first["has_paths"]:
        paths = np.concatenate([a["paths"] for _, _, a in read])[order]
    failures = sorted((f for _, h, _ in read for f in h["failures"]), key=lambda f: f["id"])
    unreadable = first["unreadable"]
    class_names = {}
    for _, header, _ in read:
        class_names.update(header["class_names"])
    contract = first["contract"]
    metric = contract["metric"]
    with build_lock(output):
        check_output(output, "index", overwrite)
        index = _make_index(contract, metric, backend, backend_options, pick["ids"],
                            pick["embeddings"], pick["labels"], paths)
        report = {"matching": _current_matching(contract)}
        index.info = _info(first["source"], report,
                           {"failures": failures, "unreadable": unreadable}, class_names,
                           shards=num_shards, seconds=time.monotonic() - started)
        index.save(output)
    log_failures(failures, tuple(unreadable))
    seconds = time.monotonic() - started
    logging.info("Merged %d shards into %s: %d rows (%.1f s).", num_shards, output,
                 len(index), seconds)
    return BuildResult(output, "index", len(index), failures, tuple(unreadable), seconds, 0)


def _current_matching(contract):
    """The matching thresholds of the model a contract names, if its report is reachable."""
    try:
        return layout.read_version_report(contract["saved_model"]).get("matching")
    except (OSError, KeyError, ValueError):
        return None
