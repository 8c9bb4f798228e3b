"""`data.raw_form`: the raw images a client sends vs what the loader stores and the model takes.

`convert_raw` / `RawForm.to_stored` (libpng's gray on every RGB triple, the same pixels eagerly,
in tf.data and in a tf.function); `RawForm.to_model_input` and `RawImagePreprocessor` against
the data layer's own path (load_dataset + make_eval_dataset) for Omniglot (mocked TFDS records)
and photos (the folder layout); the fixed-size (LiteRT) preprocessing; the raw calibration
images (`calibration_images`, `fixed_size_images`)."""

import io
import json
import os
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from dvml_tf import data as data_lib
from dvml_tf import task
from dvml_tf.data import datasets
from dvml_tf.data import raw_form as raw_form_lib
from dvml_tf.data.catalog import ImageCatalog
from dvml_tf.data.preprocessing import PreprocessConfig
from dvml_tf.data.raw_form import NO_CONVERSION
from dvml_tf.data.raw_form import OMNIGLOT_INK
from dvml_tf.data.raw_form import RawForm
from dvml_tf.data.raw_form import RawImagePreprocessor
from dvml_tf.data.raw_form import calibration_images
from dvml_tf.data.raw_form import convert_raw
from dvml_tf.data.raw_form import png_gray
from dvml_tf.data.sampler import ClassBalancedSampler
from dvml_tf.testing import synthetic_data
from dvml_tf.training.config import TrainConfig


def test_png_gray_weights_are_tf_png_decoders():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    rgb[0, :, :] = np.arange(128)[:, np.newaxis] * 2  # R = G = B
    rgb[1, :3] = [[255, 255, 255], [0, 0, 255], [255, 0, 0]]
    decoded = tf.io.decode_png(tf.io.encode_png(rgb), channels=1).numpy()
    ink = convert_raw(rgb, OMNIGLOT_INK).numpy()
    np.testing.assert_array_equal(255 - ink, decoded)


def test_png_gray_is_libpngs_gray_on_all_rgb_triples():
    values = np.arange(2**24, dtype=np.uint32)
    rgb = np.stack([(values >> 16) & 255, (values >> 8) & 255, values & 255], axis=-1)
    rgb = rgb.astype(np.uint8).reshape(4096, 4096, 3)
    # The loader's former path: libpng's own RGB -> gray, by decoding an RGB PNG with 1 channel.
    decoded = tf.io.decode_png(tf.io.encode_png(rgb, compression=0), channels=1).numpy()
    gray = png_gray(rgb).numpy()
    assert gray.dtype == np.uint8 and gray.shape == (4096, 4096, 1)
    np.testing.assert_array_equal(gray, decoded)
    # And the documented integer formula, in numpy.
    pixels = rgb.astype(np.int64)
    formula = (9797 * pixels[..., 0] + 19234 * pixels[..., 1] + 3737 * pixels[..., 2]) >> 15
    np.testing.assert_array_equal(gray[..., 0], formula)


def _reference(images, conversion_kind, size):
    """numpy gray/invert; TF's antialiased bilinear resize (what the loader always used)."""
    images = np.asarray(images)
    if conversion_kind == OMNIGLOT_INK:
        pixels = images.astype(np.int64)
        gray = (9797 * pixels[..., 0] + 19234 * pixels[..., 1] + 3737 * pixels[..., 2]) >> 15
        images = (255 - gray).astype(np.uint8)[..., np.newaxis]
    if size is not None:
        resized = tf.image.resize(images.astype(np.float32), [size, size],
                                  antialias=max(images.shape[-3:-1]) > size).numpy()
        images = np.round(np.clip(resized, 0, 255)).astype(np.uint8)
    return images


CASES = [(OMNIGLOT_INK, 32), (OMNIGLOT_INK, None), (OMNIGLOT_INK, 120), (NO_CONVERSION, 24),
         (NO_CONVERSION, None)]


