"""DVML where its premise holds: the pre-registered glyph study (issue 21, part 3), in two regimes.

* scratch: `convnet_wide` (F = 512 > J = 128) trained from scratch on the calibration's selected
  glyph folder (its training classes);
* transfer (the paper's regime, analogue): the backbone first trained by softmax classification
  on the folder's pretraining pool (`pretrain.py`; characters never used again), then metric
  fine-tuning at the paper's learning rate (1e-4) on a small training set (100 classes, as
  CUB's 100), the paper's phase schedule (25 % of the steps in phase 1) scaled to the run.

In each regime: base losses triplet (the Omniglot study's reduction: mean over active
triplets), N-pair and triplet2 + DWS; methods: the `--nodvml` baseline, DVML chosen on
validation among the paper's literal recipe and the Omniglot studies' informative variants, and
the Omniglot study's best reference synthesis method (deviation transfer). `PROTOCOL` is
written into the results file before the first run and is fixed from then on.

Stages, in order, each resumable (a run recorded in the results file is never trained again;
an interrupted one resumes from its checkpoint; two processes may share a stage's runs):

    S=research/glyphs/study.py
    python $S --stage=protocol --workdir=RUNS              # writes the protocol, no run
    python $S --stage=prepare --workdir=RUNS               # the two folders, the backbone
    python $S --stage=validation --regime=scratch --workdir=RUNS  # candidates, 2 seeds
    python $S --stage=test --regime=scratch --workdir=RUNS        # 3 seeds x 3 losses
    python $S --stage=geometry --regime=scratch --workdir=RUNS    # the positive control
    (the same with --regime=transfer)
    python $S --stage=report

Results: `results/glyphs_synthesis.json` (this folder): `protocol`, `premise` (from
premise.json), `font_packages`, `folders` (what `prepare` built),
`selected` ({regime: {"dvml": NAME, "validation_means": ...}}), `validation` and `test`
({regime: {loss: {method: {"seeds", "recall@1", "map@r", ..., diagnostics}}}}), `success`
({regime: the rule per loss and overall}), `geometry` ({regime: [positive control per run]}),
and `runs` (every run's record), from which the summaries are derived.
"""

import json
import os
import pathlib
import platform
import subprocess
import sys

import numpy as np
from absl import app
from absl import flags

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dvml_tf.utils import atomic  # noqa: E402
from research.dvml_omniglot import methods  # noqa: E402
from research.dvml_omniglot import runs  # noqa: E402
from research.glyphs import recipe  # noqa: E402

FLAGS = flags.FLAGS

REGIMES = ("scratch", "transfer")
TRANSFER_TRAIN_CLASSES = 100  # as CUB-200-2011's 100 training classes
BUDGET_SECONDS = 12 * 60
VALIDATION_SEEDS, TEST_SEEDS = (0, 1), (0, 1, 2)
VALIDATION_LOSSES = ("npair", "triplet2_dws")
TEST_LOSSES = ("triplet", "npair", "triplet2_dws")
SUCCESS_MIN_GAIN, SUCCESS_MIN_LOSSES = 0.015, 2

NETWORK = ["--backbone=convnet_wide", "--embedding_dim=128", "--log_every=250"]
REGIME_FLAGS = {
    "scratch": ["--learning_rate=1e-3"],
    # The paper's one learning rate (Adam 1e-4) and phase schedule (25 % in phase 1).
    "transfer": ["--learning_rate=1e-4", "--phase1_fraction=0.25"],
}
# The DVML candidates: the paper's literal recipe, the Omniglot follow-up's selected variant
# (`dvml_centre`) and its best other validation variant (`dvml_transfer`). The post-hoc
# `dvml_decoded` of the Omniglot study is left out: exploratory there, the dearest step here
# (calibration.json `method_cost`), and 4 more validation runs per regime.
DVML_CANDIDATES = {name: methods.DVML_VARIANTS[name]
                   for name in ("dvml_paper", "dvml_centre", "dvml_transfer")}
