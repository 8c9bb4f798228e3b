"""Evaluates a trained embedding on a dataset split: NMI, F1, Recall@K, MAP@R, figures, projector.

    python evaluate.py --model_dir=runs/omniglot_npair_dvml_seed0
    python evaluate.py --model_dir=D --tfsim --plots=figures/ --projector=projector/
    python evaluate.py --saved_model=exports/omniglot
    python evaluate.py --saved_model=E --index=I                # + the figures through an index
    python evaluate.py --saved_model=E --calibrate              # open-set matching thresholds

--model_dir evaluates a run written by train.py through the training preprocessing; --saved_model
evaluates an exported SavedModel (an export folder, its saved_model/ folder or one version)
through its `embed_bytes` signature on the dataset's encoded images, i.e. exactly what a TF
Serving client gets back. A split with separate query and gallery images (a CSV manifest with
is_query/is_gallery columns, the In-Shop protocol) is evaluated with queries searching the
gallery only.

--index=I also measures Recall@K and MAP@R through a gallery index built by `index.py build`
from the same SavedModel and split, printed beside the exact figures (and stored under "index"
in --output_json). --calibrate picks the score thresholds at which matching a query to its
top-1 neighbour reaches the --precisions on the validation classes, reports the matching
precision and recall those thresholds give on --split, and stores them in the export's report
(`dvml_tf.index.matching`). The library calls are `dvml_tf.evaluation.runner.embed_run` /
`embed_saved_model`, `dvml_tf.evaluation.evaluate_embeddings`,
`dvml_tf.index.evaluation.index_retrieval_metrics` and `dvml_tf.index.matching`.
"""

import sys

import numpy as np
from absl import app
from absl import flags
from absl import logging

from dvml_tf import data as data_lib
from dvml_tf.evaluation import metrics as metrics_lib
from dvml_tf.evaluation import runner
from dvml_tf.training import flags as flags_lib
from dvml_tf.utils import atomic
from dvml_tf.utils import write_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "A run folder written by train.py.")
flags.DEFINE_string("saved_model", None,
                    "An exported SavedModel: an export folder, its saved_model/ folder (latest "
                    "version) or a version folder.")
flags.DEFINE_enum("dataset", None, data_lib.DATASETS,
                  "Dataset; default: the run's (or the one the export was trained on).")
flags.DEFINE_string("data_dir", None, "TFDS data directory or image folder; default: the run's.")
flags.DEFINE_enum("split", "test", ["test", "validation", "train"], "Split to evaluate.")
flags.DEFINE_list("recall_ks", None, "K of Recall@K; default: the run's (SOP: 1,10,100,1000).")
flags.DEFINE_integer("batch_size", 256, "Images per embedding batch.")
flags.DEFINE_boolean("clustering", True, "Compute NMI and F1 (k-means, K = number of classes).")
flags.DEFINE_string("output_json", None, "Write the metrics (metrics.json keys) to this file.")
flags.DEFINE_boolean("tfsim", False, "Also compute Recall@K and MAP@R with tensorflow-similarity.")
flags.DEFINE_string("plots", None, "Write t-SNE, central-latent-space and retrieval PNGs here.")
flags.DEFINE_string("projector", None, "Write TensorBoard projector files here.")
flags.DEFINE_integer("plot_points", 500, "Images shown in the t-SNE figures.")
flags.DEFINE_string("index", None,
                    "A gallery index built by index.py from --saved_model on this split: also "
                    "measure Recall@K and MAP@R through it.")
flags.DEFINE_boolean("calibrate", False,
                     "Pick matching thresholds on the validation classes at --precisions and "
                     "store them in the export's report (needs --saved_model).")
flags.DEFINE_list("precisions", ["0.9", "0.95", "0.99"],
                  "--calibrate: target precisions of open-set matching.")
