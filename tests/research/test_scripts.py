"""Smoke tests of the research scripts (research/dvml_omniglot: train.py with the research
variants, table4.py, zero_shot.py) at tiny settings."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.research.conftest import write_folder_dataset
from tests.script_session import ScriptSession

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = ROOT / "research" / "dvml_omniglot"


# ------------------------------------------------------------------------------- table4.py

@pytest.mark.slow
def test_table4_on_tiny_runs(tiny_runs, tmp_path, capsys):
    from dvml_tf import data as data_lib
    from dvml_tf import models
    from dvml_tf import task
    from dvml_tf.evaluation import runner
    from research.dvml_omniglot import table4
    from research.dvml_omniglot import variance_analysis as va

    folder, dirs = tiny_runs
    output = tmp_path / "table4.json"
    record = table4.main([f"--baseline_dir={dirs['baseline']}", f"--dvml_dir={dirs['dvml']}",
                          "--num_pairs=10", "--num_directions=4", f"--output={output}"])
    assert json.loads(output.read_text())["markdown"] == record["markdown"]
    printed = capsys.readouterr().out
    assert "| Train | Triplet p-value |" in printed and "| 76.00 ± 1.25 |" in printed
    assert "| Test | DVML+Triplet (rel. dev.) |" in printed and "| 57.08 |" in printed

    # Reference: the test split of the DVML run and the train split of the baseline, embedded
    # with the runner's own functions (model(images) for z_I, the backbone for f(x)) and the
    # preprocessing written out here (resize 16, centre crop 12).
    splits = data_lib.load_dataset("folder", data_dir=folder, image_size=16)
    preprocess = data_lib.PreprocessConfig(resize_size=16, crop_size=12)
    dvml_model = task.load_run(dirs["dvml"]).model
    z, labels = runner.compute_embeddings(models.inference_function(dvml_model),
                                          data_lib.make_eval_dataset(splits.test, preprocess, 7))
    assert record["results"]["test"]["dvml"]["embedding"]["relative_deviation"][
        "relative_deviation_percent"] == pytest.approx(
        va.relative_deviation(z, labels)["relative_deviation_percent"], rel=1e-4)
    baseline_model = task.load_run(dirs["baseline"]).model
    f, labels = runner.compute_embeddings(models.inference_function(baseline_model.backbone),
                                          data_lib.make_eval_dataset(splits.train, preprocess, 7))
    expected = va.ks_class_pvalues(f, labels, num_pairs=10, num_directions=4,
                                   null_reference=True)
    ks = record["results"]["train"]["baseline"]["backbone"]["ks"]
    assert ks["num_classes"] == 5 and ks["num_pairs"] == 10
    for key in ("p_value_mean_percent", "p_value_std_percent", "null_p_value_mean_percent"):
        assert ks[key] == pytest.approx(expected[key], abs=1e-6)


@pytest.mark.slow
def test_table4_rejects_swapped_runs(tiny_runs, tmp_path):
    from research.dvml_omniglot import table4

    _, dirs = tiny_runs
    with pytest.raises(ValueError, match=r"--baseline_dir .* is a DVML run"):
        table4.main([f"--baseline_dir={dirs['dvml']}", f"--dvml_dir={dirs['baseline']}",
                     f"--output={tmp_path / 'out.json'}"])


# ---------------------------------------------------------------------------- zero_shot.py
# Run as a subprocess: the script defines absl flags (steps, seeds, ...) that train.py's flags,
# imported by other tests of the same worker, would collide with.


def _finished_run(run_dir, recall_at_1, log_line):
    run_dir.mkdir(parents=True)
    metrics = {"nmi": 0.9, "f1": 0.7, "recall@1": recall_at_1, "recall@2": 0.95,
               "recall@4": 0.97, "recall@8": 0.99, "map@r": 0.5}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "train.log").write_text(
        "I1127 trainer.py:292] step 250/500 kl=9.0 sigma=0.5 loss=3.0\n"
        f"I1127 trainer.py:292] step 500/500 {log_line}\n"
        "I1127 trainer.py:300] Test metrics: ...\n")


def test_zero_shot_collects_finished_runs_with_their_diagnostics(tmp_path):
    workdir, output = tmp_path / "bench", tmp_path / "results.json"
    for seed, (base, dvml) in enumerate([(0.80, 0.83), (0.82, 0.85)]):
        _finished_run(workdir / "test" / f"npair_baseline_seed{seed}", base,
                      "metric_inv=0.3 z_inv_norm=5.1 loss=0.3")
        _finished_run(workdir / "test" / f"npair_dvml_seed{seed}", dvml,
                      f"metric_inv=0.4 kl=0.1{seed} sigma=1.0 z_var_norm=1.1 phase=2 loss=1.1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "zero_shot.py"), "--stage=test",
         "--losses=npair", "--variants=baseline,dvml", "--seeds=0,1", f"--workdir={workdir}",
         f"--output={output}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done" not in proc.stdout  # every run was reused, none trained

    report = json.loads(output.read_text())
    assert report["npair"]["baseline"]["recall@1"] == [0.80, 0.82]
    assert report["npair"]["dvml"]["recall@1"] == [0.83, 0.85]
    # Diagnostics come from the last step's line only, per seed.
    assert report["npair"]["dvml"]["train/kl"] == [0.10, 0.11]
    assert report["npair"]["dvml"]["train/phase"] == [2.0, 2.0]
    assert "train/kl" not in report["npair"]["baseline"]
    assert report["config"]["seeds"] == [0, 1]
    assert report["config"]["variants"]["baseline"] == ["--nodvml"]
    # mean ± std (population) in percent, and "—" where a baseline has no KL.
    assert "| npair | dvml | 90.0 ± 0.0 | 70.0 ± 0.0 | 84.0 ± 1.0 |" in proc.stdout
    assert "| npair | baseline | 5.10 ± 0.00 | — |" in proc.stdout


def test_zero_shot_rejects_unknown_variants(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(HERE / "zero_shot.py"),
         "--variants=baseline,dvml_typo", f"--workdir={tmp_path}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "dvml_typo" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing trained or written


# ------------------------------------------------------------------------------ train.py
# Its flags are train.py's (and --research_variant), defined once more: not in the test process.
# Its three commands run in one session (tests/script_session.py), from another folder and
# without PYTHONPATH (the script finds its packages itself); the glyph study's test runs it as a
# plain process (research/dvml_omniglot/runs.py starts every study run that way).


@pytest.mark.slow
def test_train_records_the_research_variant_and_refuses_another(tmp_path):
    folder = tmp_path / "images"
    write_folder_dataset(folder, num_classes=6, per_class=4)
    model_dir = tmp_path / "run"
    flags_ = ["--config=omniglot", "--dataset=folder", f"--data_dir={folder}",
              f"--model_dir={model_dir}", "--image_size=12", "--resize_size=16",
              "--embedding_dim=8", "--num_samples=2", "--loss=triplet", "--classes_per_batch=2",
              "--images_per_class=2", "--steps=2", "--checkpoint_every=2", "--log_every=1",
              "--eval_batch_size=16"]
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}}
    session = ScriptSession(HERE / "train.py", cwd=tmp_path, env=env)
    try:
        done = session.run(*flags_, "--research_variant=stop", timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (model_dir / "research_variant.txt").read_text() == "stop"
        assert json.loads((model_dir / "metrics.json").read_text())["recall@1"] >= 0.0
        other = session.run(*flags_, "--research_variant=reverse")
        unknown = session.run(*flags_, "--research_variant=sideways")
    finally:
        session.close()
    assert other.returncode != 0
    assert f"{model_dir} was trained with research_variant=stop, not reverse" in other.stderr
    assert (model_dir / "research_variant.txt").read_text() == "stop"
    assert unknown.returncode != 0 and "unit|stop|reverse" in unknown.stderr

    from dvml_tf import task
    from research.dvml_omniglot import variants

    run = task.load_run(model_dir)
    assert type(run.model) is variants.ResearchDVMLModel
    assert run.model.research_variant == "stop"


# ---------------------------------------------------------------------------- synthesis.py
# synthesis.py defines absl flags that other scripts (zero_shot.py, ...) define too: its commands
# and functions run in one session for the module (each process pays TensorFlow's import, which
# dvml_tf brings), and one test runs it as a plain subprocess.


@pytest.fixture(scope="module")
def synthesis():
    """A session of synthesis.py (tests/script_session.py): `.run(*argv)` as `python
    synthesis.py *argv`, `.evaluate(expression)` in its namespace."""
    session = ScriptSession(HERE / "synthesis.py")
    yield session
    session.close()


def _validation_run(run_dir, recall_at_1, curve=None, diagnostics=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"recall@1": recall_at_1, "recall@2": 0.95, "map@r": 0.5}
    if diagnostics:
        metrics["dvml_diagnostics"] = diagnostics
    name = "metrics.json" if run_dir.parent.name.endswith("test") else "metrics_validation.json"
    (run_dir / name).write_text(json.dumps(metrics))
    lines = [f"I1130 trainer.py:303] step {step} validation: recall@1={value} map@r=0.5"
             for step, value in (curve or {}).items()]
    (run_dir / "train.log").write_text("\n".join(lines) + "\n")


def test_synthesis_applies_the_protocols_rules_to_finished_runs(synthesis, tmp_path):
    """The steps rule, the selection rule and the test stage's jobs, on fabricated runs (every
    run exists, so nothing trains)."""
    workdir, output = tmp_path / "runs", tmp_path / "results.json"
    common = [f"--workdir={workdir}", f"--output={output}"]
    curve = {"npair": {1000: 0.80, 2000: 0.85, 3000: 0.90, 9000: 0.903, 10000: 0.90},
             "triplet2_dws": {1000: 0.88, 2000: 0.91, 10000: 0.912}}
    for loss, points in curve.items():
        _validation_run(workdir / "curve" / f"{loss}_baseline_seed0", 0.9, points)
    proc = synthesis.run("--stage=curve", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # npair: best 0.903, first multiple of 1,000 within 0.5 points = 3000; triplet2_dws: 2000.
    assert "steps chosen by the rule: 3000" in proc.stdout
    assert json.loads(output.read_text())["protocol"]["selection"].startswith("The DVML")

    diagnostics = {"active_units": 3, "recon": 1.0, "recon_shuffled": 1.5, "kl": 2.0,
                   "kl_per_dim": [1.0, 1.0], "syn_to_inv": 1.1, "metric_inv": 0.1,
                   "metric_syn": 0.11, "images": 8}
    variants = json.loads(output.read_text())["protocol"]["flags"]["variants"]
    scores = {"baseline": 0.90, "dvml_transfer": 0.93, "ref_symmetrical": 0.92}
    for seed in (0, 1):
        for loss in ("npair", "triplet2_dws"):
            for variant in variants:
                _validation_run(workdir / "validation" / f"{loss}_{variant}_seed{seed}",
                                scores.get(variant, 0.85) + 0.001 * seed,
                                diagnostics=diagnostics if variant.startswith("dvml") else None)
        for name, value in (("baseline", 0.90), ("baseline_active", 0.91)):
            _validation_run(workdir / "validation" / f"triplet_{name}_seed{seed}", value)
    proc = synthesis.run("--stage=validation", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["steps"] == 3000
    assert results["selected"]["dvml"] == "dvml_transfer"
    assert results["selected"]["reference"] == "ref_symmetrical"
    assert results["selected"]["triplet_reduction"] == "baseline_active"
    # The schema: one value per seed; each run's own record under "runs".
    summary = results["validation"]["npair"]["dvml_transfer"]
    assert summary["seeds"] == [0, 1]
    assert summary["recall@1"] == pytest.approx([0.93, 0.931])
    assert summary["active_units"] == [3, 3] and summary["recon_shuffled"] == [1.5, 1.5]
    assert "active_units" not in results["validation"]["npair"]["baseline"]
    record = results["runs"]["validation"]["npair"]["dvml_transfer"]["1"]
    assert record["diagnostics"]["kl_per_dim_max"] == 1.0
    assert results["curve"]["npair"]["3000"] == 0.90

    # The test stage runs exactly the selected methods: all exist, so it only collects them.
    for seed in (0, 1, 2):
        for loss in ("triplet", "npair", "triplet2_dws"):
            for method in ("baseline", "dvml", "reference"):
                _validation_run(workdir / "test" / f"{loss}_{method}_seed{seed}", 0.8)
    proc = synthesis.run("--stage=test", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results["test"]["triplet"]) == {"baseline", "dvml", "reference"}
    assert results["test"]["npair"]["dvml"]["recall@1"] == [0.8, 0.8, 0.8]
    assert "| dvml | 3 | 80.0 ± 0.0 |" in proc.stdout
    assert results["success"]["dvml"]["success"] is False  # a tie meets no bar
    assert results["success"]["dvml"]["per_loss"]["npair"]["gain"] == pytest.approx(0.0)
    assert "success rule, dvml vs baseline (test): not met" in proc.stdout

    # The exploratory stage: its protocol is in the file before its runs; a variant within
    # 0.5 points of the baseline's validation mean (0.9005 here) gets no test runs ...
    exploratory = json.loads(output.read_text())["protocol_exploratory"]
    assert set(exploratory["flags"]) == {"dvml_decoded", "dvml_decoded_transfer"}

    def exploratory_runs(scores):
        for seed in (0, 1):
            for loss in ("npair", "triplet2_dws"):
                for variant, value in scores.items():
                    _validation_run(workdir / "exploratory_validation"
                                    / f"{loss}_{variant}_seed{seed}", value,
                                    diagnostics=diagnostics)

    exploratory_runs({"dvml_decoded": 0.904, "dvml_decoded_transfer": 0.903})
    before = output.read_text()
    proc = synthesis.run("--stage=exploratory", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no test runs" in proc.stdout and not (workdir / "exploratory_test").exists()
    selected = json.loads(output.read_text())["exploratory"]["selected"]
    assert selected["variant"] == "dvml_decoded" and not selected["to_test"]
    assert selected["means"]["baseline"] == pytest.approx(0.9005)
    # ... and one 0.5 points above it does (the same runs under a fresh exploratory record).
    results = json.loads(before)
    results["runs"].pop("exploratory_validation", None)
    output.write_text(json.dumps(results))
    for path in (workdir / "exploratory_validation").iterdir():
        (path / "metrics_validation.json").unlink()
    exploratory_runs({"dvml_decoded": 0.901, "dvml_decoded_transfer": 0.906})
    for seed in (0, 1, 2):
        for loss in ("triplet", "npair", "triplet2_dws"):
            _validation_run(workdir / "exploratory_test"
                            / f"{loss}_dvml_decoded_transfer_seed{seed}", 0.82,
                            diagnostics=diagnostics)
    proc = synthesis.run("--stage=exploratory", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["exploratory"]["selected"]["to_test"]
    assert results["exploratory"]["test"]["npair"]["dvml_decoded_transfer"]["recall@1"] == [
        0.82, 0.82, 0.82]
    assert results["test"]["npair"]["dvml"]["recall@1"] == [0.8, 0.8, 0.8]  # untouched
    assert "exploratory_test, triplet" in proc.stdout
    # Against the test stage's baselines (0.80): +2 points with no seed spread, z_V used.
    assert results["exploratory"]["success"]["dvml_decoded_transfer"]["success"] is True
    assert results["exploratory"]["success"]["dvml_decoded"] is None  # never went to the test
    assert "success rule, dvml_decoded_transfer vs baseline (test): MET" in proc.stdout


def test_synthesis_success_rule_on_hand_computed_cases(synthesis):
    """The protocol's success rule: more than twice the larger seed std AND at least 1.5 points,
    on at least two of the three losses, with active units and a decoder that uses z_V."""
    def row(recalls, active=None, recon=None):
        out = {"recall@1": recalls}
        if active is not None:
            out.update(active_units=[active] * 3, recon=[1.0] * 3, recon_shuffled=[recon] * 3)
        return out

    base = [0.80, 0.81, 0.82]  # mean 0.81, np.std 0.00816: twice = 1.63 points
    summary = {
        # +2.0 points, larger std 0.0082: clears both bars.
        "triplet": {"baseline": row(base), "dvml": row([0.82, 0.83, 0.84], 128, 2.0)},
        # +1.4 points: above twice the std (0.0 vs 0.0) but under 1.5 points.
        "npair": {"baseline": row([0.8] * 3), "dvml": row([0.814] * 3, 128, 2.0)},
        # +1.6 points, but twice the larger std (the DVML runs': 0.0327) is 3.3 points.
        "triplet2_dws": {"baseline": row([0.8] * 3),
                         "dvml": row([0.776, 0.816, 0.856], 128, 2.0)},
    }
    cases = {
        "one_loss": summary,
        "two_losses": {**summary, "npair": {"baseline": row([0.8] * 3),
                                            "dvml": row([0.816] * 3, 128, 2.0)}},
        "collapsed": {loss: {"baseline": row([0.8] * 3), "dvml": row([0.83] * 3, 0, 2.0)}
                      for loss in summary},
        "z_v_ignored": {loss: {"baseline": row([0.8] * 3), "dvml": row([0.83] * 3, 128, 1.0)}
                        for loss in summary},
        "no_diagnostics": {loss: {"baseline": row([0.8] * 3), "dvml": row([0.83] * 3)}
                           for loss in summary},
        "seed_missing": {**summary, "npair": {"baseline": row([0.8] * 3),
                                              "dvml": row([0.83] * 2, 128, 2.0)}},
    }
    proc = synthesis.evaluate(
        "{name: success_check(case, 'dvml') for name, case in cases.items()}", cases=cases)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = proc.value
    one = checks["one_loss"]
    assert one["per_loss"]["triplet"]["gain"] == pytest.approx(0.02)
    assert one["per_loss"]["triplet"]["twice_larger_std"] == pytest.approx(0.01633, abs=1e-5)
    assert [one["per_loss"][loss]["clears_bars"] for loss in ("triplet", "npair",
                                                             "triplet2_dws")] == [True, False,
                                                                                  False]
    assert one["losses_met"] == ["triplet"] and one["success"] is False
    # Beside the rule's population std, the sample std (ddof=1), which decides nothing: 1 point
    # for the triplet seeds (2 x = 2 points), 0 for N-pair's, 4 points for triplet2 + DWS's.
    assert [one["per_loss"][loss]["twice_larger_sample_std"] for loss in (
        "triplet", "npair", "triplet2_dws")] == pytest.approx([0.02, 0.0, 0.08], abs=1e-9)
    assert one["per_loss"]["npair"]["clears_bars_with_sample_std"] is False  # under 1.5
    assert one["per_loss"]["triplet2_dws"]["clears_bars_with_sample_std"] is False
    assert checks["two_losses"]["losses_met"] == ["triplet", "npair"]
    assert checks["two_losses"]["success"] is True
    for name in ("collapsed", "z_v_ignored", "no_diagnostics"):
        assert all(c["clears_bars"] for c in checks[name]["per_loss"].values()), name
        assert checks[name]["losses_met"] == [] and checks[name]["success"] is False, name
    assert checks["seed_missing"] is None


def test_synthesis_reads_results_files_written_before_runs_existed(synthesis, tmp_path):
    """Earlier files kept each run's record under the stage's name: they are moved under
    "runs" (nothing is trained again) and the summaries are derived from them."""
    record = {"recall@1": 0.92, "map@r": 0.73, "nmi": 0.96, "f1": 0.83}
    output = tmp_path / "results.json"
    output.write_text(json.dumps({"validation": {"npair": {"baseline": {"0": record}}}}))
    proc = synthesis.run("--stage=report", f"--output={output}", f"--workdir={tmp_path / 'runs'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["runs"]["validation"]["npair"]["baseline"]["0"] == record
    assert results["validation"]["npair"]["baseline"]["recall@1"] == [0.92]
    assert "| baseline | 1 | 92.0 ± 0.0 |" in proc.stdout
    assert not (tmp_path / "runs").exists()
    # The frozen protocol is kept as it is; what it left unsaid is written beside it, dated.
    assert "ddof=0" in results["protocol_clarifications"]["2026-12-07"]


def test_synthesis_refuses_a_results_file_whose_protocol_clarification_differs(synthesis,
                                                                               tmp_path):
    """Clarifications are only ever added: a file holding another text for a date is refused
    and left as it was."""
    output = tmp_path / "results.json"
    written = json.dumps({"protocol_clarifications": {"2026-12-07": "the sample std"}})
    output.write_text(written)
    proc = synthesis.run("--stage=report", f"--output={output}", f"--workdir={tmp_path / 'runs'}")
    assert proc.returncode != 0
    assert "protocol clarifications" in proc.stderr
    assert output.read_text() == written


def test_synthesis_test_stage_refuses_before_validation_is_complete(tmp_path):
    """A plain `python synthesis.py` process (the other tests use the module's session)."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "synthesis.py"), "--stage=test", f"--workdir={tmp_path}",
         f"--output={tmp_path / 'results.json'}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "not complete" in proc.stderr + proc.stdout
    assert not (tmp_path / "test").exists()


def test_the_default_preset_is_the_variant_the_study_selected(synthesis):
    """`python train.py` trains what synthesis.py selected: the study's flags for N-pair and the
    selected DVML variant, on the research runs' base preset, give the `omniglot` preset, but for
    the steps (sized for the default run's 10 minutes) and the logging."""
    from dvml_tf import configs
    from dvml_tf.training.config import TrainConfig
    from tests.training.test_flags import parse

    selected = json.loads((HERE / "results" / "omniglot_synthesis.json").read_text())["selected"]
    proc = synthesis.evaluate(
        "[NETWORK, runs.LOSS_FLAGS['npair'], VARIANTS, runs.command('RUN', 'test', [])[2]]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    network, npair, variants, base = proc.value
    study = parse(base, *network, *npair, *variants[selected["dvml"]])
    default = configs.get_preset("omniglot")
    differences = {field.name for field in dataclasses.fields(TrainConfig)
                   if getattr(study, field.name) != getattr(default, field.name)}
    assert differences <= {"config", "steps", "log_every", "model_dir"}, differences
    assert base == "--config=omniglot_paper"