BASELINE = ["--nodvml"]
REFERENCE = methods.REFERENCE_VARIANTS["ref_deviation_transfer"]
# The Omniglot study's triplet reduction (selected on its validation classes).
TRIPLET_EXTRA = methods.TRIPLET_REDUCTIONS["baseline_active"][1:]
# Pretraining is a run too: 750 steps at the baseline's step (0.67-0.82 CPU s, calibration.json
# `method_cost`; a softmax head costs no more than a metric loss) + 90 s fit 12 minutes.
# pretrain.py records its CPU seconds, which the study's results keep.
PRETRAIN = {"steps": 750, "learning_rate": 1e-3, "classes_per_batch": 64,
            "images_per_class": 2, "seed": 0, "held_out_designs": 1}


# ------------------------------------------------------------------------------- protocol

def calibration_choice(path):
    """The calibration's selected setting: (name, build arguments, its baseline run)."""
    results = json.loads(pathlib.Path(path).read_text())
    name = results.get("selected")
    if not name:
        raise SystemExit(f"{path} selects no setting yet: finish the calibration first (the "
                         "study's folder is its selection).")
    return name, results["settings"][name]["build"], results["runs"][name]


def folder_builds(build):
    """The build arguments of the two regimes' folders: the calibration's selected folder, and
    the same with TRANSFER_TRAIN_CLASSES training classes (the builder deals classes in a
    keyed hash order, so both share their test, validation and pretrain classes)."""
    transfer = json.loads(json.dumps(build))
    transfer["splits"]["train"] = TRANSFER_TRAIN_CLASSES
    return {"scratch": build, "transfer": transfer}


def estimate(step_seconds):
    """CPU hours of the study from the measured step of every method and loss (CPU seconds,
    calibration.json `method_cost`), the budget's steps and the runs of each stage."""
    def minutes(kind_seeds, losses, names):
        return sum(kind_seeds * (recipe.STEPS_BY_LOSS[loss] * step_seconds[f"{loss}/{name}"]
                                 + START_SECONDS)
                   for loss in losses for name in names) / 60

    per_regime = {
        "validation": minutes(len(VALIDATION_SEEDS), VALIDATION_LOSSES,
                              ("baseline", *DVML_CANDIDATES)),
        # The test's DVML: the dearest candidate (the selection is not known yet).
        "test": minutes(len(TEST_SEEDS), TEST_LOSSES, ("baseline", "ref_deviation_transfer"))
        + max(minutes(len(TEST_SEEDS), TEST_LOSSES, (name,)) for name in DVML_CANDIDATES),
    }
    pretrain = BUDGET_SECONDS / 60
    total = 2 * sum(per_regime.values()) + pretrain
    return {"per_regime_cpu_minutes": {k: round(v) for k, v in per_regime.items()},
            "pretrain_cpu_minutes": round(pretrain),
            "total_cpu_hours": round(total / 60, 1),
            "wall_hours_two_at_a_time": round(total / 120, 1),
            "runs_per_regime": {
                "validation": len(VALIDATION_SEEDS) * len(VALIDATION_LOSSES)
                * (1 + len(DVML_CANDIDATES)),
                "test": len(TEST_SEEDS) * len(TEST_LOSSES) * 3}}


# Start-up, tracing and the final evaluation of a run, beside its steps (recipe.STEPS_BY_LOSS).
START_SECONDS = 90


