"""k-means clustering for the NMI and F1 scores (K = number of test classes; Song et al. 2016).

Settings (scikit-learn ``KMeans``, ``algorithm="lloyd"``, ``n_init=1``, ``tol=1e-4``), chosen by
measurement on the project machine (2 cores, scikit-learn 1.9.1, synthetic clustered 512-d
embeddings from benchmarks/eval_scale.py):

* K <= 1,000 (CUB: 100, Cars196: 98): ``init="k-means++", max_iter=300`` (scikit-learn's
  defaults). At Cars scale (8,131 x 512, K = 98) it takes about 5 s and scored NMI 0.965 / 0.973
  and F1 0.872 / 0.911 (seeds 0 / 1), against 0.4-0.7 s and NMI 0.959 / 0.944, F1 0.871 / 0.811
  with random init: better and less seed-dependent, at a cost that does not matter.
* K > 1,000 (SOP: 11,316): ``init="random", max_iter=20`` (K distinct samples drawn uniformly,
  as faiss k-means, which most metric-learning code uses for SOP, also does). scikit-learn's
  k-means++ is a sequential loop over the K centres, each scoring 2 + ln K candidates against
  all N points, so its cost grows as K log K x N: at 15,000 x 512 with K = 2,806 it took 79-106 s
  (random init: 4-5 s; NMI 0.926 vs 0.900, F1 0.577 vs 0.446), and at SOP scale it had not
  finished after 13 minutes (about 25 minutes extrapolated). With random init the full SOP
  scale (60,502 x 512, K = 11,316) took 141 s on 2 cores (60.9 s in an earlier run): Lloyd
  converged in 14 of the allowed 20 iterations, each an N x K x D product (~0.7 TFLOP);
  NMI 0.890, F1 0.328 on the synthetic data (benchmarks/results/eval_scale.json, "kmeans").
* n_init=1: a restart costs a full clustering. algorithm="lloyd": "elkan" keeps K x K centre
  distances and N x K bounds (0.5 GB + 2.7 GB at SOP scale) and gains little in 512-d.

The result is deterministic for a given seed.
"""

import numpy as np

# Paper §4.1 is silent: k-means settings (init, restarts, iterations) for K = #test classes.
KMEANS_PLUSPLUS_MAX_CLUSTERS = 1000
SMALL_K_SETTINGS = {
    "init": "k-means++",
    "n_init": 1,
    "max_iter": 300,
    "tol": 1e-4,
    "algorithm": "lloyd",
}
LARGE_K_SETTINGS = {
    "init": "random",
    "n_init": 1,
    "max_iter": 20,
    "tol": 1e-4,
    "algorithm": "lloyd",
}
_ALLOWED_OVERRIDES = frozenset({"init", "n_init", "max_iter", "tol", "algorithm", "verbose"})


def kmeans_settings(num_clusters):
    """The default scikit-learn KMeans settings for K clusters (see the module docstring).

    Args:
        num_clusters: K.

    Returns:
        dict of ``KMeans`` keyword arguments (a copy).
    """
    if num_clusters <= KMEANS_PLUSPLUS_MAX_CLUSTERS:
        return dict(SMALL_K_SETTINGS)
    return dict(LARGE_K_SETTINGS)


def fit_kmeans(embeddings, num_clusters, seed=0, **overrides):
    """Fits k-means (settings in the module docstring) and returns the fitted model.

    Args:
        embeddings: float array [N, D] (already L2-normalised if the evaluation is cosine).
        num_clusters: K, 1 <= K <= N (the number of test classes for NMI/F1).
        seed: random state of the initialisation.
        **overrides: replacements for the `kmeans_settings(num_clusters)` defaults (e.g.
            ``init="k-means++"``, ``n_init=3``, ``max_iter=300``), passed to
            ``sklearn.cluster.KMeans``.

    Returns:
        The fitted ``sklearn.cluster.KMeans`` (``labels_``, ``n_iter_``, ``inertia_``).

    Raises:
        ValueError: on invalid embeddings, K out of range or unknown settings.
    """
    # Imported here: scikit-learn is needed only when clustering is requested.
    from sklearn.cluster import KMeans

    from dvml_tf.evaluation import knn

    embeddings = knn.check_embeddings(embeddings)
    num = embeddings.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)):
        raise ValueError(f"num_clusters must be an int; got {num_clusters!r}.")
    if not 1 <= num_clusters <= num:
        raise ValueError(
            f"num_clusters must be in [1, {num}] (the number of samples); got {num_clusters}."
        )
    unknown = set(overrides) - _ALLOWED_OVERRIDES
    if unknown:
        raise ValueError(
            f"unknown k-means settings {sorted(unknown)}; valid: {sorted(_ALLOWED_OVERRIDES)}."
        )
    settings = {**kmeans_settings(num_clusters), **overrides}
    return KMeans(n_clusters=int(num_clusters), random_state=seed, **settings).fit(embeddings)


def kmeans_cluster(embeddings, num_clusters, seed=0, **overrides):
    """Clusters the embeddings with k-means (settings in the module docstring).

    Args:
        embeddings: float array [N, D] (already L2-normalised if the evaluation is cosine).
        num_clusters: K, 1 <= K <= N (the number of test classes for NMI/F1).
        seed: random state of the initialisation.
        **overrides: see `fit_kmeans`.

    Returns:
        int64 array [N] of cluster ids in [0, K).

    Raises:
        ValueError: on invalid embeddings, K out of range or unknown settings.
    """
    return fit_kmeans(embeddings, num_clusters, seed, **overrides).labels_.astype(np.int64)
