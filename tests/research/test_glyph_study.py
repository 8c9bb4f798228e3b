"""research/glyphs/study.py on a DejaVu glyph folder, a few steps per run, so that the driver of
the pre-registered study cannot rot: its protocol, both folders, the pretrained backbone, the
selection, a transfer-regime DVML test run (pretrained weights, the triplet reduction) and its
positive control. Plus the positive control's cosines
and the success rule on cases whose answer is known."""

import json

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from research.dvml_omniglot import runs
from research.glyphs import positive_control
from research.glyphs import study
from tests.data import fonts


def test_positive_control_finds_a_shared_offset_and_not_a_private_one():
    rng = np.random.default_rng(0)
    classes, instances, dim = 30, 5, 8
    style = rng.normal(0, 1, (instances, dim))
    centres = rng.normal(0, 3, (classes, 1, dim))
    points = (centres + style[None]).reshape(-1, dim)
    labels = np.repeat(np.arange(classes), instances)
    ids = np.tile(np.arange(instances), classes)
    table, class_index, instance_index = positive_control.offset_table(points, labels, ids)
    sources = np.arange(len(points))
    # A synthesis that adds the image's own style (its real offset): the same font elsewhere.
    shared = positive_control.alignment(table[class_index, instance_index], sources, table,
                                        class_index, instance_index, np.random.default_rng(1))
    # A synthesis that adds noise: no font's direction.
    noise = positive_control.alignment(rng.normal(0, 1, (len(points), dim)), sources, table,
                                       class_index, instance_index, np.random.default_rng(1))
    assert shared["cosine_same"] == pytest.approx(1.0)
    assert shared["cosine_ceiling"] == pytest.approx(1.0)
    assert shared["cosine_control"] < 0.0 < shared["same_above_control"] == 1.0
    assert abs(noise["cosine_same"] - noise["cosine_control"]) < 0.15
    assert 0.3 < noise["same_above_control"] < 0.7
    assert shared["cases"] == noise["cases"] == len(points)


def summary(base, dvml):
    row = {"recall@1": None, "active_units": [3, 3, 3], "recon": [1.0] * 3,
           "recon_shuffled": [1.2] * 3}
    return {loss: {"baseline": {"recall@1": base}, "dvml": {**row, "recall@1": values}}
            for loss, values in zip(study.TEST_LOSSES, dvml, strict=False)}


def test_success_needs_two_losses_clearing_both_bars():
    base = [0.80, 0.81, 0.79]
    clear = [0.83, 0.835, 0.825]  # +3.0 points, spread 0.4
    small = [0.81, 0.812, 0.808]  # +1.0 point: under the 1.5-point bar
    assert study.success_check(summary(base, [clear, clear, small]), "dvml")["success"]
    check = study.success_check(summary(base, [clear, small, small]), "dvml")
    assert check["losses_met"] == ["triplet"] and not check["success"]
    noisy = [0.75, 0.83, 0.91]  # +3.0 points but a spread of 6.5
    assert not study.success_check(summary(base, [noisy, noisy, clear]), "dvml")["success"]
    unused = summary(base, [clear, clear, clear])
    for loss in study.TEST_LOSSES:  # a decoder that ignores z_V does not count
        unused[loss]["dvml"]["recon_shuffled"] = [1.0] * 3
    assert not study.success_check(unused, "dvml")["success"]
    assert study.success_check(summary(base, [clear, clear]), "dvml") is None


