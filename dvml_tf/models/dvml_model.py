"""DVMLModel: a backbone, the three DVML heads, the decoder and the custom `train_step`.

Deep Variational Metric Learning (Lin et al., ECCV 2018) splits the pooled feature f(x) into an
intra-class invariant embedding z_I (used for retrieval) and a Gaussian intra-class variance
z_V ~ N(mu(x), diag(sigma^2(x))). Training adds synthesized embeddings z = z_I + z_V to the metric
loss, reconstructs f(x) from them, and pulls q(z_V | x) towards N(0, I):

    L = l1 * KL + l2 * recon + l3 * L_metric(z_I + z_V) + l4 * L_metric(z_I)

in two phases: phase 1 trains the decoder on a stop-gradient input, phase 2 lets the
reconstruction gradient reach the heads and the backbone.

Distribution. Under a `tf.distribute` strategy every term is scaled so that the sum of the
replicas' gradients (what Keras and our training loop apply) equals the single-device gradient on
the global batch: per-sample terms are summed locally and divided by the global batch size; the
metric losses are computed on the embeddings all-gathered from every replica (so mining and
softmaxes see the whole global batch, as on one device) and divided by the number of replicas,
since the all-gather's gradient sums the replicas' upstream gradients before slicing out the
local part. Random draws depend only on (seed, step), so every replica draws the same numbers.
"""

import keras
import tensorflow as tf

from dvml_tf import losses as losses_lib

# (lambda_KL, lambda_recon, lambda_syn, lambda_inv), paper §3.5.
PAPER_PHASE1_WEIGHTS = (1.0, 1.0, 0.1, 1.0)
PAPER_PHASE2_WEIGHTS = (0.8, 1.0, 0.2, 0.8)

# Keys of the per-step logs, in display order.
LOG_KEYS = (
    "loss",
    "kl",
    "recon",
    "metric_inv",
    "metric_syn",
    "phase",
    "z_inv_norm",
    "z_var_norm",
    "sigma",
)

# Sub-seeds for the independent random draws of one step.
_NOISE, _SAMPLING_INV, _SAMPLING_SYN = 1, 2, 3


# Options that left the product for research/dvml_omniglot. A model.keras or config.json written
# before then carries them: their paper values load as they are, anything else is refused.
RETIRED_OPTIONS = {"normalize_before_sum": False, "synthesis_gradient": "full"}


def drop_retired_options(values):
    """A copy of a model or run configuration without the retired research options.

    Args:
        values: dict, a `DVMLModel` config or a `TrainConfig` dict.

    Returns:
        dict.

    Raises:
        ValueError: a retired option with a value other than the paper's.
    """
    values = dict(values)
    for name, paper_value in RETIRED_OPTIONS.items():
        value = values.pop(name, paper_value)
        if value != paper_value:
            raise ValueError(
                f"This model was trained with {name}={value!r}, a research variant that is no "
                "longer part of dvml_tf; research/dvml_omniglot/variants.py builds such models."
            )
    return values


