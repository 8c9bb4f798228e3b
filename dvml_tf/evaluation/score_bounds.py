"""Candidate scores with a proven error bound, and exact re-scoring.

The exact search (`exact_search`) ranks gallery rows by their *exact* distance to the query,
i.e. by the real number that the float32 inputs define, with exact ties going to the smaller
index. It never computes that number for every pair: a fast matrix product gives a candidate
score ``s~`` with a proven bound ``|s~ - s| <= w_i + w_j`` (one term per row, ``w = C a^2 + t``,
``a`` the row's norm), the bound decides which pairs can still matter, and only those are
re-scored in float64 (`rescore`) and, where even float64 cannot order two of them, in exact
integer arithmetic (`exact_keys`).

Scores (smaller is nearer; ``x`` are the canonical float32 rows: the embeddings for
"euclidean", their float32 L2-normalisation for "cosine"):

* "euclidean": ``s = ||x_q - x_g||^2``;
* "cosine": ``s = -x_q . x_g`` (the distance is ``1 + s``).

Derivation of the bound. ``u = 2^-24`` is float32's unit roundoff, ``u_b = 2^-8`` bfloat16's,
``D`` the dimension, ``g_n = n u / (1 - n u)`` (Higham, Accuracy and Stability of Numerical
Algorithms, Lemma 3.1 and eq. 3.5: a sum of n terms in any order, with or without fused
multiply-adds, errs by at most ``g_n`` times the sum of their magnitudes). ``a_i`` bounds
``||x'_i||``, ``x'`` being the rows the product sees (see centring below).

1. Product ``p~ = fl(x'_i . x'_j)``. float32 GEMM (any BLAS, any blocking, any thread count):
   ``|p~ - p| <= g_D sum_d |x'_id x'_jd| <= g_D a_i a_j`` (Cauchy-Schwarz). bfloat16 GEMM
   (oneDNN through TF: inputs rounded to bfloat16, products exact in float32, float32
   accumulation, result converted to bfloat16 because TF's CPU kernel returns bfloat16):
   rounding the inputs moves each product by at most ``(2 u_b + u_b^2) |x'_id x'_jd|``, the
   accumulation adds ``g_D (1 + u_b)^2 a_i a_j``, the output conversion one bfloat16 ulp,
   ``2 u_b``, times the accumulated magnitude (TF 2.21 truncates on AVX2 CPUs: 1 + 511 * 2^-9
   comes back as 2 - 2^-7; oneDNN's AVX512_BF16 conversion rounds to nearest); together
   ``rho a_i a_j`` with ``rho = 2 u_b + u_b^2 + g_D (1 + u_b)^2 + 2 u_b (1 + u_b)^2 (1 + g_D)``.
   Flushing subnormals to zero (oneDNN's bf16 kernels do) moves the result by at most
   ``D 2^-126 (a_i + a_j)``, covered by the absolute term ``t`` below for every a <= 2^60.
2. Euclidean scores are ``fl(fl(-2 p~ + n_j) + n_i)`` with ``n = fl(||x'||^2)``,
   ``|n_i - ||x'_i||^2| <= g_D a_i^2``; each of the two float32 additions errs by at most
   ``u (1 + rho + g_D) (a_i + a_j)^2`` (the magnitude of its operands). Scaling by -2 is exact.
3. Centring (Euclidean data far from the origin, see `prepare`): ``x' = fl(x - c)`` moves each
   row by at most ``e_i = u / (1 - u) a_i``, so the distance moves by at most
   ``e = e_i + e_j`` and the squared distance by at most ``e (2 (a_i + a_j) + e)``, i.e.
   ``(2 v + v^2)(a_i + a_j)^2`` with ``v = u / (1 - u)``.
4. With ``a_i a_j <= (a_i^2 + a_j^2) / 2`` and ``(a_i + a_j)^2 <= 2 (a_i^2 + a_j^2)`` the total
   is at most ``C (a_i^2 + a_j^2)``: Euclidean ``C = rho' + g_D + 4 u (1 + rho' + g_D) +
   [centred] 2 (2 v + v^2)`` with ``rho' = rho`` of the product (the factor 2 of ``-2 p`` and the
   1/2 of step 4 cancel); cosine ``C = rho / 2`` (the score is ``-p~``, no additions). The
   code multiplies C by ``1 + 2^-20`` and adds ``t = 2^-64`` to absorb the float64 rounding of
   computing the bound itself and the subnormal flushes of step 1 (``D 2^-126 (a_i + a_j) <=
   2^-64`` for D <= 2^20, a <= 2^40; larger norms are refused by `prepare`).

float64 re-scoring: Euclidean ``fl64(sum_d (x_id - x_jd)^2)`` sums D non-negative terms that
each carry a relative error of at most ``3 u64`` (subtraction, square), so its relative error
is at most ``g64_{D+3}``; cosine ``-fl64(sum_d x_id x_jd)`` has exact float64 products and
errs by at most ``g64_D a_i a_j``. Two re-scored pairs whose float64 intervals overlap are
ordered by `exact_keys`: the rows scaled by 2^149 are integers (every float32 is a multiple
of 2^-149), so the score times 2^298 is an exact Python integer.
"""

