"""The inference model every export converts: raw-form preprocessing, then the model's own
embedder; and embedding a raw catalog through it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import data as data_lib
from dvml_tf import task
from dvml_tf.export import inference as inference_lib
from dvml_tf.export import verify
from dvml_tf.testing import synthetic_data
from dvml_tf.training.config import TrainConfig


@pytest.fixture(scope="module", params=["npair", "triplet"])
def built(request):
    """An unnormalized (N-pair) and a normalized (triplet) tiny model, with raw test images."""
    config = TrainConfig(embedding_dim=16, loss=request.param)
    keras.utils.set_random_seed(0)
    model = task.build_model(config)
    raw_form, preprocess = task.raw_form(config), task.preprocess_config(config)
    splits = synthetic_data.synthetic_raw_splits(raw_form, preprocess, train_classes=1,
                                                 test_classes=3, images_per_class=3)
    return model, raw_form, preprocess, splits


def test_is_the_preprocessor_then_the_models_own_embedder(built):
    model, raw_form, preprocess, splits = built
    inference = inference_lib.inference_model(model, raw_form, preprocess)
    assert isinstance(inference, keras.Sequential)
    preprocessor, embedder = inference.layers
    assert isinstance(preprocessor, data_lib.RawImagePreprocessor)
    assert preprocessor.raw_form == raw_form and preprocessor.preprocess == preprocess
    assert not preprocessor.fixed_size
    assert embedder is model.embedder  # shared, not copied
    assert {id(w) for w in inference.weights} == {id(w) for w in model.embedder.weights}
    (images_input,) = inference.inputs
    assert images_input.dtype == "uint8" and tuple(images_input.shape) == (None, None, None, 3)
    images = tf.constant(splits.test.images)
    expected = model(raw_form.to_model_input(images, preprocess), training=False).numpy()
    got = inference(images, training=False).numpy()
    assert got.shape == (9, 16)
    assert np.max(np.abs(got - expected)) == 0.0


def test_fixed_size_matches_the_model_within_litert_float_tolerance(built):
    model, raw_form, preprocess, splits = built
    inference = inference_lib.inference_model(model, raw_form, preprocess, fixed_size=True)
    assert inference.layers[0].fixed_size and inference.layers[1] is model.embedder
    assert tuple(inference.inputs[0].shape) == (None, 105, 105, 3)
    images = tf.constant(splits.test.images)
    expected = model(raw_form.to_model_input(images, preprocess), training=False).numpy()
    got = inference(images, training=False).numpy()
    assert verify.cosine_rows(expected, got).min() >= 0.9999
    # The preprocessing alone: the same pixels up to one gray level of rounding.
    pixels = inference.layers[0](images).numpy()
    assert np.abs(pixels - raw_form.to_model_input(images, preprocess).numpy()).max() <= 1.0


def test_without_normalization_it_stops_at_z_inv(built):
    model, raw_form, preprocess, splits = built
    inference = inference_lib.inference_model(model, raw_form, preprocess, normalize=False)
    images = tf.constant(splits.test.images)
    model_input = raw_form.to_model_input(images, preprocess)
    z_inv = model.embedding_head(model.backbone(model_input, training=False)).numpy()
    got = inference(images, training=False).numpy()
    np.testing.assert_allclose(got, z_inv, rtol=1e-6, atol=1e-6)
    expected = model(model_input, training=False).numpy()
    if model.normalize_embeddings:
        assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
        np.testing.assert_allclose(got / np.linalg.norm(got, axis=1, keepdims=True), expected,
                                   atol=1e-6)
    else:
        np.testing.assert_array_equal(got, expected)


def test_embed_raw_equals_the_model_on_converted_images(built):
    model, raw_form, preprocess, splits = built
    inference = inference_lib.inference_model(model, raw_form, preprocess)
    embeddings, labels = inference_lib.embed_raw(inference, splits.test, batch_size=4)
    expected = model(raw_form.to_model_input(tf.constant(splits.test.images), preprocess),
                     training=False).numpy()
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    np.testing.assert_array_equal(labels, splits.test.labels)
    some, some_labels = inference_lib.embed_raw(inference, splits.test, indices=[4, 1])
    np.testing.assert_allclose(some, expected[[4, 1]], atol=1e-5)
    np.testing.assert_array_equal(some_labels, splits.test.labels[[4, 1]])
    with pytest.raises(ValueError, match="nothing to embed"):
        inference_lib.embed_raw(inference, splits.test, indices=[])


def test_embed_raw_takes_photos_of_different_sizes():
    config = TrainConfig(dataset="folder", data_dir="/none", image_size=12, resize_size=16,
                         embedding_dim=8)
    keras.utils.set_random_seed(0)
    model = task.build_model(config)
    raw_form, preprocess = data_lib.RawForm(), task.preprocess_config(config)
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, size, dtype=np.uint8) for size in
              ((20, 30, 3), (16, 16, 3), (40, 21, 3))]
    catalog = data_lib.ImageCatalog(
        [0, 1, 1], sources=[tf.io.encode_png(p).numpy() for p in photos])
    inference = inference_lib.inference_model(model, raw_form, preprocess)
    embeddings, _ = inference_lib.embed_raw(inference, catalog)
    for photo, embedding in zip(photos, embeddings, strict=True):
        expected = model(raw_form.to_model_input(tf.constant(photo[np.newaxis]), preprocess),
                         training=False).numpy()[0]
        np.testing.assert_allclose(embedding, expected, atol=1e-5)
