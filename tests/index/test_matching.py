"""Open-set matching thresholds: a hand-computed case, a brute force over every threshold, the
top-1 search against numpy, and choosing a calibrated threshold."""

import numpy as np
import pytest

from dvml_tf.index import matching


def test_a_hand_computed_calibration():
    scores = np.array([0.6, 0.8, 0.9, 0.7, 0.8])
    correct = np.array([False, False, True, True, True])
    # Sorted: 0.9 T | 0.8 T, 0.8 F (a tie: both or neither) | 0.7 T | 0.6 F
    # accepted at >= 0.9: 1/1; >= 0.8: 2/3; >= 0.7: 3/4; >= 0.6: 3/5.
    chosen = matching.calibrate(scores, correct, targets=(0.5, 0.7, 0.75, 0.9, 1.0))
    assert {k: v["threshold"] for k, v in chosen.items()} == {
        "0.5": 0.6, "0.7": 0.7, "0.75": 0.7, "0.9": 0.9, "1": 0.9}
    assert chosen["0.75"] == {"threshold": 0.7, "precision": 0.75, "recall": 1.0,
                              "matched": 0.8}
    assert chosen["0.9"]["recall"] == pytest.approx(1 / 3)
    nothing = matching.calibrate(np.array([0.5, 0.4]), np.array([False, True]), targets=(0.9,))
    assert nothing["0.9"] == {"threshold": None, "precision": None, "recall": 0.0,
                              "matched": 0.0}


@pytest.mark.parametrize("seed", range(5))
def test_calibration_is_the_loosest_threshold_reaching_each_precision(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    correct = rng.random(300) < 1 / (1 + np.exp(-2 * scores))  # higher scores: more correct
    targets = (0.6, 0.8, 0.9, 0.95)
    chosen = matching.calibrate(scores, correct, targets)
    for target in targets:
        best, best_count = None, -1
        for t in np.unique(scores):  # brute force over every threshold
            accepted = scores >= t
            if correct[accepted].mean() >= target and accepted.sum() > best_count:
                best, best_count = t, accepted.sum()
        got = chosen[matching.target_key(target)]
        assert got["threshold"] == best
        if best is not None:
            accepted = scores >= best
            assert got["precision"] == pytest.approx(correct[accepted].mean())
            assert got["recall"] == pytest.approx((accepted & correct).sum() / correct.sum())
            assert got["matched"] == pytest.approx(accepted.mean())


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_top1_is_the_nearest_other_gallery_image(metric):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    x[5] = x[4]  # a duplicate: the query's own copy is its nearest other image
    labels = rng.integers(0, 4, 40)
    is_query = rng.random(40) < 0.6
    is_gallery = ~is_query | (rng.random(40) < 0.5)
    scores, correct = matching.top1(x, labels, metric, is_query, is_gallery)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected_scores, expected_correct = [], []
    for q in np.flatnonzero(is_query):
        others = [g for g in np.flatnonzero(is_gallery) if g != q]
        if metric == "cosine":
            s = np.array([unit[q] @ unit[g] for g in others])
        else:
            s = np.array([-np.sum((x[q].astype(np.float64) - x[g]) ** 2) for g in others])
        best = others[int(np.argmax(s))]
        expected_scores.append(s.max())
        expected_correct.append(labels[best] == labels[q])
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert correct.tolist() == expected_correct


def test_choosing_a_threshold():
    report = {"thresholds": {"0.9": 0.5, "0.95": 0.7, "0.99": None}}
    assert matching.choose_threshold(report) == ("0.95", 0.7)
    assert matching.choose_threshold(report, 0.99) == ("0.99", None)
    assert matching.choose_threshold({"thresholds": {"0.8": 0.1, "0.9": 0.2}}) == ("0.9", 0.2)
    assert matching.choose_threshold(None) == (None, None)
    with pytest.raises(ValueError, match=r"--precision=0\.5 has no calibrated threshold "
                                         r"\(calibrated: 0\.9, 0\.95, 0\.99\)"):
        matching.choose_threshold(report, 0.5)
    with pytest.raises(ValueError, match="calibrated: none"):
        matching.choose_threshold(None, 0.9)
    with pytest.raises(ValueError, match=r"target precisions must be in \(0, 1\]"):
        matching.calibrate([0.1], [True], targets=(1.5,))
