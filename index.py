"""Builds, merges and searches gallery indexes of an exported SavedModel's embeddings.

    python index.py build --saved_model=E/saved_model/1 --dataset=omniglot --split=test --output=I
    python index.py build --saved_model=E --dataset=csv --data_dir=manifest.csv --output=I \\
        --backend=hnsw
    python index.py build --saved_model=E --output=parts/3 --num_shards=8 --shard_index=3
    python index.py merge --inputs=parts/0,parts/1,...  (or --inputs='parts/*') --output=I
    python index.py search --index=I --images=a.png --images=b,c.jpg --k=5 [--precision=0.95]
    python index.py search --index=I --image_list=queries.txt      # one path per line

`build` embeds a split through the SavedModel's `embed_bytes` signature (resumable: run the same
command again after an interruption, also after SIGTERM, which exits with 143 and says what was
kept; one build per output at a time; bad images and images above --max_image_pixels are
skipped and reported) and writes the index atomically; with --num_shards it embeds one shard,
and `merge` joins the shards. `search` prints one JSON object per query image. Every flag is
checked before anything is loaded. The library calls are `dvml_tf.index.builder.build_index` /
`merge_shards` and `dvml_tf.index.query.search_files`; docs/index.md has the details.
"""

import glob
import json
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging

from dvml_tf import data as data_lib
from dvml_tf.index import BACKENDS
from dvml_tf.training import flags as flags_lib
from dvml_tf.utils import write_errors

FLAGS = flags.FLAGS
COMMANDS = ("build", "merge", "search")
# The shell's code for a process ended by SIGTERM (128 + 15), as train.py uses it.
EXIT_TERMINATED = 143

flags.DEFINE_string("saved_model", None,
                    "build: the SavedModel to embed with (an export folder, its saved_model/ "
                    "folder or a version folder). search: overrides the one the index records.")
flags.DEFINE_enum("dataset", None, data_lib.DATASETS, "build: dataset; default: the export's.")
flags.DEFINE_string("data_dir", None,
                    "build: TFDS data dir, image folder (--dataset=folder) or CSV manifest "
                    "(--dataset=csv).")
flags.DEFINE_enum("split", "test", ["test", "validation", "train"], "build: the split to index.")
flags.DEFINE_string("output", None, "build, merge: the index folder (a shard's folder with "
                    "--num_shards > 1).")
flags.DEFINE_enum("backend", "flat", list(BACKENDS),
                  "build, merge: flat (exact), hnsw or ivf_pq (faiss ANN).")
flags.DEFINE_string("backend_options", "",
                    "build, merge: backend options as key=value pairs, e.g. ef_search=256,M=32.")
flags.DEFINE_integer("batch_size", 256, "build, search: images per SavedModel call.")
flags.DEFINE_integer("num_shards", 1, "build: split the images into this many shards.")
flags.DEFINE_integer("shard_index", 0, "build: the shard to embed, in [0, num_shards).")
flags.DEFINE_enum("shard_by", "range", ["range", "modulo"],
                  "build: shards are contiguous ranges of rows, or every num_shards-th row.")
flags.DEFINE_integer("checkpoint_images", 4096,
                     "build: images per checkpoint of the embeddings (what a resume redoes at "
                     "most).")
flags.DEFINE_integer("validation_classes", None,
                     "build --split=validation: held-out training classes; default: the run's.")
flags.DEFINE_boolean("overwrite", False, "build, merge: replace an existing index (or shard).")
flags.DEFINE_boolean("restart", False,
                     "build: discard the checkpoints of an interrupted build with other settings.")
flags.DEFINE_list("inputs", None, "merge: the shard folders (comma-separated; globs allowed).")
flags.DEFINE_string("index", None, "search: the index folder.")
flags.DEFINE_multi_string(
    "images", None,
    "search: a query image file; repeat the flag for more. A value that is not an existing "
    "file is split at commas (a,b.png: two files), so quote nothing: a file whose name holds a "
    "comma is taken as it is.")
flags.DEFINE_string("image_list", None,
                    "search: a text file listing query image files, one path per line (any "
                    "character but a newline); '-' reads the list from standard input.")
flags.DEFINE_integer("k", 5, "search: results per query.")
flags.DEFINE_float("precision", None,
                   "search: target precision of the matching threshold (e.g. 0.95); default: "
                   "0.95 when the model is calibrated for it (evaluate.py --calibrate).")
flags.DEFINE_string("serving_url", None,
                    "search: embed the queries through TF Serving's REST API at this URL (e.g. "
                    "http://localhost:8501) instead of a local SavedModel.")
