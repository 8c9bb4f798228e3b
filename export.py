"""Exports a trained run for serving: a SavedModel for TF Serving and LiteRT models.

    python export.py --model_dir=runs/omniglot_npair_dvml_seed0 --export_dir=exports/omniglot
    python export.py --model_dir=... --export_dir=... --skip_litert      # SavedModel only
    python export.py --model_dir=... --export_dir=... --verify           # + verification.json

Writes E/saved_model/<version>/ (TF Serving's layout), E/model.tflite,
E/model_dynamic_range.tflite, E/model_int8.tflite, E/retrieval.tflite,
E/retrieval_gallery.json and E/export_report.json (files, contracts, sizes). Exporting again
into E adds the next version and keeps the older ones and every file of E it does not write.
`--verify` measures the export against the Keras model (parity of every artifact, Recall@1 of
the LiteRT models) into E/verification.json. docs/deployment.md has the TF Serving command,
the REST/gRPC request formats and the LiteRT usage.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from dvml_tf import task
from dvml_tf.export import exporter
from dvml_tf.export import layout
from dvml_tf.export import verify
from dvml_tf.utils import atomic
from dvml_tf.utils import write_errors

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", None, "A run folder written by train.py.")
flags.DEFINE_string("export_dir", None, "The export folder E.")
flags.DEFINE_integer(
    "version", None, "SavedModel version; default: 1, or one more than the highest in E."
)
flags.DEFINE_boolean("overwrite", False, "Replace an existing --version folder.")
flags.DEFINE_enum("gallery_split", "test", ["test", "train"], "The retriever's gallery.")
flags.DEFINE_integer("top_k", 10, "Results per query of retrieval.tflite.")
flags.DEFINE_boolean("skip_litert", False, "Export the SavedModel only (no data needed).")
flags.DEFINE_integer(
    "int8_calibration_images", 200, "Raw training images calibrating model_int8.tflite."
)
flags.DEFINE_string(
    "data_dir", None, "TFDS data dir or image folder (default: the run's; TFDS_DATA_DIR works)."
)
flags.DEFINE_integer(
    "max_image_pixels", None,
    "embed_bytes refuses images larger than this (width x height, read from the header) "
    "before decoding them; default: the run's --max_image_pixels (67108864 = 8192 x 8192).",
)
flags.DEFINE_boolean(
    "verify", False,
    "Measure the export against the Keras model (parity, LiteRT Recall@1) into "
    "E/verification.json.",
)
flags.mark_flags_as_required(["model_dir", "export_dir"])


def main(argv):
    if len(argv) > 1:
        sys.exit(f"export.py: error: unexpected arguments: {' '.join(argv[1:])}")
    try:
        # Fail on the flags and the folder before spending time on loading.
        for name in ("top_k", "int8_calibration_images", "max_image_pixels"):
            value = FLAGS[name].value
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1; got {value}.")
        exporter.resolve_version(os.path.abspath(FLAGS.export_dir), FLAGS.version,
                                 FLAGS.overwrite)
        run = task.load_run(FLAGS.model_dir)
        raw_splits = None
        if not FLAGS.skip_litert or FLAGS.verify:
            raw_splits = task.load_splits(run.config, raw=True, data_dir=FLAGS.data_dir)
        result = exporter.export_model(
            run.model,
            run.config,
            FLAGS.export_dir,
            version=FLAGS.version,
            overwrite=FLAGS.overwrite,
            raw_splits=raw_splits,
            data_dir=FLAGS.data_dir,
            gallery_split=FLAGS.gallery_split,
            top_k=FLAGS.top_k,
            litert_models=not FLAGS.skip_litert,
            calibration_images=FLAGS.int8_calibration_images,
            source=run.source,
            max_image_pixels=FLAGS.max_image_pixels,
        )
    except (FileNotFoundError, FileExistsError, ValueError, PermissionError,
            write_errors.WriteFailedError) as error:
        # A clear one-line error instead of a traceback for what the user can fix.
        logging.error("%s", error)
        sys.exit(f"export.py: error: {error}")
    report = result.report
    print(f"Exported version {result.version} to {result.export_dir}")
    print(json.dumps({key: report[key] for key in ("files", "sizes_bytes")}, indent=2))
    if FLAGS.verify:
        figures = verify.verify_export(result.export_dir, run.model, run.config, raw_splits,
                                       split=FLAGS.gallery_split)
        print(json.dumps({key: figures[key] for key in figures if key != "bounds"}, indent=2))
        try:
            atomic.write_json(os.path.join(result.export_dir, layout.VERIFICATION_FILE), figures)
        except write_errors.WriteFailedError as error:
            sys.exit(f"export.py: error: {error}")
        failed = [name for name, ok in figures["checks"].items() if not ok]
        if failed:
            sys.exit(f"export.py: verification failed: {', '.join(failed)} (see "
                     f"{layout.VERIFICATION_FILE}).")


if __name__ == "__main__":
    app.run(main)
