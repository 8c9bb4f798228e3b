"""Exports a trained run for serving: a SavedModel for TF Serving and LiteRT models.

    python export.py --model_dir=runs/omniglot_npair_dvml_seed0 --export_dir=exports/omniglot
    python export.py --model_dir=... --export_dir=... --skip_litert      # SavedModel only
    TFDS_DATA_DIR=../shared/tfds python export.py --model_dir=... --export_dir=...  # offline data

Writes E/saved_model/<version>/ (TF Serving's layout), E/model.tflite,
E/model_dynamic_range.tflite, E/model_int8.tflite, E/retrieval.tflite,
E/retrieval_gallery.json and E/export_report.json (sizes, parity with Keras, int8 vs float
Recall@1, latency). Exporting again into E adds the next version and keeps the older ones; the
folder is replaced only once the new export is complete. README, "Deploying", has the
TF Serving command, the REST/gRPC request formats and the LiteRT usage.
"""

import json

from absl import app
from absl import flags
from absl import logging

from dvml_tf.export import exporter

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
flags.DEFINE_integer("latency_runs", 50, "Timed runs per latency figure.")
flags.DEFINE_integer(
    "recall_max_images", 20000, "Cap (whole classes) on the images of the LiteRT Recall@1 check."
)
flags.mark_flags_as_required(["model_dir", "export_dir"])


def main(argv):
    del argv
    try:
        result = exporter.export_run(
            FLAGS.model_dir,
            FLAGS.export_dir,
            version=FLAGS.version,
            overwrite=FLAGS.overwrite,
            gallery_split=FLAGS.gallery_split,
            top_k=FLAGS.top_k,
            litert_models=not FLAGS.skip_litert,
            calibration_images=FLAGS.int8_calibration_images,
            data_dir=FLAGS.data_dir,
            latency_runs=FLAGS.latency_runs,
            recall_max_images=FLAGS.recall_max_images,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        # A clear one-line error instead of a traceback for what the user can fix.
        logging.error("%s", error)
        raise SystemExit(f"export.py: error: {error}") from None
    report = result.report
    print(f"Exported version {result.version} to {result.export_dir}")
    print(json.dumps({key: report[key] for key in ("files", "sizes_bytes")}, indent=2))
    for key in ("parity_vs_keras", "recall_at_1", "latency_ms_per_image"):
        if key in report:
            print(key, json.dumps(report[key], indent=2))


if __name__ == "__main__":
    app.run(main)