import functools

import numpy as np

PRECISIONS = ("auto", "float32", "bfloat16")
_U32 = 2.0**-24
_U_BF16 = 2.0**-8
_U64 = 2.0**-53
_SAFETY = 1.0 + 2.0**-20
_ABSOLUTE = 2.0**-64
# Norms above this make the absolute slack of the subnormal flushes (derivation, step 4) too
# small, and squared norms approach float32's range.
MAX_NORM = 2.0**40
# Pairs per float64 re-scoring block: bounds the [pairs, D] float64 temporaries.
_RESCORE_BYTES = 1 << 25


def _gamma(n, unit):
    return n * unit / (1.0 - n * unit)


def cpu_flags():
    """The CPU feature flags of this machine (Linux /proc/cpuinfo; empty elsewhere).

    Returns:
        frozenset of str.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bfloat16(flags=None):
    """Whether the CPU multiplies bfloat16 natively (AVX512_BF16 or AMX_BF16), which is what
    makes oneDNN's bfloat16 GEMM faster than float32."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


@functools.cache
def _tf_bfloat16_accumulates_in_float32():
    """Checks the rounding and accumulation that the bound assumes (step 1 of the derivation).

    1 + 511 * 2^-9 summed in bfloat16 would stay at 1 (each 2^-9 is below half an ulp of 1);
    a float32 accumulator gives 1.998, which the conversion to bfloat16 turns into 2 (rounding)
    or 2 - 2^-7 (truncation): either is within one bfloat16 ulp of the exact sum.
    """
    try:
        import tensorflow as tf
    except ImportError:
        return False
    a = np.full((1, 512), 2.0**-9, dtype=np.float32)
    a[0, 0] = 1.0
    b = np.ones((512, 1), dtype=np.float32)
    result = tf.matmul(tf.cast(a, tf.bfloat16), tf.cast(b, tf.bfloat16))
    exact = 1.0 + 511 * 2.0**-9
    accumulates = abs(float(tf.cast(result, tf.float32).numpy()[0, 0]) - exact) <= 2.0**-7
    # The inputs' error of u_b assumes tf.cast rounds to nearest: 1 + 0.75 * 2^-7 -> 1 + 2^-7.
    value = tf.cast(tf.constant([1.0 + 0.75 * 2.0**-7]), tf.bfloat16)
    rounds = float(tf.cast(value, tf.float32).numpy()[0]) == 1.0 + 2.0**-7
    return accumulates and rounds


