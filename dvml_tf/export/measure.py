"""Measurements of an export: file sizes, embedding parity, Recall@1 and per-image latency."""

import os
import time

import numpy as np

from dvml_tf.evaluation import metrics as metrics_lib


def cosine_rows(a, b):
    """Cosine similarity of each row of `a` with the same row of `b`.

    Args:
        a: float array [N, D].
        b: float array [N, D].

    Returns:
        float64 array [N].
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Shapes differ: {a.shape} vs {b.shape}.")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)


def parity(reference, candidate):
    """Summary of per-image agreement with a reference.

    Args:
        reference: float array [N, D] (the Keras embeddings).
        candidate: float array [N, D].

    Returns:
        dict: `cosine_min`, `cosine_mean`, `max_abs_diff`, `num_images`.
    """
    cosines = cosine_rows(reference, candidate)
    return {
        "cosine_min": float(cosines.min()),
        "cosine_mean": float(cosines.mean()),
        "max_abs_diff": float(np.max(np.abs(np.asarray(reference) - np.asarray(candidate)))),
        "num_images": len(cosines),
    }


def recall_at_1(embeddings, labels, normalized):
    """Recall@1 of a split against itself (each query excluded), as `evaluate.py` computes it.

    Args:
        embeddings: float array [N, D].
        labels: int array [N].
        normalized: cosine distance (the model L2-normalizes) or Euclidean.

    Returns:
        float in [0, 1].
    """
    result = metrics_lib.evaluate_embeddings(
        embeddings,
        labels,
        recall_ks=(1,),
        metric="cosine" if normalized else "euclidean",
        compute_clustering=False,
        compute_map=False,
    )
    return result["recall@1"]


def median_latency_ms(fn, runs=50, warmup=5):
    """Median wall time of `fn()` in milliseconds, after `warmup` untimed calls.

    Args:
        fn: callable without arguments (it must block until its result exists).
        runs: timed calls (>= 1).
        warmup: untimed calls first.

    Returns:
        float.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1; got {runs}.")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def path_size(path):
    """Size in bytes of a file, or of every file under a folder.

    Args:
        path: file or folder.

    Returns:
        int.
    """
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
