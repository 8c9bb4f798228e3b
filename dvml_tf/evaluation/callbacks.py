"""`RetrievalMetricsCallback`: Recall@K and MAP@R on held-out data while `model.fit` trains.

    callback = RetrievalMetricsCallback((val_images, val_labels), every_n_epochs=5,
                                        log_dir="runs/fit/retrieval")
    model.fit(train_batches, epochs=50, steps_per_epoch=100,
              callbacks=[callback, keras.callbacks.EarlyStopping("val_recall@1", mode="max",
                                                                 patience=3)])

At the end of every N-th epoch the callback embeds the held-out images with the model (in
inference mode, `models.inference_function`), computes the metrics of `train.py`'s evaluation
(`evaluation.evaluate_embeddings`: exact leave-one-out kNN over the whole held-out set, every
Recall@K, MAP@R, optionally NMI and F1) with the model's own distance (`runner.distance_metric`:
cosine when it L2-normalizes its embeddings), adds them to the epoch's `logs` as
`val_recall@K`, `val_map@r`, ... (so `History` and callbacks listed after it, such as
`EarlyStopping` or `ModelCheckpoint`, see them) and writes them as TensorBoard scalars.

Unlike tensorflow-similarity's `EvalCallback`, it needs no separate query/index split (every
held-out image queries all the others), any K up to the set size, MAP@R, and runs every N epochs
instead of every epoch.
"""

import keras
import numpy as np
import tensorflow as tf

from dvml_tf import data as data_lib
from dvml_tf import models
from dvml_tf.evaluation import metrics as metrics_lib
from dvml_tf.evaluation import runner


class RetrievalMetricsCallback(keras.callbacks.Callback):
    """Evaluates retrieval on held-out data every N epochs of `model.fit`.

    Args:
        data: the held-out images and labels: a tuple `(images, labels)` of arrays (images as
            the model takes them), a finite `tf.data.Dataset` of `(images, labels)` batches
            (read once per evaluation), or a `data.ImageCatalog` (read with `preprocess`'s
            test transform).
        every_n_epochs: evaluate after epochs N, 2N, 3N, ... (1-based).
        recall_ks: the K of Recall@K.
        log_dir: optional TensorBoard folder; one scalar per metric, `step` = the epoch index
            (0-based, as Keras's `TensorBoard` callback counts).
        prefix: prefix of the keys in `logs` and of the TensorBoard tags.
        compute_clustering: also compute NMI and F1 (k-means with K = the number of classes:
            slower).
        metric: "cosine" or "euclidean"; default: the model's rule
            (`runner.distance_metric(model.normalize_embeddings)`; "euclidean" for models
            without that attribute).
        batch_size: images per embedding batch (arrays and catalogs).
        preprocess: `data.PreprocessConfig` for a catalog (required then).
        verbose: print the metrics after each evaluation.
    """

    def __init__(self, data, every_n_epochs=1, recall_ks=metrics_lib.DEFAULT_RECALL_KS,
                 log_dir=None, prefix="val_", compute_clustering=False, metric=None,
                 batch_size=256, preprocess=None, verbose=False):
        super().__init__()
        if int(every_n_epochs) != every_n_epochs or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1; got {every_n_epochs!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
        if metric not in (None, "cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine', 'euclidean' or None; got {metric!r}.")
        self.recall_ks = tuple(int(k) for k in recall_ks)
        if not self.recall_ks or min(self.recall_ks) < 1:
            raise ValueError(f"recall_ks must be integers >= 1; got {recall_ks!r}.")
        self.dataset = self._as_dataset(data, batch_size, preprocess)
        self.every_n_epochs = int(every_n_epochs)
        self.log_dir = None if log_dir is None else str(log_dir)
        self.prefix = prefix
        self.compute_clustering = bool(compute_clustering)
        self.metric = metric
        self.verbose = verbose
        self.history = {}  # epoch (0-based) -> metrics
        self._writer = None

    @staticmethod
    def _as_dataset(data, batch_size, preprocess):
        if isinstance(data, data_lib.ImageCatalog):
            if preprocess is None:
                raise ValueError("A catalog needs preprocess= (a data.PreprocessConfig: the "
                                 "test transform of its images).")
            return data_lib.make_eval_dataset(data, preprocess, batch_size)
        if isinstance(data, tf.data.Dataset):
            return data
        if isinstance(data, (tuple, list)) and len(data) == 2:
            images, labels = (np.asarray(part) for part in data)
            if len(images) != len(labels):
                raise ValueError(f"data holds {len(images)} images but {len(labels)} labels.")
            return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
        raise ValueError("data must be (images, labels) arrays, a tf.data.Dataset of (images, "
                         f"labels) batches or a data.ImageCatalog; got {type(data).__name__}.")

    def evaluate(self):
        """The metrics of the model now (dict of floats, keys without the prefix)."""
        embeddings, labels = runner.compute_embeddings(models.inference_function(self.model),
                                                       self.dataset)
        metric = self.metric or runner.distance_metric(
            bool(getattr(self.model, "normalize_embeddings", False)))
        return metrics_lib.evaluate_embeddings(embeddings, labels, recall_ks=self.recall_ks,
                                               metric=metric,
                                               compute_clustering=self.compute_clustering)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        metrics = self.evaluate()
        self.history[epoch] = metrics
        if logs is not None:
            logs.update({f"{self.prefix}{key}": value for key, value in metrics.items()})
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            with self._writer.as_default(step=epoch):
                for key, value in metrics.items():
                    tf.summary.scalar(f"{self.prefix}{key}", value)
            self._writer.flush()
        if self.verbose:
            print(f"epoch {epoch + 1}: {runner.format_metrics(metrics)}")

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
