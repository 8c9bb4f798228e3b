"""Multi-class N-pair loss (DVML Eq. 3; Sohn, NIPS 2016)."""

import keras
import tensorflow as tf

from dvml_tf.losses import base


@keras.saving.register_keras_serializable(package="dvml_tf")
class NPairLoss(base.MetricLoss):
    """N-pair-mc loss: softmax cross-entropy of each anchor over all N positives.

    The batch holds N classes x 2 images laid out in pairs, `[a_1, p_1, a_2, p_2, ...]` (the
    class-major layout of a P x 2 batch). With logits S_ij = a_i . p_j / temperature the loss is
    (1/N) sum_i log(1 + sum_{j != i} exp(S_ij - S_ii)) plus Sohn's penalty on embedding norms.

    Args:
        l2_reg: float. Weight lambda of the norm penalty
            `0.25 * lambda * (mean ||a||^2 + mean ||p||^2)`, the form and default (0.002) of
            TensorFlow's `npairs_loss`. Paper §3.1 gives no value. Ignored when `normalize`.
        normalize: bool. Paper-faithful N-pair uses unnormalized embeddings (the default);
            `True` gives the cosine-softmax variant, which needs a `temperature` below 1.
        temperature: float. Divides the logits.
        **kwargs: forwarded to `MetricLoss`.
    """

    images_per_class = 2

    def __init__(self, l2_reg=0.002, normalize=False, temperature=1.0, **kwargs):
        super().__init__(normalize=normalize, **kwargs)
        if l2_reg < 0:
            raise ValueError(f"l2_reg must be >= 0; got {l2_reg}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}.")
        self.l2_reg = float(l2_reg)
        self.temperature = float(temperature)

    def _check_batch(self, labels):
        anchor_labels, positive_labels = labels[0::2], labels[1::2]
        checks = base.require(
            tf.reduce_all(tf.equal(anchor_labels, positive_labels)),
            "NPairLoss: the batch must be N classes x 2 images laid out in pairs "
            "[a1, p1, a2, p2, ...] with each pair from one class (use images_per_class=2).",
        )
        distinct = tf.size(tf.unique(anchor_labels).y) == tf.size(anchor_labels)
        checks += base.require(
            tf.logical_and(distinct, tf.size(anchor_labels) >= 2),
            "NPairLoss: the N pairs must come from N >= 2 distinct classes "
            "(use images_per_class=2).",
        )
        return checks

    def loss_value(self, embeddings, labels, seed):
        anchors, positives = embeddings[..., 0::2, :], embeddings[..., 1::2, :]
        logits = tf.matmul(anchors, positives, transpose_b=True) / self.temperature
        num_pairs = tf.shape(logits)[-1]
        targets = tf.broadcast_to(tf.range(num_pairs), tf.shape(logits)[:-1])
        cross_entropy = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        )
        if self.normalize or self.l2_reg == 0.0:
            return cross_entropy
        squared_norms = tf.reduce_sum(tf.square(embeddings), axis=-1)
        penalty = (
            0.25
            * self.l2_reg
            * (tf.reduce_mean(squared_norms[..., 0::2]) + tf.reduce_mean(squared_norms[..., 1::2]))
        )
        return cross_entropy + penalty

    def get_config(self):
        config = super().get_config()
        config.update({"l2_reg": self.l2_reg, "temperature": self.temperature})
        return config
