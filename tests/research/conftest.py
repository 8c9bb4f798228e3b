"""Fixtures of the research tests: a tiny image folder and a baseline / DVML pair trained on it."""

import numpy as np
import pytest
from PIL import Image


def write_folder_dataset(root, num_classes=10, per_class=5, size=16):
    """Class prototypes plus noise as PNG files, one sub-folder per class."""
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        prototype = rng.uniform(0, 255, (size, size, 3))
        directory = root / f"class_{c:02d}"
        directory.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(prototype + rng.normal(0, 40, prototype.shape), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(directory / f"{i}.png")


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """`(image folder, {"baseline": dir, "dvml": dir})`: two triplet runs of 2 steps."""
    from dvml_tf.training import trainer as trainer_lib
    from dvml_tf.training.config import TrainConfig

    root = tmp_path_factory.mktemp("table4")
    folder = root / "images"
    write_folder_dataset(folder)
    dirs = {}
    for name, dvml in (("baseline", False), ("dvml", True)):
        dirs[name] = root / name
        config = TrainConfig(
            config="table4_test", dataset="folder", data_dir=str(folder), image_size=12,
            resize_size=16, embedding_dim=16, loss="triplet", dvml=dvml, num_samples=2,
            classes_per_batch=4, images_per_class=2, steps=2, log_every=1, checkpoint_every=2,
            eval_batch_size=16, model_dir=str(dirs[name]))
        trainer_lib.Trainer(config, verbose=False).run()
    return folder, dirs
