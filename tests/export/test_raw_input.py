"""The serving conversion of raw images equals the data layer's path (load_dataset +
make_eval_dataset), for Omniglot (mocked TFDS records) and for photos (the folder layout)."""

import os
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from dvml_tf import data as data_lib
from dvml_tf.data import datasets
from dvml_tf.export import raw_data
from dvml_tf.export import raw_input
from dvml_tf.training.config import TrainConfig

OMNIGLOT_BOUNDARY = 964


def _omniglot_like(num_images, seed):
    """Raw Omniglot-like images: strokes on white, plus coloured noise (to exercise the RGB ->
    gray weights on R != G != B, which real Omniglot never has)."""
    spec = raw_input.raw_input_spec(TrainConfig())
    images = raw_data.synthetic_raw_images(spec, num_images, seed=seed)
    rng = np.random.default_rng(seed)
    images[-2:] = rng.integers(0, 256, images[-2:].shape, dtype=np.uint8)
    images[-3, 40:60, 40:60] = [200, 30, 90]
    return images


def _mock_omniglot(raw_by_split):
    """mock_data serving our own raw images as TFDS omniglot's encoded PNG records."""

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        del self, decoders, read_config, kwargs
        images, labels = raw_by_split[str(split)]
        encoded = [tf.io.encode_png(image).numpy() for image in images]
        return tf.data.Dataset.from_tensor_slices({"image": encoded, "label": labels})

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


@pytest.fixture(scope="module")
def omniglot():
    train = _omniglot_like(8, seed=1)
    test = _omniglot_like(10, seed=2)
    raw = {
        "train": (train, np.repeat(np.arange(4), 2).astype(np.int64)),
        "test": (test, OMNIGLOT_BOUNDARY + np.repeat(np.arange(5), 2).astype(np.int64)),
    }
    with mock.patch.object(datasets, "download_host_reachable",
                           side_effect=AssertionError("network checked")), _mock_omniglot(raw):
        splits = data_lib.load_dataset("omniglot", image_size=32)
        raw_splits = raw_data.load_raw_splits(TrainConfig(dataset="omniglot"), data_dir="/none")
    preprocess = data_lib.PreprocessConfig.omniglot()
    loader_images = np.concatenate([
        images.numpy() for images, _ in data_lib.make_eval_dataset(splits.test, preprocess, 4)])
    return test, loader_images, raw_splits


def test_omniglot_serving_conversion_equals_the_loader(omniglot):
    raw, loader_images, _ = omniglot
    spec = raw_input.raw_input_spec(TrainConfig(dataset="omniglot", image_size=28,
                                                resize_size=32))
    assert spec.ink and spec.load_size == 32 and spec.raw_size == (105, 105)
    served = raw_input.to_model_input(tf.constant(raw), spec).numpy()
    assert served.shape == loader_images.shape == (10, 28, 28, 3)
    np.testing.assert_array_equal(served, loader_images)


def test_omniglot_litert_conversion_matches_the_loader(omniglot):
    raw, loader_images, _ = omniglot
    spec = raw_input.raw_input_spec(TrainConfig(dataset="omniglot"))
    exact_steps = raw_input.litert_model_input(tf.constant(raw), spec).numpy()
    diff = np.abs(exact_steps - loader_images)
    # Same pixels up to float summation order: a rounding may flip by one gray level.
    assert diff.max() <= 1.0 and diff.mean() < 1e-3
    linear = raw_input.litert_model_input(tf.constant(raw), spec, integer_steps=False).numpy()
    assert np.abs(linear - loader_images).max() <= 1.5


