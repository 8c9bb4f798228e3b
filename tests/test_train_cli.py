"""train.py end to end, in-process (absl flags parsed as on the command line)."""

import json
import pathlib
import subprocess
import sys

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
    with tfds.testing.mock_data(num_examples=2000):
        assert run_main(*tiny_training_flags(run)) is None
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"nmi", "f1", "recall@1", "recall@2", "recall@4", "recall@8", "map@r"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "omniglot" and config["loss"] == "npair" and config["dvml"]
    assert (run / "model.keras").exists()
    # Rerunning the finished command trains nothing more and evaluates again.
    with tfds.testing.mock_data(num_examples=2000):
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
