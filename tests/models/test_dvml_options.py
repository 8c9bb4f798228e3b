"""The options that make DVML's variance branch informative: where each sends (or stops) which
gradient, the values they compute (by hand), and the null control (DVML with only L_inv is the
baseline)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import losses
from dvml_tf import models
from tests.models.test_dvml_model import batch
from tests.models.test_dvml_model import make_model
from tests.models.test_dvml_model import tiny_backbone

ONLY = {name: tuple(float(i == j) for j in range(4))
        for i, name in enumerate(("kl", "recon", "syn", "inv"))}


def gradients(model, images, labels, variables):
    with tf.GradientTape() as tape:
        objective, _ = model.loss_terms(images, labels)
    grads = tape.gradient(objective, variables)
    return {part: sum(0.0 if g is None else float(tf.reduce_sum(tf.abs(g))) for g in part_grads)
            for part, part_grads in grads.items()}


def parts(model):
    return {"backbone": model.backbone.trainable_variables,
            "z_inv_head": model.embedding_head.trainable_variables,
            "mean_head": model.mean_head.trainable_variables,
            "log_variance_head": model.log_variance_head.trainable_variables,
            "decoder": model.decoder.trainable_variables}


def test_null_control_dvml_with_only_the_invariant_loss_is_the_baseline():
    images, _ = batch(num_classes=4, images_per_class=2)
    weights = ONLY["inv"]
    results = []
    for use_dvml in (False, True):
        model = make_model(seed=3, use_dvml=use_dvml, phase1_steps=2, phase1_weights=weights,
                           phase2_weights=weights)
        for step in range(4):
            model.train_step(batch(num_classes=4, images_per_class=2, seed=step))
        results.append(model(images).numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_detached_variance_heads_keep_the_kl_off_the_backbone():
    weights = ONLY["kl"]
    model = make_model(phase1_steps=0, phase1_weights=weights, phase2_weights=weights,
                       detach_variance_heads=True)
    grads = gradients(model, *batch(), parts(model))
    assert grads["backbone"] == 0.0 and grads["z_inv_head"] == 0.0
    assert grads["mean_head"] > 0
    attached = make_model(phase1_steps=0, phase1_weights=weights, phase2_weights=weights)
    assert gradients(attached, *batch(), parts(attached))["backbone"] > 0
    # The reconstruction still reaches the backbone through the decoder's z_I (phase 2) unless
    # the decoder reads the class mean instead (next test).
    weights = ONLY["recon"]
    model = make_model(phase1_steps=0, phase1_weights=weights, phase2_weights=weights,
                       detach_variance_heads=True)
    assert gradients(model, *batch(), parts(model))["backbone"] > 0


def test_class_mean_decoding_keeps_the_reconstruction_off_z_inv_in_phase_2():
    weights = ONLY["recon"]
    model = make_model(phase1_steps=0, phase1_weights=weights, phase2_weights=weights,
                       decoder_centre="class_mean", detach_variance_heads=True)
    grads = gradients(model, *batch(), parts(model))
    assert grads["z_inv_head"] == 0.0 and grads["backbone"] == 0.0
    assert grads["mean_head"] > 0 and grads["decoder"] > 0


def test_class_mean_centre_is_the_leave_one_out_mean_by_hand():
    model = make_model(decoder_centre="class_mean", metric_loss="triplet")
    labels = tf.constant([0, 0, 0, 1, 1, 2])
    z_inv = tf.constant(np.arange(12, dtype=np.float32).reshape(6, 2))
    centre = model._decoder_centre(z_inv, z_inv, models.dvml_model._Batch(labels)).numpy()
    z = z_inv.numpy()
    np.testing.assert_allclose(centre[0], (z[1] + z[2]) / 2)
    np.testing.assert_allclose(centre[3], z[4])
    np.testing.assert_allclose(centre[5], z[5])  # alone in its class: its own


def test_variance_transfer_uses_another_class_and_keeps_l_syn_off_the_variance_heads():
    weights = ONLY["syn"]
    model = make_model(phase1_steps=0, phase1_weights=weights, phase2_weights=weights,
                       variance_transfer=True)
    grads = gradients(model, *batch(), parts(model))
    assert grads["mean_head"] == 0.0 and grads["log_variance_head"] == 0.0
    assert grads["z_inv_head"] > 0 and grads["backbone"] > 0
    labels = tf.constant(np.repeat(np.arange(5), 2))
    partners = losses.synthesis.other_class_partners(labels, tf.constant([0, 7], tf.int64))
    assert np.all(tf.gather(labels, partners).numpy() != labels.numpy())


def test_free_bits_remove_the_pressure_below_the_floor():
    weights = ONLY["kl"]
    model = make_model(phase1_steps=0, phase1_weights=weights, phase2_weights=weights,
                       kl_free_bits=1e6)
    grads = gradients(model, *batch(), parts(model))
    assert grads["mean_head"] == 0.0 and grads["log_variance_head"] == 0.0
    images, labels = batch()
    objective, logs = model.loss_terms(images, labels)
    # Every dimension sits at the floor: the objective is J * floor.
    assert float(objective) == pytest.approx(model.embedding_dim * 1e6, rel=1e-6)
    low = make_model(phase1_steps=0, phase1_weights=weights, phase2_weights=weights,
                     kl_free_bits=1e-9)
    assert float(low.loss_terms(images, labels)[0]) == pytest.approx(float(logs["kl"]), 1e-5)


def test_kl_warmup_ramps_the_kl_weight_over_phase_1():
    weights = ONLY["kl"]
    images, labels = batch()
    model = make_model(phase1_steps=4, phase1_weights=weights, phase2_weights=weights,
                       kl_warmup=True)
    for step, fraction in ((0, 0.0), (1, 0.25), (3, 0.75), (4, 1.0), (9, 1.0)):
        model.step_counter.assign(step)
        objective, logs = model.loss_terms(images, labels)
        assert float(objective) == pytest.approx(fraction * float(logs["kl"]), rel=1e-5, abs=1e-9)


def test_standardized_reconstruction_by_hand():
    model = make_model(reconstruction="standardized_squares", phase1_steps=0,
                       phase1_weights=ONLY["recon"], phase2_weights=ONLY["recon"])
    images, labels = batch()
    features = model.backbone(images).numpy()
    target, error = model._reconstruction_target(tf.constant(features),
                                                 models.dvml_model._Batch(labels), True)
    # The first step takes the batch statistics.
    np.testing.assert_allclose(model.feature_mean.numpy(), features.mean(0), rtol=1e-5)
    np.testing.assert_allclose(model.feature_variance.numpy(), features.var(0), rtol=1e-4)
    floor = 1e-3 * features.var(0).mean() + 1e-8
    expected = (features - features.mean(0)) / np.sqrt(features.var(0) + floor)
    np.testing.assert_allclose(target.numpy(), expected, rtol=1e-4, atol=1e-5)
    reconstruction = np.zeros_like(expected)
    np.testing.assert_allclose(error(target, reconstruction).numpy(),
                               0.5 * np.sum(np.asarray(target) ** 2, axis=-1), rtol=1e-5)


def test_intra_class_scale_multiplies_z_var_by_the_rms_deviation():
    images, labels = batch()
    plain = make_model(phase1_steps=0)
    scaled = make_model(phase1_steps=0, scale_to_intra_class=True)
    _, plain_logs = plain.loss_terms(images, labels)
    _, scaled_logs = scaled.loss_terms(images, labels)
    z_inv = scaled.embedding_head(scaled.backbone(images)).numpy()
    centres = np.stack([z_inv[labels.numpy() == y].mean(0) for y in labels.numpy()])
    rms = np.sqrt(np.mean(np.sum((z_inv - centres) ** 2, axis=-1)))
    assert float(scaled_logs["z_var_norm"]) == pytest.approx(
        rms * float(plain_logs["z_var_norm"]), rel=1e-4)


def test_diagnostics_logs_by_hand():
    model = make_model(phase1_steps=0)
    images, labels = batch()
    _, logs, details = model.loss_terms(images, labels, details=True)
    mean = details["mean"].numpy()
    expected_active = np.sum(np.var(mean, axis=0) > models.ACTIVE_UNIT_VARIANCE)
    assert float(logs["active_units"]) == expected_active
    assert float(logs["recon_shuffled"]) == pytest.approx(
        float(np.mean(details["recon_shuffled"])), rel=1e-6)
    assert float(logs["syn_to_inv"]) == pytest.approx(
        float(logs["metric_syn"]) / float(logs["metric_inv"]), rel=1e-6)
    # A decoder that ignores z_V reconstructs equally well from another image's z_V.
    for layer in model.decoder.layers:
        layer.kernel.assign(tf.zeros_like(layer.kernel))
    _, logs = model.loss_terms(images, labels)
    assert float(logs["recon_shuffled"]) == pytest.approx(float(logs["recon"]), rel=1e-6)


def test_options_round_trip_through_model_keras(tmp_path):
    options = dict(reconstruction="standardized_squares", detach_variance_heads=True,
                   kl_free_bits=0.2, kl_warmup=True, decoder_centre="class_mean",
                   variance_transfer=True, scale_to_intra_class=True)
    model = make_model(**options)
    model.train_step(batch())
    path = str(tmp_path / "m.keras")
    model.save(path)
    restored = keras.saving.load_model(path, compile=False)
    for key, value in options.items():
        assert getattr(restored, key) == value
    np.testing.assert_allclose(restored.feature_mean.numpy(), model.feature_mean.numpy())
    images, _ = batch()
    np.testing.assert_array_equal(restored(images).numpy(), model(images).numpy())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"reconstruction": "l1"}, "Unknown reconstruction"),
    ({"decoder_centre": "median"}, "Unknown decoder_centre"),
    ({"kl_free_bits": -1.0}, "kl_free_bits"),
])
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.DVMLModel(tiny_backbone(), "npair", embedding_dim=4, **kwargs)
