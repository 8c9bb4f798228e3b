"""train.py end to end, in-process (absl flags parsed as on the command line)."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl.testing import flagsaver
from PIL import Image

import train  # noqa: F401  (defines train.py's flags, as running the script does)
from dvml_tf.training import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*flags):
    """Runs train.py's main as `python train.py <flags>` would; returns the SystemExit text."""
    with flagsaver.flagsaver():
        cli.FLAGS.unparse_flags()
        argv = cli.FLAGS(["train.py", *flags])  # what absl hands to main: name + positionals
        try:
            cli.main(argv)
        except SystemExit as exit_:
            return str(exit_)
    return None


def tiny_training_flags(model_dir):
    """A few steps of a tiny model: what these tests need to see every output written."""
    return [f"--model_dir={model_dir}", "--steps=6", "--classes_per_batch=4",
            "--embedding_dim=8", "--num_samples=2", "--eval_batch_size=64",
            "--checkpoint_every=3", "--log_every=3"]


def write_folder(root, num_classes=8, per_class=5, size=20):
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        (root / f"class_{c}").mkdir(parents=True)
        base = rng.uniform(0, 255, (size, size, 3))
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.jpg")
    return root


def test_train_py_end_to_end_on_mocked_omniglot(tmp_path):
    run = tmp_path / "run"
    # 400 mocked images a split (random labels) leave 27 training classes with two images or
    # more for the batches of 4 classes, and take less time to mock, read and evaluate than
    # 2,000.
    with tfds.testing.mock_data(num_examples=400):
        assert run_main(*tiny_training_flags(run)) is None
    metrics = json.loads((run / "metrics.json").read_text())
    assert "active_units" in metrics.pop("dvml_diagnostics")  # a DVML run's diagnostics
    # Mocked classes are random: a test class may hold a single image, a query left out.
    excluded = metrics.pop("excluded_queries")
    assert isinstance(excluded, int) and excluded >= 0
    assert set(metrics) == {"nmi", "f1", "recall@1", "recall@2", "recall@4", "recall@8", "map@r"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "omniglot" and config["loss"] == "npair" and config["dvml"]
    assert (run / "model.keras").exists()
    # Rerunning the finished command trains nothing more and evaluates again.
    with tfds.testing.mock_data(num_examples=400):
        assert run_main(*tiny_training_flags(run)) is None


def test_train_py_resolves_presets_and_flags():
    with flagsaver.flagsaver():
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["train.py", "--dataset=sop", "--nodvml", "--steps=10",
                   "--loss_options=l2_reg=0.01,normalize=False", "--recall_ks=1,10"])
        config = cli.config_from_flags()
    assert config.config == "sop" and config.dataset == "sop"
    assert config.backbone == "inception_v3" and config.embedding_dim == 512  # paper recipe
    assert not config.dvml and config.steps == 10 and config.recall_ks == (1, 10)
    assert config.loss_options == {"l2_reg": 0.01, "normalize": False}
    assert config.model_dir == "runs/sop_npair_baseline_seed0"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset=folder"], "needs --data_dir"),
        (["--loss_options=margin"], "train.py: error: --loss_options: expected key=value"),
        (["--phase1_weights=a,b,c,d"],
         "train.py: error: --phase1_weights: expected comma-separated numbers, got 'a'"),
        (["--recall_ks=1,x"],
         "train.py: error: --recall_ks: expected comma-separated integers, got 'x'"),
        (["stray", "--steps=3"], "train.py: error: unexpected arguments: stray"),
        (["--loss=triplet", "--loss_options=margin=abc"],
         "train.py: error: --loss_options: margin must be a number, got 'abc' (loss=triplet"),
        (["--loss=triplet", "--loss_options=normalize=maybe"],
         "train.py: error: --loss_options: normalize must be True or False, got 'maybe'"),
        (["--loss=triplet", "--loss_options=mining=3"],
         "train.py: error: --loss_options: mining must be a string, got 3"),
        (["--loss=triplet", "--loss_options=temperature=0.1"], "Unrecognized keyword"),
        (["--loss=triplet", "--loss_options=mining=hardest"], "Unknown triplet mining"),
        (["--loss=npair", "--images_per_class=4"], "needs images_per_class=2"),
        (["--image_size=40"], "cannot exceed resize_size"),
    ],
)
def test_train_py_bad_values_exit_with_a_clear_message(tmp_path, flags, message):
    error = run_main(f"--model_dir={tmp_path}/run", *flags)
    assert error is not None and message in error


