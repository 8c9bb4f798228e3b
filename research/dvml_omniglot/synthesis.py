"""DVML where it can work: a non-degenerate configuration, an informative variance branch, and
synthesized samples measured against reference synthesis methods, under a protocol fixed in
advance (`PROTOCOL`, written into the results file before the first run).

Stages, in order (each resumes: runs recorded in the results file are not trained again, runs
whose folder holds their metrics are collected, interrupted ones resume from their checkpoint):

    S=research/dvml_omniglot/synthesis.py
    TFDS_DATA_DIR=/path/to/tfds python $S --stage=curve        # baselines' validation curves
    TFDS_DATA_DIR=/path/to/tfds python $S --stage=validation   # every variant, 2 seeds
    TFDS_DATA_DIR=/path/to/tfds python $S --stage=test         # selected variants, 3 seeds
    TFDS_DATA_DIR=/path/to/tfds python $S --stage=exploratory  # post hoc: `EXPLORATORY`
    python $S --stage=report                                    # tables of what is done

`--stage=validation` and `--stage=test` take `--only=LOSS/VARIANT/SEED,...` to run a part (two
processes of this script may share the work: runs are claimed with a lock file). The selection
(`select`) applies the rule of `PROTOCOL` to the validation results; the test stage refuses to
start before the validation stage is complete. The runs live in --workdir.

Results: research/dvml_omniglot/results/omniglot_synthesis.json, with `protocol`, `steps`,
`selected` ({"dvml": NAME, "reference": NAME, "triplet_reduction": NAME, ...}), `curve`
({LOSS: {STEP: R@1}}), `validation` and `test` ({LOSS: {VARIANT: {"seeds": [...],
"recall@1": [...], "map@r": [...], ..., "active_units": [...]}}}, one value per seed, fractions;
the test stage's variants are `baseline`, `dvml` and `reference`), `success` (the protocol's
success rule for `dvml` and `reference`: `success_check`), `exploratory` (the same for the
post-hoc stage, under its own protocol `protocol_exploratory`, apart from the pre-registered
result), `protocol_clarifications` (what the frozen protocol left unsaid, dated:
`PROTOCOL_CLARIFICATIONS`) and `runs`: every run's own record ({STAGE: {LOSS: {VARIANT: {SEED:
metrics, diagnostics, last step}}}}), from which the other keys are derived.
"""

import json
import os
import pathlib
import platform
import sys

import numpy as np
from absl import app
from absl import flags

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

from dvml_tf.utils import atomic  # noqa: E402
from research.dvml_omniglot import methods  # noqa: E402
from research.dvml_omniglot import runs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", "report", ["curve", "validation", "test", "exploratory", "report"],
                  "Stage to run.")
flags.DEFINE_integer("parallel", 2, "Runs at a time (each single-threaded).")
flags.DEFINE_string("workdir", os.path.expanduser("~/dvml_runs/omniglot_synthesis"),
                    "Where the runs are written.")
flags.DEFINE_string("output", str(HERE / "results" / "omniglot_synthesis.json"),
                    "Results file.")
flags.DEFINE_list("only", [], "Run only these LOSS/VARIANT/SEED jobs of the stage.")

NETWORK = ["--backbone=convnet_wide", "--embedding_dim=128", "--learning_rate=1e-3",
           "--log_every=250"]
# The study's methods as train.py flags (methods.py: shared with the glyph study).
GAUSSIAN, FREE_BITS, CENTRE, TRANSFER = (methods.GAUSSIAN, methods.FREE_BITS, methods.CENTRE,
                                         methods.TRANSFER)
DVML_VARIANTS, REFERENCE_VARIANTS = methods.DVML_VARIANTS, methods.REFERENCE_VARIANTS
VARIANTS, TRIPLET_REDUCTIONS = methods.VARIANTS, methods.TRIPLET_REDUCTIONS