@pytest.mark.parametrize(("kind", "size"), CASES)
def test_same_pixels_eagerly_in_tf_data_and_in_tf_function(kind, size):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 105, 90, 3), dtype=np.uint8)
    images[0] = 255
    images[0, 30:70, 40:50] = 0  # strokes on white
    expected = _reference(images, kind, size)
    channels = 1 if kind == OMNIGLOT_INK else 3
    height, width = (size, size) if size else (105, 90)
    assert expected.shape == (5, height, width, channels)

    eager_batch = convert_raw(images, kind, size).numpy()
    eager_single = np.stack([convert_raw(image, kind, size).numpy() for image in images])
    dataset = tf.data.Dataset.from_tensor_slices(images).map(
        lambda image: convert_raw(image, kind, size), num_parallel_calls=2, deterministic=True)
    in_map = np.stack(list(dataset.as_numpy_iterator()))
    batched = next(iter(tf.data.Dataset.from_tensor_slices(images).batch(5).map(
        lambda batch: convert_raw(batch, kind, size)))).numpy()
    # Unknown height and width at trace time, as in a SavedModel signature.
    traced = tf.function(lambda batch: convert_raw(batch, kind, size), input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8)])
    in_function = traced(tf.constant(images)).numpy()
    form = RawForm(kind, size)
    for got in (eager_batch, eager_single, in_map, batched, in_function,
                form.to_stored(images).numpy()):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected)