@pytest.fixture
def study_flags(tmp_path, monkeypatch):
    """A calibration whose selected folder is rendered from the DejaVu faces, and the study's
    flags pointing at it (2 steps per run)."""
    build = {"characters": fonts.LETTERS, "max_characters": 0, "image_size": 32,
             "max_designs": 0, "min_designs": 2, "copies": 1,
             "augmentation": {"rotation": 0.0, "shear": 0.0, "scale": 0.0,
                              "translation": 0.0, "stroke": 0.0},
             "splits": {"train": 0, "validation": 10, "test": 10, "pretrain": 16}, "seed": 0}
    calibration = tmp_path / "calibration.json"
    methods = ("baseline", "dvml_paper", "dvml_centre", "dvml_transfer",
               "ref_deviation_transfer")
    cost = {f"{loss}/{name}": 1.0 for loss in study.TEST_LOSSES for name in methods}
    calibration.write_text(json.dumps({
        "selected": "dejavu", "settings": {"dejavu": {"build": build}},
        "runs": {"dejavu": {"cpu_seconds": 540.0, "steps": 650, "recall@1": 0.8}},
        "method_cost": {"cpu_seconds_per_step": cost}}))
    # N-pair's 64 x 2 batches need 64 training classes; the pretraining pool is 16 classes.
    monkeypatch.setattr(study, "TRANSFER_TRAIN_CLASSES", 66)
    monkeypatch.setattr(study, "PRETRAIN", {**study.PRETRAIN, "classes_per_batch": 8})
    # The triplet run's batch: 8 x 4 images instead of 32 x 4. A run ends with the DVML
    # diagnostics on 8 training batches, 20 draws each, which took most of its time.
    triplet = [f for f in runs.LOSS_FLAGS["triplet"] if not f.startswith("--classes_per_batch")]
    monkeypatch.setitem(runs.LOSS_FLAGS, "triplet", [*triplet, "--classes_per_batch=8"])
    if "calibration" not in flags.FLAGS:  # study.py defines its flags when run as a script
        study.define_flags()
    return [f"--workdir={tmp_path / 'runs'}", f"--fonts={','.join(fonts.DEJAVU[:6])}",
            f"--calibration={calibration}", f"--premise={tmp_path / 'none.json'}",
            f"--output={tmp_path / 'glyphs_synthesis.json'}", "--max_steps=2", "--parallel=1"]


def parse(argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["study.py", *argv])


def test_the_study_driver_runs_each_stage_on_a_tiny_folder(study_flags, tmp_path):
    with flagsaver.flagsaver():
        parse(study_flags)
        with pytest.raises(SystemExit, match="no protocol"):
            study.load_results()
        study.stage_protocol()
        protocol = study.load_results()["protocol"]
        assert protocol["steps"] == {"npair": 650, "triplet2_dws": 650, "triplet": 300}
        assert protocol["data"]["folders"]["transfer"]["splits"]["train"] == 66
        assert protocol["estimate"]["runs_per_regime"] == {"validation": 16, "test": 27}
        # 1 CPU s per step: validation 2 seeds x 4 methods x (650 + 90) s x 2 losses.
        assert protocol["estimate"]["per_regime_cpu_minutes"]["validation"] == round(
            2 * 4 * 740 * 2 / 60)
        study.stage_prepare()
        results = study.load_results()
        folders = results["folders"]
        assert folders["transfer"]["splits"]["train"] == 66
        assert folders["scratch"]["splits"]["train"] > 66
        assert folders["pretraining"]["steps"] == 2 and folders["pretraining"]["classes"] == 16

        # The selection on validation results recorded as if run: dvml_transfer is best.
        def validation(results):
            for loss in study.VALIDATION_LOSSES:
                for name in ("baseline", *study.DVML_CANDIDATES):
                    value = 0.6 if name == "dvml_transfer" else 0.5
                    results["runs"].setdefault("transfer_validation", {}).setdefault(
                        loss, {})[name] = {str(s): {"recall@1": value} for s in (0, 1)}
        study.update(validation)
        assert study.select(study.load_results(), "scratch") is None
        selected = study.select(study.load_results(), "transfer")
        assert selected["dvml"] == "dvml_transfer"
        study.update(lambda r: r.setdefault("selected", {}).__setitem__("transfer", selected))

        # One test run of the transfer regime: pretrained backbone, triplet (active), DVML.
        parse([*study_flags, "--only=triplet/dvml/0"])
        study.stage_test("transfer")
        run_dir = study.run_dir("transfer_test", "triplet", "dvml", 0)
        config = json.loads((run_dir / "config.json").read_text())
        assert config["backbone_weights"] == str(study.backbone_path())
        assert config["learning_rate"] == 1e-4 and config["loss_options"] == {
            "reduction": "active"}
        assert config["variance_transfer"] and config["decoder_centre"] == "class_mean"
        record = study.load_results()["runs"]["transfer_test"]["triplet"]["dvml"]["0"]
        assert {"recall@1", "map@r", "diagnostics"} <= set(record)
        assert study.load_results()["test"]["transfer"]["triplet"]["dvml"]["seeds"] == [0]
        assert study.load_results()["success"]["transfer"]["dvml"] is None  # not complete

        study.stage_geometry("transfer")
        (geometry,) = study.load_results()["geometry"]["transfer"]
        control = geometry["positive_control"]
        assert geometry["dvml"] and control["cases"] > 0
        assert -1 <= control["cosine_control"] <= 1 and -1 <= control["cosine_same"] <= 1