PROTOCOL = {
    "question": "Does a DVML variant whose variance branch is informative beat its base-loss "
                "baseline on unseen classes, and does it clear reference synthesis methods?",
    "data": "Omniglot, 28 px crops of 32 px images. Validation: train on the first 803 "
            "background classes, evaluate on the last 161 (background alphabets 25-29, whole "
            "alphabets). Test: train on all 964 background classes, evaluate once on all "
            "13,180 images of the 659 evaluation classes.",
    "network": "convnet_wide (F = 512) -> z_I (J = 128), Adam 1e-3; batches N-pair 64 x 2, "
               "triplet and triplet2 + DWS 32 x 4; DVML: T = 20, paper weights and phases "
               "(25 % in phase 1). The baseline uses the same backbone.",
    "flags": {"common": NETWORK, "losses": {k: runs.LOSS_FLAGS[k] for k in
                                            ("npair", "triplet", "triplet2_dws")},
              "variants": VARIANTS, "triplet_reductions": TRIPLET_REDUCTIONS},
    "steps_rule": "Curve stage: both baselines (N-pair, triplet2 + DWS), seed 0, validation "
                  "R@1 every 500 steps up to 10,000. Steps = the smallest multiple of 1,000 at "
                  "which each baseline's validation R@1 is within 0.5 points of its best over "
                  "the curve; every later run uses that number of steps.",
    "validation": "Base losses N-pair and triplet2 + DWS, seeds 0 and 1, every variant of "
                  "`flags.variants`. Triplet reduction (item 6): the triplet baseline with the "
                  "mean over all triplets vs over active triplets, seeds 0 and 1; the one with "
                  "the higher mean validation R@1 is used for every triplet run of the test.",
    "selection": "The DVML variant (dvml_*) and the reference method (ref_*) with the highest "
                 "mean validation R@1 over both losses and both seeds. Fixed before any run.",
    "test": "Seeds 0, 1, 2; base losses triplet, N-pair, triplet2 + DWS; baseline vs the "
            "selected DVML variant vs the selected reference method; each evaluated once.",
    "success": "The selected DVML variant beats the baseline on the test classes by more than "
               "twice the larger seed std and by at least 1.5 points of R@1 for at least two "
               "of the three losses, with active units > 0 and a decoder that uses z_V "
               "(reconstruction error with shuffled z_V above the error with its own).",
}

# What the frozen `PROTOCOL` left unsaid, stated after the fact without changing it (the
# results file refuses a changed protocol): {date: clarification}, written beside it into the
# results file as `protocol_clarifications`. Entries are only ever added.
PROTOCOL_CLARIFICATIONS = {
    "2026-12-07": "The seed std of `success` is the population standard deviation over the "
                  "seeds (np.std, ddof=0), the spread the tables show next to each mean, "
                  "and the one `success_check` has used since it was written (2026-12-01, "
                  "during the test stage). With the sample std (ddof=1, 1.22 times larger "
                  "for three seeds) no outcome changes: `success` records both "
                  "(`twice_larger_sample_std`, `clears_bars_with_sample_std`) and the report "
                  "prints both.",
}

CURVE_MAX_STEPS = 10_000
CURVE_EVERY = 500
VALIDATION_SEEDS = (0, 1)
TEST_SEEDS = (0, 1, 2)
VALIDATION_LOSSES = ("npair", "triplet2_dws")
TEST_LOSSES = ("triplet", "npair", "triplet2_dws")