def test_no_conversion_without_size_is_the_identity():
    images = np.random.default_rng(2).integers(0, 256, (2, 7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(convert_raw(images).numpy(), images)
    gray = images[..., :1]
    assert convert_raw(gray, NO_CONVERSION, 7).shape == (2, 7, 7, 1)


def test_raw_form_describes_the_loaders_storage():
    omniglot = RawForm(OMNIGLOT_INK, 32, [105, 105])
    assert omniglot.resized and omniglot.num_channels == 1 and omniglot.raw_size == (105, 105)
    assert omniglot.ink and omniglot.stored_size == 32
    photos = RawForm()
    assert not photos.resized and photos.num_channels == 3 and photos.raw_size is None
    assert not photos.ink
    assert RawForm(OMNIGLOT_INK, 32, (105, 105)) == omniglot


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="valid: none, omniglot_ink"):
        convert_raw(np.zeros((4, 4, 3), np.uint8), "sepia")
    with pytest.raises(ValueError, match="valid: none, omniglot_ink"):
        RawForm("sepia")
    with pytest.raises(ValueError, match="size must be a positive integer"):
        convert_raw(np.zeros((4, 4, 3), np.uint8), size=0)
    with pytest.raises(ValueError, match=r"RawForm\.stored_size"):
        RawForm(stored_size=2.5)
    with pytest.raises(ValueError, match="raw_size"):
        RawForm(raw_size=(105,))
    with pytest.raises(ValueError, match="uint8"):
        convert_raw(np.zeros((4, 4, 3), np.float32), OMNIGLOT_INK)
    with pytest.raises(ValueError, match=r"RGB images \[\.\.\., 3\]"):
        convert_raw(np.zeros((4, 4, 1), np.uint8), OMNIGLOT_INK)
    assert raw_form_lib.converted_channels(NO_CONVERSION, 1) == 1


# ------------------------------------------------------------ raw image -> model input

OMNIGLOT_BOUNDARY = 964


def _omniglot_like(num_images, seed):
    """Raw Omniglot-like images: strokes on white, plus coloured noise (to exercise the RGB ->
    gray weights on R != G != B, which real Omniglot never has)."""
    images = synthetic_data.synthetic_raw_images(
        data_lib.raw_form_of("omniglot"), PreprocessConfig.omniglot(), num_images, seed=seed)
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
        raw_splits = task.load_splits(TrainConfig(dataset="omniglot"), raw=True,
                                      data_dir="/none")
    preprocess = data_lib.PreprocessConfig.omniglot()
    loader_images = np.concatenate([
        images.numpy() for images, _ in data_lib.make_eval_dataset(splits.test, preprocess, 4)])
    return test, loader_images, raw_splits


def test_omniglot_model_input_equals_the_loader(omniglot):
    raw, loader_images, _ = omniglot
    config = TrainConfig(dataset="omniglot", image_size=28, resize_size=32)
    raw_form, preprocess = task.raw_form(config), task.preprocess_config(config)
    assert raw_form.ink and raw_form.stored_size == 32 and raw_form.raw_size == (105, 105)
    served = raw_form.to_model_input(tf.constant(raw), preprocess).numpy()
    assert served.shape == loader_images.shape == (10, 28, 28, 3)
    np.testing.assert_array_equal(served, loader_images)
    # The Keras layer every export puts in front of the embedder: the same pixels.
    layer = RawImagePreprocessor(raw_form, preprocess)
    np.testing.assert_array_equal(layer(tf.constant(raw)).numpy(), loader_images)


def test_omniglot_fixed_size_preprocessing_matches_the_loader(omniglot):
    raw, loader_images, _ = omniglot
    config = TrainConfig(dataset="omniglot")
    raw_form, preprocess = task.raw_form(config), task.preprocess_config(config)
    assert raw_form.fixed_size(preprocess) == (105, 105)
    exact_steps = RawImagePreprocessor(raw_form, preprocess, fixed_size=True)(
        tf.constant(raw)).numpy()
    diff = np.abs(exact_steps - loader_images)
    # Same pixels up to float summation order: a rounding may flip by one gray level.
    assert diff.max() <= 1.0 and diff.mean() < 1e-3
    linear = RawImagePreprocessor(raw_form, preprocess, fixed_size=True, integer_steps=False)(
        tf.constant(raw)).numpy()
    assert np.abs(linear - loader_images).max() <= 1.5
    with pytest.raises(ValueError, match=r"fixed-size input must be \(105, 105\)"):
        RawImagePreprocessor(raw_form, preprocess, fixed_size=True)(tf.constant(raw[:, :50]))


def test_raw_omniglot_splits_are_the_loaders_records_in_rgb(omniglot):
    raw, _, raw_splits = omniglot
    assert raw_splits.test.num_channels == 3 and raw_splits.test.num_images == 10
    np.testing.assert_array_equal(
        np.stack([raw_splits.test.image(i) for i in range(10)]), raw)
    assert raw_splits.test.labels.min() >= OMNIGLOT_BOUNDARY > raw_splits.train.labels.max()


def test_raw_omniglot_splits_carry_the_runs_raw_form(omniglot):
    _, _, raw_splits = omniglot
    config = TrainConfig(dataset="omniglot")
    assert raw_splits.raw and raw_splits.raw_form == data_lib.raw_form_of("omniglot", 32)
    # From the splits or from the loader's rule without them: the same form.
    assert task.raw_form(config, raw_splits) == task.raw_form(config) == raw_splits.raw_form


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
def test_photo_model_input_equals_the_folder_loader(photo_folder, max_decoded_bytes):
    config = TrainConfig(dataset="folder", data_dir=photo_folder, image_size=28, resize_size=32)
    limit = max_decoded_bytes or datasets.MAX_DECODED_BYTES
    with mock.patch.object(datasets, "MAX_DECODED_BYTES", limit):
        splits = data_lib.load_dataset("folder", data_dir=photo_folder, image_size=32)
        raw_splits = task.load_splits(config, raw=True)
        raw_form = task.raw_form(config, raw_splits)
    assert (splits.test.storage == "decoded") == (raw_form.stored_size == 32)
    assert (max_decoded_bytes is None) == (raw_form.stored_size == 32)
    assert raw_form.raw_size is None and not raw_form.ink
    preprocess = data_lib.PreprocessConfig(resize_size=32, crop_size=28)
    assert task.preprocess_config(config) == preprocess
    loader = np.concatenate([
        images.numpy() for images, _ in data_lib.make_eval_dataset(splits.test, preprocess, 8)])
    layer = RawImagePreprocessor(raw_form, preprocess)
    served, from_layer = [], []
    for i in range(raw_splits.test.num_images):
        image = tf.constant(raw_splits.test.image(i))[tf.newaxis]
        served.append(raw_form.to_model_input(image, preprocess)[0])
        from_layer.append(layer(image)[0])
    np.testing.assert_array_equal(np.stack(served), loader)
    np.testing.assert_array_equal(np.stack(from_layer), loader)
    np.testing.assert_array_equal(raw_splits.test.labels, splits.test.labels)


def test_photo_fixed_size_preprocessing_matches_the_any_size_one(photo_folder):
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    config = TrainConfig(dataset="folder", data_dir=photo_folder, image_size=28, resize_size=32)
    preprocess = task.preprocess_config(config)
    raw_form = data_lib.raw_form_of("folder", 32, num_images=12)
    assert raw_form.fixed_size(preprocess) == (32, 32)
    # Fixed-size inputs are the loader's in-memory form: resized to 32 x 32 and rounded.
    small = tf.cast(tf.round(data_lib.preprocessing.resize_square(raw, 32)), tf.uint8)
    np.testing.assert_array_equal(data_lib.fixed_size_images(
        ImageCatalog([0, 0, 1], images=raw), [0, 1, 2], (32, 32)), small.numpy())
    lite = RawImagePreprocessor(raw_form, preprocess, fixed_size=True)(small).numpy()
    np.testing.assert_array_equal(lite, raw_form.to_model_input(tf.constant(raw),
                                                                preprocess).numpy())
    # Another fixed input size goes through the resize matrices.
    other = RawForm(NO_CONVERSION, None, (50, 70))
    assert other.fixed_size(preprocess) == (50, 70)
    lite = RawImagePreprocessor(other, preprocess, fixed_size=True)(tf.constant(raw)).numpy()
    exact = other.to_model_input(tf.constant(raw), preprocess).numpy()
    assert np.abs(lite - exact).max() < 1e-3


def test_fixed_size_of_photos_of_any_size_is_the_loaders_square():
    preprocess = PreprocessConfig(resize_size=256, crop_size=224)
    assert RawForm().fixed_size(preprocess) == (256, 256)  # kept encoded: the resize size
    assert RawForm(NO_CONVERSION, 64).fixed_size(preprocess) == (64, 64)  # held at 64 px
    assert RawForm(OMNIGLOT_INK, 32, (105, 105)).fixed_size(preprocess) == (105, 105)


@pytest.mark.parametrize(("size_in", "size_out", "antialias"),
                         [(105, 32, True), (32, 32, True), (20, 32, False), (50, 32, False)])
def test_resize_matrix_is_tf_resize(size_in, size_out, antialias):
    image = np.random.default_rng(0).uniform(0, 255, (size_in, 7, 1)).astype(np.float32)
    matrix = raw_form_lib.resize_matrix(size_in, size_out, antialias)
    expected = tf.image.resize(image, [size_out, 7], antialias=antialias).numpy()[..., 0]
    np.testing.assert_allclose(matrix @ image[..., 0], expected, atol=1e-4)


def test_shape_check_names_the_expected_form():
    raw_form = task.raw_form(TrainConfig())
    ok = raw_form.check_images(tf.zeros([2, 105, 105, 3], tf.uint8), "sig")
    assert ok.shape == (2, 105, 105, 3)
    for shape in ([2, 28, 28, 3], [105, 105, 3], [1, 105, 105, 4]):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"sig: `images` must be uint8"):
            raw_form.check_images(tf.zeros(shape, tf.uint8), "sig")
    assert raw_form.describe() == ("uint8 RGB images [batch, 105, 105, 3] with dark strokes on "
                                   "white (the raw form of TFDS omniglot)")
    assert RawForm().describe() == "uint8 RGB images [batch, height, width, 3] of any size"
    photos = RawForm().check_images(tf.zeros([1, 7, 9, 3], tf.uint8), "sig")
    assert photos.shape == (1, 7, 9, 3)


