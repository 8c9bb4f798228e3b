"""ClassBalancedSampler: P x K layout, coverage, uniformity, purity in (seed, step), replicas."""

import collections
import itertools
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from dvml_tf.data.sampler import ClassBalancedSampler
from dvml_tf.data.sampler import replica_slice


def make_labels(counts, seed=0, shuffle=True):
    """Labels with `counts[c]` images of class 10 * c + 3, optionally in a shuffled order."""
    labels = np.repeat(10 * np.arange(len(counts)) + 3, counts)
    if shuffle:
        np.random.default_rng(seed).shuffle(labels)
    return labels


def sop_like_labels(num_classes=11318, seed=0):
    counts = np.random.default_rng(seed).integers(2, 13, size=num_classes)
    return make_labels(counts, seed)


def check_batch(sampler, labels, indices):
    """Every structural promise of one batch, checked with plain numpy."""
    p, k = sampler.classes_per_batch, sampler.images_per_class
    assert indices.shape == (p * k,) and indices.dtype == np.int64
    assert indices.min() >= 0 and indices.max() < len(labels)
    rows = labels[indices].reshape(p, k)
    assert (rows == rows[:, :1]).all(), "class-major layout: K consecutive images per class"
    assert len(set(rows[:, 0].tolist())) == p, "P distinct classes"
    counts = collections.Counter(labels.tolist())
    for row_indices, label in zip(indices.reshape(p, k), rows[:, 0], strict=True):
        n = counts[label]
        assert n >= 2, "classes with a single image are never drawn"
        assert len(set(row_indices.tolist())) == min(n, k), "distinct images first"


def test_batches_are_p_by_k_class_major_and_distinct():
    labels = make_labels([7, 3, 1, 12, 5, 2, 9, 4, 6, 8])
    sampler = ClassBalancedSampler(labels, classes_per_batch=4, images_per_class=5, seed=3)
    for step in range(200):
        check_batch(sampler, labels, sampler.batch_indices(step))


def test_epoch_covers_every_class_once():
    counts = np.arange(2, 39)  # 37 eligible classes
    labels = make_labels(counts)
    sampler = ClassBalancedSampler(labels, classes_per_batch=5, images_per_class=2, seed=1)
    assert sampler.batches_per_epoch == 37 // 5
    seen_over_epochs = set()
    for epoch in range(6):
        steps = range(epoch * 7, (epoch + 1) * 7)
        classes = np.concatenate([labels[sampler.batch_indices(s)][::2] for s in steps])
        assert len(classes) == len(set(classes.tolist())) == 35, "no class twice in an epoch"
        seen_over_epochs |= set(classes.tolist())
    assert seen_over_epochs == set(np.unique(labels).tolist())


def test_epochs_use_different_permutations():
    labels = make_labels([3] * 40)
    sampler = ClassBalancedSampler(labels, classes_per_batch=8, images_per_class=2, seed=0)
    first = [labels[sampler.batch_indices(s)][0] for s in range(5)]
    second = [labels[sampler.batch_indices(s)][0] for s in range(5, 10)]
    assert first != second


def test_pure_function_of_seed_and_step():
    labels = sop_like_labels(500)
    a = ClassBalancedSampler(labels, 16, 4, seed=11)
    b = ClassBalancedSampler(labels, 16, 4, seed=11)
    steps = list(range(300))
    expected = {s: a.batch_indices(s) for s in steps}
    # Another instance, steps in random order, repeated, across epoch boundaries.
    order = np.random.default_rng(0).permutation(steps * 2)
    for s in order:
        np.testing.assert_array_equal(b.batch_indices(int(s)), expected[int(s)])
    other = ClassBalancedSampler(labels, 16, 4, seed=12)
    assert any((other.batch_indices(s) != expected[s]).any() for s in range(5))


def test_dataset_resumes_with_the_same_batches():
    labels = make_labels([4, 6, 2, 9, 3, 5, 7, 2])
    sampler = ClassBalancedSampler(labels, 4, 3, seed=5)
    full = [b.numpy() for b in sampler.dataset(num_steps=12)]
    resumed = [b.numpy() for b in sampler.dataset(start_step=7, num_steps=5)]
    for got, want in zip(resumed, full[7:], strict=True):
        np.testing.assert_array_equal(got, want)
    for step, batch in enumerate(full):
        np.testing.assert_array_equal(batch, sampler.batch_indices(step))
    infinite = sampler.dataset(start_step=3).take(2)
    np.testing.assert_array_equal(next(iter(infinite)).numpy(), full[3])


@pytest.mark.parametrize("num_replicas", [1, 2, 4])
def test_replica_slices_hold_whole_classes(num_replicas):
    labels = sop_like_labels(200)
    sampler = ClassBalancedSampler(labels, 8, 4, seed=0)
    for step in range(20):
        batch = sampler.batch_indices(step)
        parts = [sampler.replica_indices(step, r, num_replicas) for r in range(num_replicas)]
        np.testing.assert_array_equal(np.concatenate(parts), batch)
        classes_per_part = [set(labels[p].tolist()) for p in parts]
        for i, j in itertools.combinations(range(num_replicas), 2):
            assert not classes_per_part[i] & classes_per_part[j], "a class split across replicas"
        for part in parts:
            assert len(part) == 8 * 4 // num_replicas
    per_replica = [list(sampler.dataset(num_steps=3, replica_id=r, num_replicas=num_replicas))
                   for r in range(num_replicas)]
    for step in range(3):
        np.testing.assert_array_equal(
            np.concatenate([per_replica[r][step].numpy() for r in range(num_replicas)]),
            sampler.batch_indices(step))


