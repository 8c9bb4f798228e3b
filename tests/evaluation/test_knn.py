"""Tests of the chunked exact kNN search against a float64 full-matrix brute force."""

import numpy as np
import pytest

from dvml_tf.evaluation import exact_search
from dvml_tf.evaluation import knn


def brute_force(queries, k, gallery=None, metric="euclidean"):
    """Full distance matrix in float64, self excluded by index, stable sort (index tie-break)."""
    q = np.asarray(queries, dtype=np.float64)
    g = q if gallery is None else np.asarray(gallery, dtype=np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        dist = 1.0 - q @ g.T
    else:
        dist = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    if gallery is None:
        np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(dist, order, axis=1), dist


def assert_matches_brute_force(ids, dists, queries, k, gallery=None, metric="euclidean", atol=1e-5):
    ref_ids, ref_dists, full = brute_force(queries, k, gallery, metric)
    np.testing.assert_allclose(dists, ref_dists, rtol=1e-5, atol=atol)
    # Each returned neighbour is at the distance it claims (float64 recomputation).
    np.testing.assert_allclose(np.take_along_axis(full, ids, axis=1), ref_dists, atol=atol)
    assert (np.diff(dists, axis=1) >= 0).all()
    # float32 vs float64 may swap neighbours whose distances differ by ~1e-7; everywhere else
    # (a gap > 1e-5 to the previous and to the next neighbour, including the (k+1)-th) the
    # indices must be identical.
    sorted_full = np.sort(full, axis=1)[:, : k + 1]
    padded = np.concatenate(
        [np.full((len(ids), 1), -np.inf), sorted_full, np.full((len(ids), 1), np.inf)], axis=1
    )
    clear = (padded[:, 1 : k + 1] - padded[:, :k] > atol) & (
        padded[:, 2 : k + 2] - padded[:, 1 : k + 1] > atol
    )
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(ids[clear], ref_ids[clear])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize(
    ("num", "dim", "k", "budget"),
    [
        (300, 6, 5, 1 << 30),  # Candidate filter path, one chunk.
        (300, 6, 5, 20_000),  # Candidate filter path, many small chunks.
        (120, 5, 90, 1 << 30),  # Plain argpartition path (subset > half the row).
        (40, 3, 39, 1 << 30),  # k = N - 1: every other sample.
    ],
)
def test_self_search_matches_brute_force(metric, num, dim, k, budget):
    x = np.random.default_rng(num + k).standard_normal((num, dim)).astype(np.float32)
    ids, dists = knn.nearest_neighbors(x, k, metric=metric, memory_budget_bytes=budget)
    assert ids.shape == dists.shape == (num, k)
    assert ids.dtype == np.int64 and dists.dtype == np.float32
    assert not (ids == np.arange(num)[:, None]).any()
    assert_matches_brute_force(ids, dists, x, k, metric=metric)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_separate_gallery_matches_brute_force(metric):
    rng = np.random.default_rng(7)
    queries = rng.standard_normal((50, 4)).astype(np.float32)
    gallery = rng.standard_normal((400, 4)).astype(np.float32)
    ids, dists = knn.nearest_neighbors(queries, 7, gallery=gallery, metric=metric)
    assert_matches_brute_force(ids, dists, queries, 7, gallery, metric)


def test_thread_count_and_chunking_do_not_change_the_result():
    x = np.random.default_rng(3).standard_normal((500, 8)).astype(np.float32)
    for budget in (1 << 30, 30_000):  # one chunk; 4-row chunks
        reference = knn.nearest_neighbors(x, 9, memory_budget_bytes=budget, num_threads=1)
        for threads in (2, 3):  # the selection is exact: bit-identical whatever the threads
            got = knn.nearest_neighbors(x, 9, memory_budget_bytes=budget, num_threads=threads)
            np.testing.assert_array_equal(got[0], reference[0])
            np.testing.assert_array_equal(got[1], reference[1])
    # Another chunking (here symmetric tiles against query chunks): the ranking is exact, and
    # the distances are re-scored pair by pair, so both are bit-identical although BLAS rounds
    # products of other shapes differently.
    whole = knn.nearest_neighbors(x, 9, memory_budget_bytes=1 << 30)
    chunked = knn.nearest_neighbors(x, 9, memory_budget_bytes=30_000)
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])


def test_iter_yields_contiguous_chunks():
    x = np.random.default_rng(4).standard_normal((103, 4)).astype(np.float32)
    # Too small for the symmetric state: one 128 x 128 tile (147,456 bytes) and 40 query rows
    # of candidates ((3 + 32) x 12 x 2 + 64 bytes each).
    budget = 147_456 + 40 * 904
    plan = exact_search.Plan(103, 103, 3, True, budget)
    assert not plan.symmetric and plan.chunk == 40
    chunks = list(knn.iter_nearest_neighbors(x, 3, memory_budget_bytes=budget))
    assert [c[0] for c in chunks] == [0, 40, 80]
    ids = np.concatenate([c[1] for c in chunks])
    np.testing.assert_array_equal(ids, knn.nearest_neighbors(x, 3)[0])


