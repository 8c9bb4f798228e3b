"""Raw splits and embedding them through the serving conversion."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import data as data_lib
from dvml_tf.export import raw_data
from dvml_tf.export import raw_input
from dvml_tf.export import saved_model
from dvml_tf.training import trainer
from dvml_tf.training.config import TrainConfig


def test_synthetic_omniglot_splits_are_raw_and_class_disjoint():
    spec = raw_input.raw_input_spec(TrainConfig())
    splits = raw_data.synthetic_raw_splits(spec, train_classes=3, test_classes=2,
                                           images_per_class=2)
    assert splits.train.images.shape == (6, 105, 105, 3) and splits.test.num_images == 4
    assert not set(splits.train.classes) & set(splits.test.classes)
    images = splits.train.images
    # Dark strokes on white, gray (R = G = B).
    assert (images[..., 0] == images[..., 2]).all()
    assert np.mean(images == 255) > 0.7 and (images == 0).any()


def test_synthetic_photos_have_the_loaders_square_size():
    spec = raw_input.raw_input_spec(TrainConfig(dataset="cub200", image_size=28,
                                                resize_size=32))
    images = raw_data.synthetic_raw_images(spec, 3)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert images.std() > 10


def test_embed_catalog_equals_the_model_on_converted_images():
    config = TrainConfig(embedding_dim=8)
    keras.utils.set_random_seed(0)
    model = trainer.build_model(config)
    spec = raw_input.raw_input_spec(config)
    splits = raw_data.synthetic_raw_splits(spec, train_classes=1, test_classes=3,
                                           images_per_class=3)
    embeddings, labels = raw_data.embed_catalog(saved_model.EmbeddingModel(model), splits.test,
                                                spec, batch_size=4)
    expected = model(raw_input.to_model_input(tf.constant(splits.test.images), spec)).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    np.testing.assert_array_equal(labels, splits.test.labels)
    some, _ = raw_data.embed_catalog(saved_model.EmbeddingModel(model), splits.test, spec,
                                     indices=[4, 1])
    np.testing.assert_allclose(some, expected[[4, 1]], atol=1e-5)


def test_whole_classes_caps_by_complete_classes():
    labels = np.array([5, 5, 3, 3, 3, 7, 7, 9])
    np.testing.assert_array_equal(raw_data.whole_classes(labels, None), np.arange(8))
    # Classes in label order: 3 (3 images), 5 (2), 7 (2), 9 (1).
    np.testing.assert_array_equal(raw_data.whole_classes(labels, 5), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(raw_data.whole_classes(labels, 2), [0, 1, 2, 3, 4])


def test_spec_for_splits_reads_the_splits_stored_form():
    config = TrainConfig(dataset="cub200", image_size=28, resize_size=32)
    spec = raw_input.raw_input_spec(config)
    splits = raw_data.synthetic_raw_splits(spec, train_classes=2, test_classes=2)
    assert splits.raw and splits.stored_form == spec.stored_form
    assert raw_data.spec_for_splits(config, splits) == spec
    encoded = dataclasses.replace(splits, stored_form=data_lib.StoredForm())
    assert raw_data.spec_for_splits(config, encoded).load_size is None
    with pytest.raises(ValueError, match="raw=True"):
        raw_data.spec_for_splits(config, dataclasses.replace(splits, raw=False))