flags.DEFINE_string("model_name", "dvml", "search --serving_url: the served model's name.")
flags.DEFINE_integer("max_image_pixels", None,
                     "build, search: largest image (width x height, read from its header) "
                     "embedded; larger ones are skipped unread. Default: the SavedModel's limit "
                     "(export.py --max_image_pixels).")

# The flags each command reads; any other flag given is an error (a typo'd command line must not
# silently do something else).
_COMMAND_FLAGS = {
    "build": {"saved_model", "dataset", "data_dir", "split", "output", "backend",
              "backend_options", "batch_size", "num_shards", "shard_index", "shard_by",
              "checkpoint_images", "validation_classes", "overwrite", "restart",
              "max_image_pixels"},
    "merge": {"inputs", "output", "backend", "backend_options", "overwrite"},
    "search": {"index", "images", "image_list", "k", "precision", "saved_model", "serving_url",
               "model_name", "batch_size", "max_image_pixels"},
}
_REQUIRED = {"build": ("saved_model", "output"), "merge": ("inputs", "output"),
             "search": ("index",)}
# Flags that must be >= 1 (or >= 0), checked before anything is loaded.
_POSITIVE = ("batch_size", "checkpoint_images", "num_shards", "k", "max_image_pixels")


class Terminated(BaseException):
    """SIGTERM (a BaseException like KeyboardInterrupt, so that no `except Exception` on the
    way swallows it)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _check_flags(command):
    own = _COMMAND_FLAGS[command]
    foreign = sorted(name for names in _COMMAND_FLAGS.values() for name in names
                     if name not in own and FLAGS[name].present)
    if foreign:
        raise ValueError(f"{', '.join('--' + n for n in foreign)} do(es) not apply to "
                         f"`index.py {command}`.")
    missing = [name for name in _REQUIRED[command] if not FLAGS[name].value]
    if command == "search" and not (FLAGS.images or FLAGS.image_list):
        missing.append("images (or --image_list)")
    if missing:
        raise ValueError(f"`index.py {command}` needs {', '.join('--' + n for n in missing)}.")
    for name in _POSITIVE:
        value = FLAGS[name].value
        if name in own and value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1; got {value}.")
    if command == "build" and not 0 <= FLAGS.shard_index < FLAGS.num_shards:
        raise ValueError(f"--shard_index must be in [0, --num_shards={FLAGS.num_shards}); got "
                         f"{FLAGS.shard_index}.")
    if command == "build" and FLAGS.validation_classes is not None \
            and FLAGS.validation_classes < 0:
        raise ValueError(f"--validation_classes must be >= 0; got {FLAGS.validation_classes}.")
    if command == "search" and FLAGS.precision is not None and not 0 < FLAGS.precision <= 1:
        raise ValueError(f"--precision must be in (0, 1]; got {FLAGS.precision}.")
    if command in ("build", "merge"):
        _backend_options()  # key=value syntax; the values are checked by the backend


def query_images():
    """The query files of --images (repeatable; a value that is no file is split at commas)
    and --image_list (one path per line), in order.

    Returns:
        list of str.

    Raises:
        FileNotFoundError: --image_list names no readable file.
    """
    paths = []
    for value in FLAGS.images or ():
        paths.extend([value] if os.path.isfile(value) or "," not in value
                     else [part for part in value.split(",") if part])
    if FLAGS.image_list:
        try:
            if FLAGS.image_list == "-":
                text = sys.stdin.read()
            else:
                with open(FLAGS.image_list, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
        except OSError as error:
            raise FileNotFoundError(f"--image_list {FLAGS.image_list}: cannot read it "
                                    f"({error.strerror}).") from None
        paths.extend(line for line in text.splitlines() if line.strip())
    if not paths:
        raise ValueError("--images / --image_list name no query image.")
    return paths


def _backend_options():
    return flags_lib.parse_key_values(FLAGS.backend_options, "backend_options") or None


def _summary(result):
    what = "index" if result.kind == "index" else "shard"
    line = (f"Wrote {what} {result.output}: {result.indexed} images in {result.seconds:.1f} s "
            f"({result.embedded_now} embedded by this run")
    if result.embedded_now and result.embed_seconds:
        line += f", {result.embedded_now / result.embed_seconds:.0f} images/s"
    line += ")"
    skipped = len(result.failures) + len(result.unreadable)
    if skipped:
        line += (f"; {skipped} image(s) skipped, unreadable or above --max_image_pixels "
                 f"({len(result.unreadable)} at load time, {len(result.failures)} while "
                 "embedding), see the log")
    return line


def build():
    from dvml_tf.index import builder

    result = builder.build_index(
        FLAGS.saved_model, FLAGS.output, dataset=FLAGS.dataset, split=FLAGS.split,
        data_dir=FLAGS.data_dir, backend=FLAGS.backend, backend_options=_backend_options(),
        batch_size=FLAGS.batch_size, num_shards=FLAGS.num_shards, shard_index=FLAGS.shard_index,
        shard_by=FLAGS.shard_by, overwrite=FLAGS.overwrite, restart=FLAGS.restart,
        chunk_images=FLAGS.checkpoint_images, validation_classes=FLAGS.validation_classes,
        max_pixels=FLAGS.max_image_pixels)
    print(_summary(result))


def merge():
    from dvml_tf.index import builder

    shards = []
    for item in FLAGS.inputs:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise FileNotFoundError(f"--inputs pattern {item!r} matches no folder.")
        shards.extend(matches)
    result = builder.merge_shards(shards, FLAGS.output, backend=FLAGS.backend,
                                  backend_options=_backend_options(), overwrite=FLAGS.overwrite)
    print(_summary(result))


def search():
    from dvml_tf.index import GalleryIndex
    from dvml_tf.index import query

    images = query_images()
    index = GalleryIndex.load(FLAGS.index)
    if FLAGS.serving_url:
        if FLAGS.saved_model:
            raise ValueError("Give --saved_model or --serving_url, not both.")
        embedder = query.QueryEmbedder.from_serving(index, FLAGS.serving_url, FLAGS.model_name)
    else:
        embedder = query.QueryEmbedder.from_saved_model(index, FLAGS.saved_model)
    if not (embedder.matching or {}).get("thresholds"):
        logging.warning("The model has no matching thresholds (run evaluate.py --saved_model=E "
                        "--calibrate): every result has matched=null.")
    answers = []
    for start in range(0, len(images), FLAGS.batch_size):
        answers += query.search_files(index, embedder, images[start:start + FLAGS.batch_size],
                                      k=FLAGS.k, precision=FLAGS.precision,
                                      max_pixels=FLAGS.max_image_pixels)
    for answer in answers:
        print(json.dumps(answer))
    failed = [answer for answer in answers if "error" in answer]
    if failed:
        shown = "; ".join(f"{a['query']}: {a['error']}" for a in failed[:5])
        sys.exit(f"index.py: error: {len(failed)} of {len(answers)} query image(s) could not be "
                 f"searched: {shown}")


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        given = " ".join(argv[1:]) or "nothing"
        sys.exit(f"index.py: error: expected one command, {' | '.join(COMMANDS)}; got {given}. "
                 "See python index.py --helpfull.")
    command = argv[1]
    logging.set_verbosity(logging.INFO)
    try:
        _check_flags(command)
    except ValueError as error:
        sys.exit(f"index.py: error: {error}")
    from dvml_tf.index import builder

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        {"build": build, "merge": merge, "search": search}[command]()
    except (KeyboardInterrupt, Terminated) as stop:
        cause = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(f"index.py: {cause}; {_what_was_kept(command, builder)}", file=sys.stderr,
              flush=True)
        sys.exit(EXIT_TERMINATED if isinstance(stop, Terminated) else 1)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ImportError,
            TimeoutError, ConnectionError, builder.BuildLockedError,
            write_errors.WriteFailedError) as error:
        sys.exit(f"index.py: error: {error}")


def _what_was_kept(command, builder):
    """One sentence for an interrupted command: what is on disk and how to go on."""
    if command != "build":
        return ("nothing was written (outputs are put in place only once complete)."
                if command == "merge" else "no more queries are answered.")
    staging = builder.staging_path(FLAGS.output)
    try:
        with open(os.path.join(staging, builder.PROGRESS_FILE)) as f:
            chunks = json.load(f)["chunks"]
    except (OSError, ValueError, KeyError, TypeError):
        chunks = []
    if not chunks:
        return (f"no embedding was checkpointed yet and {FLAGS.output} was not written; run the "
                "same command again to start over.")
    images = sum(chunk["count"] for chunk in chunks)
    return (f"{images} embedded images ({len(chunks)} checkpoint(s) of --checkpoint_images="
            f"{FLAGS.checkpoint_images}) are kept in {staging}, and {FLAGS.output} was not "
            "written; run the same command again to resume from them.")


if __name__ == "__main__":
    app.run(main)
