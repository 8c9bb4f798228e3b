"""The paper's Table 4 for two trained runs: is intra-class variance shared across classes?

Given a base-loss baseline run (`--baseline_dir`, the paper's Triplet model) and a DVML run with
the same base loss (`--dvml_dir`, DVML+Triplet), both written by train.py, this embeds the
training and the test classes of the runs' own dataset (each run loaded with
`task.load_run` and fed with its own resize / centre-crop preprocessing) and computes, per
split, with `variance_analysis` of this folder (definitions in its docstring):

  * the KS p-value (%) of class-centred features, mean +- std over 200 random class pairs,
    for both models, with the class-shuffled null reference (the level classes sharing one
    centred distribution reach);
  * the relative deviation (%): mean distance to the class mean over mean distance between
    class means, for both models.

"Features" are both the backbone feature f(x) and the embedding z_I; the Markdown table in the
paper's layout uses f(x) for the p-value rows (the backbone's view of the intra-class
variation, what DVML's decoder reconstructs) and z_I for the relative deviation rows (the
embedding DVML trains to be the class centre); both variants of everything are in the JSON and
in the second table. The paper does not say which features Table 4 used.

    TFDS_DATA_DIR=/path/to/tfds python research/dvml_omniglot/table4.py \\
        --baseline_dir=/tmp/runs/triplet_baseline --dvml_dir=/tmp/runs/triplet_dvml

Writes research/dvml_omniglot/results/table4.json and prints the tables.
"""

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tensorflow as tf  # noqa: E402

from dvml_tf import data as data_lib  # noqa: E402
from dvml_tf import task  # noqa: E402
from dvml_tf.evaluation import runner  # noqa: E402
from dvml_tf.utils import atomic  # noqa: E402
from research.dvml_omniglot import variance_analysis  # noqa: E402

RESULTS = os.path.join(HERE, "results", "table4.json")
SPLITS = ("train", "test")
MODELS = ("baseline", "dvml")
FEATURES = {"backbone": "f(x)", "embedding": "z_I"}
LOSS_NAMES = {"triplet": "Triplet", "npair": "N-pair", "triplet2_dws": "Triplet2+DWS",
              "margin_dws": "Margin+DWS", "contrastive": "Contrastive"}

# Paper Table 4 (verbatim, %): p-value mean, std; relative deviation without / with DVML.
PAPER_DATASETS = ("Cars196", "CUB-200-2011", "Products")
PAPER = {
    "train": {
        "p_value": ((76.00, 1.25), (76.87, 1.42), (83.87, 8.24)),
        "baseline_deviation": (79.99, 86.14, 73.10),
        "dvml_deviation": (40.75, 44.50, 44.48),
    },
    "test": {
        "p_value": ((74.87, 2.29), (77.01, 1.19), (83.75, 8.12)),
        "baseline_deviation": (97.98, 105.80, 73.46),
        "dvml_deviation": (57.08, 57.56, 46.94),
    },
}


def load_runs(baseline_dir, dvml_dir):
    """Loads both runs and checks that they make a baseline / DVML pair."""
    runs = {"baseline": task.load_run(baseline_dir), "dvml": task.load_run(dvml_dir)}
    if runs["baseline"].config.dvml:
        raise ValueError(f"--baseline_dir {baseline_dir!r} is a DVML run (dvml=True); it must be "
                         "the base-loss baseline (train.py --nodvml).")
    if not runs["dvml"].config.dvml:
        raise ValueError(f"--dvml_dir {dvml_dir!r} is a baseline run (dvml=False); it must be a "
                         "DVML run.")
    datasets = {name: run.config.dataset for name, run in runs.items()}
    if len(set(datasets.values())) != 1:
        raise ValueError(f"The two runs use different datasets: {datasets}.")
    return runs


def split_data(run, data_dir, cache):
    """The run's dataset (as it was trained: same resize, validation carve-out and seed) and its
    preprocessing; `cache` shares one load between runs with identical settings."""
    config = run.config
    directory = data_dir or config.data_dir
    key = (config.dataset, directory, config.resize_size, config.validation_classes, config.seed)
    if key not in cache:
        cache[key] = task.load_splits(config, data_dir=directory)
    return cache[key], task.preprocess_config(config)