def inference_function(model):
    """A compiled inference-mode call of a Keras model (`DVMLModel`, its `embedder`, its
    backbone, an export's inference model): the one wrapper evaluation and export use.

    Args:
        model: a `keras.Model`.

    Returns:
        `tf.function` mapping a batch of images to the model's output (training=False).
    """
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def _replica_context():
    """Returns (replica context or None, number of replicas, replica id)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None, 1, 0
    return context, context.num_replicas_in_sync, context.replica_id_in_sync_group


@keras.saving.register_keras_serializable(package="dvml_tf")
class DVMLModel(keras.Model):
    """Deep Variational Metric Learning around any pooled-feature backbone.

    `embedder` is the inference model: a functional `keras.Model` backbone -> z_I head ->
    L2 normalization (when the metric loss trains on normalized embeddings). `call` (and so
    `predict` and `test_step`), evaluation and every export run it, so there is one forward
    pass. mu, log sigma^2 and the decoder exist for training only and are not built when
    `use_dvml=False`, which trains the plain base-loss baseline with the same backbone and the
    same z_I head (and, under the same Keras seed, the same initial weights), so that
    comparisons are like for like.

    Args:
        backbone: `keras.Model` mapping images to a pooled feature `[B, F]`.
        metric_loss: a `dvml_tf.losses.MetricLoss` or its name (see `losses.METRIC_LOSSES`).
        embedding_dim: int, size of z_I, mu and log sigma^2 (512 in the paper).
        use_dvml: bool. False trains the base loss on z_I alone.
        num_samples: int, T, the number of z_V draws per image (20 in the paper). Both the
            reconstruction and the synthesized metric loss average over the T draws
            (paper §3.5 defines T for reconstruction only).
        phase1_steps: int, number of training steps in phase 1; the phase switches when the
            step counter reaches it. Saved with the model so a resumed run continues in the
            right phase.
        phase1_weights: 4 floats (KL, recon, synthesized metric, invariant metric) in phase 1.
        phase2_weights: the same in phase 2.
        decoder_hidden_dim: int, width of the decoder's tanh layer (512 in the paper).
        variance_scale: float s; z_V = s * (mu + sigma * eps), i.e. a N(0, s^2 I) prior on z_V
            (paper: 1). Below 1 it keeps the synthesized samples near their class centre.
        seed: int, seeds the z_V noise and the loss's sampling together with the step counter.
        **kwargs: forwarded to `keras.Model` (e.g. `name`).

    Example:

    ```python
    backbone = dvml_tf.build_backbone("convnet_small", input_shape=(28, 28, 3))
    model = dvml_tf.DVMLModel(backbone, "npair", embedding_dim=128, phase1_steps=500)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(train_dataset, steps_per_epoch=2000)
    embeddings = model.predict(test_images)
    ```
    """

    def __init__(
        self,
        backbone,
        metric_loss="npair",
        embedding_dim=512,
        use_dvml=True,
        num_samples=20,
        phase1_steps=0,
        phase1_weights=PAPER_PHASE1_WEIGHTS,
        phase2_weights=PAPER_PHASE2_WEIGHTS,
        decoder_hidden_dim=512,
        variance_scale=1.0,
        seed=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        if isinstance(metric_loss, str):
            metric_loss = losses_lib.get_metric_loss(metric_loss)
        elif isinstance(metric_loss, dict):
            metric_loss = keras.saving.deserialize_keras_object(metric_loss)
        if not isinstance(metric_loss, losses_lib.MetricLoss):
            raise ValueError(
                f"metric_loss must be a loss name or a MetricLoss; got {type(metric_loss)}."
            )
        if len(backbone.outputs) != 1 or len(backbone.outputs[0].shape) != 2:
            raise ValueError(
                "The backbone must output one pooled feature [batch, dim]; got outputs "
                f"{[tuple(o.shape) for o in backbone.outputs]}."
            )
        for label, value in (
            ("embedding_dim", embedding_dim),
            ("num_samples", num_samples),
            ("decoder_hidden_dim", decoder_hidden_dim),
        ):
            if int(value) < 1:
                raise ValueError(f"{label} must be >= 1; got {value}.")
        if float(variance_scale) <= 0:
            raise ValueError(f"variance_scale must be > 0; got {variance_scale}.")
        if int(phase1_steps) < 0:
            raise ValueError(f"phase1_steps must be >= 0; got {phase1_steps}.")
        for label, weights in (
            ("phase1_weights", phase1_weights),
            ("phase2_weights", phase2_weights),
        ):
            if len(weights) != 4 or min(weights) < 0:
                raise ValueError(
                    f"{label} must be 4 non-negative floats (KL, recon, synthesized metric, "
                    f"invariant metric); got {weights}."
                )

        self.backbone = backbone
        self.metric_loss = metric_loss
        self.embedding_dim = int(embedding_dim)
        self.use_dvml = bool(use_dvml)
        self.num_samples = int(num_samples)
        self.phase1_weights = tuple(float(w) for w in phase1_weights)
        self.phase2_weights = tuple(float(w) for w in phase2_weights)
        self.decoder_hidden_dim = int(decoder_hidden_dim)
        self.variance_scale = float(variance_scale)
        self.seed = int(seed)
        self.feature_dim = int(backbone.outputs[0].shape[-1])

        # Heads in float32 even under mixed precision: the KL and the losses need it. The z_I
        # head is created first so that with and without DVML it gets the same initial weights.
        self.embedding_head = keras.layers.Dense(
            self.embedding_dim, dtype="float32", name="z_invariant"
        )
        if self.use_dvml:
            self.mean_head = keras.layers.Dense(
                self.embedding_dim, dtype="float32", name="z_variance_mean"
            )
            self.log_variance_head = keras.layers.Dense(
                self.embedding_dim, dtype="float32", name="z_variance_log_variance"
            )
            # Paper §3.2: "tanh is used as the activation"; read as the hidden layer only, since
            # the target f(x) is unbounded (ReLU/average-pooled features).
            self.decoder = keras.Sequential(
                [
                    keras.layers.Dense(self.decoder_hidden_dim, activation="tanh", dtype="float32"),
                    keras.layers.Dense(self.feature_dim, dtype="float32"),
                ],
                name="decoder",
            )

        # Training state saved with the weights: the step drives the phase and the random draws.
        self.step_counter = self.add_weight(
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="step_counter",
        )
        self.phase_switch_step = self.add_weight(
            shape=(),
            dtype="int64",
            initializer=keras.initializers.Constant(int(phase1_steps)),
            trainable=False,
            aggregation="only_first_replica",
            name="phase_switch_step",
        )
        self.trackers = {key: keras.metrics.Mean(name=key) for key in LOG_KEYS if key != "loss"}
        # Before build(): Keras locks a built model's state.
        self.embedder = self._build_embedder()
        self.build()

    # ----------------------------------------------------------------------------------- build

    def build(self, input_shape=None):
        # The backbone fixes every shape, so the model is built at construction: its variables
        # exist before any optimizer, checkpoint or distribution strategy looks for them.
        heads = [(self.embedding_head, self.feature_dim)]
        if self.use_dvml:
            heads += [
                (self.mean_head, self.feature_dim),
                (self.log_variance_head, self.feature_dim),
                (self.decoder, self.embedding_dim),
            ]
        for layer, input_dim in heads:
            if not layer.built:
                layer.build((None, input_dim))
        self.built = True

    # ------------------------------------------------------------------------------- inference

    @property
    def normalize_embeddings(self):
        return self.metric_loss.normalize

    @property
    def phase(self):
        """The current phase, 1 or 2 (a Python int; read outside `tf.function`)."""
        return 1 if int(self.step_counter.numpy()) < int(self.phase_switch_step.numpy()) else 2

    def _build_embedder(self):
        """The inference model, sharing (not copying) the backbone and the z_I head."""
        images = keras.Input(shape=self.backbone.inputs[0].shape[1:], name="images")
        embeddings = self.embedding_head(self.backbone(images))
        if self.normalize_embeddings:
            # The same op as tf.math.l2_normalize (max |diff| 0, tested).
            embeddings = keras.layers.UnitNormalization(dtype="float32", name="l2_normalize")(
                embeddings
            )
        return keras.Model(images, embeddings, name="embedder")

    def unnormalized_embedder(self):
        """A view of `embedder` that stops before the L2 normalization (z_I itself), for the
        full-integer LiteRT model, whose int8 output cannot carry unit vectors precisely."""
        return keras.Model(self.embedder.inputs[0], self.embedding_head.output, name="z_invariant")

    def call(self, images, training=False):
        return self.embedder(images, training=training)

    # -------------------------------------------------------------------------------- training

    def _step_seed(self, purpose):
        seed = tf.stack([tf.constant(self.seed, tf.int64), self.step_counter.value])
        return tf.random.experimental.stateless_fold_in(seed, purpose, alg="philox")

    def loss_terms(self, images, labels, training=True):
        """Computes every DVML loss term on one (per-replica) batch.

        Args:
            images: float tensor `[B, H, W, 3]`, this replica's part of the global batch.
            labels: int tensor `[B]`.
            training: bool, passed to the backbone (batch-norm mode).

        Returns:
            `(objective, logs)`: `objective` is the scalar to differentiate, already scaled for
            a cross-replica gradient sum; `logs` maps each key of `LOG_KEYS` to its value on the
            global batch (unscaled).
        """
        context, num_replicas, replica_id = _replica_context()
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])

        def gather(tensor, axis=0):
            if context is None:
                return tensor
            # all_gather forgets the static shape, which the losses need (embedding dim).
            shape = tensor.shape.as_list()
            shape[axis] = None if shape[axis] is None else shape[axis] * num_replicas
            return tf.ensure_shape(context.all_gather(tensor, axis=axis), shape)

        features = tf.cast(self.backbone(images, training=training), "float32")
        z_inv = self.embedding_head(features)
        all_labels = gather(labels)
        metric_inv = self.metric_loss(
            gather(z_inv), all_labels, seed=self._step_seed(_SAMPLING_INV)
        )
        logs = {
            "metric_inv": metric_inv,
            "z_inv_norm": tf.reduce_mean(tf.norm(z_inv, axis=-1)),
        }
        if not self.use_dvml:
            logs["loss"] = metric_inv
            return metric_inv / num_replicas, logs

        mean = self.mean_head(features)
        log_variance = self.log_variance_head(features)
        sigma = tf.exp(0.5 * log_variance)
        local_batch = tf.shape(z_inv)[0]
        global_batch = local_batch * num_replicas
        # Draw the noise of the whole global batch and keep this replica's rows, so that R
        # replicas use exactly the numbers one device would.
        # Philox explicitly: "auto_select" may pick another algorithm under XLA, and the same
        # (seed, step) must give the same noise on every device, with or without XLA.
        noise = tf.random.stateless_normal(
            [self.num_samples, global_batch, self.embedding_dim],
            seed=self._step_seed(_NOISE),
            alg="philox",
        )
        noise = noise[:, replica_id * local_batch : (replica_id + 1) * local_batch]
        z_var = self.variance_scale * (mean + sigma * noise)  # [T, B, J], reparameterized
        z_syn, z_syn_metric = self.synthesize(z_inv, z_var, features, noise)

        in_phase1 = self.step_counter < self.phase_switch_step
        # Phase 1 cuts the gradient from the decoder at its input (paper §3.5). The gate keeps
        # the value and multiplies the gradient by 0 (phase 1) or 1 (phase 2) without a cond.
        gate = tf.cast(tf.logical_not(in_phase1), "float32")
        frozen = tf.stop_gradient(z_syn)
        decoder_input = tf.reshape(frozen + gate * (z_syn - frozen), [-1, self.embedding_dim])
        reconstruction = tf.reshape(
            self.decoder(decoder_input), [self.num_samples, local_batch, self.feature_dim]
        )
        # f(x) is the target, not something to move towards the decoder output.
        recon_per_sample = losses_lib.reconstruction_distance(
            tf.stop_gradient(features), reconstruction
        )
        kl_per_sample = losses_lib.kl_divergence(mean, log_variance)
        metric_syn = self.metric_loss(
            gather(z_syn_metric, axis=1), all_labels, seed=self._step_seed(_SAMPLING_SYN)
        )

        weights = tf.where(
            in_phase1, tf.constant(self.phase1_weights), tf.constant(self.phase2_weights)
        )
        global_size = tf.cast(global_batch, "float32")
        objective = (
            weights[0] * tf.reduce_sum(kl_per_sample) / global_size
            + weights[1] * tf.reduce_sum(recon_per_sample) / (global_size * self.num_samples)
            + (weights[2] * metric_syn + weights[3] * metric_inv) / num_replicas
        )
        kl = tf.reduce_mean(kl_per_sample)
        recon = tf.reduce_mean(recon_per_sample)
        logs.update(
            {
                "loss": weights[0] * kl
                + weights[1] * recon
                + weights[2] * metric_syn
                + weights[3] * metric_inv,
                "kl": kl,
                "recon": recon,
                "metric_syn": metric_syn,
                "phase": tf.where(in_phase1, 1.0, 2.0),
                "z_var_norm": tf.reduce_mean(tf.norm(z_var, axis=-1)),
                "sigma": tf.reduce_mean(sigma),
            }
        )
        return objective, logs

    def synthesize(self, z_inv, z_var, features, noise):
        """The synthesized embeddings (paper Eq. 7): z = z_I + z_V.

        A subclass can change how samples are synthesized (research variants do) without
        touching the rest of the step.

        Args:
            z_inv: float32 `[B, J]`, this replica's z_I.
            z_var: float32 `[T, B, J]`, the reparameterized draws of z_V.
            features: float32 `[B, F]`, the backbone features f(x).
            noise: float32 `[T, B, J]`, the standard normal draws behind `z_var`.

        Returns:
            `(decoder_input, metric_input)`, both `[T, B, J]`: what the decoder reconstructs
            f(x) from, and what the synthesized metric loss L_syn is computed on.
        """
        del features, noise  # used by subclasses
        z_syn = z_inv + z_var
        return z_syn, z_syn

    def train_step(self, data):
        images, labels = data[0], data[1]
        with tf.GradientTape() as tape:
            objective, logs = self.loss_terms(images, labels, training=True)
            # Under mixed precision the optimizer is a LossScaleOptimizer: it needs the scaled
            # loss and unscales the gradients itself (a no-op for other optimizers).
            objective = self.optimizer.scale_loss(objective)
        variables = self.trainable_variables
        gradients = tape.gradient(objective, variables)
        self.optimizer.apply(gradients, variables)
        self.step_counter.assign_add(1)
        return self._update_trackers(logs)

    def test_step(self, data):
        images, labels = data[0], data[1]
        embeddings = self(images, training=False)
        loss = self.metric_loss(embeddings, tf.reshape(labels, [-1]), seed=self._step_seed(0))
        return self._update_trackers({"metric_inv": loss})

    def _update_trackers(self, logs):
        # Keras's own "loss" tracker must carry the total: a second tracker named "loss" would be
        # shadowed by it (stack.md §1).
        if self.compiled and self._loss_tracker is not None and "loss" in logs:
            self._loss_tracker.update_state(logs["loss"])
        for key, value in logs.items():
            if key in self.trackers:
                self.trackers[key].update_state(value)
        results = {key: self.trackers[key].result() for key in logs if key in self.trackers}
        if "loss" in logs and self._loss_tracker is not None:
            results["loss"] = self._loss_tracker.result()
        return results

    # --------------------------------------------------------------------------- serialization

    @classmethod
    def from_config(cls, config):
        config = drop_retired_options(config)
        return super().from_config(config)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "metric_loss": keras.saving.serialize_keras_object(self.metric_loss),
                "embedding_dim": self.embedding_dim,
                "use_dvml": self.use_dvml,
                "num_samples": self.num_samples,
                "phase1_steps": int(self.phase_switch_step.numpy()),
                "phase1_weights": self.phase1_weights,
                "phase2_weights": self.phase2_weights,
                "decoder_hidden_dim": self.decoder_hidden_dim,
                "variance_scale": self.variance_scale,
                "seed": self.seed,
            }
        )
        return config
