"""A tiny complete export (SavedModel and LiteRT models), shared by the exporter's and the
verification's tests: exporting once per test session keeps the suite fast."""

import dataclasses

import keras
import pytest

from dvml_tf import task
from dvml_tf.export import exporter
from dvml_tf.testing import synthetic_data
from dvml_tf.training.config import TrainConfig


@dataclasses.dataclass
class TinyExport:
    model: object
    config: TrainConfig
    splits: object
    result: exporter.ExportResult


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """An untrained Omniglot-preset model (16-d) exported with every artifact into E."""
    config = TrainConfig(embedding_dim=16, classes_per_batch=4)
    keras.utils.set_random_seed(0)
    model = task.build_model(config)
    splits = synthetic_data.synthetic_raw_splits(
        task.raw_form(config), task.preprocess_config(config), train_classes=10, test_classes=6,
        images_per_class=4)
    export_dir = str(tmp_path_factory.mktemp("exports") / "E")
    result = exporter.export_model(model, config, export_dir, raw_splits=splits, top_k=5,
                                   source="tiny", calibration_images=40)
    return TinyExport(model, config, splits, result)
