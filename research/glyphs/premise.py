"""DVML's premise, measured before any DVML run (issue 21, part 2): is intra-class variation
shared across classes on glyphs, and not (or much less) on Omniglot?

For a trained `--nodvml` baseline of each dataset (trained on its training classes, a
validation split of held-out training classes kept apart; the test classes are never touched),
on the held-out classes:

1. *Probe*: a linear classifier (multinomial logistic regression on standardized features)
   predicts the instance identity of an image from its features, fitted on half of the held-out
   classes and scored on the other half (classes disjoint): the font design (glyphs; with
   augmented copies, the instance = design x copy) or, on Omniglot, the drawer index YY of the
   file name within an alphabet (fitted and scored alphabet by alphabet). Features: the
   penultimate f(x), the embedding z_I, both centred on their class mean (only the deviation
   from the class is left), and the raw pixels. Chance is 1 / (number of identities).
2. *Offset alignment*: the offset u = x - (class mean) of instance j in class a against the
   offset of the same instance j in class b (same design; Omniglot: same drawer index, same
   alphabet), and against a shuffled control (another instance k of class b): mean cosine of
   both, and the *transfer test*: the synthesized point mean_b + u_a^j (a real offset moved to
   another class, what DVML's synthesis should produce) is nearest, among class b's images, to
   x_b^j in what share of cases (chance 1 / images of class b), and its squared error relative
   to the shuffled control's.
3. *Table 4* of the paper (research/dvml_omniglot/variance_analysis.py) on the training and the
   held-out classes: the KS p-value of class-centred f(x) between class pairs (with the
   class-shuffled null) and the relative deviation of z_I.

    python research/glyphs/premise.py --stage=pixels --glyphs_data=RUNS/data/SETTING \\
        --omniglot_npz=OMNIGLOT_105_NPZ            # items 1-2 on pixels, before any training
    python research/glyphs/premise.py --stage=omniglot_run --workdir=RUNS   # the Omniglot baseline
    python research/glyphs/premise.py --glyphs_run=RUNS/runs/SETTING \\
        --omniglot_run=RUNS/omniglot_baseline --omniglot_npz=OMNIGLOT_105_NPZ

The Omniglot drawer index is not in TFDS: it is read from the numpy archive of the same images
(`omniglot_105.npz`, rows sorted by class and drawer; see its README), matched to the TFDS images
pixel for pixel. Writes research/glyphs/results/premise.json and prints the tables.
"""

import hashlib
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np
from absl import app
from absl import flags

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from dvml_tf import task  # noqa: E402
from dvml_tf.utils import atomic  # noqa: E402
from research.dvml_omniglot import runs  # noqa: E402
from research.dvml_omniglot import table4  # noqa: E402
from research.dvml_omniglot import variance_analysis  # noqa: E402
from research.glyphs import positive_control  # noqa: E402
from research.glyphs import recipe  # noqa: E402

FLAGS = flags.FLAGS

# The Omniglot baseline: the calibration's network and steps; validation = the last 161
# background classes (alphabets 25-29), as in the Omniglot study.
OMNIGLOT_FLAGS = [*recipe.NETWORK, "--dataset=omniglot", *recipe.size_flags(32)]
FEATURES = ("f(x)", "z_I", "f(x) centred", "z_I centred", "pixels")


# ------------------------------------------------------------------------------- embeddings

def embed(run_dir, split):
    """f(x), z_I, labels and the stored pixels of a run's split (its own preprocessing)."""
    run = task.load_run(run_dir)
    splits = task.load_splits(run.config)
    catalog = getattr(splits, split)
    features, embeddings, labels = table4.embed_split(
        run.model, catalog, task.preprocess_config(run.config), 256)
    if not np.array_equal(labels, catalog.labels):
        raise RuntimeError("The embedded rows are not the catalog's.")
    return {"f(x)": features, "z_I": embeddings, "labels": labels,
            "pixels": catalog.images.reshape(catalog.num_images, -1).astype(np.float32),
            "config": run.config, "splits": splits}


