"""research/glyphs/premise.py: the probe and the offset alignment on synthetic features where the
answer is known, and the alignment against a plain loop."""

import numpy as np
import pytest

from research.glyphs import premise


def features(shared, classes=24, instances=6, dim=16, noise=0.05, seed=0):
    """Class centres plus instance offsets: the same offset for instance j in every class
    (`shared`), or a fresh one per class and instance."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    if shared:
        offsets = np.broadcast_to(rng.normal(0, 1, (instances, dim)), (classes, instances, dim))
    else:
        offsets = rng.normal(0, 1, (classes, instances, dim))
    values = centres[:, None] + offsets + rng.normal(0, noise, (classes, instances, dim))
    labels = np.repeat(np.arange(classes), instances)
    identities = np.tile(np.arange(instances), classes)
    return values.reshape(-1, dim), identities, labels


def test_shared_offsets_are_found_and_private_ones_are_not():
    for shared in (True, False):
        values, identities, labels = features(shared)
        groups = np.zeros(len(labels), np.int64)
        # Centred on the class mean: the class no longer hides the instance.
        probe = premise.probe(premise.centred(values, labels), identities, labels, groups,
                              np.random.default_rng(0))
        alignment = premise.offset_alignment(values, identities, labels, groups, 200,
                                             np.random.default_rng(0))
        assert probe["chance"] == pytest.approx(1 / 6)
        assert alignment["transfer_chance"] == pytest.approx(1 / 6)
        if shared:
            assert probe["accuracy"] > 0.95
            assert alignment["cosine_same"] > 0.9 > alignment["cosine_shuffled"] + 0.5
            assert alignment["transfer_top1"] > 0.95
            assert alignment["transfer_error_ratio"] < 0.05
        else:
            assert probe["accuracy"] < 0.35
            assert abs(alignment["cosine_same"] - alignment["cosine_shuffled"]) < 0.1
            assert alignment["transfer_top1"] < 0.35
            assert alignment["transfer_error_ratio"] == pytest.approx(1.0, abs=0.2)


def test_alignment_matches_a_loop_over_cases():
    values, identities, labels = features(True, classes=5, instances=4, dim=3, noise=0.5)
    identities[3] = -1  # an image without identity is left out
    groups = np.array([0] * 12 + [1] * 8)  # classes 0-2 and 3-4: pairs within a group only
    result = premise.offset_alignment(values, identities, labels, groups, 100,
                                      np.random.default_rng(1))
    same, shuffled, hits, chance = [], [], [], []
    for a, b in [(0, 1), (0, 2), (1, 2), (3, 4)]:
        for source, target in ((a, b), (b, a)):
            rows_a = [i for i in range(len(labels)) if labels[i] == source and identities[i] >= 0]
            rows_b = [i for i in range(len(labels)) if labels[i] == target and identities[i] >= 0]
            mean_a = values[[i for i in range(len(labels)) if labels[i] == source]].mean(0)
            mean_b = values[[i for i in range(len(labels)) if labels[i] == target]].mean(0)
            common = [(i, k) for i in rows_a for k in rows_b if identities[i] == identities[k]]
            for n, (i, k) in enumerate(common):
                control = common[n - 1][0]  # the previous case's source: another instance
                u, v, w = values[i] - mean_a, values[k] - mean_b, values[control] - mean_a
                same.append(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
                shuffled.append(w @ v / np.linalg.norm(w) / np.linalg.norm(v))
                nearest = min(rows_b, key=lambda r: np.sum((mean_b + u - values[r]) ** 2))
                hits.append(nearest == k)
                chance.append(1 / len(rows_b))
    assert result["cases"] == len(same) == 3 + 3 + 3 + 3 + 4 + 4 + 4 + 4
    assert result["cosine_same"] == pytest.approx(np.mean(same))
    assert result["cosine_shuffled"] == pytest.approx(np.mean(shuffled))
    assert result["transfer_top1"] == pytest.approx(np.mean(hits))
    assert result["transfer_chance"] == pytest.approx(np.mean(chance))
