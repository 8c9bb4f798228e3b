"""Builds, merges and searches gallery indexes of an exported SavedModel's embeddings.

    python index.py build --saved_model=E/saved_model/1 --dataset=omniglot --split=test --output=I
    python index.py build --saved_model=E --dataset=csv --data_dir=manifest.csv --output=I \\
        --backend=hnsw
    python index.py build --saved_model=E --output=parts/3 --num_shards=8 --shard_index=3
    python index.py merge --inputs=parts/0,parts/1,...  (or --inputs='parts/*') --output=I
    python index.py search --index=I --images=a.png,b.jpg --k=5 [--precision=0.95]

`build` embeds a split through the SavedModel's `embed_bytes` signature (resumable: run the same
command again after an interruption; one build per output at a time; bad images are skipped and
reported) and writes the index atomically; with --num_shards it embeds one shard, and `merge`
joins the shards. `search` prints one JSON object per query image. The library calls are
`dvml_tf.index.builder.build_index` / `merge_shards` and `dvml_tf.index.query.search_files`;
docs/index.md has the details.
"""

import glob
import json
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
flags.DEFINE_list("images", None, "search: query image files (comma-separated).")
flags.DEFINE_integer("k", 5, "search: results per query.")
flags.DEFINE_float("precision", None,
                   "search: target precision of the matching threshold (e.g. 0.95); default: "
                   "0.95 when the model is calibrated for it (evaluate.py --calibrate).")
flags.DEFINE_string("serving_url", None,
                    "search: embed the queries through TF Serving's REST API at this URL (e.g. "
                    "http://localhost:8501) instead of a local SavedModel.")
flags.DEFINE_string("model_name", "dvml", "search --serving_url: the served model's name.")

# The flags each command reads; any other flag given is an error (a typo'd command line must not
# silently do something else).
_COMMAND_FLAGS = {
    "build": {"saved_model", "dataset", "data_dir", "split", "output", "backend",
              "backend_options", "batch_size", "num_shards", "shard_index", "shard_by",
              "checkpoint_images", "validation_classes", "overwrite", "restart"},
    "merge": {"inputs", "output", "backend", "backend_options", "overwrite"},
    "search": {"index", "images", "k", "precision", "saved_model", "serving_url",
               "model_name", "batch_size"},
}
_REQUIRED = {"build": ("saved_model", "output"), "merge": ("inputs", "output"),
             "search": ("index", "images")}


def _check_flags(command):
    own = _COMMAND_FLAGS[command]
    foreign = sorted(name for names in _COMMAND_FLAGS.values() for name in names
                     if name not in own and FLAGS[name].present)
    if foreign:
        raise ValueError(f"{', '.join('--' + n for n in foreign)} do(es) not apply to "
                         f"`index.py {command}`.")
    missing = [name for name in _REQUIRED[command] if not FLAGS[name].value]
    if missing:
        raise ValueError(f"`index.py {command}` needs {', '.join('--' + n for n in missing)}.")


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
        line += (f"; {skipped} unreadable image(s) skipped ({len(result.unreadable)} at load "
                 f"time, {len(result.failures)} while embedding), see the log")
    return line


def build():
    from dvml_tf.index import builder

    result = builder.build_index(
        FLAGS.saved_model, FLAGS.output, dataset=FLAGS.dataset, split=FLAGS.split,
        data_dir=FLAGS.data_dir, backend=FLAGS.backend, backend_options=_backend_options(),
        batch_size=FLAGS.batch_size, num_shards=FLAGS.num_shards, shard_index=FLAGS.shard_index,
        shard_by=FLAGS.shard_by, overwrite=FLAGS.overwrite, restart=FLAGS.restart,
        chunk_images=FLAGS.checkpoint_images, validation_classes=FLAGS.validation_classes)
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
    for start in range(0, len(FLAGS.images), FLAGS.batch_size):
        answers += query.search_files(index, embedder, FLAGS.images[start:start +
                                                                    FLAGS.batch_size],
                                      k=FLAGS.k, precision=FLAGS.precision)
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
    from dvml_tf.index import builder

    try:
        _check_flags(command)
        {"build": build, "merge": merge, "search": search}[command]()
    except KeyboardInterrupt:
        staging = builder.staging_path(FLAGS.output) if FLAGS.output else None
        sys.exit(f"index.py: interrupted; the embeddings done so far are checkpointed in "
                 f"{staging}: run the same command again to resume." if command == "build"
                 else "index.py: interrupted.")
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ImportError,
            TimeoutError, ConnectionError, builder.BuildLockedError,
            write_errors.WriteFailedError) as error:
        sys.exit(f"index.py: error: {error}")


if __name__ == "__main__":
    app.run(main)