# A post-hoc stage, added while the test stage ran: not part of the pre-registered protocol
# above, reported apart from it, and chosen on held-out training classes like it.
EXPLORATORY_VARIANTS = methods.EXPLORATORY_VARIANTS
EXPLORATORY_MARGIN = 0.005  # R@1 over the baseline's validation mean needed to reach the test
EXPLORATORY = {
    "origin": "Post hoc, written before its first run: synthesis_geometry.py (seed 0 of every "
              "synthesizing run, training classes only) found DVML's offsets z_V isotropic in "
              "the embedding in every variant, while the feature-space deviations the same "
              "trained decoders make of z_V, mapped by the embedding head's kernel W, align "
              "with the real intra-class variation (0.75-0.86), though mostly through W (its "
              "control, feature noise mapped by W, aligns about as well). The `decoded` "
              "research variant computes L_syn on z_I(x) + W (f_hat(c + z_V) - f_hat(c)) "
              "(variants.py): does DVML help once its samples lie along the embedding's "
              "intra-class directions?",
    "flags": EXPLORATORY_VARIANTS,
    "validation": "N-pair and triplet2 + DWS, seeds 0 and 1, the validation stage's network "
                  "and steps; compared with the validation stage's baseline runs (same seeds "
                  "and flags).",
    "selection": "The variant with the higher mean validation R@1 over both losses and both "
                 "seeds goes to the test only if that mean exceeds the baseline's by at least "
                 f"{100 * EXPLORATORY_MARGIN:.1f} points (the validation stage's noise level); "
                 "otherwise the stage ends after validation.",
    "test": "Seeds 0, 1, 2; triplet (the selected reduction), N-pair, triplet2 + DWS; compared "
            "with the test stage's baseline and reference runs (same seeds and flags); each "
            "run evaluated once.",
    "success": "The success rule of `protocol`, reported as exploratory: it does not replace "
               "the pre-registered result.",
}


# ------------------------------------------------------------------------------ results file

STAGES = ("curve", "validation", "test")
EXPLORATORY_STAGES = {"validation": "exploratory_validation", "test": "exploratory_test"}
# What the summaries keep of each run, one value per seed (fractions).
SUMMARY_METRICS, SUMMARY_DIAGNOSTICS = runs.SUMMARY_METRICS, runs.SUMMARY_DIAGNOSTICS
summarize = runs.summarize


def _migrate(results):
    """Files written before `runs` existed kept the per-run records under the stage names."""
    if "runs" not in results:
        results["runs"] = {stage: results.pop(stage) for stage in STAGES if stage in results}
    return results


SUCCESS_MIN_GAIN = 0.015  # `protocol["success"]`: at least 1.5 points of R@1 ...
SUCCESS_MIN_LOSSES = 2    # ... for at least two of the three losses


def success_check(summary, method):
    """`protocol["success"]` applied to `method` against "baseline" in a test summary
    (`runs.success_check` with this study's losses, seeds and bars; np.std with ddof=0 as
    `PROTOCOL_CLARIFICATIONS` states); None until every loss has every seed."""
    return runs.success_check(summary, method, TEST_LOSSES, TEST_SEEDS, SUCCESS_MIN_GAIN,
                              SUCCESS_MIN_LOSSES)


def load_results():
    path = pathlib.Path(FLAGS.output)
    results = _migrate(json.loads(path.read_text()) if path.exists() else {})
    if results.get("protocol", PROTOCOL) != PROTOCOL:
        raise SystemExit(f"{path} was written under another protocol; the protocol is fixed "
                         "once runs exist (write a new results file).")
    results["protocol"] = PROTOCOL
    if results.get("protocol_exploratory", EXPLORATORY) != EXPLORATORY:
        raise SystemExit(f"{path} was written under another exploratory protocol; it is fixed "
                         "once its runs exist.")
    results["protocol_exploratory"] = EXPLORATORY
    recorded = results.get("protocol_clarifications", {})
    if any(PROTOCOL_CLARIFICATIONS.get(date) != text for date, text in recorded.items()):
        raise SystemExit(f"{path} holds protocol clarifications this script does not: they "
                         "are only ever added, never changed or removed.")
    results["protocol_clarifications"] = PROTOCOL_CLARIFICATIONS
    results.setdefault("machine", {"python": platform.python_version(),
                                   "cpu_count": os.cpu_count(), "machine": platform.machine()})
    return results


