"""The research variants of the synthesis (research/dvml_omniglot/variants.py): what L_syn's
gradient does to the variance heads ("stop", "reverse"), the unit-norm centre ("unit"), the
embedded decoder deviation ("decoded"), and that they build, save and load like the product
model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import losses as losses_lib
from dvml_tf import models
from dvml_tf import task
from dvml_tf.training.config import TrainConfig
from research.dvml_omniglot import variants
from tests.models.test_dvml_model import EMBEDDING_DIM
from tests.models.test_dvml_model import batch
from tests.models.test_dvml_model import tiny_backbone

ONLY_SYN = (0.0, 0.0, 1.0, 0.0)


def make_model(variant=None, seed=0, **kwargs):
    """The product DVMLModel (variant None) or a research variant, same initial weights."""
    keras.utils.set_random_seed(seed)
    kwargs.setdefault("metric_loss", "npair")
    kwargs.setdefault("embedding_dim", EMBEDDING_DIM)
    kwargs.setdefault("num_samples", 3)
    if variant is None:
        model = models.DVMLModel(tiny_backbone(), **kwargs)
    else:
        model = variants.ResearchDVMLModel(tiny_backbone(), research_variant=variant, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    return model


def test_synthesis_gradient_modes_reach_the_variance_heads_as_documented():
    images, labels = batch()

    def head_gradients(variant):
        model = make_model(variant, phase1_steps=0, phase1_weights=ONLY_SYN,
                           phase2_weights=ONLY_SYN)
        with tf.GradientTape() as tape:
            objective, _ = model.loss_terms(images, labels)
        variables = {"mean": model.mean_head.kernel, "backbone": model.backbone.weights[0],
                     "z_inv": model.embedding_head.kernel}
        return {k: g.numpy() if g is not None else None
                for k, g in tape.gradient(objective, variables).items()}

    # The product model is the "full" gradient: L_syn reaches the heads as it reaches z_I.
    full, stop, reverse = head_gradients(None), head_gradients("stop"), head_gradients("reverse")
    assert np.abs(full["mean"]).sum() > 0
    assert stop["mean"] is None or np.abs(stop["mean"]).sum() == 0
    np.testing.assert_allclose(reverse["mean"], -full["mean"], rtol=1e-5, atol=1e-8)
    # The adversary is the heads only: the backbone and z_I learn from L_syn as before.
    np.testing.assert_allclose(reverse["z_inv"], full["z_inv"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(stop["z_inv"], full["z_inv"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(reverse["backbone"], stop["backbone"], rtol=1e-5, atol=1e-8)


def test_stop_and_reverse_change_gradients_not_values():
    images, labels = batch()
    _, paper = make_model(phase1_steps=0).loss_terms(images, labels)
    for variant in ("stop", "reverse"):
        _, logs = make_model(variant, phase1_steps=0).loss_terms(images, labels)
        for key in ("loss", "kl", "recon", "metric_inv", "metric_syn", "z_var_norm"):
            assert float(logs[key]) == pytest.approx(float(paper[key]), rel=1e-6), (variant, key)


def test_unit_centre_shapes_the_synthesized_samples():
    images, labels = batch()
    _, paper = make_model(phase1_steps=0).loss_terms(images, labels)
    unit_model = make_model("unit", phase1_steps=0)
    _, unit = unit_model.loss_terms(images, labels)
    assert float(unit["metric_syn"]) != float(paper["metric_syn"])
    # What is synthesized, on an independent computation: normalize(z_I) + z_V, for the decoder
    # and for L_syn alike.
    z_inv = tf.constant([[3.0, 4.0], [0.0, -2.0]])
    z_var = tf.constant(np.random.default_rng(0).normal(size=(5, 2, 2)), tf.float32)
    decoder_input, metric_input = unit_model.synthesize(z_inv, z_var, None, None)
    expected = np.array([[0.6, 0.8], [0.0, -1.0]]) + z_var.numpy()
    np.testing.assert_allclose(decoder_input.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(metric_input.numpy(), expected, rtol=1e-6)
    # The variance scale still scales z_V only; KL is measured against N(0, s^2 I).
    _, scaled = make_model("unit", phase1_steps=0, variance_scale=0.1).loss_terms(images, labels)
    assert float(scaled["z_var_norm"]) == pytest.approx(0.1 * float(unit["z_var_norm"]), 1e-5)
    assert float(scaled["kl"]) == pytest.approx(float(unit["kl"]), 1e-6)


def _decoded_model(**kwargs):
    model = make_model("decoded", phase1_steps=0, reconstruction="standardized_squares",
                       decoder_centre="class_mean", **kwargs)
    # Running feature statistics far from 1, so that un-standardizing matters.
    variance = np.linspace(0.5, 4.0, model.feature_dim).astype("float32")
    model.feature_variance.assign(variance)
    return model, variance


def _decode(model, codes):
    """The model's decoder on numpy codes [..., J] -> [..., F]."""
    flat = model.decoder(tf.constant(codes.reshape(-1, EMBEDDING_DIM), tf.float32)).numpy()
    return flat.reshape(*codes.shape[:-1], -1)