def test_replica_slice_rejects_classes_cut_in_two():
    with pytest.raises(ValueError, match="num_replicas=4"):
        replica_slice(np.arange(12), 0, 4, images_per_class=2)  # 6 classes over 4 replicas
    with pytest.raises(ValueError, match="replica_id=2"):
        replica_slice(np.arange(8), 2, 2, images_per_class=2)


def test_within_class_draws_are_uniform():
    # One class of 5 images among fillers; K = 2: each ordered pair of distinct images has
    # probability 1/20, each image 1/5 as anchor (first position).
    labels = np.concatenate([np.zeros(5, np.int64), np.repeat(np.arange(1, 4), 2)])
    sampler = ClassBalancedSampler(labels, classes_per_batch=4, images_per_class=2, seed=0)
    pairs = collections.Counter()
    for step in range(8000):
        idx = sampler.batch_indices(step)
        row = idx[labels[idx] == 0]
        pairs[tuple(row.tolist())] += 1
    assert set(pairs) == {(a, b) for a in range(5) for b in range(5) if a != b}
    freq = np.array(list(pairs.values())) / 8000
    assert np.abs(freq - 1 / 20).max() < 0.015  # ~6 standard deviations
    anchors = collections.Counter()
    for (a, _), count in pairs.items():
        anchors[a] += count
    assert max(abs(c / 8000 - 0.2) for c in anchors.values()) < 0.025


def test_small_classes_use_every_image_then_repeat():
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    sampler = ClassBalancedSampler(labels, classes_per_batch=3, images_per_class=4, seed=2)
    for step in range(50):
        idx = sampler.batch_indices(step).reshape(3, 4)
        for row in idx:
            class_images = np.flatnonzero(labels == labels[row[0]])
            if len(class_images) < 4:
                assert set(row.tolist()) == set(class_images.tolist())
            else:
                assert len(set(row.tolist())) == 4


def test_single_image_classes_are_left_out_and_logged(caplog):
    labels = np.array([0, 0, 1, 2, 2, 3, 4, 4])
    with caplog.at_level("WARNING"):
        sampler = ClassBalancedSampler(labels, classes_per_batch=3, images_per_class=2)
    assert "2 class(es) with fewer than 2 images" in caplog.text
    assert sorted(sampler.classes.tolist()) == [0, 2, 4]
    for step in range(10):
        assert not set(labels[sampler.batch_indices(step)].tolist()) & {1, 3}


@pytest.mark.parametrize(("p", "k", "match"), [
    (5, 2, "classes_per_batch=5 exceeds the 4 classes"),
    (1, 2, "classes_per_batch must be an integer >= 2, got 1"),
    (2, 0, "images_per_class must be an integer >= 1, got 0"),
])
def test_bad_arguments(p, k, match):
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4])
    with pytest.raises(ValueError, match=match):
        ClassBalancedSampler(labels, classes_per_batch=p, images_per_class=k)


def test_sop_scale_speed():
    labels = sop_like_labels()
    started = time.perf_counter()
    sampler = ClassBalancedSampler(labels, classes_per_batch=64, images_per_class=2, seed=0)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(2000):
        sampler.batch_indices(step)
    per_second = 2000 / (time.perf_counter() - started)
    assert setup < 2.0
    assert per_second > 1000, f"{per_second:.0f} batches/s"
    check_batch(sampler, labels, sampler.batch_indices(123_456))


@st.composite
def sampler_cases(draw):
    counts = draw(st.lists(st.integers(1, 15), min_size=2, max_size=40))
    eligible = sum(c >= 2 for c in counts)
    if eligible < 2:
        counts = [*counts, 2, 3]
        eligible += 2
    p = draw(st.integers(2, eligible))
    k = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**40))
    step = draw(st.integers(0, 10**6))
    shuffle_seed = draw(st.integers(0, 1000))
    return counts, p, k, seed, step, shuffle_seed


@settings(max_examples=150, deadline=None)
@given(sampler_cases())
def test_property_every_batch_is_valid_and_pure(case):
    counts, p, k, seed, step, shuffle_seed = case
    labels = make_labels(counts, shuffle_seed)
    sampler = ClassBalancedSampler(labels, p, k, seed=seed)
    batch = sampler.batch_indices(step)
    check_batch(sampler, labels, batch)
    # Purity: a fresh sampler that first computed other steps gives the same batch.
    fresh = ClassBalancedSampler(labels, p, k, seed=seed)
    fresh.batch_indices(step + 1)
    fresh.batch_indices(max(step - 1, 0))
    np.testing.assert_array_equal(fresh.batch_indices(step), batch)


@settings(max_examples=40, deadline=None)
@given(sampler_cases())
def test_property_epoch_visits_each_class_at_most_once(case):
    counts, p, k, seed, step, shuffle_seed = case
    labels = make_labels(counts, shuffle_seed)
    sampler = ClassBalancedSampler(labels, p, k, seed=seed)
    epoch = step % 50
    first = epoch * sampler.batches_per_epoch
    classes = np.concatenate([sampler.batch_classes(s)
                              for s in range(first, first + sampler.batches_per_epoch)])
    assert len(classes) == len(set(classes.tolist())) == sampler.batches_per_epoch * p
    assert set(classes.tolist()) <= {c for c, n in collections.Counter(labels).items() if n >= 2}
