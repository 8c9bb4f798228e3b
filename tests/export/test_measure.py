"""Parity, Recall@1, latency and size helpers, against hand-computed cases."""

import numpy as np
import pytest

from dvml_tf.export import measure


def test_cosine_rows_and_parity():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [1.0, -1.0], [0.0, -1.0]])
    np.testing.assert_allclose(measure.cosine_rows(a, b), [1.0, 0.0, -1.0], atol=1e-12)
    summary = measure.parity(a, b)
    assert summary["cosine_min"] == pytest.approx(-1.0)
    assert summary["cosine_mean"] == pytest.approx(0.0)
    assert summary["max_abs_diff"] == pytest.approx(3.0)
    assert summary["num_images"] == 3
    with pytest.raises(ValueError, match="Shapes differ"):
        measure.cosine_rows(a, b[:2])


def test_recall_at_1_by_hand():
    # Nearest neighbours (Euclidean): 0 -> 1 (same class), 1 -> 0 (same), 2 -> 1 (distance 0.2,
    # other class), 3 -> 2 (same): R@1 = 3/4.
    embeddings = np.array([[0.0, 0.0], [0.1, 0.0], [0.3, 0.0], [0.6, 0.0]])
    labels = np.array([0, 0, 1, 1])
    assert measure.recall_at_1(embeddings, labels, normalized=False) == pytest.approx(0.75)
    # Cosine: directions only.
    embeddings = np.array([[1.0, 0.0], [5.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    assert measure.recall_at_1(embeddings, labels, normalized=True) == pytest.approx(1.0)


def test_median_latency_runs_the_function_warmup_plus_runs_times():
    calls = []
    assert measure.median_latency_ms(lambda: calls.append(1), runs=7, warmup=2) >= 0
    assert len(calls) == 9
    with pytest.raises(ValueError, match="runs must be >= 1"):
        measure.median_latency_ms(lambda: None, runs=0)


def test_path_size(tmp_path):
    (tmp_path / "a").write_bytes(b"12345")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"123")
    assert measure.path_size(tmp_path / "a") == 5
    assert measure.path_size(tmp_path) == 8
