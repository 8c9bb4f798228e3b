"""Evaluating an export for retrieval through a gallery index, and calibrating its open-set
matching: what `evaluate.py --index` and `--calibrate` run.

Recall@K and MAP@R through a `GalleryIndex` (exact or approximate search) follow the rules of
`dvml_tf.evaluation.metrics`: a query never finds itself, R counts the gallery images of its
class, and queries with R = 0 (no possible positive) are left out of Recall@K and MAP@R alike.

    metrics = index_retrieval_metrics(index, embeddings, labels, recall_ks=(1, 2, 4, 8))
    metrics, index = evaluate_through_index("I", "E", embedded, recall_ks, split="test")
    record = calibrate_export("E", embedded, precisions=(0.9, 0.95, 0.99), split="test")

The index's ids are the row numbers of the evaluated split (as `dvml_tf.index.builder` builds
it), so `flat` gives exactly `evaluate_embeddings`' figures and an ANN backend shows what its
approximation costs.
"""

import numpy as np

from dvml_tf.evaluation import metrics as metrics_lib
from dvml_tf.evaluation import runner
from dvml_tf.export import exporter
from dvml_tf.export import layout
from dvml_tf.index import builder
from dvml_tf.index import matching
from dvml_tf.index.gallery_index import GalleryIndex

# Queries per `GalleryIndex.search` call: bounds the [queries, k] results held at once.
QUERY_CHUNK = 4096


def index_retrieval_metrics(index, embeddings, labels, recall_ks, is_query=None,
                            compute_map=True):
    """Recall@K and MAP@R of a split's queries searched through an index of its gallery rows.

    Args:
        index: a `GalleryIndex` with labels whose int ids are row numbers of this split.
        embeddings: float [N, D], every row of the split (queries are taken from it).
        labels: [N] class labels of the split.
        recall_ks: ints >= 1.
        is_query: optional bool [N], the queries (default: every row).
        compute_map: also compute MAP@R.

    Returns:
        dict "recall@K" for each K (ascending) and "map@r".

    Raises:
        ValueError: the index holds ids that are not rows of the split, or rows whose labels
            differ from the split's (it was built from other data).
    """
    labels = np.asarray(labels)
    count = len(labels)
    ids = index.ids
    if not index.has_labels or ids.dtype.kind != "i" or not len(ids):
        raise ValueError("The index must hold labelled rows with int ids (row numbers of the "
                         "evaluated split), as index.py build writes it.")
    if ids.min() < 0 or ids.max() >= count:
        raise ValueError(f"The index holds ids outside the split's {count} rows (up to "
                         f"{ids.max()}): it was built from another split or dataset.")
    differ = np.flatnonzero(index.get_labels(ids) != labels[ids])
    if differ.size:
        raise ValueError(f"{differ.size} of the index's {len(ids)} rows have other labels than "
                         f"the split's rows of the same number (e.g. row {ids[differ[0]]}): it "
                         "was built from other data.")
    is_query, _ = metrics_lib.check_roles(is_query, None, count)
    query_rows = np.flatnonzero(is_query)
    in_index = np.zeros(count, bool)
    in_index[ids] = True
    codes = metrics_lib.encode_labels(labels)
    recall_ks = tuple(sorted(set(recall_ks)))

    def search(k):
        for start in range(0, len(query_rows), QUERY_CHUNK):
            rows = query_rows[start:start + QUERY_CHUNK]
            found, _ = index.search(embeddings[rows], k)
            yield start, found

    return metrics_lib.retrieval_metrics(
        search, codes[query_rows], codes, ids, np.where(in_index[query_rows], query_rows, -1),
        recall_ks, compute_map)


def evaluate_through_index(index_dir, saved_model, embedded, recall_ks, split, dataset=None,
                           compute_map=True):
    """Recall@K and MAP@R of an evaluated split searched through an index of it.

    Args:
        index_dir: a folder written by `index.py build` from `saved_model` on this split.
        saved_model: the export (folder, base path or version) the split was embedded with.
        embedded: the split's `evaluation.runner.EmbeddedSplit`.
        recall_ks: ints >= 1.
        split: the split's name (checked against the index's).
        dataset: the dataset's name; default: the export's.
        compute_map: also compute MAP@R.

    Returns:
        `(metrics, index)`.

    Raises:
        ValueError: an index of another model, dataset or split.
    """
    index = GalleryIndex.load(index_dir)
    _, report, contract, _ = builder.load_model(saved_model)
    index.check_contract(contract)
    info = index.info or {}
    dataset = dataset or report["model"]["dataset"]
    for key, value in (("dataset", dataset), ("split", split)):
        if value and info.get(key) not in (None, value):
            raise ValueError(f"The index {index_dir} was built on {key} {info[key]!r}, not "
                             f"{value!r}.")
    metrics = index_retrieval_metrics(index, embedded.embeddings, embedded.labels, recall_ks,
                                      is_query=embedded.catalog.is_query,
                                      compute_map=compute_map)
    return metrics, index


def calibrate_export(saved_model, embedded, precisions, split, dataset=None, data_dir=None,
                     batch_size=256, validation_classes=None):
    """Picks the matching thresholds of an export on its validation classes, measures them on
    an evaluated split, and stores them in the export's reports (both copies).

    Args:
        saved_model: the export (folder, base path or version).
        embedded: the evaluated split's `evaluation.runner.EmbeddedSplit` (not validation).
        precisions: target precisions.
        split: the evaluated split's name.
        dataset: the dataset; default: the export's.
        data_dir: TFDS data dir, image folder or CSV manifest.
        batch_size: images per embedding batch.
        validation_classes: training classes held out as validation; default: the run's.

    Returns:
        dict: the `matching` record stored (rule, metric, thresholds, the validation figures
        under "calibration" and the evaluated split's under `split`), plus "written": the
        report files updated.
    """
    validation = runner.embed_saved_model(saved_model, "validation", dataset, data_dir,
                                          batch_size, validation_classes)
    scores, correct = matching.top1(validation.embeddings, validation.labels, validation.metric,
                                    validation.catalog.is_query, validation.catalog.is_gallery)
    chosen = matching.calibrate(scores, correct, precisions)
    test_scores, test_correct = matching.top1(embedded.embeddings, embedded.labels,
                                              embedded.metric, embedded.catalog.is_query,
                                              embedded.catalog.is_gallery)
    measured = {key: matching.match_rates(test_scores, test_correct, rates["threshold"])
                for key, rates in chosen.items()}
    version_dir, _ = layout.resolve_saved_model(saved_model)
    report = layout.read_version_report(version_dir)
    record = {
        "rule": matching.RULE,
        "metric": embedded.metric,
        "score": matching.score_name(embedded.metric),
        "thresholds": {key: rates["threshold"] for key, rates in chosen.items()},
        "calibration": {"dataset": dataset or report["model"]["dataset"],
                        "split": "validation", "queries": len(scores),
                        "classes": int(validation.catalog.num_classes),
                        "top1_correct": float(np.mean(correct)), "targets": chosen},
        split: {"queries": len(test_scores), "classes": int(embedded.catalog.num_classes),
                "top1_correct": float(np.mean(test_correct)), "targets": measured},
    }
    written = exporter.update_report(version_dir, "matching", record)
    return {**record, "written": list(written)}