def embed_split(model, catalog, preprocess, batch_size):
    """f(x) and z_I of every image of a split, in one backbone pass.

    Returns:
        `(features [N, F], embeddings [N, D], labels [N])`.
    """
    dataset = data_lib.make_eval_dataset(catalog, preprocess, batch_size)

    @tf.function(reduce_retracing=True)
    def both(images):
        features = tf.cast(model.backbone(images, training=False), "float32")
        embeddings = model.embedding_head(features)
        if model.normalize_embeddings:
            embeddings = tf.math.l2_normalize(embeddings, axis=-1)
        return tf.concat([features, embeddings], axis=1)

    joined, labels = runner.compute_embeddings(both, dataset)
    features, embeddings = joined[:, : model.feature_dim], joined[:, model.feature_dim :]
    # z_I from f(x) must be what the model itself returns (DVMLModel.call): check one batch.
    images, _ = next(iter(dataset))
    expected = np.asarray(model(images, training=False))
    if not np.allclose(expected, embeddings[: len(expected)], rtol=1e-4, atol=1e-5):
        raise RuntimeError("z_I computed from the backbone feature differs from model(images).")
    return features, embeddings, labels


def analyse(features, labels, args):
    ks = variance_analysis.ks_class_pvalues(
        features, labels, num_pairs=args.num_pairs,
        num_directions=args.num_directions or None, seed=args.seed, null_reference=True)
    deviation = variance_analysis.relative_deviation(features, labels)
    return {"ks": ks, "relative_deviation": deviation}


def _paper_cells(split, key):
    values = PAPER[split][key]
    if key == "p_value":
        return [f"{m:.2f} ± {s:.2f}" for m, s in values]
    return [f"{v:.2f}" for v in values]


