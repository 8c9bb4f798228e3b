import keras
import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import losses
from dvml_tf import models

FEATURE_DIM, EMBEDDING_DIM = 12, 6


def tiny_backbone(image_size=4):
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1.0 / 255.0)(inputs))
    features = keras.layers.Dense(FEATURE_DIM, activation="relu", name="features")(x)
    return keras.Model(inputs, features, name="tiny_backbone")


def make_model(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    kwargs.setdefault("metric_loss", "npair")
    kwargs.setdefault("embedding_dim", EMBEDDING_DIM)
    kwargs.setdefault("num_samples", 3)
    model = models.DVMLModel(tiny_backbone(), **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    return model


def batch(num_classes=4, images_per_class=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, size=(num_classes * images_per_class, 4, 4, 3))
    labels = np.repeat(np.arange(num_classes), images_per_class)
    return tf.constant(images, tf.float32), tf.constant(labels)


def gradients_by_part(model, images, labels):
    with tf.GradientTape() as tape:
        objective, _ = model.loss_terms(images, labels)
    parts = {
        "backbone": model.backbone.trainable_variables,
        "z_inv_head": model.embedding_head.trainable_variables,
        "mean_head": model.mean_head.trainable_variables,
        "log_variance_head": model.log_variance_head.trainable_variables,
        "decoder": model.decoder.trainable_variables,
    }
    flat = tape.gradient(objective, parts)
    return {
        part: sum(0.0 if g is None else float(tf.reduce_sum(tf.abs(g))) for g in grads)
        for part, grads in flat.items()
    }


def test_inference_embedding_is_z_inv_and_deterministic():
    model = make_model(metric_loss="triplet")  # a normalizing loss
    images, _ = batch()
    expected = tf.math.l2_normalize(model.embedding_head(model.backbone(images)), axis=-1)
    first = model(images).numpy()
    np.testing.assert_allclose(first, expected.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(model(images).numpy(), first)
    np.testing.assert_allclose(model.predict(images, verbose=0), first, rtol=1e-6)
    assert first.shape == (8, EMBEDDING_DIM)
    unnormalized = make_model(metric_loss="npair")
    np.testing.assert_allclose(
        unnormalized(images).numpy(),
        unnormalized.embedding_head(unnormalized.backbone(images)).numpy(),
        rtol=1e-6,
    )


def test_phase1_cuts_the_reconstruction_gradient_at_the_decoder_input():
    only_recon = (0.0, 1.0, 0.0, 0.0)
    model = make_model(phase1_steps=10, phase1_weights=only_recon, phase2_weights=only_recon)
    grads = gradients_by_part(model, *batch())
    assert grads["decoder"] > 0
    for part in ("backbone", "z_inv_head", "mean_head", "log_variance_head"):
        assert grads[part] == 0.0, part


def test_phase2_lets_the_reconstruction_gradient_through():
    only_recon = (0.0, 1.0, 0.0, 0.0)
    model = make_model(phase1_steps=0, phase1_weights=only_recon, phase2_weights=only_recon)
    grads = gradients_by_part(model, *batch())
    for part, value in grads.items():
        assert value > 0, part


@pytest.mark.parametrize("phase1_steps", [10, 0])
def test_synthesized_metric_loss_reaches_mean_and_log_variance(phase1_steps):
    only_syn = (0.0, 0.0, 1.0, 0.0)
    model = make_model(phase1_steps=phase1_steps, phase1_weights=only_syn, phase2_weights=only_syn)
    grads = gradients_by_part(model, *batch())
    assert grads["mean_head"] > 0
    assert grads["log_variance_head"] > 0
    assert grads["decoder"] == 0.0


def test_variance_scale_shapes_the_synthesized_samples():
    images, labels = batch()
    _, paper = make_model(phase1_steps=0).loss_terms(images, labels)
    _, scaled = make_model(phase1_steps=0, variance_scale=0.1).loss_terms(images, labels)
    assert float(scaled["z_var_norm"]) == pytest.approx(0.1 * float(paper["z_var_norm"]), 1e-5)
    assert float(scaled["kl"]) == pytest.approx(float(paper["kl"]), 1e-6)  # prior N(0, s^2 I)


def test_objective_is_the_weighted_sum_of_the_logged_terms():
    for phase1_steps, weights in (
        (5, models.PAPER_PHASE1_WEIGHTS),
        (0, models.PAPER_PHASE2_WEIGHTS),
    ):
        model = make_model(phase1_steps=phase1_steps)
        objective, logs = model.loss_terms(*batch())
        terms = [logs[k] for k in ("kl", "recon", "metric_syn", "metric_inv")]
        expected = sum(w * float(t) for w, t in zip(weights, terms, strict=True))
        assert float(objective) == pytest.approx(expected, rel=1e-5)
        assert float(logs["loss"]) == pytest.approx(expected, rel=1e-5)
        assert float(logs["phase"]) == (1.0 if phase1_steps else 2.0)


def test_logged_terms_match_an_independent_computation():
    model = make_model(phase1_steps=0, num_samples=4)
    images, labels = batch()
    _, logs = model.loss_terms(images, labels)
    features = model.backbone(images).numpy()
    mean = model.mean_head(features).numpy()
    log_var = model.log_variance_head(features).numpy()
    kl = np.mean(0.5 * np.sum(mean**2 + np.exp(log_var) - log_var - 1, axis=1))
    assert float(logs["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(logs["sigma"]) == pytest.approx(np.mean(np.exp(0.5 * log_var)), rel=1e-5)
    z_inv = model.embedding_head(features).numpy()
    assert float(logs["z_inv_norm"]) == pytest.approx(np.linalg.norm(z_inv, axis=1).mean(), 1e-5)
    assert float(logs["metric_inv"]) == pytest.approx(float(model.metric_loss(z_inv, labels)), 1e-5)


def test_random_draws_depend_on_seed_and_step_only():
    model = make_model(phase1_steps=0)
    images, labels = batch()
    _, first = model.loss_terms(images, labels)
    _, again = model.loss_terms(images, labels)
    assert float(first["metric_syn"]) == float(again["metric_syn"])
    model.step_counter.assign(7)
    _, later = model.loss_terms(images, labels)
    assert float(later["metric_syn"]) != float(first["metric_syn"])
    other_seed = make_model(phase1_steps=0, seed=0)
    other_seed.seed = 1
    _, other = other_seed.loss_terms(images, labels)
    assert float(other["metric_syn"]) != float(first["metric_syn"])


def test_phase_switches_at_the_configured_step():
    model = make_model(phase1_steps=3)
    images, labels = batch()
    train_step = tf.function(model.train_step)
    phases = []
    logged = []
    for _ in range(5):
        logged.append(float(train_step((images, labels))["phase"]))
        phases.append(model.phase)
        model.trackers["phase"].reset_state()
    assert logged == [1.0, 1.0, 1.0, 2.0, 2.0]  # the phase each step trained in
    assert phases == [1, 1, 2, 2, 2]  # phase read after steps 1..5: switch when step == 3
    assert int(model.step_counter.numpy()) == 5


def test_step_and_phase_are_restored_from_checkpoints(tmp_path):
    model = make_model(phase1_steps=3)
    images, labels = batch()
    for _ in range(4):
        model.train_step((images, labels))
    checkpoint = tf.train.Checkpoint(model=model)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    model.save(tmp_path / "model.keras")

    restored = make_model(phase1_steps=3, seed=5)
    assert restored.phase == 1
    tf.train.Checkpoint(model=restored).restore(path).assert_existing_objects_matched()
    assert int(restored.step_counter.numpy()) == 4 and restored.phase == 2
    np.testing.assert_allclose(restored(images).numpy(), model(images).numpy(), rtol=1e-6)

    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert int(loaded.step_counter.numpy()) == 4 and loaded.phase == 2
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), rtol=1e-6)


def test_baseline_shares_backbone_and_z_inv_init_and_has_no_variational_parts():
    dvml = make_model(seed=3, use_dvml=True)
    baseline = make_model(seed=3, use_dvml=False)
    assert not hasattr(baseline, "decoder") and not hasattr(baseline, "mean_head")
    for a, b in zip(baseline.trainable_variables, dvml.trainable_variables[:4], strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    objective, logs = baseline.loss_terms(*batch())
    assert float(objective) == pytest.approx(float(logs["metric_inv"]))
    assert set(logs) == {"loss", "metric_inv", "z_inv_norm"}


def test_train_step_logs_every_term():
    model = make_model(phase1_steps=1)
    logs = model.train_step(batch())
    assert set(logs) == set(models.LOG_KEYS)
    assert all(np.isfinite(float(v)) for v in logs.values())


def test_margin_loss_beta_is_trained_with_the_model():
    model = make_model(metric_loss=losses.MarginDWSLoss(), phase1_steps=0)
    assert any(v.name == "beta" for v in model.trainable_variables)
    before = float(model.metric_loss.beta.numpy())
    model.train_step(batch(num_classes=3, images_per_class=3))
    assert float(model.metric_loss.beta.numpy()) != before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metric_loss": "lifted"}, "valid losses"),
        ({"metric_loss": 3}, "loss name or a MetricLoss"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"num_samples": 0}, "num_samples"),
        ({"phase1_steps": -1}, "phase1_steps"),
        ({"phase1_weights": (1, 1, 1)}, "phase1_weights"),
        ({"phase2_weights": (1, 1, -1, 1)}, "phase2_weights"),
        ({"variance_scale": 0.0}, "variance_scale"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(**kwargs)


def test_backbone_must_output_a_pooled_feature():
    inputs = keras.Input((4, 4, 3))
    with pytest.raises(ValueError, match="pooled feature"):
        models.DVMLModel(keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs)))


def test_npair_with_four_images_per_class_is_rejected_at_train_time():
    model = make_model(metric_loss="npair")
    with pytest.raises(ValueError, match="distinct classes"):
        model.loss_terms(*batch(num_classes=2, images_per_class=4))


def test_mismatched_labels_are_rejected():
    model = make_model()
    images, _ = batch()
    with pytest.raises(ValueError, match="8 embeddings but 6 labels"):
        model.loss_terms(images, tf.constant([0, 0, 1, 1, 2, 2]))


def synthetic_classes(num_classes=12, per_class=8, size=8, seed=0):
    """Images = a class prototype + noise: learnable, but not trivially separated at init."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, size=(num_classes, size, size, 3))
    images = prototypes[:, None] + rng.normal(0, 60, size=(num_classes, per_class, size, size, 3))
    return np.clip(images, 0, 255).astype(np.float32)


@pytest.mark.parametrize("loss_name", ["npair", "triplet2_dws"])
def test_a_few_hundred_steps_lower_every_loss_term(loss_name):
    images = synthetic_classes()
    keras.utils.set_random_seed(0)
    backbone = models.build_backbone("convnet_small", input_shape=(8, 8, 3))
    model = models.DVMLModel(
        backbone, loss_name, embedding_dim=16, num_samples=4, phase1_steps=75, seed=0
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(1)
    per_class = 2 if loss_name == "npair" else 4
    train_step = tf.function(model.train_step)
    history = {key: [] for key in ("kl", "recon", "metric_inv", "metric_syn")}
    for _ in range(300):
        classes = rng.choice(len(images), size=6, replace=False)
        idx = np.stack([rng.choice(8, size=per_class, replace=False) for _ in classes])
        x = images[classes[:, None], idx].reshape(-1, 8, 8, 3)
        y = np.repeat(classes, per_class)
        train_step((tf.constant(x), tf.constant(y)))
        for key in history:
            history[key].append(float(model.trackers[key].result()))
            model.trackers[key].reset_state()
    for key, values in history.items():
        start, end = np.mean(values[:30]), np.mean(values[-30:])
        assert end < 0.9 * start, f"{key}: {start:.3f} -> {end:.3f}"
