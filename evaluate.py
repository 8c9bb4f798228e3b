"""Evaluates a trained embedding on a dataset split: NMI, F1, Recall@K, MAP@R, figures, projector.

    python evaluate.py --model_dir=runs/omniglot_npair_dvml_seed0
    python evaluate.py --model_dir=D --tfsim --plots=figures/ --projector=projector/
    python evaluate.py --saved_model=exports/omniglot

--model_dir evaluates a run written by train.py through the training preprocessing; --saved_model
evaluates an exported SavedModel (an export folder, its saved_model/ folder or one version)
through its `embed_bytes` signature on the dataset's encoded images, i.e. exactly what a TF
Serving client gets back. The library calls are `dvml_tf.evaluation.runner.embed_run` /
`embed_saved_model` and `dvml_tf.evaluation.evaluate_embeddings`.
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if bool(FLAGS.model_dir) == bool(FLAGS.saved_model):
        raise app.UsageError("Give exactly one of --model_dir and --saved_model.")
    logging.set_verbosity(logging.INFO)
    try:
        recall_ks = (flags_lib.parse_list(FLAGS.recall_ks, int, "recall_ks")
                     if FLAGS.recall_ks else None)
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
                                                FLAGS.data_dir, FLAGS.batch_size)
        recall_ks = recall_ks or embedded.recall_ks
        metrics = metrics_lib.evaluate_embeddings(
            embedded.embeddings, embedded.labels, recall_ks=recall_ks, metric=embedded.metric,
            compute_clustering=FLAGS.clustering,
        )
        print(runner.metrics_table(metrics, title=f"{FLAGS.split} split, "
                                   f"{len(embedded.labels)} images, {embedded.metric} distance"))
        if FLAGS.tfsim:
            from dvml_tf.evaluation import tfsim_check  # an optional extra

            tfsim = tfsim_check.tfsim_retrieval_metrics(embedded.embeddings, embedded.labels,
                                                        recall_ks, metric=embedded.metric)
            print("\n| metric | dvml_tf | tensorflow-similarity | difference |\n|---|---|---|---|")
            for key, value in tfsim.items():
                print(f"| {key} | {metrics[key]:.6f} | {value:.6f} | "
                      f"{abs(metrics[key] - value):.1e} |")
        if FLAGS.output_json:
            atomic.write_json(FLAGS.output_json, metrics, sort_keys=True)
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
    except (ValueError, FileNotFoundError, ImportError, PermissionError) as error:
        sys.exit(f"evaluate.py: error: {error}")


if __name__ == "__main__":
    app.run(main)
