"""Reference synthesis methods without a VAE: the bar a DVML variant has to clear.

Each wraps a base metric loss (`SyntheticAugmentation(base, method)`), so it works with every
base loss and with or without DVML (the wrapped loss then serves as L_inv and L_syn alike).
Synthetic points get the labels of the real points they come from; the base loss then sees the
union of real and synthetic points (class-major, so its own mining — all triplets, semi-hard,
distance-weighted sampling — ranges over both, as in the original methods), except for the
N-pair loss, whose batch must be exactly one pair per class: there the loss is the mean over the
real batch and each synthetic batch (same layout).

Methods (`METHODS`), on a class-major P x K batch whose partner of image i is the adjacent image
of its class (i + 1 for even i, i - 1 for odd i; Embedding Expansion's pairing, K even):

* `embedding_expansion` (Ko & Gu, CVPR 2020): `points` internal division points of every
  positive pair, at equal intervals, L2-normalized when the base loss normalizes.
* `symmetrical` (Gu & Ko, AAAI 2020): each point reflected about its partner's axis,
  2 (x . p^) p^ - x, which keeps its norm and its distance to the partner's direction.
* `deviation_transfer`: the class centre of x plus the deviation of a random image x' of
  another class from its own centre, c[y] + (x' - c[y']): the intra-class variation of one
  class transferred to another (DVML's premise, without a learned variance).
"""

import keras
import tensorflow as tf

from dvml_tf.losses import base

METHODS = ("embedding_expansion", "symmetrical", "deviation_transfer")


def partner_indices(batch_size):
    """The adjacent same-class partner of each image of a class-major batch with even K.

    Args:
        batch_size: int tensor or int, B (even).

    Returns:
        int32 tensor [B]: 1, 0, 3, 2, ...
    """
    index = tf.range(batch_size)
    return index + 1 - 2 * (index % 2)


def embedding_expansion(embeddings, points=2, normalize=True):
    """Internal division points of each image and its partner (Embedding Expansion).

    Args:
        embeddings: float tensor [..., B, D], class-major, K even.
        points: int, n internal points per pair, at fractions 1/(n+1), ..., n/(n+1).
        normalize: L2-normalize the points.

    Returns:
        float tensor [points, ..., B, D].
    """
    partner = tf.gather(embeddings, partner_indices(tf.shape(embeddings)[-2]), axis=-2)
    fractions = tf.range(1, points + 1, dtype=embeddings.dtype) / float(points + 1)
    shape = tf.concat([[points], tf.ones([tf.rank(embeddings)], tf.int32)], axis=0)
    fractions = tf.reshape(fractions, shape)
    synthetic = (1.0 - fractions) * embeddings[tf.newaxis] + fractions * partner[tf.newaxis]
    return tf.math.l2_normalize(synthetic, axis=-1) if normalize else synthetic


def symmetrical(embeddings):
    """Each point reflected about its partner's axis (Symmetrical Synthesis).

    Args:
        embeddings: float tensor [..., B, D], class-major, K even.

    Returns:
        float tensor [1, ..., B, D].
    """
    partner = tf.gather(embeddings, partner_indices(tf.shape(embeddings)[-2]), axis=-2)
    axis = tf.math.l2_normalize(partner, axis=-1)
    projection = tf.reduce_sum(embeddings * axis, axis=-1, keepdims=True)
    return (2.0 * projection * axis - embeddings)[tf.newaxis]


def class_means(embeddings, labels):
    """The mean embedding of each image's class within the batch.

    Args:
        embeddings: float tensor [..., B, D].
        labels: int tensor [B].

    Returns:
        float tensor [..., B, D].
    """
    same = tf.cast(tf.equal(labels[:, None], labels[None, :]), embeddings.dtype)
    weights = same / tf.reduce_sum(same, axis=-1, keepdims=True)
    return tf.matmul(weights, embeddings)


def other_class_partners(labels, seed):
    """A random image of another class for every image (stateless).

    Args:
        labels: int tensor [B] (at least 2 classes).
        seed: int tensor [2].

    Returns:
        int32 tensor [B].
    """
    batch = tf.shape(labels)[0]
    scores = tf.random.stateless_uniform([batch, batch], seed=tf.cast(seed, tf.int64),
                                         alg="philox")
    other = tf.not_equal(labels[:, None], labels[None, :])
    return tf.argmax(tf.where(other, scores, -1.0), axis=-1, output_type=tf.int32)