flags.DEFINE_integer("validation_classes", None,
                     "--saved_model: training classes held out as the validation split; "
                     "default: the run's.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if bool(FLAGS.model_dir) == bool(FLAGS.saved_model):
        raise app.UsageError("Give exactly one of --model_dir and --saved_model.")
    for name in ("index", "calibrate", "validation_classes"):
        if FLAGS[name].value and not FLAGS.saved_model:
            raise app.UsageError(f"--{name} needs --saved_model (indexes and thresholds belong "
                                 "to an exported SavedModel).")
    logging.set_verbosity(logging.INFO)
    try:
        recall_ks = (flags_lib.parse_list(FLAGS.recall_ks, int, "recall_ks")
                     if FLAGS.recall_ks else None)
        precisions = flags_lib.parse_list(FLAGS.precisions, float, "precisions")
        if FLAGS.calibrate and FLAGS.split == "validation":
            raise ValueError("--calibrate picks thresholds on the validation split and measures "
                             "them on --split: choose --split=test (or train).")
        # Before the evaluation runs, not after it.
        for flag, directory in (("output_json", False), ("plots", True), ("projector", True)):
            path = FLAGS[flag].value
            if path:
                try:
                    atomic.check_writable(path, directory=directory)
                except (ValueError, PermissionError) as error:
                    raise type(error)(f"--{flag}: {error}") from None
        if FLAGS.model_dir:
            embedded = runner.embed_run(FLAGS.model_dir, FLAGS.split, FLAGS.data_dir,
                                        FLAGS.batch_size, dataset=FLAGS.dataset)
        else:
            embedded = runner.embed_saved_model(FLAGS.saved_model, FLAGS.split, FLAGS.dataset,
                                                FLAGS.data_dir, FLAGS.batch_size,
                                                FLAGS.validation_classes)
        recall_ks = recall_ks or embedded.recall_ks
        catalog = embedded.catalog
        metrics = metrics_lib.evaluate_embeddings(
            embedded.embeddings, embedded.labels, recall_ks=recall_ks, metric=embedded.metric,
            compute_clustering=FLAGS.clustering, is_query=catalog.is_query,
            is_gallery=catalog.is_gallery,
        )
        queries, gallery = catalog.query_gallery()
        protocol = (f"{int(queries.sum())} queries searching a gallery of {int(gallery.sum())}"
                    if catalog.has_query_gallery else f"{len(embedded.labels)} images")
        print(runner.metrics_table(metrics, title=f"{FLAGS.split} split, {protocol}, "
                                   f"{embedded.metric} distance"))
        excluded = metrics_lib.queries_without_positive(embedded.labels, catalog.is_query,
                                                        catalog.is_gallery)
        if excluded:
            print(f"({excluded} of {int(queries.sum())} queries have no other image of their "
                  "class in the gallery and are left out of Recall@K and MAP@R.)")
        record = {**metrics, "excluded_queries": excluded}
        if FLAGS.index:
            from dvml_tf.index import evaluation as index_evaluation  # faiss only when asked

            found, index = index_evaluation.evaluate_through_index(
                FLAGS.index, FLAGS.saved_model, embedded, recall_ks, FLAGS.split,
                FLAGS.dataset, compute_map="map@r" in metrics)
            print_index_metrics(metrics, found, index.backend, len(index))
            record["index"] = found
        if FLAGS.calibrate:
            from dvml_tf.index import evaluation as index_evaluation

            matching = index_evaluation.calibrate_export(
                FLAGS.saved_model, embedded, precisions, FLAGS.split, FLAGS.dataset,
                FLAGS.data_dir, FLAGS.batch_size, FLAGS.validation_classes)
            print_calibration(matching, FLAGS.split)
            record["matching"] = {k: v for k, v in matching.items() if k != "written"}
        if FLAGS.tfsim and catalog.has_query_gallery:
            raise ValueError("--tfsim compares the leave-one-out protocol; this split has "
                             "separate query and gallery sets.")
        if FLAGS.tfsim:
            from dvml_tf.evaluation import tfsim_check  # an optional extra

            tfsim = tfsim_check.tfsim_retrieval_metrics(embedded.embeddings, embedded.labels,
                                                        recall_ks, metric=embedded.metric)
            print("\n| metric | dvml_tf | tensorflow-similarity | difference |\n|---|---|---|---|")
            for key, value in tfsim.items():
                print(f"| {key} | {metrics[key]:.6f} | {value:.6f} | "
                      f"{abs(metrics[key] - value):.1e} |")
        if FLAGS.output_json:
            atomic.write_json(FLAGS.output_json, record, sort_keys=True)
        if FLAGS.plots:
            from dvml_tf.evaluation import plots  # matplotlib only when figures are asked for

            if embedded.features is None:
                logging.warning("The central-latent-space figure needs the backbone features: "
                                "use --model_dir, not --saved_model.")
            for path in plots.write_figures(FLAGS.plots, embedded, FLAGS.plot_points):
                print(f"wrote {path}")
        if FLAGS.projector:
            from dvml_tf.evaluation import projector

            thumbnails = data_lib.load_thumbnails(embedded.catalog,
                                                  np.arange(len(embedded.labels)), size=32)
            projector.write_projector(embedded.embeddings, embedded.labels, FLAGS.projector,
                                      images=thumbnails, class_names=embedded.catalog.class_names)
            print(f"wrote projector files to {FLAGS.projector} "
                  f"(tensorboard --logdir {FLAGS.projector}, or projector.tensorflow.org)")
    except (ValueError, FileNotFoundError, ImportError, PermissionError, TimeoutError,
            write_errors.WriteFailedError) as error:
        sys.exit(f"evaluate.py: error: {error}")


def print_index_metrics(exact, found, backend, rows):
    """Recall@K and MAP@R through the index beside the exact figures."""
    keys = list(found)
    print(f"\nthrough the index ({backend}, {rows} rows) beside exact search:")
    print("| search | " + " | ".join(k.replace("recall", "R") for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    print("| exact | " + " | ".join(f"{100 * exact[k]:.2f}" for k in keys) + " |")
    print(f"| {backend} | " + " | ".join(f"{100 * found[k]:.2f}" for k in keys) + " |")
    print("| difference | " + " | ".join(f"{100 * (found[k] - exact[k]):+.2f}" for k in keys)
          + " |")


def print_calibration(record, split):
    """The thresholds, their validation figures and their figures on the evaluated split."""
    for path in record["written"]:
        print(f"wrote the matching thresholds into {path}")
    calibration, measured = record["calibration"], record[split]["targets"]
    print(f"\nopen-set matching: thresholds on {calibration['queries']} validation queries "
          f"({calibration['classes']} classes), measured on {record[split]['queries']} {split} "
          f"queries ({record['score']} >= threshold)")
    print(f"| target precision | threshold | validation precision | validation recall | "
          f"{split} precision | {split} recall | {split} matched |")
    print("|---|---|---|---|---|---|---|")

    def pct(value):
        return "—" if value is None else f"{100 * value:.1f}"

    for key, rates in calibration["targets"].items():
        test = measured[key]
        threshold = "none" if rates["threshold"] is None else f"{rates['threshold']:.4f}"
        print(f"| {key} | {threshold} | {pct(rates['precision'])} | {pct(rates['recall'])} | "
              f"{pct(test['precision'])} | {pct(test['recall'])} | {pct(test['matched'])} |")


if __name__ == "__main__":
    app.run(main)
