"""Run construction: what a `TrainConfig` implies, in one place (Model Garden's Task).

The trainer, the run loader, `evaluate.py`, the exporter and the benchmarks all build a run's
pieces here, so that a rule (which dataset arguments, which preprocessing, whether images are
flipped, which files a run folder holds) exists once:

    config = TrainConfig(...)
    splits = task.load_splits(config)               # or raw=True: what clients send
    model = task.build_model(config)                # DVMLModel (model.embedder: inference)
    optimizer = task.build_optimizer(config)
    preprocess = task.preprocess_config(config)     # the test/train image transform
    raw_form = task.raw_form(config, raw_splits)    # the exports' input form
    run = task.load_run("runs/omniglot_npair_dvml_seed0")   # a trained run folder

A run folder (`model_dir`) holds `config.json`, `dataset.json` (the identity of the data it
trains on), `checkpoints/`, `logs/`, `model.keras` and `metrics.json` (`metrics_validation.json`
for model selection).
"""

import dataclasses
import json
import os
import zipfile

import keras
import tensorflow as tf
from absl import logging

from dvml_tf import data as data_lib
from dvml_tf import losses as losses_lib
from dvml_tf import models
from dvml_tf.training.config import TrainConfig

CONFIG_FILE = "config.json"
DATASET_FILE = "dataset.json"
MODEL_FILE = "model.keras"
CHECKPOINT_DIR = "checkpoints"
LOGS_DIR = "logs"


def metrics_file(split):
    """The metrics file of a split's final evaluation: metrics.json for the test classes."""
    return "metrics.json" if split == "test" else f"metrics_{split}.json"


def build_model(config, model_class=models.DVMLModel, **overrides):
    """Builds the (uncompiled) DVMLModel a configuration describes.

    Args:
        config: a `TrainConfig`.
        model_class: `DVMLModel` or a subclass (research variants).
        **overrides: extra constructor arguments of `model_class`.

    Returns:
        The model, built (its variables exist).
    """
    backbone = models.build_backbone(
        config.backbone,
        input_shape=(config.image_size, config.image_size, 3),
        pretrained=config.pretrained,
        weights_path=config.backbone_weights,
        sync_batch_norm=config.sync_batch_norm,
    )
    metric_loss = losses_lib.get_metric_loss(config.loss, synthesis=config.synthesis,
                                             **config.loss_options)
    return model_class(
        backbone,
        metric_loss,
        embedding_dim=config.embedding_dim,
        use_dvml=config.dvml,
        num_samples=config.num_samples,
        phase1_steps=config.phase1_steps,
        phase1_weights=config.phase1_weights,
        phase2_weights=config.phase2_weights,
        variance_scale=config.variance_scale,
        reconstruction=config.reconstruction,
        detach_variance_heads=config.detach_variance_heads,
        kl_free_bits=config.kl_free_bits,
        kl_warmup=config.kl_warmup,
        decoder_centre=config.decoder_centre,
        variance_transfer=config.variance_transfer,
        scale_to_intra_class=config.scale_to_intra_class,
        seed=config.seed,
        name="dvml" if config.dvml else "baseline",
        **overrides,
    )


def build_optimizer(config):
    """Adam, or AdamW when the configuration has weight decay."""
    # Paper §4.1: Adam, one learning rate for every parameter, no weight decay stated.
    if config.weight_decay > 0:
        return keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay)
    return keras.optimizers.Adam(config.learning_rate)


def load_splits(config, raw=False, data_dir=None):
    """The dataset splits of a run, as the trainer loads them (same classes, same order).

    Args:
        config: a `TrainConfig`.
        raw: load the raw images (what clients of the exports send) instead of the stored ones;
            row i of each raw split is row i of the run's split.
        data_dir: overrides `config.data_dir` (TFDS data dir or image folder); TFDS's default
            honours the TFDS_DATA_DIR environment variable.

    Returns:
        `data.DatasetSplits`.

    Raises:
        FileNotFoundError: the data is not available (the message says what to do).
    """
    data_dir = data_dir or config.data_dir
    return data_lib.load_dataset(
        config.dataset,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        image_size=config.resize_size,
        validation_classes=config.validation_classes,
        seed=config.seed,
        raw=raw,
        max_pixels=config.max_image_pixels,
    )


def preprocess_config(config):
    """The image transform of a run: resize, crop, and flips for all but grayscale strokes."""
    return data_lib.PreprocessConfig(
        resize_size=config.resize_size,
        crop_size=config.image_size,
        random_flip=not data_lib.is_grayscale(config.dataset),
    )


