"""`dvml_tf.task`: what a TrainConfig implies (model, optimizer, splits, preprocessing, raw form)
and loading a trained run (model.keras, or the latest checkpoint, or a clear error)."""

import logging
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dvml_tf import data as data_lib
from dvml_tf import models
from dvml_tf import task
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


# ------------------------------------------------------------------------------ run folders

def test_a_run_folder_holds_the_files_task_names(run):
    model_dir, _, _, _ = run
    for name in (task.CONFIG_FILE, task.MODEL_FILE, task.CHECKPOINT_DIR, task.LOGS_DIR,
                 task.metrics_file("test")):
        assert os.path.exists(model_dir / name), name
    assert task.metrics_file("test") == "metrics.json"
    assert task.metrics_file("validation") == "metrics_validation.json"


def test_loads_model_keras(run):
    model_dir, config, expected, probe = run
    loaded = task.load_run(model_dir)
    assert isinstance(loaded, task.TrainedRun) and loaded.model_dir == os.fspath(model_dir)
    assert loaded.source.endswith("model.keras") and loaded.config == config
    assert task.load_config(model_dir) == config
    np.testing.assert_allclose(loaded.model(probe, training=False).numpy(), expected, atol=1e-6)


def test_falls_back_to_the_latest_checkpoint(run, tmp_path):
    model_dir, _, expected, probe = run
    copy = tmp_path / "run"
    shutil.copytree(model_dir, copy)
    (copy / "model.keras").unlink()
    loaded = task.load_run(copy)
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
        task.load_run(empty)