def deviation_transfer(embeddings, labels, seed):
    """c[y] + (x' - c[y']) with x' a random image of another class.

    Args:
        embeddings: float tensor [..., B, D].
        labels: int tensor [B].
        seed: int tensor [2].

    Returns:
        float tensor [1, ..., B, D].
    """
    centres = class_means(embeddings, labels)
    partners = other_class_partners(labels, seed)
    deviation = tf.gather(embeddings - centres, partners, axis=-2)
    return (centres + deviation)[tf.newaxis]


@keras.saving.register_keras_serializable(package="dvml_tf")
class SyntheticAugmentation(base.MetricLoss):
    """A base metric loss computed on real plus synthesized points (see the module docstring).

    Args:
        base_loss: the `MetricLoss` to augment (or its serialized config).
        method: one of `METHODS`.
        points: int, internal points per pair for `embedding_expansion`.
        **kwargs: forwarded to `MetricLoss` (`normalize` follows the base loss).
    """

    def __init__(self, base_loss, method="embedding_expansion", points=2, **kwargs):
        if isinstance(base_loss, dict):
            base_loss = keras.saving.deserialize_keras_object(base_loss)
        if method not in METHODS:
            raise ValueError(f"Unknown synthesis method {method!r}; valid: {', '.join(METHODS)}.")
        if int(points) < 1:
            raise ValueError(f"points must be >= 1; got {points}.")
        kwargs.pop("normalize", None)
        super().__init__(normalize=base_loss.normalize, **kwargs)
        self.base_loss = base_loss
        self.method = method
        self.points = int(points)
        self.images_per_class = base_loss.images_per_class
        self.uses_seed = True

    def build(self, *args):
        # Stateless but for the base loss's own weights (margin_dws's beta), created with it.
        self.built = True

    def _check_shapes(self, embeddings, labels):
        super()._check_shapes(embeddings, labels)
        batch = embeddings.shape[-2]
        if self.method != "deviation_transfer" and batch is not None and batch % 2:
            raise ValueError(f"{self.method} pairs adjacent images of a class: it needs a "
                             f"class-major batch with an even number of images per class; got "
                             f"a batch of {batch}.")

    def _check_batch(self, labels):
        checks = self.base_loss._check_batch(labels)
        if self.method != "deviation_transfer":
            partners = tf.gather(labels, partner_indices(tf.shape(labels)[0]))
            checks += base.require(
                tf.reduce_all(tf.equal(labels, partners)),
                f"{self.method}: images 2i and 2i+1 of the batch must share a class "
                "(a class-major batch with an even number of images per class).",
            )
        return checks

    def synthesize(self, embeddings, labels, seed):
        """The synthetic points, [S, ..., B, D] (S synthetic batches of the real layout)."""
        if self.method == "embedding_expansion":
            return embedding_expansion(embeddings, self.points, self.normalize)
        if self.method == "symmetrical":
            return symmetrical(embeddings)
        return deviation_transfer(embeddings, labels, seed)

    def loss_value(self, embeddings, labels, seed):
        seed = tf.cast(seed, tf.int64)
        # Philox explicitly: "auto_select" may pick another algorithm under XLA.
        synthetic = self.synthesize(
            embeddings, labels, tf.random.experimental.stateless_fold_in(seed, 1, alg="philox"))
        if self.normalize:  # the base loss trains on the unit sphere: so do its synthetic points
            synthetic = tf.math.l2_normalize(synthetic, axis=-1)
        base_seed = tf.random.experimental.stateless_fold_in(seed, 2, alg="philox")
        if self.images_per_class is not None:
            # A fixed per-class layout (N-pair): average over the real and synthetic batches.
            batches = tf.concat([embeddings[tf.newaxis], synthetic], axis=0)
            return self.base_loss.loss_value(batches, labels, base_seed)
        # The union, class-major: every real image's class also holds its synthetic points.
        count = 1 + int(synthetic.shape[0])
        union = tf.concat([embeddings[tf.newaxis], synthetic], axis=0)  # [S+1, ..., B, D]
        union = tf.experimental.numpy.moveaxis(union, 0, -2)  # [..., B, S+1, D]
        shape = tf.concat([tf.shape(embeddings)[:-2], [-1, embeddings.shape[-1]]], axis=0)
        union = tf.reshape(union, shape)  # [..., B (S+1), D]: image, its synthetic points, ...
        union_labels = tf.repeat(labels, count)
        return self.base_loss.loss_value(union, union_labels, base_seed)

    def get_config(self):
        config = super().get_config()
        config.pop("normalize")
        config.update({
            "base_loss": keras.saving.serialize_keras_object(self.base_loss),
            "method": self.method,
            "points": self.points,
        })
        return config
