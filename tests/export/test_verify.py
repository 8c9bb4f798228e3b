"""Grading an export: parity, Recall@1 and latency helpers against hand-computed cases, the
acceptance rule, and `verify_export` on a tiny complete export."""

import os

import numpy as np
import pytest

from dvml_tf import task
from dvml_tf.evaluation import metrics as metrics_lib
from dvml_tf.export import inference as inference_lib
from dvml_tf.export import litert
from dvml_tf.export import verify


def test_cosine_rows_and_parity():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [1.0, -1.0], [0.0, -1.0]])
    np.testing.assert_allclose(verify.cosine_rows(a, b), [1.0, 0.0, -1.0], atol=1e-12)
    summary = verify.parity(a, b)
    assert summary["cosine_min"] == pytest.approx(-1.0)
    assert summary["cosine_mean"] == pytest.approx(0.0)
    assert summary["max_abs_diff"] == pytest.approx(3.0)
    assert summary["num_images"] == 3
    with pytest.raises(ValueError, match="Shapes differ"):
        verify.cosine_rows(a, b[:2])


def test_recall_at_1_by_hand():
    # Nearest neighbours (Euclidean): 0 -> 1 (same class), 1 -> 0 (same), 2 -> 1 (distance 0.2,
    # other class), 3 -> 2 (same): R@1 = 3/4.
    embeddings = np.array([[0.0, 0.0], [0.1, 0.0], [0.3, 0.0], [0.6, 0.0]])
    labels = np.array([0, 0, 1, 1])
    assert verify.recall_at_1(embeddings, labels, normalized=False) == pytest.approx(0.75)
    # Cosine: directions only.
    embeddings = np.array([[1.0, 0.0], [5.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    assert verify.recall_at_1(embeddings, labels, normalized=True) == pytest.approx(1.0)


def test_median_latency_runs_the_function_warmup_plus_runs_times():
    calls = []
    assert verify.median_latency_ms(lambda: calls.append(1), runs=7, warmup=2) >= 0
    assert len(calls) == 9
    with pytest.raises(ValueError, match="runs must be >= 1"):
        verify.median_latency_ms(lambda: None, runs=0)


def test_whole_classes_caps_by_complete_classes():
    labels = np.array([5, 5, 3, 3, 3, 7, 7, 9])
    np.testing.assert_array_equal(verify.whole_classes(labels, None), np.arange(8))
    # Classes in label order: 3 (3 images), 5 (2), 7 (2), 9 (1).
    np.testing.assert_array_equal(verify.whole_classes(labels, 5), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(verify.whole_classes(labels, 2), [0, 1, 2, 3, 4])


@pytest.mark.parametrize("int8_minus_float32, passes", [(-0.10, True), (-1.0, True), (-1.5, False),
                                                         (2.0, False)])
def test_the_int8_recall_bound_rule(int8_minus_float32, passes):
    # A tiny test model cannot exercise the bound with real numbers (README, "Measured": -0.10
    # points on Omniglot), so check the rule verify_export applies to its figures.
    parity = {key: {"cosine_min": 1.0} for key in
              ("saved_model_serving_default", "saved_model_embed_bytes_png", "litert_float32")}
    checks = verify.checks(parity, {"int8_minus_float32_points": int8_minus_float32})
    assert checks["int8_recall_at_1_within_1_point_of_float32"] is passes
    assert checks["saved_model_cosine_min>=0.99999"] and checks["litert_float32_cosine_min>=0.9999"]
    parity["litert_float32"]["cosine_min"] = 0.999
    assert not verify.checks(parity, None)["litert_float32_cosine_min>=0.9999"]
    parity["saved_model_embed_bytes_png"]["cosine_min"] = 0.9999
    assert not verify.checks(parity, None)["saved_model_cosine_min>=0.99999"]


@pytest.fixture(scope="module")
def figures(tiny_export):
    return verify.verify_export(tiny_export.result.export_dir, tiny_export.model,
                                tiny_export.config, tiny_export.splits, parity_images=8,
                                latency_runs=3)


def test_every_artifact_agrees_with_keras(figures):
    parity = figures["parity_vs_keras"]
    assert parity["images"] == "8 images of the test split"
    # The SavedModel is the Keras model's own layers: exactly the same numbers.
    for key in ("saved_model_serving_default", "saved_model_embed_bytes_png"):
        assert parity[key]["num_images"] == 8
        assert parity[key]["cosine_min"] >= 0.99999
        assert parity[key]["max_abs_diff"] == 0.0
    assert parity["litert_float32"]["cosine_min"] >= 0.9999
    assert parity["litert_dynamic_range"]["cosine_min"] >= 0.999
    assert parity["litert_int8"]["cosine_min"] >= 0.99


def test_recall_and_latency_of_the_litert_models(figures, tiny_export):
    recall = figures["recall_at_1"]
    splits = tiny_export.splits
    assert recall["split"] == "test" and recall["num_images"] == splits.test.num_images
    assert recall["num_classes"] == 6
    assert recall["litert_float32"] == pytest.approx(recall["keras"], abs=1 / 24 + 1e-9)
    assert recall["int8_minus_float32_points"] == pytest.approx(
        100 * (recall["litert_int8"] - recall["litert_float32"]))
    assert set(figures["latency_ms_per_image"]) == {
        "keras_preprocessed_input", "saved_model_serving_default", "saved_model_embed_bytes_png",
        "litert_float32", "litert_dynamic_range", "litert_int8", "litert_retrieval"}
    assert all(v > 0 for v in figures["latency_ms_per_image"].values())
    assert "median of 3 runs" in figures["latency_setup"]


def test_recall_is_computed_independently_of_the_export(figures, tiny_export):
    # Keras Recall@1 from the model on the converted images, with the evaluation's own metric.
    model, config, splits = tiny_export.model, tiny_export.config, tiny_export.splits
    raw_form, preprocess = task.raw_form(config, splits), task.preprocess_config(config)
    embeddings = model(raw_form.to_model_input(splits.test.images, preprocess),
                       training=False).numpy()
    metric = "cosine" if model.normalize_embeddings else "euclidean"
    expected = metrics_lib.evaluate_embeddings(embeddings, splits.test.labels, recall_ks=(1,),
                                               metric=metric, compute_clustering=False)
    assert figures["recall_at_1"]["keras"] == pytest.approx(expected["recall@1"])
    # The float LiteRT model on the same images, run here.
    runner = litert.LiteRTModel(os.path.join(tiny_export.result.export_dir, "model.tflite"))
    lite = metrics_lib.evaluate_embeddings(runner(splits.test.images), splits.test.labels,
                                           recall_ks=(1,), metric=metric,
                                           compute_clustering=False)
    assert figures["recall_at_1"]["litert_float32"] == pytest.approx(lite["recall@1"])
    inference = inference_lib.inference_model(model, raw_form, preprocess)
    served, _ = inference_lib.embed_raw(inference, splits.test)
    np.testing.assert_allclose(served, embeddings, atol=1e-5)


def test_bounds_and_checks_are_reported(figures):
    assert figures["bounds"] == {"saved_model_cosine_min": 0.99999,
                                 "litert_float32_cosine_min": 0.9999,
                                 "int8_max_recall_loss_points": 1.0}
    checks = figures["checks"]
    assert checks == verify.checks(figures["parity_vs_keras"], figures["recall_at_1"])
    assert checks["saved_model_cosine_min>=0.99999"]
    assert checks["litert_float32_cosine_min>=0.9999"]
    assert "int8_recall_at_1_within_1_point_of_float32" in checks


def test_recall_and_latency_can_be_skipped(tiny_export):
    figures = verify.verify_export(tiny_export.result.export_dir, tiny_export.model,
                                   tiny_export.config, tiny_export.splits, parity_images=4,
                                   recall_max_images=0)
    assert "recall_at_1" not in figures and "latency_ms_per_image" not in figures
    assert figures["parity_vs_keras"]["images"] == "4 images of the test split"
    assert "int8_recall_at_1_within_1_point_of_float32" not in figures["checks"]