def test_raw_form_round_trips_through_a_dict_and_json():
    raw_form = task.raw_form(TrainConfig())
    assert RawForm.from_dict(raw_form.to_dict()) == raw_form
    # The export report stores it as JSON (tuples become lists).
    assert RawForm.from_dict(json.loads(json.dumps(raw_form.to_dict()))) == raw_form


@pytest.mark.parametrize("fixed_size", [False, True])
def test_preprocessor_layer_round_trips_through_its_config(fixed_size):
    raw_form = RawForm(OMNIGLOT_INK, 32, (105, 105))
    preprocess = PreprocessConfig.omniglot()
    layer = RawImagePreprocessor(raw_form, preprocess, fixed_size=fixed_size,
                                 integer_steps=False)
    config = json.loads(json.dumps(layer.get_config()))
    again = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(again, RawImagePreprocessor)
    rebuilt = RawImagePreprocessor.from_config(config)
    for copy in (again, rebuilt):
        assert copy.raw_form == raw_form and copy.preprocess == preprocess
        assert copy.fixed_size == fixed_size and not copy.integer_steps
    images = tf.constant(_omniglot_like(3, seed=4))
    np.testing.assert_array_equal(rebuilt(images).numpy(), layer(images).numpy())
    assert layer.compute_output_shape((None, 105, 105, 3)) == (None, 28, 28, 3)