def test_decoded_synthesis_embeds_the_decoders_feature_deviation():
    model, variance = _decoded_model()
    rng = np.random.default_rng(0)
    z_inv = tf.constant(rng.normal(size=(4, EMBEDDING_DIM)), tf.float32)
    centre = tf.constant(rng.normal(size=(4, EMBEDDING_DIM)), tf.float32)
    z_var = tf.constant(rng.normal(size=(3, 4, EMBEDDING_DIM)), tf.float32)
    labels = tf.constant([0, 0, 1, 1])
    batch = models.dvml_model._Batch(labels)
    decoder_input, metric_input = model.synthesize(z_inv, z_var, None, None, centre=centre,
                                                   batch=batch)
    np.testing.assert_allclose(decoder_input.numpy(), centre.numpy() + z_var.numpy(), rtol=1e-6)
    # Independently: un-standardize the decoder's outputs, take the difference, apply W.
    scale = np.sqrt(variance + 1e-3 * variance.mean() + 1e-8)
    kernel = model.embedding_head.kernel.numpy()
    deviation = (_decode(model, centre.numpy() + z_var.numpy())
                 - _decode(model, centre.numpy())[None]) * scale
    np.testing.assert_allclose(metric_input.numpy(), z_inv.numpy() + deviation @ kernel,
                               rtol=1e-4, atol=1e-5)
    # With variance transfer, each image's code is z_V of an image of another class.
    transfer = make_model("decoded", variance_transfer=True)
    _, transferred = transfer.synthesize(z_inv, z_var, None, None, centre=centre, batch=batch)
    partners = losses_lib.synthesis.other_class_partners(
        labels, transfer._step_seed(models.dvml_model._PARTNERS)).numpy()
    assert (labels.numpy()[partners] != labels.numpy()).all()
    expected = z_inv.numpy() + (
        _decode(transfer, centre.numpy() + z_var.numpy()[:, partners])
        - _decode(transfer, centre.numpy())[None]) @ transfer.embedding_head.kernel.numpy()
    np.testing.assert_allclose(transferred.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_decoded_synthesis_trains_the_embedding_not_the_decoder_or_the_heads():
    images, labels = batch()
    model, _ = _decoded_model(phase1_weights=ONLY_SYN, phase2_weights=ONLY_SYN)
    with tf.GradientTape() as tape:
        objective, logs = model.loss_terms(images, labels)
    parts = {"decoder": model.decoder.trainable_variables, "mean": [model.mean_head.kernel],
             "backbone": model.backbone.trainable_variables,
             "head": [model.embedding_head.kernel]}
    gradients = tape.gradient(objective, parts)
    norm = {k: sum(0.0 if g is None else float(tf.reduce_sum(tf.abs(g))) for g in v)
            for k, v in gradients.items()}
    assert float(logs["metric_syn"]) > 0
    assert norm["decoder"] == 0 and norm["mean"] == 0
    assert norm["backbone"] > 0 and norm["head"] > 0


def test_an_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown research_variant 'half'; valid: unit, stop, "
                                         "reverse"):
        make_model("half")


def test_inference_is_the_product_models():
    images, _ = batch()
    product = make_model(seed=2)
    for variant in variants.VARIANTS:
        model = make_model(variant, seed=2)
        np.testing.assert_array_equal(model(images).numpy(), product(images).numpy())
        assert model.embedder is not product.embedder


def test_a_variant_saves_and_loads_with_its_variant(tmp_path):
    images, labels = batch()
    model = make_model("reverse", phase1_steps=1)
    model.train_step((images, labels))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded) is variants.ResearchDVMLModel and loaded.research_variant == "reverse"
    assert int(loaded.step_counter.numpy()) == 1
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), rtol=1e-6)
    assert model.get_config()["research_variant"] == "reverse"


def test_model_builder_builds_the_variant_from_a_configuration():
    assert variants.model_builder(None) is None  # the product model
    config = TrainConfig(embedding_dim=8, variance_scale=0.3)
    model = variants.model_builder("stop")(config)
    assert type(model) is variants.ResearchDVMLModel and model.research_variant == "stop"
    assert model.embedding_dim == 8 and model.variance_scale == 0.3
    product = task.build_model(config)
    assert type(product) is models.DVMLModel
