"""Tests of research/dvml_omniglot/synthesis_geometry.py: the geometry of synthesized points,
the training-layout batches, and the synthesis it replays from a model."""

import json

import numpy as np
import pytest

from research.dvml_omniglot import synthesis_geometry as sg


def _classes(num_classes=40, per_class=10, dim=8, spread=None, seed=0):
    """Well-separated class means with a shared, anisotropic intra-class covariance."""
    rng = np.random.default_rng(seed)
    spread = np.linspace(1.0, 0.05, dim) if spread is None else spread
    means = rng.normal(0, 6, (num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    points = means[labels] + rng.normal(0, 1, (len(labels), dim)) * spread
    return points, labels, rng


def test_a_point_synthesized_as_its_own_source_is_a_real_image():
    real, labels, _ = _classes()
    result = sg.geometry(real, real, np.arange(len(real)), labels)
    assert result["spread_ratio"] == pytest.approx(1.0)
    assert result["rms_offset"] == 0 and result["alignment"] is None
    assert result["label_kept_synthetic"] == result["label_kept_real"]
    assert result["num_classes"] == 40 and result["num_synthetic"] == 400


def test_shared_deviations_align_and_isotropic_noise_does_not():
    real, labels, rng = _classes()
    means = np.stack([real[labels == c].mean(0) for c in range(40)])
    deviations = real - means[labels]
    # Another image's deviation from its class (the shared variation): aligned, same spread.
    partners = rng.permutation(len(real))
    transferred = sg.geometry(real, means[labels] + deviations[partners], np.arange(len(real)),
                              labels)
    assert transferred["alignment"] > 0.95
    assert transferred["spread_ratio"] == pytest.approx(1.0, abs=0.1)
    # Isotropic offsets three times the real spread: alignment at the isotropic level, labels lost.
    rms = np.sqrt(np.mean(np.sum(deviations**2, axis=1)))
    noise = rng.normal(0, 3 * rms / np.sqrt(real.shape[1]), real.shape)
    noisy = sg.geometry(real, real + noise, np.arange(len(real)), labels)
    assert noisy["alignment"] == pytest.approx(noisy["isotropic_alignment"], abs=0.05)
    assert noisy["isotropic_alignment"] < 0.8 < transferred["alignment"]
    assert noisy["spread_ratio"] == pytest.approx(np.sqrt(1 + 9), rel=0.1)
    assert noisy["label_kept_synthetic"] < transferred["label_kept_synthetic"]


def test_label_kept_uses_the_source_class_mean_without_the_source_image():
    # 1-D: class 0 at {0, 2} (mean 1), class 1 at {3, 6} (mean 4.5). Without itself, real 3's
    # own class mean is 6 (3 away), farther than class 0's mean 1 (2 away): lost. 0, 2 and 6
    # are nearer their own mean without themselves: kept.
    real = np.array([[0.0], [2.0], [3.0], [6.0]])
    labels = np.array([0, 0, 1, 1])
    result = sg.geometry(real, np.array([[1.9], [3.2]]), np.array([1, 2]), labels)
    # 1.9 from source 1 (class 0): own mean without 2.0 is 0 (1.9 away), class 1's 4.5 (2.6
    # away): kept. 3.2 from source 2 (class 1): own mean without 3.0 is 6 (2.8 away), class
    # 0's 1 (2.2 away): lost.
    assert result["label_kept_synthetic"] == 0.5
    assert result["label_kept_real"] == 0.75


@pytest.mark.parametrize("kwargs, message", [
    ({"real": np.zeros((4, 2)), "synthetic": np.zeros((2, 3))}, r"\[N, D\] and \[M, D\]"),
    ({"sources": np.array([0, 9])}, "sources must index"),
    ({"labels": np.array([0, 0, 0, 1])}, "at least 2 images each"),
    ({"synthetic": np.array([[np.nan, 0.0], [0.0, 0.0]])}, "finite"),
    ({"real": np.ones((4, 2))}, "do not vary within their classes"),
])
def test_geometry_rejects_bad_inputs(kwargs, message):
    inputs = {"real": np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [6.0, 5.0]]),
              "synthetic": np.zeros((2, 2)), "sources": np.array([0, 3]),
              "labels": np.array([0, 0, 1, 1])}
    inputs.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sg.geometry(**inputs)


