"""Preprocessing: shapes, ranges, crops against numpy references, determinism, eager vs tf.data."""

import numpy as np
import pytest
import tensorflow as tf

from dvml_tf.data.preprocessing import PreprocessConfig
from dvml_tf.data.preprocessing import preprocess_test
from dvml_tf.data.preprocessing import preprocess_test_batch
from dvml_tf.data.preprocessing import preprocess_train

PAPER = PreprocessConfig.paper()
OMNIGLOT = PreprocessConfig.omniglot()


def random_image(height, width, channels, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)


def find_window(big, small):
    """Offsets (y, x) and flip flag where `small` equals a window of `big` (numpy reference)."""
    size = small.shape[0]
    hits = []
    for flip in (False, True):
        candidate = small[:, ::-1] if flip else small
        for y in range(big.shape[0] - size + 1):
            for x in range(big.shape[1] - size + 1):
                # Cheap first-row test before the full comparison.
                if (np.array_equal(big[y, x:x + size], candidate[0])
                        and np.array_equal(big[y:y + size, x:x + size], candidate)):
                    hits.append((y, x, flip))
    return hits


@pytest.mark.parametrize("shape", [(13, 40, 3), (300, 200, 3), (500, 333, 1)])
def test_train_output_shape_dtype_range(shape):
    image = random_image(*shape)
    out = preprocess_train(tf.constant(image), tf.constant([1, 2], tf.int64), PAPER).numpy()
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    if shape[-1] == 1:
        np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_train_crop_is_a_window_of_the_resized_image_and_flips_sometimes():
    # A 256 x 256 input makes the resize an identity, so crops can be located exactly.
    image = random_image(256, 256, 3, seed=1)
    flips = set()
    offsets = set()
    for seed in range(12):
        out = preprocess_train(tf.constant(image), tf.constant([seed, 7], tf.int64), PAPER)
        hits = find_window(image.astype(np.float32), out.numpy())
        assert len(hits) == 1, hits
        offsets.add(hits[0][:2])
        flips.add(hits[0][2])
    assert flips == {False, True}
    assert len(offsets) > 6


def test_omniglot_train_never_flips_and_tiles_gray():
    image = random_image(32, 32, 1, seed=2)
    offsets = set()
    for seed in range(40):
        out = preprocess_train(tf.constant(image), tf.constant([seed, 0], tf.int64), OMNIGLOT)
        out = out.numpy()
        assert out.shape == (28, 28, 3)
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        hits = find_window(image[..., 0].astype(np.float32), out[..., 0])
        assert hits and all(not flip for _, _, flip in hits)
        offsets.add(hits[0][:2])
    assert len(offsets) > 10  # 25 possible offsets


def test_train_is_deterministic_under_the_seed():
    image = tf.constant(random_image(100, 150, 3))
    a = preprocess_train(image, tf.constant([3, 4], tf.int64), PAPER)
    b = preprocess_train(image, tf.constant([3, 4], tf.int64), PAPER)
    c = preprocess_train(image, tf.constant([3, 5], tf.int64), PAPER)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


@pytest.mark.parametrize("config", [PAPER, OMNIGLOT], ids=["paper", "omniglot"])
def test_eager_equals_tf_data_map(config):
    channels = 1 if config is OMNIGLOT else 3
    images = [random_image(40 + 7 * i, 60 - 3 * i, channels, seed=i) for i in range(4)]
    eager_train = [preprocess_train(tf.constant(im), tf.constant([9, i], tf.int64), config)
                   for i, im in enumerate(images)]
    eager_test = [preprocess_test(tf.constant(im), config) for im in images]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(images), output_signature=tf.TensorSpec([None, None, channels], tf.uint8))
    dataset = dataset.enumerate().map(
        lambda i, im: (preprocess_train(im, tf.stack([tf.constant(9, tf.int64), i]), config),
                       preprocess_test(im, config)),
        num_parallel_calls=2)
    for (train, test), want_train, want_test in zip(dataset, eager_train, eager_test,
                                                    strict=True):
        np.testing.assert_array_equal(train.numpy(), want_train.numpy())
        np.testing.assert_array_equal(test.numpy(), want_test.numpy())


def test_test_transform_is_the_centre_crop():
    image = random_image(256, 256, 3, seed=4)
    out = preprocess_test(tf.constant(image), PAPER).numpy()
    np.testing.assert_array_equal(out, image[16:240, 16:240].astype(np.float32))
    gray = random_image(32, 32, 1, seed=5)
    out = preprocess_test(tf.constant(gray), OMNIGLOT).numpy()
    np.testing.assert_array_equal(out, np.repeat(gray[2:30, 2:30], 3, -1).astype(np.float32))


def test_resize_ignores_the_aspect_ratio():
    # Left half black, right half white, 100 x 400: after a square resize the boundary is still
    # in the middle of the width.
    image = np.zeros((100, 400, 3), np.uint8)
    image[:, 200:] = 255
    out = preprocess_test(tf.constant(image), PAPER).numpy()
    assert out.shape == (224, 224, 3)
    assert out[:, :100].max() < 1e-3 and out[:, 124:].min() > 255 - 1e-3


@pytest.mark.parametrize("channels", [1, 3])
def test_batch_transform_in_a_graph_with_unknown_channels(channels):
    # The SavedModel export feeds uint8 [B, H, W, C] with C unknown at trace time.
    transform = tf.function(lambda x: preprocess_test_batch(x, PAPER),
                            input_signature=[tf.TensorSpec([None, None, None, None], tf.uint8)])
    batch = np.stack([random_image(64, 80, channels, seed=s) for s in range(3)])
    out = transform(tf.constant(batch)).numpy()
    assert out.shape == (3, 224, 224, 3) and out.dtype == np.float32
    for i in range(3):
        np.testing.assert_allclose(out[i], preprocess_test(tf.constant(batch[i]), PAPER).numpy(),
                                   atol=1e-4)


@pytest.mark.parametrize("shape", [(100, 180), (256, 256), (300, 500), (400, 120)])
def test_resize_matches_the_antialiased_resize(shape):
    # The pipeline skips antialiasing when no axis shrinks; the pixels must not change.
    image = random_image(*shape, 3, seed=6)
    reference = tf.image.resize(image, [256, 256], antialias=True).numpy()
    got = preprocess_test(tf.constant(image), PAPER).numpy()
    np.testing.assert_allclose(got, np.clip(reference, 0, 255)[16:240, 16:240], atol=1e-3)
    dynamic = tf.function(lambda x: preprocess_test_batch(x, PAPER),
                          input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    np.testing.assert_allclose(dynamic(image[None]).numpy()[0], got, atol=1e-3)


def test_bad_config():
    with pytest.raises(ValueError, match="crop_size=300"):
        PreprocessConfig(resize_size=256, crop_size=300)
