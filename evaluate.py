"""Evaluates a trained embedding on a dataset split: NMI, F1, Recall@K, MAP@R, figures, projector.

    python evaluate.py --model_dir=runs/omniglot_npair_dvml_seed0
    python evaluate.py --model_dir=D --tfsim --plots=figures/ --projector=projector/
    python evaluate.py --saved_model=exports/omniglot/saved_model --dataset=omniglot

--model_dir evaluates a run written by train.py through the training preprocessing; --saved_model
evaluates an exported SavedModel through its `embed_bytes` signature on the dataset's encoded
images, i.e. exactly what a TF Serving client gets back.
"""

import os
import sys

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from dvml_tf import data as data_lib
from dvml_tf.evaluation import metrics as metrics_lib
from dvml_tf.evaluation import runner
from dvml_tf.training import config as config_lib
from dvml_tf.training import run_loader
from dvml_tf.training import trainer
from dvml_tf.utils import atomic

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "A run folder written by train.py.")
flags.DEFINE_string("saved_model", None,
                    "An exported SavedModel: export_dir/saved_model (latest version) or a "
                    "version folder.")
flags.DEFINE_enum("dataset", None, config_lib.DATASETS,
                  "Dataset; default: the run's. Required with --saved_model.")
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


def latest_version(path):
    """`path` itself if it holds saved_model.pb, else its highest numeric version folder."""
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = [int(v) for v in os.listdir(path) if v.isdigit()] if os.path.isdir(path) else []
    if not versions:
        raise FileNotFoundError(
            f"{path} is neither a SavedModel (no saved_model.pb) nor a folder of numeric "
            "version folders (export.py writes export_dir/saved_model/<version>/)."
        )
    return os.path.join(path, str(max(versions)))


def load_embed_bytes(path):
    """Loads a SavedModel and returns its `embed_bytes` signature, checking the contract."""
    version_dir = latest_version(path)
    loaded = tf.saved_model.load(version_dir)
    signatures = dict(loaded.signatures)
    if "embed_bytes" not in signatures or "serving_default" not in signatures:
        raise ValueError(
            f"{version_dir} has signatures {sorted(signatures)}; evaluate.py needs the "
            "'serving_default' and 'embed_bytes' signatures that export.py writes."
        )
    embed_bytes = signatures["embed_bytes"]
    inputs = embed_bytes.structured_input_signature[1]
    if (len(inputs) != 1 or next(iter(inputs.values())).dtype != tf.string
            or "embedding" not in embed_bytes.structured_outputs):
        raise ValueError(
            f"{version_dir}: signature 'embed_bytes' must map one string input to an "
            f"'embedding' output; it maps {inputs} to {sorted(embed_bytes.structured_outputs)}."
        )
    return loaded, embed_bytes


def evaluate_run(split_name, batch_size):
    """Embeddings (and, for the figures, backbone features and thumbnails) of a trained run."""
    run = run_loader.load_run(FLAGS.model_dir)
    config = run.config
    if FLAGS.dataset and FLAGS.dataset != config.dataset:
        raise ValueError(f"--dataset={FLAGS.dataset} but the run was trained on "
                         f"{config.dataset}; omit --dataset.")
    splits = data_lib.load_dataset(
        config.dataset, data_dir=FLAGS.data_dir or config.data_dir, image_size=config.resize_size,
        validation_classes=config.validation_classes, seed=config.seed,
    )
    catalog = getattr(splits, split_name)
    if catalog is None:
        raise ValueError(f"The run has no {split_name} split (validation_classes=0).")
    preprocess = trainer.preprocess_config(config, splits)
    dataset = data_lib.make_eval_dataset(catalog, preprocess, batch_size)
    embeddings, labels = runner.compute_embeddings(runner.model_embed_fn(run.model), dataset)
    metric = runner.distance_metric(run.model)

    def features():
        return runner.compute_embeddings(runner.backbone_embed_fn(run.model), dataset)[0]

    return embeddings, labels, metric, catalog, features, config.recall_ks