def markdown(record, ks_features, deviation_features):
    loss = LOSS_NAMES.get(record["loss"], record["loss"])
    dataset = record["dataset"]
    ks_name, dev_name = FEATURES[ks_features], FEATURES[deviation_features]
    lines = [
        f"Table 4 (paper layout; ours: p-value on {ks_name}, rel. dev. on {dev_name}; in "
        "brackets the class-shuffled null reference):",
        "",
        f"| split | row | ours ({dataset}) | " + " | ".join(f"{d} (paper)" for d in PAPER_DATASETS)
        + " |",
        "|---|---|---|---|---|---|",
    ]
    for split in record["splits"]:
        result = record["results"][split]
        ks = result["baseline"][ks_features]["ks"]
        deviation = {model: result[model][deviation_features]["relative_deviation"]
                     ["relative_deviation_percent"] for model in MODELS}
        rows = [
            (f"{loss} p-value",
             f"{ks['p_value_mean_percent']:.2f} ± {ks['p_value_std_percent']:.2f} "
             f"({ks['null_p_value_mean_percent']:.2f})", _paper_cells(split, "p_value")),
            (f"{loss} (rel. dev.)", f"{deviation['baseline']:.2f}",
             _paper_cells(split, "baseline_deviation")),
            (f"DVML+{loss} (rel. dev.)", f"{deviation['dvml']:.2f}",
             _paper_cells(split, "dvml_deviation")),
        ]
        for row, ours, paper in rows:
            lines.append(f"| {split.capitalize()} | {row} | {ours} | " + " | ".join(paper) + " |")
    lines += [
        "",
        "All measurements (p-values: mean ± std over class pairs [null reference], share of "
        "tests rejected at 5 %):",
        "",
        "| split | model | features | p-value | rejected | rel. dev. | classes | images |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split in record["splits"]:
        for model in MODELS:
            for kind, name in FEATURES.items():
                r = record["results"][split][model][kind]
                ks, dev = r["ks"], r["relative_deviation"]
                label = loss if model == "baseline" else f"DVML+{loss}"
                lines.append(
                    f"| {split} | {label} | {name} | {ks['p_value_mean_percent']:.2f} ± "
                    f"{ks['p_value_std_percent']:.2f} [{ks['null_p_value_mean_percent']:.2f}] | "
                    f"{100 * ks['rejection_rate']:.1f} % | "
                    f"{dev['relative_deviation_percent']:.2f} | {dev['num_classes']} | "
                    f"{dev['num_samples']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline_dir", required=True, help="run folder of the baseline")
    parser.add_argument("--dvml_dir", required=True, help="run folder of the DVML run")
    parser.add_argument("--data_dir", default=None,
                        help="override the runs' data_dir (TFDS data dir or image folder)")
    parser.add_argument("--splits", default="train,test", help="comma-separated: train, test")
    parser.add_argument("--num_pairs", type=int, default=variance_analysis.DEFAULT_NUM_PAIRS)
    parser.add_argument("--num_directions", type=int,
                        default=variance_analysis.DEFAULT_NUM_DIRECTIONS,
                        help="principal directions tested (0: every raw coordinate)")
    parser.add_argument("--seed", type=int, default=0, help="class pairs and null shuffle")
    parser.add_argument("--batch_size", type=int, default=256)
    # Paper Table 4 is ambiguous about "features": f(x) for the p-values, z_I for rel. dev.
    parser.add_argument("--ks_features", default="backbone", choices=tuple(FEATURES),
                        help="features of the table's p-value rows")
    parser.add_argument("--deviation_features", default="embedding", choices=tuple(FEATURES),
                        help="features of the table's relative-deviation rows")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or set(splits) - set(SPLITS):
        parser.error(f"--splits must list values from {', '.join(SPLITS)}; got {args.splits!r}.")
    if args.num_pairs < 1 or args.num_directions < 0 or args.batch_size < 1:
        parser.error("--num_pairs and --batch_size must be >= 1, --num_directions >= 0.")

    started = time.time()
    runs = load_runs(args.baseline_dir, args.dvml_dir)
    cache = {}
    results = {split: {} for split in splits}
    for model_name, run in runs.items():
        dataset_splits, preprocess = split_data(run, args.data_dir, cache)
        for split in splits:
            features, embeddings, labels = embed_split(
                run.model, getattr(dataset_splits, split), preprocess, args.batch_size)
            results[split][model_name] = {
                "backbone": analyse(features, labels, args),
                "embedding": analyse(embeddings, labels, args),
            }
    configs = {name: run.config for name, run in runs.items()}
    record = {
        "dataset": configs["baseline"].dataset,
        "loss": configs["baseline"].loss,
        "splits": splits,
        "results": results,
        "runs": {name: {"model_dir": os.path.abspath(run.model_dir), "source": run.source,
                        "dvml": run.config.dvml, "loss": run.config.loss,
                        "backbone": run.config.backbone, "steps": run.config.steps,
                        "step": int(run.model.step_counter.numpy()),
                        "embedding_dim": run.config.embedding_dim,
                        "image_size": run.config.image_size, "seed": run.config.seed}
                 for name, run in runs.items()},
        "settings": {"num_pairs": args.num_pairs, "num_directions": args.num_directions,
                     "seed": args.seed, "ks_features": args.ks_features,
                     "deviation_features": args.deviation_features},
        "paper": {"datasets": PAPER_DATASETS, **PAPER},
        "notes": [],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_seconds": None,
    }
    if configs["baseline"].loss != configs["dvml"].loss:
        record["notes"].append(f"The runs use different base losses: baseline "
                               f"{configs['baseline'].loss}, DVML {configs['dvml'].loss}.")
    if configs["baseline"].loss != "triplet":
        record["notes"].append("The paper's Table 4 uses the Triplet loss.")
    table = markdown(record, args.ks_features, args.deviation_features)
    record["markdown"] = table
    record["wall_seconds"] = round(time.time() - started, 1)
    atomic.write_json(args.output, record)
    print(table)
    for note in record["notes"]:
        print(f"\nNote: {note}")
    print(f"\nWritten to {args.output}")
    return record


if __name__ == "__main__":
    main()