def save_results(results):
    path = pathlib.Path(FLAGS.output)
    for stage in ("validation", "test"):  # derived from `runs`, rewritten on every save
        results[stage] = summarize(results["runs"].get(stage, {}))
    exploratory = {kind: summarize(results["runs"][stage])
                   for kind, stage in EXPLORATORY_STAGES.items() if stage in results["runs"]}
    results["success"] = {method: success_check(results["test"], method)
                          for method in ("dvml", "reference")}
    if exploratory:
        exploratory["selected"] = select_exploratory(results)
        if "test" in exploratory:  # against the test stage's baselines (same seeds and flags)
            merged = {loss: {**results["test"].get(loss, {}), **by_variant}
                      for loss, by_variant in exploratory["test"].items()}
            exploratory["success"] = {variant: success_check(merged, variant)
                                      for variant in EXPLORATORY_VARIANTS}
        results["exploratory"] = exploratory
    curves = results["runs"].get("curve", {})
    results["curve"] = {loss: by["baseline"]["0"].get("curve", {})
                        for loss, by in curves.items() if "0" in by.get("baseline", {})}
    atomic.write_json(path, results)


def _update_results(update):
    """Read-modify-write of the results file under a lock (several processes write it)."""
    return runs.locked_update(FLAGS.output, load_results, save_results, update)


# ---------------------------------------------------------------------------------- stages

def run_dir(stage, loss, variant, seed):
    return pathlib.Path(FLAGS.workdir) / stage / f"{loss}_{variant}_seed{seed}"


_claim, _summary = runs.claim, runs.run_record


def execute(stage, jobs):
    """Runs (or reuses) `jobs` = [(loss, variant, seed, flags)], recording each result."""
    def record(loss, variant, seed, metrics):
        _update_results(lambda results: results["runs"].setdefault(stage, {}).setdefault(
            loss, {}).setdefault(variant, {}).__setitem__(str(seed), _summary(metrics)))

    runs.execute(stage, jobs, lambda *key: run_dir(*key), load_results()["runs"].get(stage, {}),
                 record, parallel=FLAGS.parallel, only=FLAGS.only)


def common_flags(loss, seed, steps):
    return [*NETWORK, *runs.LOSS_FLAGS[loss], f"--seed={seed}", f"--steps={steps}",
            f"--checkpoint_every={min(1000, steps)}"]


def chosen_steps(results):
    """The steps rule of the protocol, applied to the curve stage's results."""
    curves = results["runs"].get("curve", {})
    if set(curves) != set(VALIDATION_LOSSES) or any(
            str(CURVE_MAX_STEPS) not in curves[loss]["baseline"]["0"]["curve"]
            for loss in VALIDATION_LOSSES):
        raise SystemExit("Run --stage=curve to completion first (the steps rule needs it).")
    chosen = 0
    for loss in VALIDATION_LOSSES:
        curve = {int(k): v for k, v in curves[loss]["baseline"]["0"]["curve"].items()}
        best = max(curve.values())
        steps = min(s for s, r in curve.items() if s % 1000 == 0 and r >= best - 0.005)
        chosen = max(chosen, steps)
    return chosen


def _record(results, stage, loss, variant, seed):
    """The recorded run (a dict), or {} when it has not finished."""
    return results["runs"].get(stage, {}).get(loss, {}).get(variant, {}).get(str(seed), {})


def validation_means(results):
    """{variant: mean validation R@1 over the validation losses and seeds} (complete only)."""
    means = {}
    for variant in VARIANTS:
        values = [_record(results, "validation", loss, variant, seed).get("recall@1")
                  for loss in VALIDATION_LOSSES for seed in VALIDATION_SEEDS]
        if None not in values:
            means[variant] = float(np.mean(values))
    return means


def select(results):
    """The selection rule of the protocol; None until the validation stage is complete."""
    means = validation_means(results)
    reduction_means = {
        name: np.mean([_record(results, "validation", "triplet", name, seed).get("recall@1", np.nan)
                       for seed in VALIDATION_SEEDS]) for name in TRIPLET_REDUCTIONS}
    if len(means) < len(VARIANTS) or any(np.isnan(v) for v in reduction_means.values()):
        return None
    return {
        "dvml": max(DVML_VARIANTS, key=means.get),
        "reference": max(REFERENCE_VARIANTS, key=means.get),
        "triplet_reduction": max(reduction_means, key=reduction_means.get),
        "validation_means": means,
        "triplet_reduction_means": {k: float(v) for k, v in reduction_means.items()},
    }