def evaluate_saved_model(split_name, batch_size):
    from dvml_tf.export import raw_data

    if not FLAGS.dataset:
        raise ValueError("--saved_model needs --dataset (and --data_dir if not TFDS's default).")
    if split_name not in ("test", "train"):
        raise ValueError("--saved_model evaluates the train or test split.")
    _, embed_bytes = load_embed_bytes(FLAGS.saved_model)
    config = config_lib.TrainConfig(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir)
    catalog = getattr(raw_data.load_raw_splits(config, FLAGS.data_dir), split_name)
    embeddings, labels = runner.saved_model_embeddings(embed_bytes, catalog, batch_size)
    norms = np.linalg.norm(embeddings, axis=1)
    metric = "cosine" if np.allclose(norms, 1.0, atol=1e-3) else "euclidean"
    default_ks = (1, 10, 100, 1000) if FLAGS.dataset == "sop" else (1, 2, 4, 8)
    return embeddings, labels, metric, catalog, None, default_ks


def write_figures(directory, embeddings, labels, metric, catalog, features):
    from dvml_tf.evaluation import plots  # matplotlib only when figures are asked for

    os.makedirs(directory, exist_ok=True)
    # Whole classes, so that the maps show clusters: random classes until --plot_points images.
    rng = np.random.default_rng(0)
    chosen = []
    for label in rng.permutation(np.unique(labels)):
        if len(chosen) >= FLAGS.plot_points:
            break
        chosen.extend(np.flatnonzero(labels == label).tolist())
    chosen = np.sort(np.asarray(chosen[: FLAGS.plot_points]))
    thumbnails = data_lib.load_thumbnails(catalog, chosen, size=48)
    written = [
        plots.plot_tsne(embeddings[chosen], labels[chosen], thumbnails,
                        os.path.join(directory, "tsne.png"), max_points=FLAGS.plot_points),
        plots.plot_retrieval_grid(embeddings, labels, data_lib.load_thumbnails(
            catalog, np.arange(len(labels)), size=48), os.path.join(directory, "retrieval.png"),
            metric=metric),
    ]
    if features is not None:
        written.append(plots.plot_central_latent_space(
            features()[chosen], labels[chosen], thumbnails,
            os.path.join(directory, "central_latent_space.png"), max_points=FLAGS.plot_points))
    else:
        logging.warning("The central-latent-space figure needs the backbone features: "
                        "use --model_dir, not --saved_model.")
    return written


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if bool(FLAGS.model_dir) == bool(FLAGS.saved_model):
        raise app.UsageError("Give exactly one of --model_dir and --saved_model.")
    logging.set_verbosity(logging.INFO)
    try:
        evaluate = evaluate_run if FLAGS.model_dir else evaluate_saved_model
        embeddings, labels, metric, catalog, features, ks = evaluate(FLAGS.split, FLAGS.batch_size)
        recall_ks = tuple(int(k) for k in FLAGS.recall_ks) if FLAGS.recall_ks else tuple(ks)
        metrics = metrics_lib.evaluate_embeddings(
            embeddings, labels, recall_ks=recall_ks, metric=metric,
            compute_clustering=FLAGS.clustering,
        )
        print(runner.metrics_table(
            metrics, title=f"{FLAGS.split} split, {len(labels)} images, {metric} distance"))
        if FLAGS.tfsim:
            from dvml_tf.evaluation import tfsim_check  # an optional extra

            tfsim = tfsim_check.tfsim_retrieval_metrics(embeddings, labels, recall_ks,
                                                        metric=metric)
            print("\n| metric | dvml_tf | tensorflow-similarity | difference |\n|---|---|---|---|")
            for key, value in tfsim.items():
                print(f"| {key} | {metrics[key]:.6f} | {value:.6f} | "
                      f"{abs(metrics[key] - value):.1e} |")
        if FLAGS.output_json:
            atomic.write_json(FLAGS.output_json, metrics, sort_keys=True)
        if FLAGS.plots:
            for path in write_figures(FLAGS.plots, embeddings, labels, metric, catalog, features):
                print(f"wrote {path}")
        if FLAGS.projector:
            from dvml_tf.evaluation import projector

            thumbnails = data_lib.load_thumbnails(catalog, np.arange(len(labels)), size=32)
            projector.write_projector(embeddings, labels, FLAGS.projector, images=thumbnails,
                                      class_names=catalog.class_names)
            print(f"wrote projector files to {FLAGS.projector} "
                  f"(tensorboard --logdir {FLAGS.projector}, or projector.tensorflow.org)")
    except (ValueError, FileNotFoundError, ImportError) as error:
        sys.exit(f"evaluate.py: error: {error}")


if __name__ == "__main__":
    app.run(main)
