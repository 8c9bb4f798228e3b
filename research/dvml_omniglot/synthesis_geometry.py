"""Where do a run's synthesized samples lie, next to the real images of their class?

DVML trains its metric loss on synthesized embeddings z_I(x) + z_V (paper Eq. 7) on the premise
that they look like further images of x's class. This measures that premise on a trained run:
it embeds the run's training classes (inference mode, the run's own preprocessing), draws the
synthesized samples the way a training step does (class-balanced batches of the run's P x K
layout, one draw per image, the model's own `synthesize`; a reference method's own
`synthesize`), maps real and synthesized points into the metric loss's space (L2-normalized when
the loss normalizes) and reports, over all synthesized points (`geometry`):

  * spread ratio: the RMS distance of synthesized points to their class mean over that of the
    real images (1: as far from their class as real images are; the class means are those of
    the real images of the split);
  * alignment: the cosine (Frobenius) between the second-moment matrices of the synthesized
    offsets (synthesized point minus its source image) and of the real deviations from the
    class mean (1: the offsets vary along the directions real images vary along), next to the
    value isotropic offsets would have;
  * label kept: the share of synthesized points whose nearest class mean (every class of the
    split; the source class's mean leaves the source image out) is their own class, next to
    the same share for the real images.

`--rule` replaces what is measured: `decoded` applies `variants.decoded_synthesis` (L_syn on
z_I + W (f_hat(c + z_V) - f_hat(c))) to a DVML run's trained decoder; `feature_noise` is its
control, z_I + W (s * eps) with eps ~ N(0, I) in feature space and s the per-dimension
intra-class standard deviation of f (any run): the alignment W alone gives to any feature-space
perturbation.

Only training classes are used (what the synthesis acts on during training); the test classes
are never touched, so this can run on any stage's runs.

    TFDS_DATA_DIR=/path/to/tfds python research/dvml_omniglot/synthesis_geometry.py \\
        --run_dirs=RUNS/validation/npair_dvml_centre_seed0,RUNS/validation/npair_dvml_paper_seed0

or every synthesizing run of one seed that `synthesis.py --workdir=RUNS` recorded (its DVML and
reference variants of the validation stage, then the test stage's DVML and reference runs):

    TFDS_DATA_DIR=/path/to/tfds python research/dvml_omniglot/synthesis_geometry.py \\
        --study=RUNS --study_seed=0

Writes research/dvml_omniglot/results/synthesis_geometry.json and prints a Markdown table.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tensorflow as tf  # noqa: E402

from dvml_tf import task  # noqa: E402
from dvml_tf.models import dvml_model  # noqa: E402
from dvml_tf.utils import atomic  # noqa: E402
from research.dvml_omniglot import table4  # noqa: E402
from research.dvml_omniglot import variance_analysis  # noqa: E402
from research.dvml_omniglot import variants  # noqa: E402  (also registers the research models)

RESULTS = os.path.join(HERE, "results", "synthesis_geometry.json")
STUDY_RESULTS = os.path.join(HERE, "results", "omniglot_synthesis.json")
STAGES = ("validation", "test")
RULES = ("own", "decoded", "feature_noise")


def geometry(real, synthetic, sources, labels):
    """The spread, alignment and label keeping of synthesized points (module docstring).

    Args:
        real: float array `[N, D]`, the real images' points in the metric loss's space.
        synthetic: float array `[M, D]`, synthesized points in the same space.
        sources: int array `[M]`, the row of `real` each synthesized point was made from (its
            class is the synthesized point's class).
        labels: int array `[N]`, the real images' classes (at least 2 images per class).

    Returns:
        dict of floats: `spread_ratio`, `alignment` (None for all-zero offsets),
        `isotropic_alignment`,
        `label_kept_synthetic`, `label_kept_real`, `real_rms_deviation`,
        `synthetic_rms_deviation`, `rms_offset`, and the counts `num_real`, `num_synthetic`,
        `num_classes`.

    Raises:
        ValueError: bad shapes, non-finite values, a source out of range, a class with one
            image (its leave-one-out mean is undefined) or no intra-class spread at all.
    """
    real = np.asarray(real, np.float64)
    synthetic = np.asarray(synthetic, np.float64)
    sources = np.asarray(sources).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if real.ndim != 2 or synthetic.ndim != 2 or real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"real and synthetic must be [N, D] and [M, D]; got {real.shape} and "
                         f"{synthetic.shape}.")
    if len(labels) != len(real) or len(sources) != len(synthetic):
        raise ValueError(f"{len(labels)} labels for {len(real)} real points, {len(sources)} "
                         f"sources for {len(synthetic)} synthesized points.")
    if not (np.isfinite(real).all() and np.isfinite(synthetic).all()):
        raise ValueError("real and synthetic points must be finite.")
    if len(sources) and (sources.min() < 0 or sources.max() >= len(real)):
        raise ValueError(f"sources must index the {len(real)} real points.")
    means, classes, inverse = variance_analysis.class_means(real, labels)
    counts = np.bincount(inverse)
    if len(classes) < 2 or counts.min() < 2:
        raise ValueError("Need at least 2 classes of at least 2 images each.")

    real_deviation = real - means[inverse]
    source_class = inverse[sources]
    synthetic_deviation = synthetic - means[source_class]
    offsets = synthetic - real[sources]
    real_rms = np.sqrt(np.mean(np.sum(real_deviation**2, axis=1)))
    if real_rms == 0:
        raise ValueError("The real images do not vary within their classes: the spread ratio "
                         "is undefined.")
    synthetic_rms = np.sqrt(np.mean(np.sum(synthetic_deviation**2, axis=1)))

    def second_moment(x):
        return x.T @ x / len(x)

    real_moment, offset_moment = second_moment(real_deviation), second_moment(offsets)
    dim = real.shape[1]

    def kept(points, rows):
        """Share of `points` (made from real rows `rows`) nearest to their own class's mean,
        that mean computed without the real image `rows` itself."""
        own = inverse[rows]
        distances = (np.sum(points**2, axis=1)[:, None] - 2 * points @ means.T
                     + np.sum(means**2, axis=1)[None, :])
        n = counts[own][:, None]
        leave_one_out = (n * means[own] - real[rows]) / (n - 1)
        distances[np.arange(len(points)), own] = np.sum((points - leave_one_out)**2, axis=1)
        return float(np.mean(np.argmin(distances, axis=1) == own))

    offset_norm = np.linalg.norm(offset_moment)
    return {
        "spread_ratio": float(synthetic_rms / real_rms),
        # Undefined (None) when every synthesized point equals its source image.
        "alignment": (float(np.sum(real_moment * offset_moment)
                            / (np.linalg.norm(real_moment) * offset_norm))
                      if offset_norm > 0 else None),
        # Offsets with second moment proportional to I: trace(M) / (sqrt(D) |M|_F).
        "isotropic_alignment": float(np.trace(real_moment)
                                     / (np.sqrt(dim) * np.linalg.norm(real_moment))),
        "label_kept_synthetic": kept(synthetic, sources),
        "label_kept_real": kept(real, np.arange(len(real))),
        "real_rms_deviation": float(real_rms),
        "synthetic_rms_deviation": float(synthetic_rms),
        "rms_offset": float(np.sqrt(np.mean(np.sum(offsets**2, axis=1)))),
        "num_real": len(real),
        "num_synthetic": len(synthetic),
        "num_classes": len(classes),
    }


def training_batches(labels, classes_per_batch, images_per_class, rounds, rng):
    """Row indices of class-balanced batches (P classes x K images, class-major), as the
    training sampler draws them: each round visits every class with at least K images once."""
    classes, inverse = np.unique(labels, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    eligible = [c for c, rows in enumerate(rows_of) if len(rows) >= images_per_class]
    if len(eligible) < classes_per_batch:
        raise ValueError(f"A batch needs {classes_per_batch} classes of at least "
                         f"{images_per_class} images; the split has {len(eligible)}.")
    batches = []
    for _ in range(rounds):
        order = rng.permutation(eligible)
        for start in range(0, len(order) - classes_per_batch + 1, classes_per_batch):
            batches.append(np.concatenate([
                rng.choice(rows_of[c], images_per_class, replace=False)
                for c in order[start:start + classes_per_batch]]))
    return batches


def synthesized_batch(model, features, labels, noise_seed, rule="own", feature_std=None):
    """One training-layout batch's real and synthesized points in the metric loss's space.

    DVML runs: z_V drawn from the model's heads (one draw, the model's prior scale, its
    intra-class scaling), decoder centre and `synthesize` (transfer partners included);
    reference runs (`--synthesis`): the metric loss's own `synthesize` on the real points.
    `rule="decoded"` replaces a DVML run's own synthesis with `variants.decoded_synthesis` (the
    run's decoder, heads and options): where its samples would lie under that rule.
    `rule="feature_noise"` (any run, a control): z_I + W (feature_std * eps), Gaussian noise in
    feature space with the per-dimension intra-class scale, mapped by the embedding head's
    kernel W: the alignment any feature-space perturbation gets from W alone.

    Args:
        model: a trained `DVMLModel` (or research subclass).
        features: float32 `[B, F]`, backbone features of a class-major batch.
        labels: int32 `[B]`.
        noise_seed: int, seeds z_V's draw and the transfer partners.
        rule: "own" (the run's synthesis), "decoded" or "feature_noise".
        feature_std: float `[F]`, the per-dimension intra-class standard deviation of f (for
            `feature_noise`).

    Returns:
        `(real [B, D], synthetic [S * B, D], sources [S * B])`, numpy.
    """
    if rule not in RULES or (rule == "decoded" and not model.use_dvml):
        raise ValueError(f"rule must be one of {', '.join(RULES)} (decoded: DVML runs only); "
                         f"got {rule!r}.")
    if rule == "feature_noise" and feature_std is None:
        raise ValueError("rule='feature_noise' needs feature_std.")
    features = tf.convert_to_tensor(features, tf.float32)
    labels = tf.convert_to_tensor(labels, tf.int32)
    z_inv = model.embedding_head(features)
    normalize = model.metric_loss.normalize
    real = tf.math.l2_normalize(z_inv, axis=-1) if normalize else z_inv
    if rule == "feature_noise":
        noise = tf.random.stateless_normal(features.shape, seed=[noise_seed, 4], alg="philox")
        offset = tf.matmul(noise * tf.constant(feature_std, tf.float32),
                           model.embedding_head.kernel)
        synthetic = (z_inv + offset)[tf.newaxis]
    elif model.use_dvml:
        # The step counter seeds the transfer partners (`synthesize`): vary it per batch.
        model.step_counter.assign(noise_seed)
        batch = dvml_model._Batch(labels)
        noise = tf.random.stateless_normal([1, *z_inv.shape], seed=[noise_seed, 1],
                                           alg="philox")
        _, _, z_var = model.variance_draws(features, z_inv, batch, noise)
        centre = model._decoder_centre(z_inv, z_inv, batch)
        if rule == "decoded":
            _, synthetic = variants.decoded_synthesis(model, z_inv, z_var, centre, batch)
        else:
            _, synthetic = model.synthesize(z_inv, z_var, features, noise, centre=centre,
                                            batch=batch)
    elif getattr(model.metric_loss, "method", None) is not None:
        synthetic = model.metric_loss.synthesize(real, labels, tf.constant([noise_seed, 2]))
    else:
        raise ValueError("The run synthesizes nothing: it is neither a DVML run nor a base loss "
                         "with --synthesis.")
    if normalize:  # the metric loss's space, as for its real points
        synthetic = tf.math.l2_normalize(synthetic, axis=-1)
    count = int(synthetic.shape[0])
    size = int(real.shape[0])
    synthetic = tf.reshape(synthetic, [count * size, -1])
    sources = np.tile(np.arange(size), count)
    return real.numpy(), synthetic.numpy(), sources


def analyse_run(run_dir, data_dir=None, rounds=4, seed=0, batch_size=256, cache=None,
                rule="own"):
    """`geometry` of one run's synthesized samples (under `rule`) on its training classes."""
    run = task.load_run(run_dir)
    config = run.config
    trained_steps = int(run.model.step_counter.numpy())  # before the batches reassign it
    dataset_splits, preprocess = table4.split_data(run, data_dir, {} if cache is None else cache)
    features, _, labels = table4.embed_split(run.model, dataset_splits.train, preprocess,
                                             batch_size)
    # Every image's real point in the metric loss's space (each batch's must be its rows').
    z_inv = run.model.embedding_head(tf.convert_to_tensor(features, tf.float32)).numpy()
    if run.model.metric_loss.normalize:
        z_inv = z_inv / np.maximum(np.linalg.norm(z_inv, axis=1, keepdims=True), 1e-12)
    means, _, inverse = variance_analysis.class_means(features, labels)
    feature_std = np.sqrt(np.mean((features - means[inverse]) ** 2, axis=0))
    rng = np.random.default_rng(seed)
    synthetic, sources = [], []
    for index, rows in enumerate(training_batches(labels, config.classes_per_batch,
                                                  config.images_per_class, rounds, rng)):
        real, points, local_sources = synthesized_batch(
            run.model, features[rows], labels[rows], noise_seed=seed * 100_003 + index,
            rule=rule, feature_std=feature_std)
        if not np.allclose(real, z_inv[rows], atol=1e-5):
            raise RuntimeError("A batch's real points differ from the split's embeddings.")
        synthetic.append(points)
        sources.append(rows[local_sources])
    result = geometry(z_inv, np.concatenate(synthetic), np.concatenate(sources), labels)
    return {
        # The folder and its parent (e.g. the study's stage): no machine's path in the results.
        "run": "/".join(os.path.normpath(os.path.abspath(run_dir)).split(os.sep)[-2:]),
        "loss": config.loss, "dvml": config.dvml, "synthesis": config.synthesis,
        "decoder_centre": config.decoder_centre if config.dvml else None,
        "variance_transfer": config.variance_transfer if config.dvml else None,
        "variance_scale": config.variance_scale if config.dvml else None,
        "normalized": bool(run.model.metric_loss.normalize),
        "rule": rule,
        "step": trained_steps,
        "geometry": result,
    }


def study_run_dirs(workdir, results_file, seed):
    """The run folders of `synthesis.py` (its `--workdir`) that synthesize and that its results
    file records as finished for `seed`: validation before test, in the protocol's variant
    order (`dvml_*`, then `ref_*`; the test stage's `dvml` and `reference`)."""
    with open(results_file) as f:
        results = json.load(f)
    order = [*results["protocol"]["flags"]["variants"], "dvml", "reference"]
    dirs = []
    for stage in STAGES:
        for loss, by_variant in results.get("runs", {}).get(stage, {}).items():
            for variant in sorted(by_variant, key=lambda v: order.index(v) if v in order else 99):
                synthesizes = variant.startswith(("dvml", "ref_")) or variant == "reference"
                if synthesizes and str(seed) in by_variant[variant]:
                    dirs.append(os.path.join(workdir, stage, f"{loss}_{variant}_seed{seed}"))
    if not dirs:
        raise ValueError(f"{results_file} records no finished DVML or reference run of seed "
                         f"{seed}.")
    return dirs


def markdown(records):
    lines = [
        "| run | spread ratio | alignment (isotropic) | label kept: synthesized / real |",
        "|---|---|---|---|",
    ]
    for record in records:
        g = record["geometry"]
        alignment = "—" if g["alignment"] is None else f"{g['alignment']:.2f}"
        name = record["run"] if record["rule"] == "own" else f"{record['run']} ({record['rule']})"
        lines.append(
            f"| {name} | {g['spread_ratio']:.2f} | {alignment} "
            f"({g['isotropic_alignment']:.2f}) | {100 * g['label_kept_synthetic']:.1f} / "
            f"{100 * g['label_kept_real']:.1f} % |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runs = parser.add_mutually_exclusive_group(required=True)
    runs.add_argument("--run_dirs",
                      help="comma-separated run folders (DVML runs or --synthesis runs)")
    runs.add_argument("--study", help="synthesis.py's --workdir: measure its recorded runs")
    parser.add_argument("--study_results", default=STUDY_RESULTS,
                        help="with --study: synthesis.py's results file")
    parser.add_argument("--study_seed", type=int, default=0, help="with --study: the runs' seed")
    parser.add_argument("--data_dir", default=None, help="override the runs' data_dir")
    parser.add_argument("--rounds", type=int, default=4,
                        help="passes over the training classes (batches of the run's layout)")
    parser.add_argument("--seed", type=int, default=0, help="batches and z_V's draws")
    parser.add_argument("--rule", default="own", choices=RULES,
                        help="own: each run's synthesis; decoded: variants.decoded_synthesis "
                             "with each DVML run's decoder; feature_noise: the control, "
                             "intra-class-scaled feature noise mapped by W (any run)")
    parser.add_argument("--batch_size", type=int, default=256, help="embedding batch size")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    if args.study:
        run_dirs = study_run_dirs(args.study, args.study_results, args.study_seed)
    else:
        run_dirs = [d.strip() for d in args.run_dirs.split(",") if d.strip()]
    if not run_dirs:
        parser.error("--run_dirs names no run folder.")
    if args.rounds < 1 or args.batch_size < 1:
        parser.error("--rounds and --batch_size must be >= 1.")
    started = time.time()
    cache = {}
    records = [analyse_run(d, args.data_dir, args.rounds, args.seed, args.batch_size, cache,
                           args.rule) for d in run_dirs]
    table = markdown(records)
    result = {"runs": records,
              "settings": {"rounds": args.rounds, "seed": args.seed, "rule": args.rule},
              "split": "train", "markdown": table, "date": time.strftime("%Y-%m-%d %H:%M"),
              "wall_seconds": round(time.time() - started, 1)}
    atomic.write_json(args.output, result)
    print(table)
    print(f"\nWritten to {args.output}")
    return result


if __name__ == "__main__":
    main()
