"""Is intra-class variance shared across classes? The two measurements of the paper's Table 4.

DVML models the intra-class variance with one class-independent prior, z_V ~ N(0, I), and backs
that premise with two numbers (the paper's Table 4), neither of which the paper defines
precisely (which features, which KS comparison, relative to what). The definitions used here:

**Class-centred features.** For features x_i (rows) with labels y_i, the centred feature is
x_i - m_{y_i}, where m_c is the sample mean of class c. Classes with fewer than
`min_class_size` (default 2) samples are left out: a single centred sample is 0.

**KS p-value** (the Table 4 "p-value" rows), `ks_class_pvalues`:

1. Directions. The pooled centred features of all classes are projected onto their first k
   principal directions (k = `num_directions`, default 16; the eigenvectors of the pooled
   within-class scatter with the largest eigenvalues). `num_directions=None` uses the raw
   coordinates (every feature dimension) instead.
   Table 4 does not say what the test compares. We test one-dimensional projections because
   the KS test is one-dimensional, and the leading within-class directions because that is
   where the intra-class variation that DVML models lives: raw pooled features have hundreds
   of near-constant or redundant coordinates whose tests would dominate an average, and
   pooling all coordinates into one sample would hide a class that is wide along one axis and
   narrow along another.
2. Pairs. `num_pairs` (default 200) distinct unordered pairs of classes (a, b), drawn uniformly
   without replacement with a seeded generator (all pairs when there are fewer).
3. Test. For each pair and each direction, the two-sided two-sample Kolmogorov-Smirnov test
   of the centred projections of class a against those of class b. The p-value is exact
   (the Hodges lattice-path distribution under H0, computed here with a vectorized dynamic
   programme) for classes of up to `exact_max_size` (10,000) samples and Smirnov's
   asymptotic one above, the same choice and values as `scipy.stats.ks_2samp` (method
   "auto").
4. Summary. The p-value of a pair is the mean over its k directions; the reported figure is
   the mean +- standard deviation over pairs, in percent (`p_value_mean_percent`,
   `p_value_std_percent`; ddof 0). Also returned: the share of the pair x direction tests
   with p < 0.05 (`rejection_rate`).

Calibration. Centring each class on its own sample mean matches the two samples' locations
exactly, so even samples from one and the same distribution give p-values well above the 50 %
that a uniform null would average: two centred Gaussian samples of 5 / 20 / 60 each average
about 89 / 83 / 79 % (`null_mean_pvalue_percent`), the range of the paper's 74-84 %.
To read a measured mean against that, `ks_class_pvalues(..., null_reference=True)` also runs
the identical procedure after shuffling the centred rows across classes (class sizes kept,
then re-centred): a split in which all classes share one centred distribution by construction
(`null_p_value_mean_percent`). A model's mean p-value close to its null reference means the
classes' centred distributions are as alike as samples of one distribution can be. (The
reference inherits the pooled shape: when a few classes are far wider than the rest, the
shuffled classes are heavy-tailed, their sample means are noisy, and the reference drops too.)

**Relative deviation** (the Table 4 "rel. dev." rows), `relative_deviation`:

    relative deviation = [ (1/C) sum_c (1/n_c) sum_{i in c} ||x_i - m_c|| ]
                         / [ (2/(C(C-1))) sum_{a<b} ||m_a - m_b|| ]

i.e. the mean (over classes, each class counting once) of the mean Euclidean distance of a
class's features to their class mean, divided by the mean Euclidean distance between two
class means (over all pairs of classes), in percent. Table 4 does not give the normalizer;
the mean distance between class means makes the figure invariant to rotation, translation and
scale of the feature space, so models with differently scaled (normalized or not) embeddings
can be compared, and 100 % reads as "a class is as wide as classes are far apart".

Everything is vectorized numpy: no Python loop over samples, classes or pairs (the only
loops run over the distinct pairs of class sizes, the m + n steps of their KS lattice, and row
chunks of distance matrices).

Public API: `ks_class_pvalues`, `relative_deviation`, and their building blocks
`class_centred`, `class_means`, `random_class_pairs`, `principal_directions`,
`ks_2samp_statistic_pairs`, `ks_2samp_pvalue`, `mean_pairwise_distance`,
`null_mean_pvalue_percent`.
"""

import numpy as np
from scipy import stats

