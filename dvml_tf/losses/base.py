"""The common interface of the base metric losses.

A metric loss is a Keras layer (so that a loss with a learnable parameter, like the margin loss's
beta, is tracked, trained and saved with the model) called as

    loss = metric_loss(embeddings, labels, seed=seed)

with `embeddings` of shape `[..., B, D]` and `labels` of shape `[B]`. Leading dimensions are
independent batches sharing the labels (DVML's T synthesized batches); the result is the loss
averaged over them.
"""

import keras
import tensorflow as tf


def require(condition, message):
    """Checks a data-dependent condition on a batch.

    Eagerly this raises `ValueError(message)`; inside a `tf.function` it adds an assertion whose
    `InvalidArgumentError` carries the same message (a graph cannot raise a Python ValueError).

    Args:
        condition: scalar bool tensor.
        message: what is wrong, for the user.

    Returns:
        A list of control dependencies (empty when executing eagerly).

    Raises:
        ValueError: eagerly, when `condition` is false.
    """
    if tf.executing_eagerly():
        if not bool(condition):
            raise ValueError(message)
        return []
    return [tf.debugging.Assert(condition, [message])]


class MetricLoss(keras.layers.Layer):
    """Base class of the metric losses: input checks, optional L2 normalization, averaging.

    Subclasses implement `loss_value(embeddings, labels, seed)` on validated (and, if
    `normalize`, unit-norm) embeddings.

    Args:
        normalize: bool. L2-normalize the embeddings before computing the loss. The model then
            also returns normalized embeddings at inference, so that retrieval uses the geometry
            the loss trained (Euclidean on the unit sphere, i.e. cosine).
        **kwargs: forwarded to `keras.layers.Layer` (`name`, `dtype`). The default dtype is
            float32 even under a mixed-precision policy: distances, softmax and sampling
            weights need float32. Pass `dtype="float64"` for gradient checks.
    """

    # Subclasses override: N-pair needs exactly 2 images of each class, laid out in pairs.
    images_per_class = None
    # Subclasses that draw random samples (distance-weighted sampling) set this.
    uses_seed = False

    def __init__(self, normalize=False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.normalize = bool(normalize)

    def call(self, embeddings, labels, seed=None):
        embeddings = tf.convert_to_tensor(embeddings)
        labels = tf.convert_to_tensor(labels)
        self._check_shapes(embeddings, labels)
        embeddings = tf.cast(embeddings, self.compute_dtype)
        if seed is None and self.uses_seed:
            seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
        with tf.control_dependencies(self._check_batch(labels)):
            if self.normalize:
                embeddings = tf.math.l2_normalize(embeddings, axis=-1)
            return self.loss_value(embeddings, labels, seed)

    def loss_value(self, embeddings, labels, seed):
        raise NotImplementedError

    def _check_shapes(self, embeddings, labels):
        name = type(self).__name__
        if embeddings.shape.rank is None or embeddings.shape.rank < 2:
            raise ValueError(
                f"{name}: embeddings must have shape [..., batch, dim]; got {embeddings.shape}."
            )
        if labels.shape.rank != 1:
            raise ValueError(f"{name}: labels must have shape [batch]; got {labels.shape}.")
        if not labels.dtype.is_integer:
            raise ValueError(f"{name}: labels must be integers; got {labels.dtype.name}.")
        batch, labels_batch = embeddings.shape[-2], labels.shape[0]
        if batch is not None and labels_batch is not None and batch != labels_batch:
            raise ValueError(
                f"{name}: {batch} embeddings but {labels_batch} labels; they must match."
            )
        if embeddings.shape[-1] is None:
            raise ValueError(f"{name}: the embedding dimension must be known statically.")
        if self.images_per_class is not None and batch is not None and batch % 2:
            raise ValueError(
                f"{name}: needs a batch of N classes x {self.images_per_class} images; "
                f"got an odd batch of {batch}."
            )

    def _check_batch(self, labels):
        """Every sample needs a positive (K >= 2) and a negative (at least 2 classes)."""
        name = type(self).__name__
        same = tf.equal(labels[:, None], labels[None, :])
        per_class = tf.reduce_sum(tf.cast(same, tf.int32), axis=1)
        checks = require(
            tf.reduce_min(per_class) >= 2,
            f"{name}: every image needs another image of its class in the batch "
            "(a P x K batch with K >= 2).",
        )
        checks += require(
            tf.reduce_max(per_class) < tf.size(labels),
            f"{name}: the batch needs at least 2 classes.",
        )
        return checks

    def get_config(self):
        config = super().get_config()
        config.update({"normalize": self.normalize})
        return config