def test_ties_are_broken_by_smaller_index():
    # Small integers: every product and sum is exact in float32, so the ties are exact.
    grid = np.array(
        [[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1], [1, 0], [0, 0], [2, 0]], dtype=np.float32
    )
    ids, dists = knn.nearest_neighbors(grid, 7)
    # Point 0 = (0, 0): its duplicate 6 at distance 0, then 1, 2, 3, 4, 5 at 1, then 7 at 2.
    np.testing.assert_array_equal(ids[0], [6, 1, 2, 3, 4, 5, 7])
    np.testing.assert_allclose(dists[0], [0, 1, 1, 1, 1, 1, 2])
    # Point 1 = (1, 0) has its duplicate 5 first, then 0, 6 and 7 at 1 (in index order).
    np.testing.assert_array_equal(ids[1][:4], [5, 0, 6, 7])
    expected, _, _ = brute_force(grid, 7)
    np.testing.assert_array_equal(ids, expected)


def test_duplicates_are_neighbours_at_distance_zero():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 16)).astype(np.float32)
    x[17] = x[4]  # An exact duplicate must be returned (self is excluded by index only).
    for metric in ("euclidean", "cosine"):
        ids, dists = knn.nearest_neighbors(x, 2, metric=metric)
        assert ids[4, 0] == 17 and ids[17, 0] == 4
        # 0 up to the documented rounding (module docstring of knn.py): Euclidean |d^2| about
        # 1e-7 ||x||^2 (||x||^2 is about 16 here, so d may reach 1e-3); 1 - cos about 1e-7.
        if metric == "euclidean":
            error = dists[[4, 17], 0].astype(np.float64) ** 2 / float(x[4] @ x[4])
        else:
            error = np.abs(dists[[4, 17], 0])
        assert (error <= 1e-6).all(), dists[[4, 17], 0]
        assert dists[4, 0] < dists[4, 1] and dists[17, 0] < dists[17, 1]


def test_cosine_ties_of_scaled_copies_and_zero_vectors():
    x = np.array([[1, 0], [0, 3], [2, 0], [0, 1], [0, 0]], dtype=np.float32)
    ids, dists = knn.nearest_neighbors(x, 4, metric="cosine")
    # (1,0) and (2,0) point the same way; (0,3) and (0,1) are at cosine distance 1, and so is the
    # zero vector, whose cosine with everything is defined as 0.
    np.testing.assert_array_equal(ids[0], [2, 1, 3, 4])
    np.testing.assert_allclose(dists[0], [0, 1, 1, 1], atol=1e-6)
    np.testing.assert_array_equal(ids[4], [0, 1, 2, 3])


@pytest.mark.parametrize(
    ("embeddings", "k", "kwargs", "message"),
    [
        (np.zeros(5), 1, {}, "2-D"),
        (np.zeros((0, 3)), 1, {}, "empty"),
        (np.ones((4, 2)), 0, {}, "k must be >= 1"),
        (np.ones((4, 2)), 4, {}, "exceeds the number of gallery items available per query (3"),
        (np.ones((4, 2)), 1.5, {}, "k must be an int"),
        (np.ones((4, 2)), 1, {"metric": "manhattan"}, "metric must be one of"),
        (np.ones((4, 2)), 1, {"gallery": np.ones((3, 5))}, "same dimension"),
        (np.ones((4, 2)), 1, {"num_threads": 0}, "num_threads"),
    ],
)
def test_bad_input_raises(embeddings, k, kwargs, message):
    with pytest.raises(ValueError, match=None) as err:
        knn.nearest_neighbors(embeddings, k, **kwargs)
    assert message in str(err.value)


def test_nan_and_inf_rows_are_counted():
    x = np.ones((6, 3), dtype=np.float32)
    x[1, 0] = np.nan
    x[4, 2] = np.inf
    with pytest.raises(ValueError, match=r"NaN or Inf values in 2 of 6 rows"):
        knn.nearest_neighbors(x, 1)


def test_plan_follows_the_memory_budget():
    # SOP's R@1 + MAP@R (k = 12) reuses symmetric tiles; R@1000's state is too big for that.
    sop = exact_search.Plan(60_502, 60_502, 12, True, knn.DEFAULT_MEMORY_BUDGET_BYTES)
    assert sop.symmetric and sop.tile == 2048
    large_k = exact_search.Plan(60_502, 60_502, 1001, True, knn.DEFAULT_MEMORY_BUDGET_BYTES)
    assert not large_k.symmetric and large_k.chunk == 2048
    tiny = exact_search.Plan(60_502, 60_502, 1001, True, 1 << 20)
    assert 1 <= tiny.chunk < 100 and tiny.tile == 147


def test_data_far_from_the_origin_keep_their_precision():
    # With an offset of 1000 and unit spread, ||g||^2 - 2 q.g would cancel ~20 bits in float32;
    # the search centres such data first.
    rng = np.random.default_rng(8)
    x = (1000.0 + rng.standard_normal((200, 4))).astype(np.float32)
    ids, dists = knn.nearest_neighbors(x, 3)
    assert_matches_brute_force(ids, dists, x, 3)


def test_rows_with_an_unlucky_candidate_subset_stay_exact():
    # The candidate filter samples every step-th gallery column (step = 9 here). Make exactly
    # those columns far from query 0, so its bound admits nearly every column: that row must
    # take the full-row path, and query 1 (near the moved columns) the filtered path.
    rng = np.random.default_rng(9)
    gallery = rng.uniform(-1, 1, (400, 3)).astype(np.float32)
    gallery[::9] += 5.0
    queries = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    queries[1] += rng.uniform(-0.1, 0.1, 3).astype(np.float32)
    ids, dists = knn.nearest_neighbors(queries, 5, gallery=gallery)
    # float32 expansion error ~ 1e-7 * ||q||^2 for query 1 (||q||^2 = 75).
    assert_matches_brute_force(ids, dists, queries, 5, gallery, atol=1e-4)
    assert (ids[1] % 9 == 0).all()