def stage_curve():
    jobs = [(loss, "baseline", 0, [*common_flags(loss, 0, CURVE_MAX_STEPS), "--nodvml",
                                   f"--eval_every={CURVE_EVERY}"])
            for loss in VALIDATION_LOSSES]
    execute("curve", jobs)
    results = _update_results(lambda r: None)
    print(f"steps chosen by the rule: {chosen_steps(results)}")


def stage_validation():
    steps = chosen_steps(load_results())
    _update_results(lambda r: r.__setitem__("steps", steps))  # before the first run: reported
    jobs = [(loss, variant, seed, [*common_flags(loss, seed, steps), *flags_])
            for seed in VALIDATION_SEEDS for loss in VALIDATION_LOSSES
            for variant, flags_ in VARIANTS.items()]
    jobs += [("triplet", name, seed, [*common_flags("triplet", seed, steps), *flags_])
             for seed in VALIDATION_SEEDS for name, flags_ in TRIPLET_REDUCTIONS.items()]
    execute("validation", jobs)
    selected = select(_update_results(lambda r: None))
    if selected:
        _update_results(lambda r: r.__setitem__("selected", selected))
        print("selected:", json.dumps(selected, indent=1))


def stage_test():
    results = load_results()
    selected = results.get("selected") or select(results)
    if not selected:
        raise SystemExit("The validation stage is not complete: nothing is selected yet.")
    methods = {"baseline": VARIANTS["baseline"], "dvml": VARIANTS[selected["dvml"]],
               "reference": VARIANTS[selected["reference"]]}
    execute("test", test_jobs(methods, results["steps"], selected))


def test_jobs(methods, steps, selected):
    """The test stage's jobs for `methods` = {name: flags}: every seed and loss, triplet with
    the selected reduction."""
    jobs = []
    for seed in TEST_SEEDS:
        for loss in TEST_LOSSES:
            extra = (TRIPLET_REDUCTIONS[selected["triplet_reduction"]][1:]
                     if loss == "triplet" else [])
            for method, flags_ in methods.items():
                jobs.append((loss, method, seed,
                             [*common_flags(loss, seed, steps), *flags_, *extra]))
    return jobs


def exploratory_means(results):
    """{variant: mean validation R@1} of the exploratory variants and the baseline (the
    validation stage's runs), complete ones only."""
    means = {}
    for variant in ("baseline", *EXPLORATORY_VARIANTS):
        stage = "validation" if variant == "baseline" else EXPLORATORY_STAGES["validation"]
        values = [_record(results, stage, loss, variant, seed).get("recall@1")
                  for loss in VALIDATION_LOSSES for seed in VALIDATION_SEEDS]
        if None not in values:
            means[variant] = float(np.mean(values))
    return means


def select_exploratory(results):
    """The exploratory rule: {"variant", "means", "to_test"}; None until validation is done."""
    means = exploratory_means(results)
    if len(means) < 1 + len(EXPLORATORY_VARIANTS):
        return None
    best = max(EXPLORATORY_VARIANTS, key=means.get)
    return {"variant": best, "means": means,
            "to_test": means[best] >= means["baseline"] + EXPLORATORY_MARGIN}


def stage_exploratory():
    results = load_results()
    steps = results.get("steps")
    selected = results.get("selected")
    if steps is None or not selected:
        raise SystemExit("The validation stage is not complete: the exploratory stage uses its "
                         "steps, baselines and triplet reduction.")
    execute(EXPLORATORY_STAGES["validation"],
            [(loss, variant, seed, [*common_flags(loss, seed, steps), *flags_])
             for seed in VALIDATION_SEEDS for loss in VALIDATION_LOSSES
             for variant, flags_ in EXPLORATORY_VARIANTS.items()])
    chosen = select_exploratory(_update_results(lambda r: None))
    if chosen is None:
        return  # part of the validation runs (--only), or one failed
    print("exploratory selection:", json.dumps(chosen, indent=1))
    if not chosen["to_test"]:
        print(f"{chosen['variant']} does not beat the baseline's validation R@1 by "
              f"{100 * EXPLORATORY_MARGIN:.1f} points: no test runs.")
        return
    variant = chosen["variant"]
    execute(EXPLORATORY_STAGES["test"],
            test_jobs({variant: EXPLORATORY_VARIANTS[variant]}, steps, selected))


