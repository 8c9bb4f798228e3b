"""`convert_raw` (raw images -> what the loader stores): libpng's gray on every RGB triple, the
same pixels eagerly, in tf.data and in a tf.function, and `StoredForm`."""

import numpy as np
import pytest
import tensorflow as tf

from dvml_tf.data import conversion
from dvml_tf.data.conversion import NO_CONVERSION
from dvml_tf.data.conversion import OMNIGLOT_INK
from dvml_tf.data.conversion import StoredForm
from dvml_tf.data.conversion import convert_raw
from dvml_tf.data.conversion import png_gray


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
    form = StoredForm(kind, size)
    for got in (eager_batch, eager_single, in_map, batched, in_function,
                form.convert(images).numpy()):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected)


def test_no_conversion_without_size_is_the_identity():
    images = np.random.default_rng(2).integers(0, 256, (2, 7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(convert_raw(images).numpy(), images)
    gray = images[..., :1]
    assert convert_raw(gray, NO_CONVERSION, 7).shape == (2, 7, 7, 1)


def test_stored_form_describes_the_loaders_storage():
    omniglot = StoredForm(OMNIGLOT_INK, 32, [105, 105])
    assert omniglot.resized and omniglot.num_channels == 1 and omniglot.raw_size == (105, 105)
    photos = StoredForm()
    assert not photos.resized and photos.num_channels == 3 and photos.raw_size is None
    assert StoredForm(OMNIGLOT_INK, 32, (105, 105)) == omniglot


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="valid: none, omniglot_ink"):
        convert_raw(np.zeros((4, 4, 3), np.uint8), "sepia")
    with pytest.raises(ValueError, match="valid: none, omniglot_ink"):
        StoredForm("sepia")
    with pytest.raises(ValueError, match="size must be a positive integer"):
        convert_raw(np.zeros((4, 4, 3), np.uint8), size=0)
    with pytest.raises(ValueError, match=r"StoredForm\.size"):
        StoredForm(size=2.5)
    with pytest.raises(ValueError, match="raw_size"):
        StoredForm(raw_size=(105,))
    with pytest.raises(ValueError, match="uint8"):
        convert_raw(np.zeros((4, 4, 3), np.float32), OMNIGLOT_INK)
    with pytest.raises(ValueError, match=r"RGB images \[\.\.\., 3\]"):
        convert_raw(np.zeros((4, 4, 1), np.uint8), OMNIGLOT_INK)
    assert conversion.converted_channels(NO_CONVERSION, 1) == 1