def omniglot_drawers(splits, split, npz_path):
    """Drawer index (1-20; -1 when ambiguous) and alphabet of each row of an Omniglot split,
    matched pixel for pixel with the archive that carries them.

    Args:
        splits: raw `DatasetSplits` (`task.load_splits(config, raw=True)`: same rows as the
            run's).
        split: "validation" or "train".
        npz_path: omniglot_105.npz (images with ink 255, labels, drawer, alphabet).
    """
    archive = np.load(npz_path)
    by_pixels = {}
    for image, label, drawer, alphabet in zip(archive["images"], archive["labels"],
                                              archive["drawer"], archive["alphabet"],
                                              strict=True):
        key = hashlib.sha256(image.tobytes()).digest()
        by_pixels.setdefault(key, []).append((int(label), int(drawer), int(alphabet)))
    catalog = getattr(splits, split)
    drawers = np.full(catalog.num_images, -1, np.int64)
    alphabets = np.full(catalog.num_images, -1, np.int64)
    for i in range(catalog.num_images):
        image = catalog.image(i)  # raw RGB, dark ink on white
        ink = (255 - image[..., 0]).astype(np.uint8)
        matches = [m for m in by_pixels.get(hashlib.sha256(ink.tobytes()).digest(), [])
                   if m[0] == catalog.labels[i]]
        if len(matches) == 1:
            _, drawers[i], alphabets[i] = matches[0]
        elif not matches:
            raise RuntimeError(f"Omniglot image {i} (label {catalog.labels[i]}) is not in "
                               f"{npz_path}.")
    return drawers, alphabets


# ------------------------------------------------------------------------------- measures

def centred(values, labels):
    means, _, inverse = variance_analysis.class_means(values, labels)
    return values - means[inverse]


def probe(values, identities, labels, groups, rng):
    """Accuracy of a linear probe predicting `identities` on held-out classes.

    Within each group (all rows: one group), the classes are split in two halves; the probe
    is fitted on one half's rows and scored on the other's, then the halves swap; the
    accuracy is over every scored row.

    Returns:
        dict: accuracy, chance (1 / identities), majority (the commonest identity's share
        among scored rows), scored rows.
    """
    correct = total = majority = 0
    identities_count = len(np.unique(identities[identities >= 0]))
    for group in np.unique(groups):
        rows = np.flatnonzero((groups == group) & (identities >= 0))
        classes = rng.permutation(np.unique(labels[rows]))
        halves = np.array_split(classes, 2)
        for fit_classes, score_classes in (halves, halves[::-1]):
            fit = rows[np.isin(labels[rows], fit_classes)]
            score = rows[np.isin(labels[rows], score_classes)]
            if len(np.unique(identities[fit])) < 2 or not len(score):
                continue
            scaler = StandardScaler().fit(values[fit])
            model = LogisticRegression(max_iter=2000, C=1.0)
            model.fit(scaler.transform(values[fit]), identities[fit])
            predicted = model.predict(scaler.transform(values[score]))
            correct += int(np.sum(predicted == identities[score]))
            total += len(score)
            majority += int(np.max(np.bincount(identities[score])))
    return {"accuracy": correct / total, "chance": 1.0 / identities_count,
            "majority": majority / total, "scored": total, "identities": identities_count}


