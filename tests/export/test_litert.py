"""LiteRT embedding models: raw uint8 in, parity with Keras, a full-integer int8 graph calibrated
on training images, photo datasets, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import data as data_lib
from dvml_tf import task
from dvml_tf.export import litert
from dvml_tf.export import verify
from dvml_tf.testing import synthetic_data
from dvml_tf.training.config import TrainConfig


def _keras(model, images, spec):
    raw_form, preprocess = spec
    return model(raw_form.to_model_input(tf.constant(images), preprocess),
                 training=False).numpy()


@pytest.fixture(scope="module")
def omniglot():
    """An unnormalized (N-pair) and a normalized (triplet) tiny model with their LiteRT models."""
    out = {}
    for loss in ("npair", "triplet"):
        config = TrainConfig(embedding_dim=16, loss=loss, classes_per_batch=4)
        keras.utils.set_random_seed(0)
        model = task.build_model(config)
        spec = task.raw_form(config), task.preprocess_config(config)
        splits = synthetic_data.synthetic_raw_splits(*spec, train_classes=30, test_classes=4,
                                                     images_per_class=4)
        calibration = litert.int8_calibration_images(splits.train, *spec, 100,
                                                     classes_per_batch=4)
        models = {q: litert.convert_embedding_model(model, *spec, q, calibration)
                  for q in litert.QUANTIZATIONS}
        out[loss] = (config, model, spec, splits, calibration, models)
    return out


@pytest.mark.parametrize("loss", ["npair", "triplet"])
def test_float_model_matches_keras(omniglot, loss):
    _, model, spec, splits, _, models = omniglot[loss]
    images = splits.test.images
    runner = litert.LiteRTModel(models[litert.FLOAT32])
    assert runner.input_shape == (1, 105, 105, 3) and runner.input["dtype"] == np.uint8
    out = runner(images)
    assert np.isfinite(out).all()
    assert verify.cosine_rows(_keras(model, images, spec), out).min() >= 0.9999
    if model.normalize_embeddings:
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("loss", ["npair", "triplet"])
def test_quantized_models_stay_close_to_keras(omniglot, loss):
    _, model, spec, splits, _, models = omniglot[loss]
    images = splits.test.images
    reference = _keras(model, images, spec)
    dynamic = litert.LiteRTModel(models[litert.DYNAMIC_RANGE])(images)
    assert verify.cosine_rows(reference, dynamic).min() >= 0.999
    int8 = litert.LiteRTModel(models[litert.INT8], normalize=model.normalize_embeddings)(images)
    assert verify.cosine_rows(reference, int8).min() >= 0.99
    if model.normalize_embeddings:
        np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)
    # int8 weights: about a quarter of the float32 flatbuffer.
    assert len(models[litert.DYNAMIC_RANGE]) < 0.4 * len(models[litert.FLOAT32])
    assert len(models[litert.INT8]) < 0.4 * len(models[litert.FLOAT32])


def test_int8_model_is_full_integer(omniglot):
    *_, models = omniglot["npair"]
    ops, tensors = litert.op_types(models[litert.INT8])
    runner = litert.LiteRTModel(models[litert.INT8])
    assert runner.input["dtype"] == np.uint8
    assert runner.outputs["embedding"]["dtype"] == np.float32
    assert "QUANTIZE" in ops and "DEQUANTIZE" in ops
    assert not {"FLOOR", "ROUND", "L2_NORMALIZATION"} & set(ops)
    floats = [name for name, dtype in tensors if dtype == np.float32]
    # Only the cast of the uint8 input (before QUANTIZE) and the dequantized output are float.
    assert len(floats) == 2, floats
    int8 = [name for name, dtype in tensors if dtype == np.int8]
    assert len(int8) > 20


def test_calibration_images_are_the_training_samplers_first_draws(omniglot):
    config, _, _, splits, calibration, _ = omniglot["npair"]
    assert calibration.shape == (100, 105, 105, 3) and calibration.dtype == np.uint8
    sampler = data_lib.ClassBalancedSampler(splits.train.labels, 4, 2, seed=config.seed)
    expected = np.concatenate([sampler.batch_indices(step) for step in range(13)])[:100]
    np.testing.assert_array_equal(calibration, splits.train.images[expected])
    # Training classes only.
    assert set(splits.train.labels[expected]) <= set(splits.train.classes)


def test_photo_dataset_models_take_the_loaders_square_images():
    config = TrainConfig(dataset="cub200", image_size=28, resize_size=32, embedding_dim=8,
                         backbone="convnet_small", classes_per_batch=4)
    keras.utils.set_random_seed(1)
    model = task.build_model(config)
    raw_form, preprocess = task.raw_form(config), task.preprocess_config(config)
    spec = raw_form, preprocess
    assert raw_form.fixed_size(preprocess) == (32, 32) and not raw_form.ink
    assert litert.input_signature(raw_form, preprocess)[0].shape == (1, 32, 32, 3)
    runner = litert.LiteRTModel(litert.convert_embedding_model(model, raw_form, preprocess,
                                                               litert.FLOAT32))
    assert runner.input_shape == (1, 32, 32, 3)
    # A raw photo of another size, as fixed_size_images prepares it (the loader's resize).
    rng = np.random.default_rng(0)
    photos = rng.integers(0, 256, (3, 45, 61, 3), dtype=np.uint8)
    catalog = data_lib.ImageCatalog([0, 0, 1], images=photos)
    small = data_lib.fixed_size_images(catalog, [0, 1, 2], raw_form.fixed_size(preprocess))
    assert small.shape == (3, 32, 32, 3)
    reference = _keras(model, photos, spec)
    assert verify.cosine_rows(reference, runner(small)).min() >= 0.9999


def test_bad_input_is_a_clear_error(omniglot):
    _, model, spec, splits, _, models = omniglot["npair"]
    with pytest.raises(ValueError, match="calibration_images"):
        litert.convert_embedding_model(model, *spec, litert.INT8)
    with pytest.raises(ValueError, match=r"uint8 \[N, 105, 105, 3\]"):
        litert.convert_embedding_model(model, *spec, litert.INT8,
                                       np.zeros((4, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="valid: float32, dynamic_range, int8"):
        litert.convert_embedding_model(model, *spec, "float16")
    runner = litert.LiteRTModel(models[litert.FLOAT32])
    with pytest.raises(ValueError, match=r"uint8 \[N, 105, 105, 3\]"):
        runner(splits.test.images.astype(np.float32))
    with pytest.raises(ValueError, match=r"uint8 \[N, 105, 105, 3\]"):
        runner(splits.test.images[:, :28, :28])


def test_latency_is_a_positive_median(omniglot):
    *_, splits, _, models = omniglot["npair"]
    runner = litert.LiteRTModel(models[litert.FLOAT32])
    assert 0 < runner.latency_ms(splits.test.images[:1], runs=3, warmup=1) < 1000
