"""Tests of the candidate-score error bound against exact integer arithmetic."""

import numpy as np
import pytest

from dvml_tf.evaluation import knn
from dvml_tf.evaluation import score_bounds


def exact_scores(x, pairs, metric):
    """Exact scores (integers at a scale of 2^-298) as floats, computed independently."""
    scaled = [[int(v) for v in row.astype(np.float64) * 2.0**149] for row in x]
    out = []
    for i, j in pairs:
        if metric == "euclidean":
            out.append(sum((a - b) ** 2 for a, b in zip(scaled[i], scaled[j], strict=True)))
        else:
            out.append(-sum(a * b for a, b in zip(scaled[i], scaled[j], strict=True)))
    return [v / 2.0**298 for v in out]  # float of an exact value: within 1 ulp of it


def adversarial_rows(rng, dim=24):
    """Large norms, tiny values, an offset far from the origin, duplicates, near-ties."""
    base = rng.standard_normal((40, dim)).astype(np.float32)
    rows = [base, base * np.float32(3e5), base * np.float32(1e-20),
            (base + np.float32(2000.0)).astype(np.float32)]
    x = np.concatenate(rows)
    x[5] = x[9]
    x[11] = x[9] * np.float32(1 + 2**-10)  # within bfloat16's error of x[9]
    return x


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("part", [0, 1, 2, 3])
def test_candidate_scores_stay_within_the_bound(precision, metric, part):
    x = adversarial_rows(np.random.default_rng(part))[40 * part:40 * part + 40]
    x = knn.l2_normalize(x) if metric == "cosine" else x
    centre = score_bounds.centre_for(x) if metric == "euclidean" else None
    assert (centre is not None) == (metric == "euclidean" and part == 3)
    prepared = score_bounds.prepare(x, metric, precision, centre)
    block = score_bounds.candidate_block(prepared, prepared, slice(0, 40), slice(0, 40))
    pairs = [(i, j) for i in range(40) for j in range(40)]
    exact = np.array(exact_scores(x, pairs, metric)).reshape(40, 40)
    bound = prepared.weights[:, None] + prepared.weights[None, :]
    error = np.abs(block.astype(np.float64) - exact)
    assert (error <= bound).all(), (error / bound).max()
    # The bound is not vacuous: within a factor ~1e4 (float32) or ~20 (bfloat16) of the error
    # (except for the tiny rows of part 2, where the absolute slack 2^-64 dominates).
    if part != 2:
        assert (error / bound).max() > (1e-4 if precision == "float32" else 0.05)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_float64_rescoring_bounds_the_exact_score(metric):
    x = adversarial_rows(np.random.default_rng(7))
    x = knn.l2_normalize(x) if metric == "cosine" else x
    rng = np.random.default_rng(1)
    left, right = rng.integers(0, len(x), 300), rng.integers(0, len(x), 300)
    scores, errors = score_bounds.rescore(x, x, left, right, metric)
    exact = np.array(exact_scores(x, zip(left, right, strict=True), metric))
    assert (np.abs(scores - exact) <= errors + np.spacing(np.abs(exact))).all()


def test_exact_keys_order_what_float64_cannot():
    # |g1|^2 = 2^48 + 2^-48 * (...) : the two squared distances differ far below float64's
    # resolution at 2^48, and 3-4-5 gives an exact tie.
    x = np.array([[0, 0, 0], [2**24, 2**-24, 0], [2**24, 0, 2**-24 * 1.5],
                  [3, 4, 0], [5, 0, 0], [0, 0, 5]], dtype=np.float32)
    keys = score_bounds.exact_keys(x, x, [0] * 5, [1, 2, 3, 4, 5], "euclidean")
    assert keys[0] < keys[1]  # 2^-48 < 2.25 * 2^-48 on top of 2^48
    assert keys[2] == keys[3] == keys[4]  # 25
    scores, _ = score_bounds.rescore(x, x, np.zeros(2, int), np.array([1, 2]), "euclidean")
    assert scores[0] == scores[1]  # float64 alone cannot order them


def test_precision_choice_follows_the_cpu():
    assert score_bounds.has_native_bfloat16({"avx2", "avx512_bf16"})
    assert score_bounds.has_native_bfloat16({"amx_bf16"})
    assert not score_bounds.has_native_bfloat16({"avx2", "fma", "avx512_vnni"})
    expected = "bfloat16" if score_bounds.has_native_bfloat16() else "float32"
    assert score_bounds.resolve_precision("auto", 12) == expected
    assert score_bounds.resolve_precision("auto", 1001) == "float32"
    assert score_bounds.resolve_precision("float32", 12) == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        score_bounds.resolve_precision("int8", 12)


def test_norms_beyond_the_supported_range_are_refused():
    x = np.full((3, 4), 2.0**40, dtype=np.float32)
    with pytest.raises(ValueError, match="norm"):
        score_bounds.prepare(x, "euclidean", "float32")