def test_training_batches_have_the_runs_class_major_layout():
    labels = np.repeat(np.arange(7), [5, 5, 5, 5, 5, 5, 1])  # class 6 has too few images
    batches = sg.training_batches(labels, classes_per_batch=3, images_per_class=2, rounds=2,
                                  rng=np.random.default_rng(0))
    assert len(batches) == 4  # 6 eligible classes, 2 full batches per round
    seen = []
    for rows in batches:
        classes = labels[rows].reshape(3, 2)
        assert (classes == classes[:, :1]).all() and len(set(classes[:, 0])) == 3
        assert len(set(rows)) == 6
        seen.extend(classes[:, 0])
    assert sorted(seen) == sorted(list(range(6)) * 2)  # every eligible class once per round
    with pytest.raises(ValueError, match="needs 7 classes"):
        sg.training_batches(labels, 7, 2, 1, np.random.default_rng(0))


def _config(**overrides):
    from dvml_tf.training.config import TrainConfig

    settings = dict(config="geometry_test", dataset="folder", data_dir="unused", image_size=12,
                    resize_size=16, embedding_dim=6, loss="npair", classes_per_batch=3,
                    images_per_class=2)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_dvml_synthesis_is_z_inv_plus_the_drawn_z_var():
    import tensorflow as tf

    from dvml_tf import task

    model = task.build_model(_config(dvml=True, variance_scale=0.5))
    features = np.random.default_rng(0).normal(size=(6, model.feature_dim)).astype("float32")
    labels = np.repeat(np.arange(3), 2).astype("int32")
    real, synthetic, sources = sg.synthesized_batch(model, features, labels, noise_seed=3)
    z_inv = model.embedding_head(features).numpy()
    mean = model.mean_head(features).numpy()
    sigma = np.exp(0.5 * model.log_variance_head(features).numpy())
    noise = tf.random.stateless_normal([1, 6, 6], seed=[3, 1], alg="philox").numpy()[0]
    np.testing.assert_allclose(real, z_inv, rtol=1e-5, atol=1e-6)  # N-pair: not normalized
    np.testing.assert_allclose(synthetic, z_inv + 0.5 * (mean + sigma * noise), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_array_equal(sources, np.arange(6))


def test_the_decoded_rule_replays_the_research_variant_on_a_product_run():
    from dvml_tf import task
    from research.dvml_omniglot import variants

    config = _config(dvml=True, reconstruction="standardized_squares",
                     decoder_centre="class_mean")
    model = task.build_model(config)
    model.feature_variance.assign(np.linspace(0.5, 2.0, model.feature_dim).astype("float32"))
    features = np.random.default_rng(2).normal(size=(6, model.feature_dim)).astype("float32")
    labels = np.repeat(np.arange(3), 2).astype("int32")
    _, decoded, _ = sg.synthesized_batch(model, features, labels, noise_seed=5, rule="decoded")
    _, own, _ = sg.synthesized_batch(model, features, labels, noise_seed=5)
    # The same draw through the `decoded` research model with the same weights.
    research = task.build_model(config, variants.ResearchDVMLModel, research_variant="decoded")
    research.set_weights(model.get_weights())
    _, expected, _ = sg.synthesized_batch(research, features, labels, noise_seed=5)
    np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(decoded - own).max() > 1e-3
    with pytest.raises(ValueError, match="rule must be one of own, decoded"):
        sg.synthesized_batch(model, features, labels, noise_seed=5, rule="paper")
    baseline = task.build_model(_config(dvml=False, loss="triplet",
                                        synthesis="deviation_transfer"))
    with pytest.raises(ValueError, match=r"decoded: DVML runs only"):
        sg.synthesized_batch(baseline, features[:, :baseline.feature_dim], labels,
                             noise_seed=5, rule="decoded")


def test_the_feature_noise_control_maps_scaled_feature_noise_through_w():
    import tensorflow as tf

    from dvml_tf import task

    model = task.build_model(_config(dvml=False, loss="triplet"))  # any run: no synthesis
    features = np.random.default_rng(3).normal(size=(6, model.feature_dim)).astype("float32")
    labels = np.repeat(np.arange(3), 2).astype("int32")
    std = np.linspace(0.1, 1.0, model.feature_dim).astype("float32")
    _, synthetic, sources = sg.synthesized_batch(model, features, labels, noise_seed=7,
                                                 rule="feature_noise", feature_std=std)
    noise = tf.random.stateless_normal([6, model.feature_dim], seed=[7, 4], alg="philox")
    z_inv = model.embedding_head(features).numpy()
    expected = z_inv + (noise.numpy() * std) @ model.embedding_head.kernel.numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)  # triplet: the unit sphere
    np.testing.assert_allclose(synthetic, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(sources, np.arange(6))
    with pytest.raises(ValueError, match="needs feature_std"):
        sg.synthesized_batch(model, features, labels, noise_seed=7, rule="feature_noise")


def test_reference_synthesis_replays_the_losses_own_method():
    from dvml_tf import task

    model = task.build_model(_config(dvml=False, loss="triplet",
                                     synthesis="deviation_transfer"))
    features = np.random.default_rng(1).normal(size=(6, model.feature_dim)).astype("float32")
    labels = np.repeat(np.arange(3), 2).astype("int32")
    real, synthetic, sources = sg.synthesized_batch(model, features, labels, noise_seed=0)
    np.testing.assert_allclose(np.linalg.norm(real, axis=1), 1.0, rtol=1e-5)  # triplet: unit
    np.testing.assert_allclose(np.linalg.norm(synthetic, axis=1), 1.0, rtol=1e-5)
    centres = (real[0::2] + real[1::2]) / 2
    # Each synthesized point: its class mean plus the deviation of an image of another class.
    for point, source in zip(synthetic, sources, strict=True):
        own = labels[source]
        candidates = [centres[own] + real[j] - centres[labels[j]]
                      for j in range(6) if labels[j] != own]
        candidates = [c / np.linalg.norm(c) for c in candidates]
        assert min(np.abs(point - c).max() for c in candidates) < 1e-5


def test_a_run_without_synthesis_is_refused():
    from dvml_tf import task

    model = task.build_model(_config(dvml=False))
    features = np.zeros((6, model.feature_dim), "float32")
    with pytest.raises(ValueError, match="synthesizes nothing"):
        sg.synthesized_batch(model, features, np.repeat(np.arange(3), 2), noise_seed=0)


@pytest.mark.slow
def test_the_script_measures_a_trained_dvml_run(tiny_runs, tmp_path, capsys):
    _, dirs = tiny_runs
    output = tmp_path / "geometry.json"
    result = sg.main([f"--run_dirs={dirs['dvml']}", "--rounds=3", f"--output={output}"])
    assert json.loads(output.read_text())["markdown"] == result["markdown"]
    (record,) = result["runs"]
    geometry = record["geometry"]
    # 5 training classes of 5 images, P = 4 x K = 2: 1 batch per round, 3 rounds, one draw.
    assert geometry["num_real"] == 25 and geometry["num_synthetic"] == 3 * 8
    assert record["dvml"] and record["normalized"] and record["step"] == 2
    assert geometry["spread_ratio"] > 0 and 0 < geometry["alignment"] <= 1
    assert record["run"] == f"{dirs['dvml'].parent.name}/dvml"  # no absolute path
    assert f"| {record['run']} | {geometry['spread_ratio']:.2f} |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="synthesizes nothing"):
        sg.main([f"--run_dirs={dirs['baseline']}", f"--output={tmp_path / 'no.json'}"])


def test_study_runs_are_the_recorded_synthesizing_runs_of_one_seed(tmp_path):
    results = tmp_path / "omniglot_synthesis.json"
    finished = {"0": {}, "1": {}}
    results.write_text(json.dumps({
        "protocol": {"flags": {"variants": {"baseline": [], "dvml_paper": [],
                                            "dvml_centre": [], "ref_symmetrical": []}}},
        "runs": {
            "validation": {
                "npair": {"ref_symmetrical": finished, "baseline": finished,
                          "dvml_centre": finished, "dvml_paper": {"1": {}}},
                "triplet": {"baseline_active": finished},
            },
            "test": {"npair": {"reference": finished, "dvml": finished, "baseline": finished}},
        },
    }))
    assert sg.study_run_dirs("RUNS", results, seed=0) == [
        "RUNS/validation/npair_dvml_centre_seed0", "RUNS/validation/npair_ref_symmetrical_seed0",
        "RUNS/test/npair_dvml_seed0", "RUNS/test/npair_reference_seed0"]
    assert "RUNS/validation/npair_dvml_paper_seed1" in sg.study_run_dirs("RUNS", results, 1)
    with pytest.raises(ValueError, match="no finished DVML or reference run of seed 2"):
        sg.study_run_dirs("RUNS", results, seed=2)