def offset_alignment(values, identities, labels, groups, num_pairs, rng):
    """The same instance's offsets in two classes against a shuffled control (module
    docstring, item 2).

    Returns:
        dict: cosine_same, cosine_shuffled (means), same_above_shuffled (share of cases),
        transfer_top1 (share of synthesized points mean_b + u_a^j nearest to x_b^j among class
        b's images), transfer_top1_shuffled (the same with u_a^k, k != j), transfer_chance,
        transfer_error_ratio (E||mean_b + u_a^j - x_b^j||^2 / the same with u_a^k), cases.
    """
    offsets = centred(values, labels)
    means, _, inverse = variance_analysis.class_means(values, labels)
    same, shuffled, top1, top1_shuffled, error, error_shuffled, chance = ([] for _ in range(7))
    pairs = []
    for group in np.unique(groups):
        members = np.unique(labels[groups == group])
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                pairs.append((members[a], members[b]))
    pairs = [pairs[i] for i in rng.permutation(len(pairs))[:num_pairs]]
    for class_a, class_b in pairs:
        for source, target in ((class_a, class_b), (class_b, class_a)):
            rows_a = np.flatnonzero((labels == source) & (identities >= 0))
            rows_b = np.flatnonzero((labels == target) & (identities >= 0))
            in_b = {int(identities[r]): r for r in rows_b}
            common = [(r, in_b[int(identities[r])]) for r in rows_a
                      if int(identities[r]) in in_b]
            if len(common) < 2:
                continue
            source_rows = np.array([r for r, _ in common])
            target_rows = np.array([t for _, t in common])
            # The control: the offset of another instance of the source class.
            control_rows = source_rows[np.roll(np.arange(len(common)), 1)]
            u_a, u_control, u_b = (offsets[source_rows], offsets[control_rows],
                                   offsets[target_rows])

            def cosine(x, y):
                return np.sum(x * y, 1) / np.maximum(
                    np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)

            same.append(cosine(u_a, u_b))
            shuffled.append(cosine(u_control, u_b))
            centre = means[inverse[target_rows[0]]]
            candidates = values[rows_b]
            for offset, hits, errors in ((u_a, top1, error),
                                         (u_control, top1_shuffled, error_shuffled)):
                synthesized = centre + offset
                distances = np.sum((synthesized[:, None] - candidates[None]) ** 2, axis=2)
                nearest = rows_b[np.argmin(distances, axis=1)]
                hits.append(nearest == target_rows)
                errors.append(np.sum((synthesized - values[target_rows]) ** 2, axis=1))
            chance.append(np.full(len(common), 1.0 / len(rows_b)))
    same, shuffled = np.concatenate(same), np.concatenate(shuffled)
    return {"cosine_same": float(same.mean()), "cosine_shuffled": float(shuffled.mean()),
            "same_above_shuffled": float(np.mean(same > shuffled)),
            "transfer_top1": float(np.concatenate(top1).mean()),
            "transfer_top1_shuffled": float(np.concatenate(top1_shuffled).mean()),
            "transfer_chance": float(np.concatenate(chance).mean()),
            "transfer_error_ratio": float(np.concatenate(error).mean()
                                          / np.concatenate(error_shuffled).mean()),
            "cases": len(same), "class_pairs": len(pairs)}


def table4_measures(features, embeddings, labels):
    ks = variance_analysis.ks_class_pvalues(features, labels, null_reference=True)
    ks.pop("pair_p_values")
    return {"ks_f(x)": ks,
            "relative_deviation_z_I": variance_analysis.relative_deviation(embeddings, labels)}


def measure(name, run_dir, identities_of, groups_of):
    """Every measure of one dataset's baseline run."""
    held_out = embed(run_dir, "validation")
    identities = identities_of(held_out)
    groups = groups_of(held_out)
    rng = np.random.default_rng(FLAGS.seed)
    values = {"f(x)": held_out["f(x)"], "z_I": held_out["z_I"],
              "f(x) centred": centred(held_out["f(x)"], held_out["labels"]),
              "z_I centred": centred(held_out["z_I"], held_out["labels"]),
              "pixels": held_out["pixels"]}
    labels = held_out["labels"]
    result = {
        "run": "/".join(pathlib.Path(run_dir).resolve().parts[-2:]),
        "held_out": {"classes": len(np.unique(labels)), "images": len(labels),
                     "identities": len(np.unique(identities[identities >= 0]))},
        "probe": {kind: probe(values[kind], identities, labels, groups,
                              np.random.default_rng(FLAGS.seed)) for kind in FEATURES},
        "alignment": {kind: offset_alignment(held_out[kind], identities, labels, groups,
                                             FLAGS.num_pairs, rng) for kind in ("f(x)", "z_I")},
        "table4": {"held_out": table4_measures(held_out["f(x)"], held_out["z_I"], labels)},
    }
    train = embed(run_dir, "train")
    result["table4"]["train"] = table4_measures(train["f(x)"], train["z_I"], train["labels"])
    print(f"{name}: done", flush=True)
    return result


