"""Loading a trained run: model.keras, or the latest checkpoint, or a clear error."""

import shutil

import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import data as data_lib
from dvml_tf.training import run_loader
from dvml_tf.training import trainer as trainer_lib
from dvml_tf.training.config import TrainConfig


def _splits():
    rng = np.random.default_rng(0)

    def catalog(first, classes, name):
        labels = np.repeat(np.arange(first, first + classes), 3)
        images = rng.integers(0, 256, (len(labels), 32, 32, 1), dtype=np.uint8)
        return data_lib.ImageCatalog(labels, images=images, num_channels=1, name=name)

    return data_lib.DatasetSplits("omniglot", catalog(0, 6, "train"), catalog(6, 4, "test"),
                                  num_channels=1, grayscale=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real (tiny) run: 3 training steps with the Trainer, model.keras and checkpoints."""
    model_dir = tmp_path_factory.mktemp("run")
    config = TrainConfig(model_dir=str(model_dir), embedding_dim=16, classes_per_batch=4,
                         steps=3, checkpoint_every=2, log_every=1, eval_batch_size=8)
    trainer = trainer_lib.Trainer(config, splits=_splits(), verbose=False)
    trainer.run()
    probe = tf.random.uniform([4, 28, 28, 3], 0, 255, seed=1)
    return model_dir, config, trainer.model(probe, training=False).numpy(), probe


def test_loads_model_keras(run):
    model_dir, config, expected, probe = run
    loaded = run_loader.load_run(model_dir)
    assert loaded.source.endswith("model.keras") and loaded.config == config
    np.testing.assert_allclose(loaded.model(probe, training=False).numpy(), expected, atol=1e-6)


def test_falls_back_to_the_latest_checkpoint(run, tmp_path):
    model_dir, _, expected, probe = run
    copy = tmp_path / "run"
    shutil.copytree(model_dir, copy)
    (copy / "model.keras").unlink()
    loaded = run_loader.load_run(copy)
    assert loaded.source.endswith("ckpt-3")
    assert int(loaded.model.step_counter.numpy()) == 3
    np.testing.assert_allclose(loaded.model(probe, training=False).numpy(), expected, atol=1e-6)


def test_no_trained_model_is_a_clear_error(run, tmp_path):
    model_dir, _, _, _ = run
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(model_dir / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match=r"holds no trained model: neither .*model\.keras "
                                                r"nor a checkpoint in .*checkpoints"):
        run_loader.load_run(empty)


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_loader.load_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        run_loader.load_run(tmp_path)
