"""Loading a trained run from its model_dir (what `train.py` wrote), for evaluation and export."""

import dataclasses
import json
import os

import keras
import tensorflow as tf

from dvml_tf.models import DVMLModel
from dvml_tf.training import trainer as trainer_lib
from dvml_tf.training.config import TrainConfig


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
    model: DVMLModel
    source: str
    model_dir: str


def load_config(model_dir):
    """Reads `<model_dir>/config.json`.

    Args:
        model_dir: a run folder.

    Returns:
        `TrainConfig`.

    Raises:
        FileNotFoundError: no such folder or no config.json in it.
    """
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model_dir {model_dir!r} does not exist (or is not a folder).")
    path = os.path.join(model_dir, trainer_lib.CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {model_dir!r} is not a training run folder (train.py writes "
            f"{trainer_lib.CONFIG_FILE}, {trainer_lib.MODEL_FILE} and "
            f"{trainer_lib.CHECKPOINT_DIR}/ there)."
        )
    with open(path) as f:
        return TrainConfig.from_dict(json.load(f))


def load_run(model_dir):
    """Loads the trained model of a run.

    `model.keras` when the run finished; otherwise the latest checkpoint, restored into the model
    the configuration describes (ImageNet weights are not downloaded: the checkpoint has them all).

    Args:
        model_dir: a folder written by `train.py`.

    Returns:
        `TrainedRun`.

    Raises:
        FileNotFoundError: no config.json, or neither model.keras nor a checkpoint.
    """
    model_dir = os.fspath(model_dir)
    config = load_config(model_dir)
    model_path = os.path.join(model_dir, trainer_lib.MODEL_FILE)
    if os.path.exists(model_path):
        model = keras.saving.load_model(model_path, compile=False)
        if not isinstance(model, DVMLModel):
            raise ValueError(f"{model_path} holds a {type(model).__name__}, not a DVMLModel.")
        return TrainedRun(config, model, model_path, model_dir)
    checkpoint_dir = os.path.join(model_dir, trainer_lib.CHECKPOINT_DIR)
    latest = tf.train.latest_checkpoint(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
    if latest is None:
        raise FileNotFoundError(
            f"{model_dir!r} holds no trained model: neither {model_path} nor a checkpoint in "
            f"{checkpoint_dir}/ exists. Train first (python train.py --model_dir={model_dir}) or "
            "point --model_dir at a finished or checkpointed run."
        )
    model = trainer_lib.build_model(config.replace(pretrained=False, backbone_weights=None))
    # The training checkpoint also holds the optimizer, which export does not need.
    tf.train.Checkpoint(model=model).restore(latest).assert_existing_objects_matched().expect_partial()
    return TrainedRun(config, model, latest, model_dir)