def markdown(results):
    lines = ["| dataset | features | probe accuracy | chance | alignment: cos same / shuffled "
             "| transfer top-1: same / shuffled / chance | error ratio |",
             "|---|---|---|---|---|---|---|"]
    for name in ("glyphs", "omniglot"):
        record = results.get(name)
        if not record:
            continue
        for kind in FEATURES:
            p = record["probe"][kind]
            a = record["alignment"].get(kind)
            cells = ("—", "—", "—") if a is None else (
                f"{a['cosine_same']:.3f} / {a['cosine_shuffled']:.3f}",
                f"{100 * a['transfer_top1']:.1f} / {100 * a['transfer_top1_shuffled']:.1f} / "
                f"{100 * a['transfer_chance']:.1f} %", f"{a['transfer_error_ratio']:.2f}")
            lines.append(f"| {name} | {kind} | {100 * p['accuracy']:.1f} % | "
                         f"{100 * p['chance']:.1f} % | " + " | ".join(cells) + " |")
    lines += ["", "| dataset | classes | KS p-value of f(x) [null] | rejected | rel. dev. of z_I |",
              "|---|---|---|---|---|"]
    for name in ("glyphs", "omniglot"):
        record = results.get(name)
        if not record:
            continue
        for split, values in record["table4"].items():
            ks, dev = values["ks_f(x)"], values["relative_deviation_z_I"]
            lines.append(f"| {name} | {split} | {ks['p_value_mean_percent']:.2f} ± "
                         f"{ks['p_value_std_percent']:.2f} [{ks['null_p_value_mean_percent']:.2f}]"
                         f" | {100 * ks['rejection_rate']:.1f} % | "
                         f"{dev['relative_deviation_percent']:.2f} % |")
    return "\n".join(lines)


def omniglot_run():
    """Trains the Omniglot baseline with the glyph calibration's network (validation held out)."""
    model_dir = pathlib.Path(FLAGS.workdir) / "omniglot_baseline"
    started = time.time()
    runs.run(model_dir, "validation", OMNIGLOT_FLAGS, label="omniglot baseline",
             config="omniglot_paper")
    print(f"{model_dir}: {time.time() - started:.0f} s")



def define_flags():
    """The command line's flags, defined when run as a script (or by a test): importing the
    module defines none, so it can share a process with other scripts' flags."""
    flags.DEFINE_enum("stage", "measure", ["omniglot_run", "pixels", "measure"], "What to do.")
    flags.DEFINE_string("glyphs_data", None, "pixels: a glyph folder (its validation split).")
    flags.DEFINE_string("workdir", os.path.expanduser("~/dvml_runs/glyphs_calibration"),
                        "omniglot_run: where the Omniglot baseline is trained.")
    flags.DEFINE_string("glyphs_run", None, "A glyph baseline run (calibration.py's runs/NAME).")
    flags.DEFINE_string("omniglot_run", None, "An Omniglot baseline run (--stage=omniglot_run).")
    flags.DEFINE_string("omniglot_npz", None,
                        "omniglot_105.npz: the Omniglot images with their drawer index.")
    flags.DEFINE_integer("num_pairs", 2000, "Class pairs of the offset alignment.")
    flags.DEFINE_integer("seed", 0, "Probe halves, class pairs, shuffled controls.")
    flags.DEFINE_string("output", str(HERE / "results" / "premise.json"), "Results file.")


