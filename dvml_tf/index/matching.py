"""Open-set matching: is a query's nearest gallery image of the same class, or of none?

A retrieval system that answers "which known class is this?" must also be able to say "none":
the query may show a class the gallery does not hold. The rule used here is the usual one of
open-set retrieval (tensorflow-similarity's `calibrate` with its nearest-neighbour match
strategy; face identification's open-set protocol): take the query's **top-1** gallery
neighbour (the query itself excluded) and accept it as a **match** when its score is at least a
threshold. Per threshold t, over the queries:

* precision(t) = correct matches / matches, where a match is correct when the top-1
  neighbour's class is the query's;
* recall(t) = correct matches / queries whose top-1 neighbour is of their class (the share of
  the right answers that the threshold lets through, tensorflow-similarity's definition);
* matched(t) = matches / queries.

`calibrate` picks, for each target precision p, the loosest threshold whose precision is at
least p on calibration data (validation classes, never the test classes): among the thresholds
with precision >= p the one with the most matches. Scores are the index's (`GalleryIndex`):
cosine similarity, or the negative squared Euclidean distance; higher is more similar, and a
result matches when score >= threshold. A target no threshold reaches gets threshold None (no
result is ever matched at that precision).
"""

import numpy as np

from dvml_tf.evaluation import metrics as metrics_lib
from dvml_tf.index import gallery_index

TARGET_PRECISIONS = (0.9, 0.95, 0.99)
RULE = ("top-1 gallery neighbour (the query itself excluded) accepted when its score >= the "
        "threshold; precision = correct accepted / accepted, recall = correct accepted / "
        "queries whose top-1 is of their class, matched = accepted / queries")


def score_name(metric):
    """What a score is under an index metric (for reports)."""
    return ("cosine similarity" if metric == "cosine"
            else "negative squared Euclidean distance")


def target_key(precision):
    """The key of a target precision in the report's thresholds: "0.95"."""
    return f"{float(precision):g}"


def top1(embeddings, labels, metric, is_query=None, is_gallery=None):
    """The score of each query's nearest gallery image and whether it shares the query's class.

    Exact search with a flat `GalleryIndex`, so the scores are in the units `search` returns.

    Args:
        embeddings: float [N, D].
        labels: int [N].
        metric: "cosine" or "euclidean".
        is_query: optional bool [N] (default: every row is a query).
        is_gallery: optional bool [N] (default: every row is in the gallery).

    Returns:
        (scores float32 [Q], correct bool [Q]) for the Q queries, in row order.

    Raises:
        ValueError: fewer than 2 gallery images, or bad masks.
    """
    embeddings = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels)
    is_query, is_gallery = metrics_lib.check_roles(is_query, is_gallery, len(labels))
    gallery_rows, query_rows = np.flatnonzero(is_gallery), np.flatnonzero(is_query)
    if len(gallery_rows) < 2:
        raise ValueError(f"Matching needs at least 2 gallery images; got {len(gallery_rows)}.")
    index = gallery_index.GalleryIndex(embeddings.shape[1], metric, "flat")
    index.add(gallery_rows, embeddings[gallery_rows], labels=labels[gallery_rows])
    ids, scores = index.search(embeddings[query_rows], k=2)
    keep = metrics_lib.exclude_self_mask(ids, query_rows, is_gallery[query_rows])
    ids = ids[keep].reshape(-1, 1)[:, 0]
    scores = scores[keep].reshape(-1, 1)[:, 0]
    return scores, labels[ids] == labels[query_rows]


def match_rates(scores, correct, threshold):
    """Precision, recall and matched share at one threshold (see the module docstring).

    Args:
        scores: float [Q] top-1 scores.
        correct: bool [Q].
        threshold: float, or None (nothing matches).

    Returns:
        dict "threshold", "precision" (None when nothing matches), "recall", "matched".
    """
    scores, correct = np.asarray(scores), np.asarray(correct, bool)
    matched = np.zeros(len(scores), bool) if threshold is None else scores >= threshold
    hits = int(np.count_nonzero(matched & correct))
    return {
        "threshold": None if threshold is None else float(threshold),
        "precision": hits / int(matched.sum()) if matched.any() else None,
        "recall": hits / int(correct.sum()) if correct.any() else 0.0,
        "matched": float(matched.mean()) if len(scores) else 0.0,
    }


def calibrate(scores, correct, targets=TARGET_PRECISIONS):
    """The loosest threshold reaching each target precision (see the module docstring).

    Args:
        scores: float [Q] top-1 scores of calibration queries.
        correct: bool [Q], whether each top-1 neighbour is of the query's class.
        targets: precisions in (0, 1].

    Returns:
        dict target key ("0.9") -> `match_rates` at the chosen threshold.

    Raises:
        ValueError: no scores, or a target outside (0, 1].
    """
    scores = np.asarray(scores, np.float64)
    correct = np.asarray(correct, bool)
    if scores.ndim != 1 or scores.shape != correct.shape or not len(scores):
        raise ValueError("calibrate needs one score and one correct flag per query (at least "
                         f"one query); got shapes {scores.shape} and {correct.shape}.")
    for target in targets:
        if not 0 < target <= 1:
            raise ValueError(f"target precisions must be in (0, 1]; got {target!r}.")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    precision = np.cumsum(correct[order]) / np.arange(1, len(scores) + 1)
    # A threshold accepts every query scoring at least as well: only the last position of each
    # run of equal scores is a threshold one can choose.
    ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    chosen = {}
    for target in targets:
        reaching = ends[precision[ends] >= target]
        threshold = sorted_scores[reaching[-1]] if len(reaching) else None
        chosen[target_key(target)] = match_rates(scores, correct, threshold)
    return chosen


def choose_threshold(matching, precision=None):
    """The threshold of one target precision from a report's "matching" section.

    Args:
        matching: dict with "thresholds" (target key -> threshold or None), or None.
        precision: the target (e.g. 0.95); None: 0.95 when calibrated for it, else the
            highest calibrated target.

    Returns:
        (target key, threshold or None), or (None, None) when `matching` is None and no
        precision was asked for.

    Raises:
        ValueError: a precision was asked for but the model is not calibrated for it.
    """
    thresholds = (matching or {}).get("thresholds") or {}
    if precision is None:
        if not thresholds:
            return None, None
        key = target_key(0.95) if target_key(0.95) in thresholds else max(
            thresholds, key=float)
        return key, thresholds[key]
    key = target_key(precision)
    if key not in thresholds:
        available = ", ".join(sorted(thresholds, key=float)) or "none"
        raise ValueError(
            f"--precision={precision:g} has no calibrated threshold (calibrated: {available}); "
            "run evaluate.py --saved_model=E --calibrate (with --precisions) first.")
    return key, thresholds[key]