# ------------------------------------------------------------------- calibration images

def _png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def raw_photo_catalog(num_classes=6, per_class=3, sizes=((20, 20), (31, 26), (14, 40))):
    """Encoded raw RGB photos of the given sizes (in turn); returns the catalog and the decoded
    images."""
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), np.uint8)
              for i in range(num_classes * per_class)]
    labels = np.repeat(np.arange(num_classes) * 3 + 2, per_class)
    return ImageCatalog(labels, sources=[_png_bytes(image) for image in images]), images


def test_calibration_images_are_the_samplers_first_draws_raw_and_deterministic():
    catalog, images = raw_photo_catalog(sizes=((21, 26),))
    sampler = ClassBalancedSampler(catalog.labels, classes_per_batch=4, images_per_class=2,
                                   seed=3)
    samples = calibration_images(catalog, sampler, num_images=19, start_step=2)
    assert samples.dtype == np.uint8 and samples.shape == (19, 21, 26, 3)
    drawn = np.concatenate([sampler.batch_indices(step) for step in (2, 3, 4)])[:19]
    for sample, index in zip(samples, drawn, strict=True):
        np.testing.assert_array_equal(sample, images[index])  # raw: size and pixels kept
    again = calibration_images(catalog, sampler, num_images=19, start_step=2)
    np.testing.assert_array_equal(samples, again)


def test_calibration_images_at_a_fixed_size_are_resized_as_the_loader_does():
    catalog, images = raw_photo_catalog()
    sampler = ClassBalancedSampler(catalog.labels, classes_per_batch=3, images_per_class=2)
    samples = calibration_images(catalog, sampler, 12, size=(20, 20))
    assert samples.shape == (12, 20, 20, 3) and samples.dtype == np.uint8
    drawn = np.concatenate([sampler.batch_indices(step) for step in range(2)])
    for sample, index in zip(samples, drawn, strict=True):
        image = images[index]
        if image.shape[:2] == (20, 20):
            np.testing.assert_array_equal(sample, image)
        else:
            shrinks = max(image.shape[:2]) > 20
            expected = tf.image.resize(image.astype(np.float32), [20, 20],
                                       antialias=shrinks).numpy()
            np.testing.assert_array_equal(sample, np.round(np.clip(expected, 0, 255)))


def test_calibration_rejects_bad_input():
    catalog, _ = raw_photo_catalog()
    sampler = ClassBalancedSampler(catalog.labels, 2, 2)
    gray = ImageCatalog(np.repeat(np.arange(3), 2), images=np.zeros((6, 20, 20, 1), np.uint8),
                        num_channels=1)
    gray_sampler = ClassBalancedSampler(gray.labels, 2, 2)
    with pytest.raises(ValueError, match="raw RGB images"):
        calibration_images(gray, gray_sampler, 4, size=(20, 20))
    with pytest.raises(ValueError, match="not RGB"):
        calibration_images(gray, gray_sampler, 4)
    with pytest.raises(ValueError, match="different sizes"):
        calibration_images(catalog, sampler, 4)  # photos of several sizes need a size
    with pytest.raises(ValueError, match="built on 18 labels"):
        calibration_images(gray, sampler)
    with pytest.raises(ValueError, match="num_images must be an integer >= 1"):
        calibration_images(catalog, sampler, num_images=0, size=(20, 20))