# ---------------------------------------------------------------------------------- report

def _cell(values, digits=1):
    values = [100 * v for v in values]
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def report(results):
    lines = []
    curves = {loss: curve for loss, curve in results.get("curve", {}).items() if curve}
    if curves:
        steps = sorted({int(s) for curve in curves.values() for s in curve})
        shown = [s for s in steps if s % 1000 == 0]
        lines.append("\nbaselines' validation R@1 (%) by step, seed 0\n| loss | "
                     + " | ".join(f"{s:,}" for s in shown) + " |\n|---|" + "---|" * len(shown))
        for loss, curve in curves.items():
            lines.append(f"| {loss} | " + " | ".join(
                f"{100 * curve[str(s)]:.1f}" if str(s) in curve else "—" for s in shown) + " |")
        if "steps" in results:
            lines.append(f"\nsteps chosen by the rule: {results['steps']:,}")
    for stage in ("validation", "test", *EXPLORATORY_STAGES.values()):
        for loss, by_variant in results["runs"].get(stage, {}).items():
            lines.append(f"\n{stage}, {loss}\n| variant | seeds | R@1 | MAP@R | active units "
                         "| recon (own / shuffled z_V) | L_syn / L_inv |\n|---|---|---|---|---|"
                         "---|---|")
            for variant, by_seed in by_variant.items():
                recall = [m["recall@1"] for m in by_seed.values()]
                maps = [m["map@r"] for m in by_seed.values()]
                diagnostics = [m.get("diagnostics") for m in by_seed.values()]
                if all(diagnostics):
                    active = np.mean([d["active_units"] for d in diagnostics])
                    recon = (f"{np.mean([d['recon'] for d in diagnostics]):.3f} / "
                             f"{np.mean([d['recon_shuffled'] for d in diagnostics]):.3f}")
                    ratio = f"{np.mean([d['syn_to_inv'] for d in diagnostics]):.2f}"
                    active = f"{active:.1f}"
                else:
                    active = recon = ratio = "—"
                lines.append(f"| {variant} | {len(recall)} | {_cell(recall)} | {_cell(maps)} | "
                             f"{active} | {recon} | {ratio} |")
    checks = {**results.get("success", {}),
              **results.get("exploratory", {}).get("success", {})}
    for method, check in checks.items():
        if check:
            lines.append(f"\nsuccess rule, {method} vs baseline (test): "
                         f"{'MET' if check['success'] else 'not met'}\n| loss | gain in R@1 "
                         "| 2 x larger std (ddof=0: the rule) | clears both bars "
                         "| 2 x larger sample std (ddof=1) | would clear them |\n"
                         "|---|---|---|---|---|---|")
            lines.extend(f"| {loss} | {100 * c['gain']:+.2f} | {100 * c['twice_larger_std']:.2f}"
                         f" | {'yes' if c['clears_bars'] else 'no'}"
                         f" | {100 * c['twice_larger_sample_std']:.2f}"
                         f" | {'yes' if c['clears_bars_with_sample_std'] else 'no'} |"
                         for loss, c in check["per_loss"].items())
    return "\n".join(lines)


def main(argv):
    del argv
    _update_results(lambda r: None)  # the protocol is in the results file before any run
    if FLAGS.stage == "curve":
        stage_curve()
    elif FLAGS.stage == "validation":
        stage_validation()
    elif FLAGS.stage == "test":
        stage_test()
    elif FLAGS.stage == "exploratory":
        stage_exploratory()
    results = _update_results(lambda r: None)
    print(report(results))


if __name__ == "__main__":
    app.run(main)
