"""Does a run's synthesized offset point where the same font's real offset points?

A positive control that exists only on glyphs: the variation DVML's z_V should model is known
there. Instance j of every class is the same font design (and augmentation copy), so the real
offset of x_b^j (its embedding minus its class's mean) is exactly what "this image's style"
looks like in another class b. For a trained synthesizing run (DVML or a reference synthesis
method), on its training classes (what the synthesis acts on; the test classes are never
touched), every image x_a^j gets its synthesized offsets s (synthesized point minus z_I(x_a^j),
drawn the way a training step draws them: `synthesis_geometry.synthesized_batch`) and is
compared, in the metric loss's space, with:

  * same: the real offset of the same instance j in a random other class b;
  * control: the real offset of another instance k != j of that class b;
  * ceiling: the real offset of x_a^j itself against that of x_b^j (how alike the same font
    makes two classes' offsets: what a perfect z_V could reach at most).

`cosine_same` > `cosine_control` means z_V carries the image's own style into its synthesized
samples; about equal means z_V varies, but not along the font's direction.

    python research/glyphs/positive_control.py --run_dirs=RUNS/scratch_test/npair_dvml_seed0
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def glyph_instances(config, labels):
    """Instance id (design x copies + copy) of each row of a glyph split."""
    from dvml_tf.data import glyphs

    arrays = glyphs.read_arrays(config.data_dir)
    rows = np.flatnonzero(np.isin(arrays["labels"], np.unique(labels)))
    if not np.array_equal(arrays["labels"][rows], labels):
        raise RuntimeError("The glyph split's rows are not the folder's.")
    copies = arrays["manifest"]["arguments"]["copies"]
    return (arrays["designs"][rows] * copies + arrays["copies"][rows]).astype(np.int64)


def offset_table(points, labels, instances):
    """Real offsets by (class, instance): float [C, I, D] (NaN where a class lacks an instance),
    with the class and instance ids in table order."""
    classes, class_index = np.unique(labels, return_inverse=True)
    ids, instance_index = np.unique(instances, return_inverse=True)
    sums = np.zeros((len(classes), points.shape[1]))
    np.add.at(sums, class_index, points)
    means = sums / np.bincount(class_index)[:, None]
    table = np.full((len(classes), len(ids), points.shape[1]), np.nan)
    table[class_index, instance_index] = points - means[class_index]
    return table, class_index, instance_index


def _cosine(x, y):
    return np.sum(x * y, 1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1),
                                         1e-12)


def alignment(offsets, sources, table, class_index, instance_index, rng):
    """The positive control's cosines (module docstring).

    Args:
        offsets: float [S, D], synthesized offsets (synthesized point minus its source's point).
        sources: int [S], the row of each offset's source image.
        table, class_index, instance_index: `offset_table` of the real points.
        rng: numpy Generator (the other class b and the control instance k of each offset).

    Returns:
        dict: cosine_same, cosine_control, same_above_control (share of offsets), cosine_ceiling
        (the source's real offset against the same one), cases.
    """
    classes, instances = table.shape[:2]
    a, j = class_index[sources], instance_index[sources]
    b = (a + rng.integers(1, classes, len(a))) % classes  # any class but a
    k = (j + rng.integers(1, instances, len(j))) % instances  # any instance but j
    same, control, own = table[b, j], table[b, k], table[a, j]
    kept = ~(np.isnan(same).any(1) | np.isnan(control).any(1))
    if not kept.any():
        raise ValueError("No synthesized offset has its instance in another class.")
    same_cos = _cosine(offsets[kept], same[kept])
    control_cos = _cosine(offsets[kept], control[kept])
    return {"cosine_same": float(same_cos.mean()), "cosine_control": float(control_cos.mean()),
            "same_above_control": float(np.mean(same_cos > control_cos)),
            "cosine_ceiling": float(_cosine(own[kept], same[kept]).mean()),
            "cases": int(kept.sum())}


def analyse_run(run_dir, rounds=2, seed=0, batch_size=256):
    """The positive control of one synthesizing run on its training classes."""
    import tensorflow as tf

    from dvml_tf import task
    from research.dvml_omniglot import synthesis_geometry
    from research.dvml_omniglot import table4

    run = task.load_run(run_dir)
    config = run.config
    if config.dataset != "glyphs":
        raise ValueError(f"{run_dir} was trained on {config.dataset!r}: the positive control "
                         "needs glyphs (the same font in every class).")
    splits, preprocess = table4.split_data(run, None, {})
    features, _, labels = table4.embed_split(run.model, splits.train, preprocess, batch_size)
    instances = glyph_instances(config, labels)
    z_inv = run.model.embedding_head(tf.convert_to_tensor(features, tf.float32)).numpy()
    if run.model.metric_loss.normalize:
        z_inv = z_inv / np.maximum(np.linalg.norm(z_inv, axis=1, keepdims=True), 1e-12)
    table, class_index, instance_index = offset_table(z_inv, labels, instances)
    rng = np.random.default_rng(seed)
    offsets, sources = [], []
    for index, rows in enumerate(synthesis_geometry.training_batches(
            labels, config.classes_per_batch, config.images_per_class, rounds, rng)):
        real, points, local = synthesis_geometry.synthesized_batch(
            run.model, features[rows], labels[rows], noise_seed=seed * 100_003 + index)
        offsets.append(points - real[local])
        sources.append(rows[local])
    result = alignment(np.concatenate(offsets), np.concatenate(sources), table, class_index,
                       instance_index, rng)
    return {"run": "/".join(os.path.normpath(os.path.abspath(run_dir)).split(os.sep)[-2:]),
            "loss": config.loss, "dvml": config.dvml, "synthesis": config.synthesis,
            "positive_control": result}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run_dirs", required=True, help="Comma-separated run folders.")
    parser.add_argument("--rounds", type=int, default=2, help="Training-layout epochs drawn.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = [analyse_run(d, args.rounds, args.seed) for d in args.run_dirs.split(",")]
    print(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