def make_protocol(calibration_path):
    """The protocol, from the calibration's selected folder and its measured step costs."""
    name, build, _ = calibration_choice(calibration_path)
    cost = json.loads(pathlib.Path(calibration_path).read_text()).get("method_cost")
    if not cost:
        raise SystemExit(f"{calibration_path} has no method_cost: run calibration.py "
                         "--stage=method_cost first (the budget's steps rest on it).")
    step_seconds = cost["cpu_seconds_per_step"]
    return {
        "question": "Where intra-class variation is shared across classes by construction "
                    "(glyphs: one font draws every character), does DVML beat its base-loss "
                    "baseline on unseen classes, from scratch and in the paper's transfer "
                    "regime, and does it clear the best reference synthesis method?",
        "data": {
            "calibration_setting": name,
            "folders": folder_builds(build),
            "scratch": "Train on the selected folder's training classes; validation: its "
                       "validation split (held-out training classes); test: train on train + "
                       "validation, evaluate once on the test classes at the run's end.",
            "transfer": f"The same fonts, designs and classes with {TRANSFER_TRAIN_CLASSES} "
                        "training classes (the first of the same hash order); the backbone "
                        "pretrained on the folder's pretrain split (pretrain.py), never used "
                        "again. Validation and test as in scratch.",
        },
        "pretraining": {**PRETRAIN, "backbone": "convnet_wide", "head": "linear softmax over "
                        "the pretrain classes", "images": "the project's training batches and "
                        "augmentation (32 px resized, 28 px random crop, no flips)"},
        "network": "convnet_wide (F = 512) -> z_I (J = 128), Adam; 28 px crops of 32 px "
                   "images; batches N-pair 64 x 2, triplet and triplet2 + DWS 32 x 4; DVML: "
                   "T = 20, the paper's weights and two phases (25 % of the steps in phase 1)",
        "flags": {"common": NETWORK, "size": recipe.size_flags(build["image_size"]),
                  "regimes": REGIME_FLAGS,
                  "losses": {k: runs.LOSS_FLAGS[k] for k in TEST_LOSSES},
                  "triplet_extra": TRIPLET_EXTRA, "baseline": BASELINE,
                  "dvml_candidates": DVML_CANDIDATES, "reference": REFERENCE},
        "steps": recipe.STEPS_BY_LOSS,
        "steps_rule": f"The budget's, per loss, the same in both regimes and for every method: "
                      f"a run of the dearest method of the loss within {BUDGET_SECONDS // 60} "
                      f"CPU minutes single-threaded, {START_SECONDS} s of them for start-up "
                      "and evaluation (calibration.json `method_cost`, measured before the "
                      "calibration's runs; recipe.STEPS_BY_LOSS). Validation R@1 at half and "
                      "at the end of every validation run.",
        "validation": "Per regime: N-pair and triplet2 + DWS, seeds 0 and 1, the baseline and "
                      "every DVML candidate, on the validation classes.",
        "selection": "Per regime, the DVML candidate with the highest mean validation R@1 over "
                     "both losses and both seeds. The reference method is fixed (the Omniglot "
                     "study's selection: deviation transfer) and the triplet reduction too "
                     "(mean over active triplets). Every choice on validation classes only.",
        "test": "Per regime: seeds 0, 1, 2; triplet, N-pair, triplet2 + DWS; baseline, the "
                "selected DVML and the reference; each run evaluates the test classes once, "
                "at its end.",
        "success": "Per regime: the selected DVML beats its baseline on the test classes by "
                   "more than twice the larger population std over seeds (np.std) AND by at "
                   f"least {100 * SUCCESS_MIN_GAIN:.1f} points of R@1, on at least "
                   f"{SUCCESS_MIN_LOSSES} of the 3 losses "
                   "(dvml_tf.evaluation.seed_comparison.compare_over_seeds), with active units "
                   "> 0 and a decoder that uses z_V (reconstruction error with shuffled z_V "
                   "above its own) on every seed of those losses, as in the Omniglot study. "
                   "The reference is checked by the same rule, reported apart.",
        "diagnostics": "Every run: the Omniglot study's (active units, KL, reconstruction "
                       "with own and shuffled z_V, L_syn / L_inv, the validation curve); seed 0 "
                       "of every synthesizing test run: the positive control "
                       "(positive_control.py: does the synthesized offset point where the same "
                       "font's real offset in another class points, against another font's).",
        "budget": f"Each run at most {BUDGET_SECONDS // 60} CPU minutes (single-threaded, two "
                  "at a time on 2 cores).",
        "estimate": estimate(step_seconds),
        "step_cpu_seconds": {"values": step_seconds,
                             "source": "calibration.json method_cost (phase 2, single-"
                                       "threaded, CPU time)"},
    }