def test_train_py_unknown_flag_values_list_the_valid_ones():
    result = subprocess.run([sys.executable, "train.py", "--dataset=mnist"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "omniglot|cub200|cars196|sop|folder" in result.stderr


def test_train_py_missing_or_empty_folder(tmp_path):
    error = run_main("--dataset=folder", f"--data_dir={tmp_path}/absent",
                     f"--model_dir={tmp_path}/run")
    assert "absent" in error
    (tmp_path / "empty").mkdir()
    error = run_main("--dataset=folder", f"--data_dir={tmp_path}/empty",
                     f"--model_dir={tmp_path}/run2")
    assert "empty" in error


def test_train_py_on_a_built_glyph_folder(tmp_path):
    """--dataset=glyphs end to end: build a folder from DejaVu faces, train a few steps with
    the glyphs preset on its training classes, validate on the built validation split."""
    from dvml_tf.data import glyph_builder
    from tests.data import fonts

    data = tmp_path / "glyphs"
    glyph_builder.build(glyph_builder.BuildSpec(
        fonts=fonts.DEJAVU[:4], characters=glyph_builder.parse_characters(fonts.LETTERS),
        image_size=16, splits=glyph_builder.SplitSizes(validation=8, test=12, pretrain=0)),
        str(data), processes=1, log=lambda _: None)
    run = tmp_path / "run"
    assert run_main(*tiny_training_flags(run), "--dataset=glyphs", f"--data_dir={data}",
                    "--resize_size=16", "--image_size=14", "--validation_classes=8",
                    "--evaluation_split=validation") is None
    config = json.loads((run / "config.json").read_text())
    assert config["config"] == "glyphs" and config["dataset"] == "glyphs"
    assert config["backbone"] == "convnet_wide"
    metrics = json.loads((run / "metrics_validation.json").read_text())
    assert 0.0 <= metrics["recall@1"] <= 1.0
    identity = json.loads((run / "dataset.json").read_text())
    assert identity["validation"] == {"images": identity["validation"]["images"], "classes": 8}


SMALL_FOLDER_RUN = ["--dataset=folder", "--backbone=convnet_small", "--nopretrained",
                    "--image_size=16", "--resize_size=18", "--embedding_dim=8", "--num_samples=2",
                    "--steps=2", "--checkpoint_every=2", "--eval_every=0", "--eval_batch_size=64"]


def test_a_small_catalogue_gets_a_smaller_preset_batch_with_a_note(tmp_path, caplog):
    data = write_folder(tmp_path / "catalogue", num_classes=10)  # 5 training classes
    run = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert run_main(*SMALL_FOLDER_RUN, f"--data_dir={data}", f"--model_dir={run}") is None
    assert ("classes_per_batch lowered from 64 (preset folder) to 5: the training split has 5 "
            "classes with at least 2 images") in caplog.text
    assert json.loads((run / "config.json").read_text())["classes_per_batch"] == 5
    assert (run / "metrics.json").exists()
    # Given on the command line, a value too large stays an error naming the flag.
    error = run_main(*SMALL_FOLDER_RUN, f"--data_dir={data}", f"--model_dir={tmp_path}/run2",
                     "--classes_per_batch=64")
    assert error.startswith("train.py: error: --classes_per_batch=64 exceeds the 5 training "
                            "classes with at least 2 images")


def test_a_model_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "taken").write_text("notes")
    taken = tmp_path / "taken"
    assert run_main(f"--model_dir={taken}") == (
        f"train.py: error: --model_dir: {taken} is a file, not a folder.")
    assert run_main(f"--model_dir={taken}/run") == (
        f"train.py: error: --model_dir: Cannot write {taken}/run: {taken} is a file, not a "
        "folder.")
    assert (tmp_path / "taken").read_text() == "notes"


def test_a_full_disk_is_a_one_line_error_that_leaves_nothing_behind(tmp_path):
    from tests import faults

    data = write_folder(tmp_path / "catalogue")
    with faults.full_disk(tmp_path / "disk") as disk:
        run = os.path.join(disk.path, "run")
        disk.fill()
        error = run_main(*SMALL_FOLDER_RUN, f"--data_dir={data}", f"--model_dir={run}",
                         "--classes_per_batch=4")
        reason = ("no space left on device" if disk.mounted
                  else "file too large for the file system")
        assert error.startswith(f"train.py: error: Cannot write config.json in {run}: {reason} ("
                                ), error
        assert "\n" not in error and "needed). Nothing was half-written." in error
        assert os.listdir(run) == []  # no temporary file, no lock file


def test_pretrained_weights_without_network_are_a_clear_error(tmp_path, monkeypatch):
    from tests.models.test_backbones import offline

    offline(monkeypatch, tmp_path / "keras")
    data = write_folder(tmp_path / "catalogue", num_classes=4, per_class=2)
    flags = [flag for flag in SMALL_FOLDER_RUN if flag != "--nopretrained"]
    error = run_main(*flags, "--backbone=mobilenet_v2", "--pretrained", "--image_size=32",
                     "--resize_size=36", f"--data_dir={data}", f"--model_dir={tmp_path}/run")
    assert error.startswith("train.py: error: Could not download the ImageNet weights of "
                            "--backbone=mobilenet_v2"), error
    assert "--nopretrained" in error and str(tmp_path / "keras" / "models") in error


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_the_same_command_resumes(tmp_path,
                                                                                     caplog):
    import tensorflow as tf

    data = write_folder(tmp_path / "catalogue")
    run, log_path = tmp_path / "run", tmp_path / "train.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}

    def flags(steps):
        # No periodic checkpoint: the one found afterwards is SIGTERM's.
        return [*SMALL_FOLDER_RUN, f"--data_dir={data}", f"--model_dir={run}", f"--steps={steps}",
                "--checkpoint_every=100000", "--log_every=2", "--classes_per_batch=4"]

    def command(steps):
        return [sys.executable, "train.py", *flags(steps)]

    with open(log_path, "w") as log:
        process = subprocess.Popen(command(100000), cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.time() + 300
        while "step 4/100000" not in log_path.read_text():
            assert process.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        # Stopped (SIGSTOP), the first run keeps its lock without taking a core from the second
        # one's start-up; it goes on (SIGCONT) before its SIGTERM.
        process.send_signal(signal.SIGSTOP)
        # A second run into the same folder is refused at once, naming the first.
        second = subprocess.run(command(100000), cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=600)
        process.send_signal(signal.SIGCONT)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"train.py: error: Another training run is writing {run} (pid {process.pid} on "
            f"{socket.gethostname()}, started "), second.stderr[-2000:]
        assert ": train.py --dataset=folder --backbone=convnet_small" in second.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 143
    finally:
        process.kill()  # never leave a 100,000-step run behind
    log = log_path.read_text()
    assert "Traceback" not in log
    saved = tf.train.latest_checkpoint(str(run / "checkpoints"))
    step = int(saved.rsplit("-", 1)[-1])
    assert step >= 4
    # The checkpoint holds the step it is named after (the one reached, not a multiple of
    # --checkpoint_every), and the last line says so.
    assert tf.train.load_checkpoint(saved).get_tensor(
        "model/step_counter/.ATTRIBUTES/VARIABLE_VALUE") == step
    assert log.rstrip().splitlines()[-1] == (
        f"train.py: terminated (SIGTERM) at step {step}; checkpoint {saved} saved. Rerun the "
        "same command to resume.")

    # The same command again, run by train.py's main in this process (a third process would
    # only add its TensorFlow import).
    with caplog.at_level("INFO", logger="absl"):
        assert run_main(*flags(step + 2)) is None
    assert f"Resumed from {saved} at step {step}" in caplog.text
    assert (run / "metrics.json").exists()
    assert not (run / ".train.lock").exists()  # released and removed by each run