def resolve_precision(precision, k):
    """The product format to use: "bfloat16" only where it pays and the bound holds.

    Args:
        precision: "auto", "float32" or "bfloat16".
        k: neighbours per query. bfloat16's bound is 257x float32's (cosine: 516x), so with
            many neighbours most of the top k must be re-scored in float64 and the pass saves
            nothing; "auto" uses it for k <= 64.

    Returns:
        "float32" or "bfloat16".

    Raises:
        ValueError: on an unknown precision, or "bfloat16" where TensorFlow is missing or does
            not accumulate bfloat16 products in float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    if precision == "float32":
        return "float32"
    if precision == "auto":
        native = has_native_bfloat16() and k <= 64
        return "bfloat16" if native and _tf_bfloat16_accumulates_in_float32() else "float32"
    if not _tf_bfloat16_accumulates_in_float32():
        raise ValueError(
            "precision='bfloat16' needs TensorFlow with oneDNN's bfloat16 matmul accumulating in "
            "float32 (the error bound assumes it); use precision='float32'."
        )
    return "bfloat16"


def product_constant(precision, dim):
    """rho of the derivation: |p~ - x'_i . x'_j| <= rho a_i a_j.

    Args:
        precision: "float32" or "bfloat16".
        dim: D.

    Returns:
        float.
    """
    g = _gamma(dim, _U32)
    if precision == "float32":
        return g
    ub = _U_BF16
    return 2 * ub + ub**2 + g * (1 + ub) ** 2 + 2 * ub * (1 + ub) ** 2 * (1 + g)


def bound_constant(metric, precision, dim, centred):
    """C of the derivation: |s~_ij - s_ij| <= C (a_i^2 + a_j^2) + t.

    Args:
        metric: "euclidean" or "cosine".
        precision: "float32" or "bfloat16".
        dim: D.
        centred: whether the Euclidean rows were centred.

    Returns:
        float (already multiplied by the safety factor).
    """
    rho = product_constant(precision, dim)
    if metric == "cosine":
        return _SAFETY * rho / 2
    g = _gamma(dim, _U32)
    constant = rho + g + 4 * _U32 * (1 + rho + g)
    if centred:
        v = _U32 / (1 - _U32)
        constant += 2 * (2 * v + v * v)
    return _SAFETY * constant


class Prepared:
    """Rows ready for the candidate pass, with their share of the error bound.

    Args:
        canonical: float32 [N, D], the rows whose exact scores define the ranking.
        product_rows: float32 [N, D], the rows the product sees (centred or not).
        sq_norms: float32 [N], ``fl(||x'||^2)`` (Euclidean) or None (cosine).
        weights: float64 [N], ``w_i = C a_i^2 + t / 2`` (the bound of a pair is w_i + w_j).
        metric: "euclidean" or "cosine".
        precision: "float32" or "bfloat16".
        centre: float32 [D] subtracted from the rows for the product, or None.
    """

    def __init__(self, canonical, product_rows, sq_norms, weights, metric, precision,
                 centre=None):
        self.centre = centre
        self.canonical = canonical
        self.product_rows = product_rows
        self.sq_norms = sq_norms
        self.weights = weights
        self.metric = metric
        self.precision = precision
        self._bf16 = None

    def subset(self, rows):
        """The same rows' data for the row indices `rows` (a gallery sample)."""
        return Prepared(self.canonical[rows], self.product_rows[rows],
                        None if self.sq_norms is None else self.sq_norms[rows],
                        self.weights[rows], self.metric, self.precision, self.centre)

    def bfloat16_rows(self, rows):
        """Rows `rows` (a slice) as a bfloat16 TF tensor, converted once per search."""
        import tensorflow as tf

        if self._bf16 is None:
            self._bf16 = tf.cast(self.product_rows, tf.bfloat16)
        return self._bf16[rows]


def centre_for(gallery):
    """The float32 centre of `gallery` when its offset dominates its spread, else None.

    Distances are translation invariant, but the expansion ||g||^2 - 2 q.g loses about
    log2(||x||^2 / spread^2) bits when the data sit far from the origin (e.g. ReLU features);
    centring on the mean removes that loss and so narrows the bound.
    """
    mean = gallery.mean(axis=0, dtype=np.float64)
    mean_sq_norm = np.einsum("ij,ij->i", gallery, gallery, dtype=np.float64).mean()
    # ||mean||^2 > total variance = E||x||^2 - ||mean||^2.
    return mean.astype(np.float32) if 2.0 * (mean @ mean) > mean_sq_norm else None


def prepare(canonical, metric, precision, centre=None):
    """Prepares canonical rows for the candidate pass.

    Args:
        canonical: float32 [N, D] (L2-normalised already for "cosine").
        metric: "euclidean" or "cosine".
        precision: "float32" or "bfloat16".
        centre: float32 [D] to subtract (Euclidean), or None.

    Returns:
        `Prepared`.

    Raises:
        ValueError: if a row's norm exceeds MAX_NORM (its squared distances would overflow
            float32).
    """
    rows = canonical if centre is None else canonical - centre
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
    if norms.size and norms.max() > MAX_NORM:
        where = " after centring" if centre is not None else ""
        raise ValueError(
            f"embeddings hold a row of norm {norms.max():.3g}{where}; at most {MAX_NORM:.3g} is "
            "supported (squared distances must fit float32)."
        )
    # The float64 norm errs by far less than 2^-20 relative; the safety factor covers it.
    constant = bound_constant(metric, precision, rows.shape[1], centre is not None)
    weights = constant * norms * norms + _ABSOLUTE / 2
    sq_norms = np.einsum("ij,ij->i", rows, rows) if metric == "euclidean" else None
    return Prepared(canonical, rows, sq_norms, weights, metric, precision, centre)


def candidate_block(queries, gallery, query_rows, gallery_rows):
    """Candidate scores s~ of a block of pairs (the float32 matrix the selection filters).

    Args:
        queries: `Prepared` of the queries.
        gallery: `Prepared` of the gallery (may be `queries`).
        query_rows: slice of query rows.
        gallery_rows: slice of gallery rows.

    Returns:
        float32 [rows, cols], C-contiguous and writable.
    """
    scale = -2.0 if queries.metric == "euclidean" else -1.0
    if queries.precision == "float32":
        # Scaling the query block by -2 (or -1) is exact, and cheaper than scaling the product.
        block = np.matmul(queries.product_rows[query_rows] * np.float32(scale),
                          gallery.product_rows[gallery_rows].T)
    else:
        import tensorflow as tf

        product = tf.matmul(queries.bfloat16_rows(query_rows), gallery.bfloat16_rows(gallery_rows),
                            transpose_b=True)
        block = tf.cast(product, tf.float32).numpy()
        block *= np.float32(scale)
    if queries.metric == "euclidean":
        block += gallery.sq_norms[gallery_rows]
        block += queries.sq_norms[query_rows, None]
    return block


def rescore(queries, gallery, query_ids, gallery_ids, metric):
    """float64 scores of pairs and their proven error bounds (see the module docstring).

    Args:
        queries: float32 [Q, D] canonical rows.
        gallery: float32 [G, D] canonical rows.
        query_ids: int [P] row of each pair in `queries`.
        gallery_ids: int [P] row of each pair in `gallery`.
        metric: "euclidean" or "cosine".

    Returns:
        (scores, errors): float64 [P] each; the exact score lies in scores +- errors.
    """
    num = len(query_ids)
    scores = np.empty(num, dtype=np.float64)
    errors = np.empty(num, dtype=np.float64)
    dim = queries.shape[1]
    step = max(1, _RESCORE_BYTES // (16 * dim))
    for start in range(0, num, step):
        part = slice(start, min(start + step, num))
        left = queries[query_ids[part]].astype(np.float64)
        right = gallery[gallery_ids[part]].astype(np.float64)
        if metric == "euclidean":
            left -= right
            value = np.einsum("ij,ij->i", left, left)
            scores[part] = value
            errors[part] = _SAFETY * _gamma(dim + 3, _U64) * value
        else:
            scores[part] = -np.einsum("ij,ij->i", left, right)
            magnitude = np.sqrt(np.einsum("ij,ij->i", left, left)
                                * np.einsum("ij,ij->i", right, right))
            errors[part] = _SAFETY * _gamma(dim, _U64) * magnitude + _ABSOLUTE
    return scores, errors


def exact_keys(queries, gallery, query_ids, gallery_ids, metric):
    """Exact scores as Python integers (score * 2^298), for pairs float64 cannot order.

    Args:
        queries, gallery: float32 canonical rows.
        query_ids, gallery_ids: int [P] pair rows (P is small: exact ties and near-ties).
        metric: "euclidean" or "cosine".

    Returns:
        list of P Python ints, ordered as the exact scores.
    """
    def integers(row):
        # float32 -> float64 and the power-of-two scaling are exact; each value is an integer.
        return [int(v) for v in row.astype(np.float64) * 2.0**149]

    keys = []
    for q, g in zip(query_ids, gallery_ids, strict=True):
        left, right = integers(queries[q]), integers(gallery[g])
        if metric == "euclidean":
            keys.append(sum((a - b) * (a - b) for a, b in zip(left, right, strict=True)))
        else:
            keys.append(-sum(a * b for a, b in zip(left, right, strict=True)))
    return keys


def float32_distance(scores, metric):
    """Reported distances of exact scores: float32 Euclidean distance or 1 - cosine.

    Args:
        scores: float64 scores (re-scored).
        metric: "euclidean" or "cosine".

    Returns:
        float32 array.
    """
    if metric == "euclidean":
        return np.sqrt(np.maximum(scores, 0.0)).astype(np.float32)
    return (1.0 + scores).astype(np.float32)


def round_up_float32(values):
    """The smallest float32 >= each float64 value (thresholds compared with float32 scores)."""
    rounded = np.asarray(values, dtype=np.float64).astype(np.float32)
    low = rounded.astype(np.float64) < values
    return np.where(low, np.nextafter(rounded, np.float32(np.inf)), rounded)