# ---------------------------------------------------------------------------- results file

def load_results():
    path = pathlib.Path(FLAGS.output)
    results = json.loads(path.read_text()) if path.exists() else {}
    if "protocol" not in results:
        raise SystemExit(f"{path} holds no protocol: run --stage=protocol first.")
    results.setdefault("runs", {})
    return results


def save_results(results):
    for kind in ("validation", "test"):  # derived from `runs`, rewritten on every save
        results[kind] = {regime: runs.summarize(results["runs"].get(f"{regime}_{kind}", {}))
                         for regime in REGIMES}
    results["success"] = {regime: {method: success_check(results["test"][regime], method)
                                   for method in ("dvml", "reference")} for regime in REGIMES}
    atomic.write_json(FLAGS.output, results)


def update(change):
    return runs.locked_update(FLAGS.output, load_results, save_results, change)


def success_check(summary, method):
    """`protocol["success"]` for `method` against "baseline" in a regime's test summary
    (`runs.success_check`, the Omniglot study's rule); None until every loss has every seed."""
    return runs.success_check(summary, method, TEST_LOSSES, TEST_SEEDS, SUCCESS_MIN_GAIN,
                              SUCCESS_MIN_LOSSES)


# ---------------------------------------------------------------------------------- stages

def workdir():
    return pathlib.Path(FLAGS.workdir)


def folder(regime):
    return workdir() / "data" / regime


def backbone_path():
    return workdir() / "pretrained" / "convnet_wide_pretrain.weights.h5"


def run_dir(stage, loss, variant, seed):
    return workdir() / stage / f"{loss}_{variant}_seed{seed}"


def stage_protocol():
    """Writes the protocol (and what it rests on) before any run; refuses to change it."""
    path = pathlib.Path(FLAGS.output)
    existing = json.loads(path.read_text()) if path.exists() else {}
    protocol = make_protocol(FLAGS.calibration)
    if existing.get("protocol") not in (None, protocol):
        raise SystemExit(f"{path} was written under another protocol; it is fixed once "
                         "written (write a new results file).")
    premise = pathlib.Path(FLAGS.premise)
    packages = pathlib.Path(FLAGS.font_packages)
    existing.update({
        "protocol": protocol,
        "premise": json.loads(premise.read_text()) if premise.exists() else None,
        "font_packages": [line.split("\t") for line in packages.read_text().splitlines()]
        if packages.exists() else None,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "machine": platform.machine()},
    })
    existing.setdefault("runs", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, existing)
    print(json.dumps(protocol["estimate"], indent=1))


def stage_prepare():
    """Builds both folders (once), checks they share their held-out classes, pretrains the
    transfer regime's backbone (once, `pretrain.py` in a single-threaded subprocess)."""
    from dvml_tf.data import glyph_builder
    from dvml_tf.data import glyphs

    protocol = load_results()["protocol"]
    record = {}
    for regime, build in protocol["data"]["folders"].items():
        output = folder(regime)
        if not output.exists():
            output.parent.mkdir(parents=True, exist_ok=True)
            glyph_builder.build(recipe.build_spec(build, FLAGS.fonts.split(",")), str(output),
                                cache_dir=str(workdir() / "cache"))
        manifest = glyphs.read_manifest(output)
        record[regime] = {"counts": manifest["counts"],
                          "splits": {s: manifest["splits"][s]["classes"]
                                     for s in manifest["splits"]}}
    held_out = {regime: {c["character"] for c in glyphs.read_manifest(folder(regime))[
        "characters"] if c["split"] != "train"} for regime in REGIMES}
    if held_out["scratch"] != held_out["transfer"]:
        raise SystemExit("The two folders differ in their test, validation or pretrain classes.")
    if not backbone_path().exists():
        backbone_path().parent.mkdir(parents=True, exist_ok=True)
        settings = protocol["pretraining"]
        command = [sys.executable, str(HERE / "pretrain.py"), f"--data_dir={folder('transfer')}",
                   f"--output={backbone_path()}", f"--seed={settings['seed']}",
                   f"--steps={capped(settings['steps'])}",
                   *[f"--{key}={settings[key]}" for key in (
                       "learning_rate", "classes_per_batch", "images_per_class",
                       "held_out_designs")]]
        with open(backbone_path().with_suffix(".log"), "a") as log:
            subprocess.run(command, check=True, cwd=ROOT, env=runs.single_threaded_env(),
                           stdout=log, stderr=subprocess.STDOUT)
    record["pretraining"] = json.loads(pathlib.Path(f"{backbone_path()}.json").read_text())
    update(lambda r: r.__setitem__("folders", record))