DEFAULT_NUM_PAIRS = 200
DEFAULT_NUM_DIRECTIONS = 16
# scipy.stats.ks_2samp (method "auto") uses the exact distribution up to this sample size.
EXACT_MAX_SIZE = 10_000


def _check_inputs(features, labels):
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, D]; got shape {features.shape}.")
    if features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features has {features.shape[0]} rows but labels has {labels.shape[0]} entries."
        )
    if not np.all(np.isfinite(features)):
        raise ValueError("features contains NaN or Inf values.")
    return features, labels


def class_centred(features, labels, min_class_size=2):
    """Subtracts each class's mean from its features, dropping classes that are too small.

    Args:
        features: float array `[N, D]`.
        labels: int array `[N]`.
        min_class_size: int, classes with fewer samples are dropped.

    Returns:
        `(centred [M, D], class_index [M], classes [C])`: the centred rows of the kept
        classes (in input order), the index into `classes` of each row, and the kept classes'
        labels (sorted).

    Raises:
        ValueError: bad shapes or non-finite features.
    """
    features, labels = _check_inputs(features, labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    keep_class = counts >= int(min_class_size)
    keep = keep_class[inverse]
    remap = np.cumsum(keep_class) - 1
    index = remap[inverse[keep]]
    kept = features[keep]
    sizes = counts[keep_class]
    means = np.zeros((len(sizes), features.shape[1]))
    np.add.at(means, index, kept)
    means /= np.maximum(sizes, 1)[:, None]
    return kept - means[index], index, classes[keep_class]


def class_means(features, labels):
    """Per-class means.

    Args:
        features: float array `[N, D]`.
        labels: int array `[N]`.

    Returns:
        `(means [C, D], classes [C], inverse [N])`, `inverse` indexing `classes` per row.
    """
    features, labels = _check_inputs(features, labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    means = np.zeros((len(classes), features.shape[1]))
    np.add.at(means, inverse, features)
    return means / counts[:, None], classes, inverse


def random_class_pairs(num_classes, num_pairs=DEFAULT_NUM_PAIRS, seed=0):
    """Distinct unordered pairs of class indices, uniform without replacement.

    Args:
        num_classes: int C >= 2.
        num_pairs: int; all C(C-1)/2 pairs (in lexicographic order) when it is not smaller.
        seed: int, seeds `numpy.random.default_rng`.

    Returns:
        int64 array `[P, 2]` with `a < b` in each row.
    """
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 to form pairs; got {num_classes}.")
    if int(num_pairs) < 1:
        raise ValueError(f"num_pairs must be >= 1; got {num_pairs}.")
    total = num_classes * (num_classes - 1) // 2
    if num_pairs >= total:
        ranks = np.arange(total, dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        ranks = np.sort(rng.choice(total, size=int(num_pairs), replace=False)).astype(np.int64)
    # Unrank k -> (a, b) in the row-major order of the strict upper triangle: row a starts at
    # start(a) = a * (2C - a - 1) / 2. Solve start(a) <= k with the quadratic formula, then
    # fix the floating-point rounding by one step either way.
    c = num_classes
    a = np.floor(((2 * c - 1) - np.sqrt((2 * c - 1) ** 2 - 8.0 * ranks)) / 2).astype(np.int64)
    a = np.clip(a, 0, c - 2)

    def start(row):
        return row * (2 * c - row - 1) // 2

    a = np.where(start(a) > ranks, a - 1, a)
    a = np.where(start(a + 1) <= ranks, a + 1, a)
    b = ranks - start(a) + a + 1
    return np.stack([a, b], axis=1)


def principal_directions(centred, num_directions):
    """The leading eigenvectors of the scatter matrix of already-centred rows.

    Args:
        centred: float array `[N, D]` (rows centred on their class means).
        num_directions: int k, at most D.

    Returns:
        float array `[D, k]`, orthonormal columns by decreasing eigenvalue (the sign of each
        column is fixed so that its largest-magnitude entry is positive).
    """
    dim = centred.shape[1]
    if not 1 <= int(num_directions) <= dim:
        raise ValueError(f"num_directions must be in [1, {dim}] (the feature dimension); got "
                         f"{num_directions}.")
    scatter = centred.T @ centred
    values, vectors = np.linalg.eigh(scatter)
    top = vectors[:, np.argsort(values)[::-1][: int(num_directions)]]
    signs = np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(top.shape[1])])
    return top * np.where(signs == 0, 1.0, signs)


def _padded_class_values(values, index, members, size):
    """`[P, size, k]` values of the classes `members` (per pair), +inf padded, and sizes."""
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    starts = np.searchsorted(sorted_index, np.arange(index.max() + 1))
    counts = np.bincount(index, minlength=index.max() + 1)
    n = counts[members]
    slot = np.arange(size)
    valid = slot[None, :] < n[:, None]
    rows = order[np.where(valid, starts[members][:, None] + slot[None, :], 0)]
    out = np.where(valid[:, :, None], values[rows], np.inf)
    return out, n, valid


def ks_2samp_statistic_pairs(values, index, pairs):
    """Two-sample KS statistics of many class pairs and directions at once.

    Args:
        values: float array `[N, k]`, one column per direction.
        index: int array `[N]`, the class index of each row.
        pairs: int array `[P, 2]` of class indices.

    Returns:
        `(d_scaled int64 [P, k], n_a [P], n_b [P])`: `d_scaled = D * n_a * n_b`, an integer, where
        D = sup_x |F_a(x) - F_b(x)| of the two empirical CDFs (ties handled as in scipy).
    """
    pairs = np.asarray(pairs, dtype=np.int64)
    size = int(np.bincount(index)[pairs].max())
    a_values, n_a, a_valid = _padded_class_values(values, index, pairs[:, 0], size)
    b_values, n_b, b_valid = _padded_class_values(values, index, pairs[:, 1], size)
    pooled = np.concatenate([a_values, b_values], axis=1)  # [P, 2S, k]
    # Integer steps: +n_b for a sample of a, -n_a for one of b, so the running sum is
    # n_a * n_b * (F_a - F_b), exactly.
    steps = np.concatenate(
        [a_valid * n_b[:, None], -(b_valid * n_a[:, None])], axis=1
    ).astype(np.int64)
    order = np.argsort(pooled, axis=1, kind="stable")
    sorted_values = np.take_along_axis(pooled, order, axis=1)
    running = np.cumsum(np.take_along_axis(steps[:, :, None], order, axis=1), axis=1)
    # The ECDFs jump at the end of a run of tied values: only look there.
    run_end = np.ones_like(sorted_values, dtype=bool)
    run_end[:, :-1] = sorted_values[:, 1:] != sorted_values[:, :-1]
    d_scaled = np.max(np.where(run_end, np.abs(running), 0), axis=1)
    return d_scaled, n_a, n_b


def _exact_inside_probability(m, n, thresholds):
    """P(max |i/m - j/n| < h/(mn) along a uniformly random lattice path), per threshold h.

    The path from (0, 0) to (m, n) is the merged order of the two samples under H0; a point
    (i, j) is inside when |i * n - j * m| < h. Computed along anti-diagonals s = i + j.
    """
    h = np.asarray(thresholds, dtype=np.int64)[:, None]  # [H, 1]
    i = np.arange(m + 1)[None, :]  # [1, m + 1]
    mass = np.zeros((h.shape[0], m + 1))
    mass[:, 0] = 1.0
    total = m + n
    for s in range(1, total + 1):
        previous = s - 1
        j_previous = previous - i
        remaining = total - previous
        # From (i, j) the next sample is from a with probability (m - i) / remaining.
        valid = (j_previous >= 0) & (j_previous <= n)
        take_a = np.where(valid, (m - i) / remaining, 0.0)
        take_b = np.where(valid, (n - j_previous) / remaining, 0.0)
        moved = mass * take_b
        moved[:, 1:] += mass[:, :-1] * take_a[:, :-1]
        j = s - i
        inside = (j >= 0) & (j <= n) & (np.abs(i * n - j * m) < h)
        mass = np.where(inside, moved, 0.0)
    return mass[:, m]


def ks_2samp_pvalue(d_scaled, n_a, n_b, exact_max_size=EXACT_MAX_SIZE):
    """Two-sided p-values of two-sample KS statistics (scipy's "auto" method, vectorized).

    Args:
        d_scaled: int array, D * n_a * n_b (see `ks_2samp_statistic_pairs`).
        n_a, n_b: int arrays broadcastable to `d_scaled`, the two sample sizes.
        exact_max_size: exact distribution when max(n_a, n_b) is at most this, otherwise
            Smirnov's asymptotic distribution (scipy: `kstwo.sf(D, round(n_a n_b/(n_a+n_b)))`).

    Returns:
        float array of p-values, the shape of `d_scaled`.
    """
    d_scaled, n_a, n_b = np.broadcast_arrays(
        np.asarray(d_scaled, np.int64), np.asarray(n_a, np.int64), np.asarray(n_b, np.int64)
    )
    small = np.minimum(n_a, n_b)
    large = np.maximum(n_a, n_b)
    p = np.ones(d_scaled.shape)
    exact = (large <= exact_max_size) & (d_scaled > 0)
    # One dynamic programme per distinct (m, n), batched over that pair's distinct thresholds.
    keys = np.stack([small[exact], large[exact], d_scaled[exact]], axis=1)
    if keys.size:
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        unique_p = np.empty(len(unique))
        sizes, starts = np.unique(unique[:, :2], axis=0, return_index=True)
        bounds = [*starts.tolist(), len(unique)]
        for (m, n), lo, hi in zip(sizes, bounds[:-1], bounds[1:], strict=True):
            inside = _exact_inside_probability(int(m), int(n), unique[lo:hi, 2])
            unique_p[lo:hi] = 1.0 - inside
        p[exact] = np.clip(unique_p[inverse], 0.0, 1.0)
    asymptotic = (large > exact_max_size) & (d_scaled > 0)
    if np.any(asymptotic):
        m, n = large[asymptotic].astype(float), small[asymptotic].astype(float)
        d = d_scaled[asymptotic] / (m * n)
        p[asymptotic] = np.clip(stats.kstwo.sf(d, np.round(m * n / (m + n))), 0.0, 1.0)
    return p


def _pair_pvalues(projected, index, pairs):
    d_scaled, n_a, n_b = ks_2samp_statistic_pairs(projected, index, pairs)
    return ks_2samp_pvalue(d_scaled, n_a[:, None], n_b[:, None])


def ks_class_pvalues(
    features,
    labels,
    num_pairs=DEFAULT_NUM_PAIRS,
    num_directions=DEFAULT_NUM_DIRECTIONS,
    seed=0,
    min_class_size=2,
    null_reference=False,
):
    """The Table 4 KS measurement: do classes share one centred feature distribution?

    See the module docstring for the definition.

    Args:
        features: float array `[N, D]`.
        labels: int array `[N]`.
        num_pairs: int, random class pairs (all pairs when fewer exist).
        num_directions: int k, leading principal directions of the pooled centred features
            (capped at D); None tests every raw coordinate instead.
        seed: int, seeds the pair draw and the null reference's shuffle.
        min_class_size: int >= 2; smaller classes are left out.
        null_reference: also run the procedure on class-shuffled centred features.

    Returns:
        dict: `p_value_mean_percent`, `p_value_std_percent` (over pairs), `rejection_rate`
        (share of tests with p < 0.05), `num_pairs`, `num_directions`, `num_classes`,
        `num_samples`, `directions` ("principal" or "coordinates"), `pair_p_values` (list, %),
        and with `null_reference` also `null_p_value_mean_percent`,
        `null_p_value_std_percent`, `null_rejection_rate`.

    Raises:
        ValueError: bad shapes, non-finite features, or fewer than 2 classes with at least
            `min_class_size` samples.
    """
    if int(min_class_size) < 2:
        raise ValueError(f"min_class_size must be >= 2; got {min_class_size}.")
    centred, index, classes = class_centred(features, labels, min_class_size)
    if len(classes) < 2:
        raise ValueError(
            f"Need at least 2 classes with >= {min_class_size} samples; got {len(classes)}."
        )
    # Paper Table 4 is ambiguous: per-direction KS on the leading within-class principal axes.
    if num_directions is None:
        projected = centred
        kind = "coordinates"
    else:
        basis = principal_directions(centred, min(int(num_directions), centred.shape[1]))
        projected = centred @ basis
        kind = "principal"
    pairs = random_class_pairs(len(classes), num_pairs, seed)
    p = _pair_pvalues(projected, index, pairs)
    per_pair = p.mean(axis=1)
    result = {
        "p_value_mean_percent": float(100 * per_pair.mean()),
        "p_value_std_percent": float(100 * per_pair.std()),
        "rejection_rate": float(np.mean(p < 0.05)),
        "num_pairs": len(pairs),
        "num_directions": int(projected.shape[1]),
        "directions": kind,
        "num_classes": len(classes),
        "num_samples": int(centred.shape[0]),
        "pair_p_values": [round(float(100 * v), 4) for v in per_pair],
    }
    if null_reference:
        rng = np.random.default_rng([int(seed), 1])
        shuffled = projected[rng.permutation(len(projected))]
        means = np.zeros((len(classes), shuffled.shape[1]))
        np.add.at(means, index, shuffled)
        means /= np.bincount(index, minlength=len(classes))[:, None]
        null_p = _pair_pvalues(shuffled - means[index], index, pairs)
        null_per_pair = null_p.mean(axis=1)
        result.update(
            null_p_value_mean_percent=float(100 * null_per_pair.mean()),
            null_p_value_std_percent=float(100 * null_per_pair.std()),
            null_rejection_rate=float(np.mean(null_p < 0.05)),
        )
    return result


def mean_pairwise_distance(points, chunk_size=2048):
    """Mean Euclidean distance over all unordered pairs of distinct rows.

    Args:
        points: float array `[C, D]`, C >= 2.
        chunk_size: rows per block of the distance matrix (bounds the memory).

    Returns:
        float.
    """
    points = np.asarray(points, dtype=np.float64)
    count = points.shape[0]
    if count < 2:
        raise ValueError(f"Need at least 2 points for a mean pairwise distance; got {count}.")
    squared = np.einsum("ij,ij->i", points, points)
    total = 0.0
    for start in range(0, count, chunk_size):
        block = points[start : start + chunk_size]
        d2 = squared[start : start + chunk_size, None] + squared[None, :] - 2 * block @ points.T
        rows = np.arange(block.shape[0])
        d2[rows, start + rows] = 0.0  # a point's distance to itself, free of rounding
        total += float(np.sqrt(np.maximum(d2, 0.0)).sum())
    # Every unordered pair is counted twice.
    return total / (count * (count - 1))


def relative_deviation(features, labels):
    """The Table 4 relative deviation: within-class spread over between-class distance.

    See the module docstring for the definition.

    Args:
        features: float array `[N, D]`.
        labels: int array `[N]`.

    Returns:
        dict: `relative_deviation_percent`, `within_class_distance` (mean over classes of the
        mean distance to the class mean), `between_centre_distance` (mean distance between
        two class means), `num_classes`, `num_samples`.

    Raises:
        ValueError: bad shapes, non-finite features, or fewer than 2 classes.
    """
    features, labels = _check_inputs(features, labels)
    means, classes, inverse = class_means(features, labels)
    if len(classes) < 2:
        raise ValueError(f"Need at least 2 classes; got {len(classes)}.")
    # Paper Table 4 is silent on the normalizer: the mean distance between class means.
    distances = np.linalg.norm(features - means[inverse], axis=1)
    per_class = np.bincount(inverse, weights=distances) / np.bincount(inverse)
    within = float(per_class.mean())
    between = mean_pairwise_distance(means)
    if between == 0:
        raise ValueError("All class means coincide: the relative deviation is undefined.")
    return {
        "relative_deviation_percent": 100 * within / between,
        "within_class_distance": within,
        "between_centre_distance": between,
        "num_classes": len(classes),
        "num_samples": int(features.shape[0]),
    }


def null_mean_pvalue_percent(class_size, num_trials=2000, seed=0):
    """Monte-Carlo mean KS p-value (%) of two centred Gaussian samples of one distribution.

    The level a shared distribution reaches once both samples are centred on their own means
    (see "Calibration" in the module docstring).

    Args:
        class_size: int n >= 2, samples per class.
        num_trials: int, simulated pairs.
        seed: int.

    Returns:
        float.
    """
    n = int(class_size)
    if n < 2:
        raise ValueError(f"class_size must be >= 2; got {class_size}.")
    rng = np.random.default_rng(seed)
    samples = rng.standard_normal((2 * num_trials, n))
    samples -= samples.mean(axis=1, keepdims=True)
    values = samples.reshape(-1, 1)
    index = np.repeat(np.arange(2 * num_trials), n)
    pairs = np.stack([np.arange(0, 2 * num_trials, 2), np.arange(1, 2 * num_trials, 2)], 1)
    return float(100 * _pair_pvalues(values, index, pairs).mean())

