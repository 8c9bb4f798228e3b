"""Evaluation on numpy embeddings: exact tiled kNN, Recall@K / MAP@R / NMI / F1, k-means,
figures, TensorBoard projector files, an optional tensorflow-similarity cross-check, and the
rule that says whether a method beats its baseline over seeds (`compare_over_seeds`).

The metrics depend on neither the model nor the data modules; `RetrievalMetricsCallback`
(`callbacks`: the metrics on held-out data during `model.fit`) and the runner do, and are
imported when first used. scikit-learn (clustering, t-SNE), matplotlib (`plots`) and
tensorflow-similarity (`tfsim_check`) are imported only when used.
"""

from dvml_tf.evaluation.knn import iter_nearest_neighbors
from dvml_tf.evaluation.knn import nearest_neighbors
from dvml_tf.evaluation.metrics import evaluate_embeddings
from dvml_tf.evaluation.metrics import map_at_r
from dvml_tf.evaluation.metrics import nmi
from dvml_tf.evaluation.metrics import pairwise_f1
from dvml_tf.evaluation.metrics import recall_at_k
from dvml_tf.evaluation.metrics import relevant_counts
from dvml_tf.evaluation.projector import write_projector
from dvml_tf.evaluation.seed_comparison import compare_over_seeds

__all__ = [
    "RetrievalMetricsCallback",
    "compare_over_seeds",
    "evaluate_embeddings",
    "iter_nearest_neighbors",
    "kmeans_cluster",
    "map_at_r",
    "nearest_neighbors",
    "nmi",
    "pairwise_f1",
    "plot_central_latent_space",
    "plot_retrieval_grid",
    "plot_tsne",
    "recall_at_k",
    "relevant_counts",
    "tfsim_retrieval_metrics",
    "write_projector",
]

_LAZY = {
    "RetrievalMetricsCallback": "dvml_tf.evaluation.callbacks",
    "kmeans_cluster": "dvml_tf.evaluation.clustering",
    "plot_tsne": "dvml_tf.evaluation.plots",
    "plot_central_latent_space": "dvml_tf.evaluation.plots",
    "plot_retrieval_grid": "dvml_tf.evaluation.plots",
    "tfsim_retrieval_metrics": "dvml_tf.evaluation.tfsim_check",
}


def __getattr__(name):
    # Lazy so that `import dvml_tf.evaluation` needs neither scikit-learn, matplotlib nor
    # tensorflow-similarity.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