def test_raw_omniglot_splits_are_the_loaders_records_in_rgb(omniglot):
    raw, _, raw_splits = omniglot
    assert raw_splits.test.num_channels == 3 and raw_splits.test.num_images == 10
    np.testing.assert_array_equal(
        np.stack([raw_splits.test.image(i) for i in range(10)]), raw)
    assert raw_splits.test.labels.min() >= OMNIGLOT_BOUNDARY > raw_splits.train.labels.max()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """A folder dataset of JPEG and PNG photos of different sizes (4 classes)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    sizes = [(40, 52), (31, 30), (64, 48), (24, 36)]
    for c in range(4):
        os.makedirs(root / f"class{c}")
        for i in range(3):
            height, width = sizes[(c + i) % 4]
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            extension = "png" if i % 2 else "jpg"
            Image.fromarray(image).save(root / f"class{c}" / f"{i}.{extension}")
    return str(root)


@pytest.mark.parametrize("max_decoded_bytes", [None, 1000])
def test_photo_serving_conversion_equals_the_folder_loader(photo_folder, max_decoded_bytes):
    config = TrainConfig(dataset="folder", data_dir=photo_folder, image_size=28, resize_size=32)
    limit = max_decoded_bytes or datasets.MAX_DECODED_BYTES
    with mock.patch.object(datasets, "MAX_DECODED_BYTES", limit):
        splits = data_lib.load_dataset("folder", data_dir=photo_folder, image_size=32)
        raw_splits = raw_data.load_raw_splits(config)
        spec = raw_data.spec_for_splits(config, raw_splits)
    assert (splits.test.storage == "decoded") == (spec.load_size == 32)
    assert (max_decoded_bytes is None) == (spec.load_size == 32)
    assert spec.raw_size is None and not spec.ink
    preprocess = data_lib.PreprocessConfig(resize_size=32, crop_size=28)
    loader = np.concatenate([
        images.numpy() for images, _ in data_lib.make_eval_dataset(splits.test, preprocess, 8)])
    served = np.stack([
        raw_input.to_model_input(tf.constant(raw_splits.test.image(i))[tf.newaxis], spec)[0]
        for i in range(raw_splits.test.num_images)
    ])
    np.testing.assert_array_equal(served, loader)
    np.testing.assert_array_equal(raw_splits.test.labels, splits.test.labels)


def test_photo_litert_conversion_matches_serving(photo_folder):
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    config = TrainConfig(dataset="folder", data_dir=photo_folder, image_size=28, resize_size=32)
    spec = raw_input.raw_input_spec(config, data_lib.stored_form("folder", 32, num_images=12))
    assert spec.litert_input_size == (32, 32)
    # LiteRT inputs are the loader's in-memory form: resized to 32 x 32 and rounded.
    small = tf.cast(tf.round(data_lib.preprocessing.resize_square(raw, 32)), tf.uint8)
    lite = raw_input.litert_model_input(small, spec).numpy()
    np.testing.assert_array_equal(lite, raw_input.to_model_input(tf.constant(raw), spec).numpy())
    # Another fixed input size goes through the resize matrices.
    other = raw_input.RawInputSpec("folder", spec.preprocess, load_size=None, raw_size=(50, 70))
    lite = raw_input.litert_model_input(tf.constant(raw), other).numpy()
    exact = raw_input.to_model_input(tf.constant(raw), other).numpy()
    assert np.abs(lite - exact).max() < 1e-3


@pytest.mark.parametrize(("size_in", "size_out", "antialias"),
                         [(105, 32, True), (32, 32, True), (20, 32, False), (50, 32, False)])
def test_resize_matrix_is_tf_resize(size_in, size_out, antialias):
    image = np.random.default_rng(0).uniform(0, 255, (size_in, 7, 1)).astype(np.float32)
    matrix = raw_input.resize_matrix(size_in, size_out, antialias)
    expected = tf.image.resize(image, [size_out, 7], antialias=antialias).numpy()[..., 0]
    np.testing.assert_allclose(matrix @ image[..., 0], expected, atol=1e-4)


def test_shape_check_names_the_expected_form():
    spec = raw_input.raw_input_spec(TrainConfig())
    ok = raw_input.check_raw_images(tf.zeros([2, 105, 105, 3], tf.uint8), spec, "sig")
    assert ok.shape == (2, 105, 105, 3)
    for shape in ([2, 28, 28, 3], [105, 105, 3], [1, 105, 105, 4]):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"sig: `images` must be uint8"):
            raw_input.check_raw_images(tf.zeros(shape, tf.uint8), spec, "sig")


def test_spec_round_trips_through_a_dict():
    spec = raw_input.raw_input_spec(TrainConfig())
    assert raw_input.RawInputSpec.from_dict(spec.to_dict()) == spec


def test_raw_omniglot_splits_give_the_runs_spec(omniglot):
    _, _, raw_splits = omniglot
    config = TrainConfig(dataset="omniglot")
    assert raw_splits.raw and raw_splits.stored_form == data_lib.stored_form("omniglot", 32)
    assert raw_data.spec_for_splits(config, raw_splits) == raw_input.raw_input_spec(config)
    assert raw_input.raw_input_spec(config).stored_form == raw_splits.stored_form


def test_spec_without_data_uses_the_data_layers_rule():
    # Without splits: the loader's own rule on the real dataset's size (SOP is kept encoded).
    spec = raw_input.raw_input_spec(TrainConfig(dataset="sop", image_size=224, resize_size=256))
    assert spec.load_size is None and spec.litert_input_size == (256, 256) and not spec.ink
    with pytest.raises(ValueError, match="num_images"):
        raw_input.raw_input_spec(TrainConfig(dataset="folder", data_dir="/none"))