def pixels_only():
    """The probe and the offset alignment on the held-out classes' pixels, before any model is
    trained: the variation in the input itself (no Table 4: it needs a network's features).
    Kept under "pixels_only" in the results file, apart from the trained-feature measures."""
    import types

    from dvml_tf.configs import omniglot_paper
    from dvml_tf.data import glyphs

    started = time.time()
    arrays = glyphs.read_arrays(FLAGS.glyphs_data)
    built = len(glyphs.split_classes(arrays["manifest"])["validation"])
    splits = glyphs.load_glyphs(FLAGS.glyphs_data, validation_classes=built)
    catalog = splits.validation
    identities = positive_control.glyph_instances(
        types.SimpleNamespace(data_dir=FLAGS.glyphs_data), catalog.labels)
    sets = {"glyphs": (catalog, identities, np.zeros(catalog.num_images, np.int64))}
    config = omniglot_paper.get_config().replace(
        validation_classes=runs.VALIDATION_CLASSES, resize_size=32, image_size=28)
    catalog = task.load_splits(config).validation
    drawers, alphabets = omniglot_drawers(task.load_splits(config, raw=True), "validation",
                                          FLAGS.omniglot_npz)
    sets["omniglot"] = (catalog, drawers, alphabets)
    record = {}
    for name, (catalog, identities, groups) in sets.items():
        pixels = catalog.images.reshape(catalog.num_images, -1).astype(np.float32)
        labels = catalog.labels
        record[name] = {
            "held_out": {"classes": len(np.unique(labels)), "images": len(labels),
                         "identities": len(np.unique(identities[identities >= 0]))},
            "probe": {kind: probe(values, identities, labels, groups,
                                  np.random.default_rng(FLAGS.seed))
                      for kind, values in (("pixels", pixels),
                                           ("pixels centred", centred(pixels, labels)))},
            "alignment": {"pixels": offset_alignment(pixels, identities, labels, groups,
                                                     FLAGS.num_pairs,
                                                     np.random.default_rng(FLAGS.seed))}}
        print(f"{name}: {json.dumps(record[name], indent=1)}", flush=True)
    record["command"] = ("TFDS_DATA_DIR=TFDS python research/glyphs/premise.py --stage=pixels "
                         f"--glyphs_data=RUNS/data/{pathlib.Path(FLAGS.glyphs_data).name} "
                         "--omniglot_npz=OMNIGLOT_105_NPZ")
    record["settings"] = {"num_pairs": FLAGS.num_pairs, "seed": FLAGS.seed}
    record["wall_seconds"] = round(time.time() - started, 1)
    path = pathlib.Path(FLAGS.output)
    results = json.loads(path.read_text()) if path.exists() else {}
    results["pixels_only"] = record
    atomic.write_json(path, results)


def main(argv):
    del argv
    if FLAGS.stage == "omniglot_run":
        omniglot_run()
        return
    if FLAGS.stage == "pixels":
        if not (FLAGS.glyphs_data and FLAGS.omniglot_npz):
            raise app.UsageError("--stage=pixels needs --glyphs_data and --omniglot_npz.")
        pixels_only()
        return
    if not (FLAGS.glyphs_run and FLAGS.omniglot_run and FLAGS.omniglot_npz):
        raise app.UsageError("--glyphs_run, --omniglot_run and --omniglot_npz are required.")
    started = time.time()
    results = {
        "glyphs": measure(
            "glyphs", FLAGS.glyphs_run,
            lambda d: positive_control.glyph_instances(d["config"], d["labels"]),
            lambda d: np.zeros(len(d["labels"]), np.int64)),
    }
    drawers = {}

    def omniglot_identities(d):
        raw = task.load_splits(d["config"], raw=True)
        drawers["values"], drawers["alphabets"] = omniglot_drawers(raw, "validation",
                                                                   FLAGS.omniglot_npz)
        return drawers["values"]

    results["omniglot"] = measure("omniglot", FLAGS.omniglot_run, omniglot_identities,
                                  lambda d: drawers["alphabets"])
    results["commands"] = [
        "python research/glyphs/premise.py --stage=omniglot_run --workdir=RUNS",
        f"python research/glyphs/premise.py --glyphs_run=RUNS/runs/"
        f"{pathlib.Path(FLAGS.glyphs_run).name} --omniglot_run=RUNS/omniglot_baseline "
        "--omniglot_npz=OMNIGLOT_105_NPZ"]
    results["settings"] = {"num_pairs": FLAGS.num_pairs, "seed": FLAGS.seed,
                           "probe": "sklearn LogisticRegression(C=1, max_iter=2000) on "
                                    "StandardScaler features, class halves swapped"}
    results["machine"] = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    results["wall_seconds"] = round(time.time() - started, 1)
    results["markdown"] = markdown(results)
    path = pathlib.Path(FLAGS.output)
    if path.exists():  # the pixel-only measures of an earlier --stage=pixels are kept
        results = {**{k: v for k, v in json.loads(path.read_text()).items()
                      if k == "pixels_only"}, **results}
    atomic.write_json(path, results)
    print(results["markdown"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
