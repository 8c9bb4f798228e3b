"""Generated raw images and raw splits in a dataset's raw form."""

import numpy as np

from dvml_tf import data as data_lib
from dvml_tf import task
from dvml_tf.testing import synthetic_data
from dvml_tf.training.config import TrainConfig


def test_synthetic_omniglot_splits_are_raw_and_class_disjoint():
    config = TrainConfig()
    raw_form, preprocess = task.raw_form(config), task.preprocess_config(config)
    splits = synthetic_data.synthetic_raw_splits(raw_form, preprocess, train_classes=3,
                                                 test_classes=2, images_per_class=2)
    assert splits.train.images.shape == (6, 105, 105, 3) and splits.test.num_images == 4
    assert not set(splits.train.classes) & set(splits.test.classes)
    images = splits.train.images
    # Dark strokes on white, gray (R = G = B).
    assert (images[..., 0] == images[..., 2]).all()
    assert np.mean(images == 255) > 0.7 and (images == 0).any()
    assert splits.raw and splits.raw_form == raw_form and splits.grayscale
    assert splits.name == "omniglot"


def test_synthetic_photos_have_the_loaders_square_size():
    config = TrainConfig(dataset="cub200", image_size=28, resize_size=32)
    raw_form, preprocess = task.raw_form(config), task.preprocess_config(config)
    images = synthetic_data.synthetic_raw_images(raw_form, preprocess, 3)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert images.std() > 10
    np.testing.assert_array_equal(
        synthetic_data.synthetic_raw_images(raw_form, preprocess, 3), images)  # seeded


def test_synthetic_photo_splits_carry_their_raw_form():
    config = TrainConfig(dataset="cub200", image_size=28, resize_size=32)
    raw_form, preprocess = task.raw_form(config), task.preprocess_config(config)
    splits = synthetic_data.synthetic_raw_splits(raw_form, preprocess, train_classes=2,
                                                 test_classes=2)
    assert splits.raw and splits.raw_form == raw_form and not splits.grayscale
    assert splits.train.images.shape == (8, 32, 32, 3)
    # A split's raw form is what task.raw_form reads from it; one without a load-time resize
    # gives the any-size form.
    assert task.raw_form(config, splits) == raw_form
    assert task.raw_form(config, data_lib.DatasetSplits(
        "cub200", splits.train, splits.test, raw=True)).stored_size is None