def regime_flags(regime, loss, seed, protocol, evaluate_halfway=False):
    steps = steps_of(protocol, loss)
    half = max(steps // 2, 1)
    flags_ = [*NETWORK, *protocol["flags"]["size"], *REGIME_FLAGS[regime],
              *runs.LOSS_FLAGS[loss], f"--seed={seed}", f"--steps={steps}",
              f"--checkpoint_every={half}", "--dataset=glyphs", f"--data_dir={folder(regime)}"]
    if evaluate_halfway:  # validation runs: R@1 at half and at the end
        flags_.append(f"--eval_every={half}")
    if regime == "transfer":
        flags_.append(f"--backbone_weights={backbone_path()}")
    return flags_ + (TRIPLET_EXTRA if loss == "triplet" else [])


def execute(regime, kind, jobs):
    from dvml_tf.data import glyphs

    stage = f"{regime}_{kind}"
    validation = glyphs.read_manifest(folder(regime))["splits"]["validation"]["classes"]

    def record(loss, variant, seed, metrics):
        update(lambda r: r["runs"].setdefault(stage, {}).setdefault(loss, {}).setdefault(
            variant, {}).__setitem__(str(seed), runs.run_record(metrics)))

    runs.execute(stage, jobs, run_dir, load_results()["runs"].get(stage, {}), record,
                 parallel=FLAGS.parallel, only=FLAGS.only, config="glyphs",
                 validation_classes=validation)


def capped(steps):
    return min(steps, FLAGS.max_steps) if FLAGS.max_steps else steps


def steps_of(protocol, loss):
    """The protocol's steps of a loss (capped by --max_steps in tests)."""
    return capped(protocol["steps"][loss])


def stage_validation(regime):
    protocol = load_results()["protocol"]
    candidates = {"baseline": BASELINE, **DVML_CANDIDATES}
    execute(regime, "validation", [
        (loss, name, seed, [*regime_flags(regime, loss, seed, protocol, True), *flags_])
        for seed in VALIDATION_SEEDS for loss in VALIDATION_LOSSES
        for name, flags_ in candidates.items()])
    selected = select(load_results(), regime)
    if selected:
        update(lambda r: r.setdefault("selected", {}).__setitem__(regime, selected))
        print(f"{regime} selected:", json.dumps(selected, indent=1))


def select(results, regime):
    """The selection rule; None until the regime's validation stage is complete."""
    runs_ = results["runs"].get(f"{regime}_validation", {})
    means = {}
    for name in ("baseline", *DVML_CANDIDATES):
        values = [runs_.get(loss, {}).get(name, {}).get(str(seed), {}).get("recall@1")
                  for loss in VALIDATION_LOSSES for seed in VALIDATION_SEEDS]
        if None in values:
            return None
        means[name] = float(np.mean(values))
    return {"dvml": max(DVML_CANDIDATES, key=means.get), "validation_means": means}


def stage_test(regime):
    results = load_results()
    selected = results.get("selected", {}).get(regime)
    if not selected:
        raise SystemExit(f"The {regime} validation stage is not complete: nothing is selected.")
    protocol = results["protocol"]
    methods = {"baseline": BASELINE, "dvml": DVML_CANDIDATES[selected["dvml"]],
               "reference": REFERENCE}
    execute(regime, "test", [
        (loss, method, seed, [*regime_flags(regime, loss, seed, protocol), *flags_])
        for seed in TEST_SEEDS for loss in TEST_LOSSES for method, flags_ in methods.items()])


def stage_geometry(regime):
    from research.glyphs import positive_control

    stage = f"{regime}_test"
    records = []
    for loss, by_method in load_results()["runs"].get(stage, {}).items():
        for method in ("dvml", "reference"):
            if "0" in by_method.get(method, {}):
                records.append(positive_control.analyse_run(run_dir(stage, loss, method, 0)))
    update(lambda r: r.setdefault("geometry", {}).__setitem__(regime, records))


# ---------------------------------------------------------------------------------- report

def cell(values):
    values = [100 * v for v in values]
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def report(results):
    lines = [f"estimate: {json.dumps(results['protocol']['estimate'])}",
             f"steps: {results['protocol']['steps']}"]
    for kind in ("validation", "test"):
        for regime, by_loss in results.get(kind, {}).items():
            for loss, by_method in by_loss.items():
                lines.append(f"\n{regime} {kind}, {loss}\n| method | seeds | R@1 | MAP@R |\n"
                             "|---|---|---|---|")
                for method, row in by_method.items():
                    lines.append(f"| {method} | {len(row['seeds'])} | "
                                 f"{cell(row['recall@1'])} | "
                                 f"{cell(row['map@r'])} |")
    for regime, checks in results.get("success", {}).items():
        for method, check in checks.items():
            if check:
                lines.append(f"\n{regime}: {method} vs baseline: "
                             f"{'MET' if check['success'] else 'not met'} "
                             f"(losses meeting the rule: {check['losses_met']})")
    return "\n".join(lines)



def define_flags():
    """The command line's flags, defined when run as a script (or by a test): importing the
    module defines none, so it can share a process with other scripts' flags."""
    flags.DEFINE_enum("stage", "report",
                      ["protocol", "prepare", "validation", "test", "geometry", "report"],
                      "Stage to run.")
    flags.DEFINE_enum("regime", None, ["scratch", "transfer"], "The regime of a training stage.")
    flags.DEFINE_string("workdir", os.path.expanduser("~/dvml_runs/glyphs_study"),
                        "The glyph folders, the pretrained backbone and the runs.")
    flags.DEFINE_string("fonts", "/usr/share/fonts", "Font files and folders (setup_fonts.sh).")
    flags.DEFINE_string("calibration", str(HERE / "results" / "calibration.json"),
                        "The calibration's results (its selected folder).")
    flags.DEFINE_string("premise", str(HERE / "results" / "premise.json"),
                        "The premise's results, copied into the study's.")
    flags.DEFINE_string("font_packages", str(HERE / "results" / "font_packages.tsv"),
                        "setup_fonts.sh's record of the font package versions.")
    flags.DEFINE_string("output", str(HERE / "results" / "glyphs_synthesis.json"), "Results file.")
    flags.DEFINE_integer("parallel", 2, "Runs at a time (each single-threaded).")
    flags.DEFINE_list("only", [], "Run only these LOSS/VARIANT/SEED jobs of the stage.")
    flags.DEFINE_integer("max_steps", 0, "Tests only: cap every run's steps (0: the protocol's).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.stage in ("validation", "test", "geometry") and not FLAGS.regime:
        raise app.UsageError(f"--stage={FLAGS.stage} needs --regime=scratch|transfer.")
    stages = {"protocol": stage_protocol, "prepare": stage_prepare, "report": lambda: None}
    regime_stages = {"validation": stage_validation, "test": stage_test,
                     "geometry": stage_geometry}
    if FLAGS.stage in stages:
        stages[FLAGS.stage]()
    else:
        regime_stages[FLAGS.stage](FLAGS.regime)
    if FLAGS.stage != "protocol":
        print(report(update(lambda r: None)))


if __name__ == "__main__":
    define_flags()
    app.run(main)