def test_a_truncated_model_keras_is_corrupt_not_missing(run, tmp_path):
    model_dir, _, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(model_dir, copy)
    data = (copy / "model.keras").read_bytes()
    for size in (len(data) // 2, 0):
        (copy / "model.keras").write_bytes(data[:size])
        with pytest.raises(ValueError, match=rf"model\.keras is corrupt or truncated \({size} "
                                             r"bytes, not a complete \.keras zip archive\)\. "
                                             r"Retrain, or restore the file; to export the "
                                             r"latest checkpoint instead, move .* aside\."):
            task.load_run(copy)


def test_a_model_keras_that_config_json_does_not_describe_is_refused(run, tmp_path):
    model_dir, config, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(model_dir, copy)
    (copy / "config.json").write_text(config.replace(embedding_dim=8).to_json())
    with pytest.raises(ValueError, match=r"model\.keras does not match .*config\.json "
                                         r"\(embedding_dim: 16 in model\.keras, 8 in "
                                         r"config\.json\): the two files come from different "
                                         r"runs"):
        task.load_run(copy)


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        task.load_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        task.load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        task.load_config(tmp_path)


# --------------------------------------------------------------------------- construction

def test_build_model_follows_the_configuration():
    config = TrainConfig(embedding_dim=12, loss="triplet", num_samples=3, steps=100,
                         phase1_fraction=0.3, variance_scale=0.5, seed=4)
    keras.utils.set_random_seed(0)
    model = task.build_model(config)
    assert isinstance(model, models.DVMLModel) and model.built and model.name == "dvml"
    assert model.use_dvml and model.embedding_dim == 12 and model.num_samples == 3
    assert int(model.phase_switch_step.numpy()) == 30 and model.variance_scale == 0.5
    assert model.seed == 4 and model.normalize_embeddings  # triplet trains on the unit sphere
    assert tuple(model.phase1_weights) == config.phase1_weights
    assert model.backbone.inputs[0].shape[1:] == (28, 28, 3)
    images = tf.random.uniform([2, 28, 28, 3], 0, 255, seed=0)
    assert model(images).shape == (2, 12)
    baseline = task.build_model(config.replace(dvml=False, loss="npair"))
    assert baseline.name == "baseline" and not baseline.use_dvml
    assert not baseline.normalize_embeddings


def test_build_model_takes_a_model_class_and_its_arguments():
    class Tagged(models.DVMLModel):
        def __init__(self, *args, tag=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.tag = tag

    model = task.build_model(TrainConfig(embedding_dim=8), Tagged, tag="x")
    assert type(model) is Tagged and model.tag == "x" and model.embedding_dim == 8


def test_build_optimizer_is_adam_or_adamw_with_weight_decay():
    adam = task.build_optimizer(TrainConfig(learning_rate=3e-4))
    assert type(adam) is keras.optimizers.Adam
    assert float(adam.learning_rate) == pytest.approx(3e-4)
    adamw = task.build_optimizer(TrainConfig(weight_decay=0.01))
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 0.01


def test_preprocess_config_never_flips_strokes():
    assert task.preprocess_config(TrainConfig()) == data_lib.PreprocessConfig.omniglot()
    paper = TrainConfig(dataset="cub200", image_size=224, resize_size=256)
    assert task.preprocess_config(paper) == data_lib.PreprocessConfig.paper()
    small = task.preprocess_config(TrainConfig(dataset="folder", data_dir="/x", image_size=28,
                                               resize_size=32))
    assert small == data_lib.PreprocessConfig(resize_size=32, crop_size=28, random_flip=True)


def test_raw_form_without_data_uses_the_data_layers_rule(caplog):
    omniglot = task.raw_form(TrainConfig())
    assert omniglot == data_lib.RawForm("omniglot_ink", 32, (105, 105))
    # Without splits: the loader's own rule on the real dataset's size (SOP is kept encoded).
    config = TrainConfig(dataset="sop", image_size=224, resize_size=256)
    raw_form = task.raw_form(config)
    assert raw_form.stored_size is None and not raw_form.ink
    assert raw_form.fixed_size(task.preprocess_config(config)) == (256, 256)
    # A folder of unknown size is assumed held decoded (the usual case), with a warning.
    with caplog.at_level(logging.WARNING):
        folder = task.raw_form(TrainConfig(dataset="folder", data_dir="/none", image_size=28,
                                           resize_size=32))
    assert folder == data_lib.RawForm("none", 32) and "Folder size unknown" in caplog.text


def test_raw_form_of_splits_is_the_splits_own():
    config = TrainConfig(dataset="folder", data_dir="/none", image_size=28, resize_size=32)
    encoded = data_lib.DatasetSplits("folder", _splits().train, _splits().test,
                                     raw_form=data_lib.RawForm())
    # The splits say how the loader held the images (here: kept encoded), whatever the rule.
    assert task.raw_form(config, encoded) == data_lib.RawForm()


def _write_folder(root, num_classes=6, per_class=3):
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20 + c, 18, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


def test_load_splits_loads_as_the_trainer_does(tmp_path):
    folder = _write_folder(tmp_path / "images")
    config = TrainConfig(dataset="folder", data_dir=str(folder), image_size=12, resize_size=16,
                         validation_classes=1, seed=3)
    splits = task.load_splits(config)
    expected = data_lib.load_dataset("folder", data_dir=str(folder), image_size=16,
                                     validation_classes=1, seed=3)
    assert not splits.raw and splits.splits().keys() == expected.splits().keys()
    for name, catalog in splits.splits().items():
        np.testing.assert_array_equal(catalog.labels, expected.splits()[name].labels)
        np.testing.assert_array_equal(catalog.image(0), expected.splits()[name].image(0))
    assert splits.test.image(0).shape == (16, 16, 3)
    raw = task.load_splits(config, raw=True)
    assert raw.raw and raw.raw_form == splits.raw_form
    np.testing.assert_array_equal(raw.validation.labels, splits.validation.labels)
    assert raw.test.image(0).shape[:2] != (16, 16)  # the original size
    # data_dir overrides the configuration's.
    elsewhere = shutil.copytree(folder, tmp_path / "copy")
    moved = task.load_splits(config.replace(data_dir=str(tmp_path / "missing")),
                             data_dir=elsewhere)
    np.testing.assert_array_equal(moved.test.labels, splits.test.labels)
    with pytest.raises(FileNotFoundError, match="missing"):
        task.load_splits(config.replace(data_dir=str(tmp_path / "missing")))