def raw_form(config, splits=None):
    """The raw form of a run's images (the exports' input), from the splits when at hand.

    Args:
        config: a `TrainConfig`.
        splits: optional `DatasetSplits` of the run's dataset (raw or not): their `raw_form`
            says how the loader held them. Without them the loader's rule for the real
            dataset's size applies; a folder dataset of unknown size is assumed held decoded.

    Returns:
        `data.RawForm`.
    """
    if splits is not None:
        return splits.raw_form
    if config.dataset in ("folder", "csv"):
        # Unknown folder size: assume the loader holds it decoded (the usual case); the only
        # difference otherwise is a rounding to uint8 after the resize.
        logging.warning("%s size unknown: assuming the loader holds the images decoded.",
                        "Folder" if config.dataset == "folder" else "CSV catalogue")
        return data_lib.raw_form_of(config.dataset, config.resize_size, num_images=0)
    return data_lib.raw_form_of(config.dataset, config.resize_size)


@dataclasses.dataclass
class TrainedRun:
    """A trained model and the configuration that produced it.

    Args:
        config: the run's `TrainConfig`.
        model: the `DVMLModel`.
        source: the file the weights came from (model.keras or a checkpoint prefix).
        model_dir: the run's folder.
    """

    config: TrainConfig
    model: models.DVMLModel
    source: str
    model_dir: str


def load_config(model_dir):
    """Reads `<model_dir>/config.json`.

    Raises:
        FileNotFoundError: no such folder or no config.json in it.
    """
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model_dir {model_dir!r} does not exist (or is not a folder).")
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {model_dir!r} is not a training run folder (train.py writes "
            f"{CONFIG_FILE}, {MODEL_FILE} and {CHECKPOINT_DIR}/ there)."
        )
    with open(path) as f:
        return TrainConfig.from_dict(json.load(f))


def _load_model_file(path):
    """Loads model.keras, telling a damaged file apart from a missing one (Keras says "File
    not found" for both)."""
    size = os.path.getsize(path)
    advice = (f"Retrain, or restore the file; to export the latest checkpoint instead, move "
              f"{path} aside.")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is corrupt or truncated ({size} bytes, not a complete .keras "
                         f"zip archive). {advice}")
    try:
        model = keras.saving.load_model(path, compile=False)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path} is corrupt ({size} bytes): {error} {advice}") from None
    if not isinstance(model, models.DVMLModel):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a DVMLModel.")
    return model


def _model_structure(model, config):
    """(name, the model's value, the configuration's value) of what both describe."""
    input_size = tuple(model.backbone.inputs[0].shape[1:3])
    return [("embedding_dim", model.embedding_dim, config.embedding_dim),
            ("dvml", model.use_dvml, config.dvml),
            ("image_size", input_size, (config.image_size, config.image_size))]


def load_run(model_dir, model_class=models.DVMLModel):
    """Loads the trained model of a run folder.

    `model.keras` when the run finished; otherwise the latest checkpoint, restored into the model
    the configuration describes (ImageNet weights are not downloaded: the checkpoint has them all).

    Args:
        model_dir: a folder written by `train.py`.
        model_class: the model class the run was trained with (research variants).

    Returns:
        `TrainedRun`.

    Raises:
        FileNotFoundError: no config.json, or neither model.keras nor a checkpoint.
        ValueError: a corrupt or truncated model.keras, or one that config.json does not
            describe (another embedding size, DVML or not, another input size).
    """
    model_dir = os.fspath(model_dir)
    config = load_config(model_dir)
    model_path = os.path.join(model_dir, MODEL_FILE)
    if os.path.exists(model_path):
        model = _load_model_file(model_path)
        mismatches = [f"{name}: {model_value} in {MODEL_FILE}, {config_value} in {CONFIG_FILE}"
                      for name, model_value, config_value in _model_structure(model, config)
                      if model_value != config_value]
        if mismatches:
            raise ValueError(
                f"{model_path} does not match {os.path.join(model_dir, CONFIG_FILE)} "
                f"({'; '.join(mismatches)}): the two files come from different runs. Put the "
                "run's own model.keras back (or retrain), rather than export or evaluate a "
                "model whose description is wrong.")
        return TrainedRun(config, model, model_path, model_dir)
    checkpoint_dir = os.path.join(model_dir, CHECKPOINT_DIR)
    latest = tf.train.latest_checkpoint(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
    if latest is None:
        raise FileNotFoundError(
            f"{model_dir!r} holds no trained model: neither {model_path} nor a checkpoint in "
            f"{checkpoint_dir}/ exists. Train first (python train.py --model_dir={model_dir}) or "
            "point --model_dir at a finished or checkpointed run."
        )
    model = build_model(config.replace(pretrained=False, backbone_weights=None), model_class)
    # The training checkpoint also holds the optimizer, which inference does not need.
    tf.train.Checkpoint(model=model).restore(latest).assert_existing_objects_matched().expect_partial()
    return TrainedRun(config, model, latest, model_dir)
