"""DVMLModel: a backbone, the three DVML heads, the decoder and the custom `train_step`.

Deep Variational Metric Learning (Lin et al., ECCV 2018) splits the pooled feature f(x) into an
intra-class invariant embedding z_I (used for retrieval) and a Gaussian intra-class variance
z_V ~ N(mu(x), diag(sigma^2(x))). Training adds synthesized embeddings z = z_I + z_V to the metric
loss, reconstructs f(x) from them, and pulls q(z_V | x) towards N(0, I):

    L = l1 * KL + l2 * recon + l3 * L_metric(z_I + z_V) + l4 * L_metric(z_I)

in two phases: phase 1 trains the decoder on a stop-gradient input, phase 2 lets the
reconstruction gradient reach the heads and the backbone.

Options that make the variance branch informative (each off by default, i.e. the paper; see
docs/method.md, "Deviations from the paper", and research/dvml_omniglot for what they do):
a Gaussian reconstruction of standardized features, variance heads on stop-gradient features,
KL free bits and warm-up, class-centre decoding, cross-class variance transfer and a z_V scale
matched to the intra-class spread of z_I.

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

# Keys of the per-step logs, in display order. The last three are diagnostics of the variance
# branch: latent dimensions whose posterior mean varies across the batch (Var > 0.01, in units of
# the prior), the reconstruction error when the batch's z_V are shuffled (against `recon`: does
# the decoder use z_V?), and L_syn / L_inv.
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
    "active_units",
    "recon_shuffled",
    "syn_to_inv",
)
# How f(x) is reconstructed (paper Eq. 9: "norm").
RECONSTRUCTIONS = ("norm", "standardized_squares")
# What the decoder adds z_V to (paper Fig. 2: the image's own z_I).
DECODER_CENTRES = ("own", "class_mean")
# A latent dimension is active when its posterior mean varies across images by more than this
# (Var_x(mu_j), in units of the prior's variance).
ACTIVE_UNIT_VARIANCE = 0.01

# Sub-seeds for the independent random draws of one step.
_NOISE, _SAMPLING_INV, _SAMPLING_SYN, _PARTNERS = 1, 2, 3, 4


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


class _Batch:
    """One step's batch as seen by one replica: its labels, the global batch's labels, and
    gathering / reducing across the replicas (identity on one device).

    Args:
        labels: int tensor [B], this replica's labels.
    """

    def __init__(self, labels):
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            context = None
        self.context = context
        self.num_replicas = 1 if context is None else context.num_replicas_in_sync
        self.replica_id = 0 if context is None else context.replica_id_in_sync_group
        self.labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        self.local_size = tf.shape(self.labels)[0]
        self.global_size = self.local_size * self.num_replicas
        self.all_labels = self.gather(self.labels)
        # This replica's rows of the global batch (replicas hold contiguous slices).
        self.global_index = self.replica_id * self.local_size + tf.range(self.local_size)

    def gather(self, tensor, axis=0):
        """All replicas' rows of `tensor` along `axis`, in replica order."""
        if self.context is None:
            return tensor
        # all_gather forgets the static shape, which the losses need (embedding dim).
        shape = tensor.shape.as_list()
        shape[axis] = None if shape[axis] is None else shape[axis] * self.num_replicas
        return tf.ensure_shape(self.context.all_gather(tensor, axis=axis), shape)

    def all_reduce_sum(self, tensor):
        """The sum of `tensor` over the replicas."""
        if self.context is None:
            return tensor
        return self.context.all_reduce(tf.distribute.ReduceOp.SUM, tensor)

    def local_rows(self, tensor, axis=0):
        """This replica's rows of a global-batch tensor."""
        start = self.replica_id * self.local_size
        return tf.gather(tensor, tf.range(start, start + self.local_size), axis=axis)


def floored_variance(variance):
    """The per-dimension feature variance ([F]) the standardized reconstruction divides by: a
    floor relative to the typical variance keeps near-constant (dead ReLU) dimensions from
    turning round-off into large targets."""
    return variance + (1e-3 * tf.reduce_mean(variance) + 1e-8)


def _intra_class_rms(embeddings, labels):
    """Root mean square distance of the embeddings to their class mean in the batch (scalar)."""
    deviations = embeddings - losses_lib.synthesis.class_means(embeddings, labels)
    return tf.sqrt(tf.reduce_mean(tf.reduce_sum(tf.square(deviations), axis=-1)))


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
        reconstruction: one of `RECONSTRUCTIONS`. "norm": ||f(x) - x_hat||, the paper's Eq. 9;
            "standardized_squares": 0.5 ||f~(x) - x_hat||^2 with f~ the stop-gradient features
            standardized per dimension by running statistics (a unit-variance Gaussian
            decoder, whose noise level does not shrink with the error as the plain norm's does).
        detach_variance_heads: bool. mu and log sigma^2 read stop-gradient f(x), so that the KL
            and the reconstruction train the variance heads but not the backbone.
        kl_free_bits: float >= 0, nats per latent dimension below which the KL exerts no
            pressure (Kingma et al. 2016; on the batch mean of each dimension's KL).
        kl_warmup: bool. The KL weight rises linearly from 0 to its phase-1 value over phase 1
            (Bowman et al. 2016), so that the encoder commits to z_V before the penalty applies.
        decoder_centre: one of `DECODER_CENTRES`. "class_mean": the decoder rebuilds f(x) from
            stop-gradient(the mean z_I of the other images of x's class in the batch) + z_V(x),
            so that only z_V can carry x's deviation from its class (the Delta-encoder's design;
            Schwartz et al. 2018), and the reconstruction never pulls z_I towards instance detail.
        variance_transfer: bool. L_syn on z_I(x) + z_V(x') with x' a random image of another
            class in the batch (the paper's premise: intra-class variation is shared across
            classes), L_syn's gradient stopped at the variance heads.
        scale_to_intra_class: bool. Multiply z_V (besides `variance_scale`) by the RMS distance
            of z_I to its class mean in the batch (stop-gradient), so that synthesized samples
            spread like real ones whatever the scale of z_I.
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
        reconstruction="norm",
        detach_variance_heads=False,
        kl_free_bits=0.0,
        kl_warmup=False,
        decoder_centre="own",
        variance_transfer=False,
        scale_to_intra_class=False,
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
        for label, value, valid in (
            ("reconstruction", reconstruction, RECONSTRUCTIONS),
            ("decoder_centre", decoder_centre, DECODER_CENTRES),
        ):
            if value not in valid:
                raise ValueError(f"Unknown {label} {value!r}; valid: {', '.join(valid)}.")
        if float(kl_free_bits) < 0:
            raise ValueError(f"kl_free_bits must be >= 0; got {kl_free_bits}.")
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
        self.reconstruction = reconstruction
        self.detach_variance_heads = bool(detach_variance_heads)
        self.kl_free_bits = float(kl_free_bits)
        self.kl_warmup = bool(kl_warmup)
        self.decoder_centre = decoder_centre
        self.variance_transfer = bool(variance_transfer)
        self.scale_to_intra_class = bool(scale_to_intra_class)
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
        if self.use_dvml and self.reconstruction == "standardized_squares":
            # Running per-dimension statistics of f(x) that standardize the target.
            self.feature_mean = self.add_weight(
                shape=(self.feature_dim,), initializer="zeros", trainable=False,
                aggregation="only_first_replica", name="feature_mean",
            )
            self.feature_variance = self.add_weight(
                shape=(self.feature_dim,), initializer="ones", trainable=False,
                aggregation="only_first_replica", name="feature_variance",
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

    def loss_terms(self, images, labels, training=True, details=False):
        """Computes every DVML loss term on one (per-replica) batch.

        Args:
            images: float tensor `[B, H, W, 3]`, this replica's part of the global batch.
            labels: int tensor `[B]`.
            training: bool, passed to the backbone (batch-norm mode); also updates the running
                feature statistics of the standardized reconstruction.
            details: also return the per-sample tensors of the variance branch (diagnostics).

        Returns:
            `(objective, logs)`, plus `details` (a dict: mean, log_variance [B, J],
            recon [B], recon_shuffled [B]) when asked: `objective` is the scalar to
            differentiate, already scaled for a cross-replica gradient sum; `logs` maps each key
            of `LOG_KEYS` to its value on the global batch (unscaled).
        """
        batch = _Batch(labels)
        features = tf.cast(self.backbone(images, training=training), "float32")
        z_inv = self.embedding_head(features)
        all_z_inv = batch.gather(z_inv)
        metric_inv = self.metric_loss(all_z_inv, batch.all_labels,
                                      seed=self._step_seed(_SAMPLING_INV))
        logs = {
            "metric_inv": metric_inv,
            "z_inv_norm": tf.reduce_mean(tf.norm(z_inv, axis=-1)),
        }
        if not self.use_dvml:
            logs["loss"] = metric_inv
            return (metric_inv / batch.num_replicas, logs) + (({},) if details else ())

        # Draw the noise of the whole global batch and keep this replica's rows, so that R
        # replicas use exactly the numbers one device would.
        # Philox explicitly: "auto_select" may pick another algorithm under XLA, and the same
        # (seed, step) must give the same noise on every device, with or without XLA.
        noise = batch.local_rows(tf.random.stateless_normal(
            [self.num_samples, batch.global_size, self.embedding_dim],
            seed=self._step_seed(_NOISE), alg="philox",
        ), axis=1)
        mean, log_variance, z_var = self.variance_draws(features, all_z_inv, batch, noise)
        sigma = tf.exp(0.5 * log_variance)
        decoder_centre = self._decoder_centre(z_inv, all_z_inv, batch)
        z_syn, z_syn_metric = self.synthesize(z_inv, z_var, features, noise,
                                              centre=decoder_centre, batch=batch)

        in_phase1 = self.step_counter < self.phase_switch_step
        # Phase 1 cuts the gradient from the decoder at its input (paper §3.5). The gate keeps
        # the value and multiplies the gradient by 0 (phase 1) or 1 (phase 2) without a cond.
        gate = tf.cast(tf.logical_not(in_phase1), "float32")
        frozen = tf.stop_gradient(z_syn)
        decoder_input = frozen + gate * (z_syn - frozen)
        target, reconstruction_error = self._reconstruction_target(features, batch, training)
        reconstruction = self._decode(decoder_input)
        recon_per_sample = reconstruction_error(target, reconstruction)  # [T, B]
        kl_per_dim = losses_lib.kl_per_dimension(mean, log_variance)  # [B, J]
        metric_syn = self.metric_loss(batch.gather(z_syn_metric, axis=1), batch.all_labels,
                                      seed=self._step_seed(_SAMPLING_SYN))

        weights = tf.where(
            in_phase1, tf.constant(self.phase1_weights), tf.constant(self.phase2_weights)
        )
        kl_weight = weights[0]
        if self.kl_warmup:
            ramp = tf.cast(self.step_counter, "float32") / tf.cast(
                tf.maximum(self.phase_switch_step, 1), "float32")
            kl_weight *= tf.where(in_phase1, ramp, 1.0)
        global_size = tf.cast(batch.global_size, "float32")
        objective = (
            kl_weight * self._kl_objective(kl_per_dim, batch) / global_size
            + weights[1] * tf.reduce_sum(recon_per_sample) / (global_size * self.num_samples)
            + (weights[2] * metric_syn + weights[3] * metric_inv) / batch.num_replicas
        )

        # Diagnostics, outside the gradient: the batch variance of mu, and the reconstruction
        # of the first draw with z_V of other images of the (local) batch.
        all_mean = tf.stop_gradient(batch.gather(mean))
        active_units = tf.reduce_sum(tf.cast(
            tf.math.reduce_variance(all_mean, axis=0) > ACTIVE_UNIT_VARIANCE, "float32"))
        # Rolled by half the batch: in a class-major batch each image gets the z_V of an image
        # of another class (deterministic and XLA-compatible, unlike a random shuffle).
        shuffled = tf.roll(z_var[0], shift=batch.local_size // 2, axis=0)
        shuffled_input = tf.stop_gradient(decoder_centre + shuffled)
        recon_shuffled = tf.stop_gradient(
            reconstruction_error(target, self._decode(shuffled_input[tf.newaxis])[0]))
        kl = tf.reduce_mean(tf.reduce_sum(kl_per_dim, axis=-1))
        recon = tf.reduce_mean(recon_per_sample)
        logs.update(
            {
                "loss": kl_weight * kl
                + weights[1] * recon
                + weights[2] * metric_syn
                + weights[3] * metric_inv,
                "kl": kl,
                "recon": recon,
                "metric_syn": metric_syn,
                "phase": tf.where(in_phase1, 1.0, 2.0),
                "z_var_norm": tf.reduce_mean(tf.norm(z_var, axis=-1)),
                "sigma": tf.reduce_mean(sigma),
                "active_units": active_units,
                "recon_shuffled": tf.reduce_mean(recon_shuffled),
                "syn_to_inv": tf.math.divide_no_nan(metric_syn, metric_inv),
            }
        )
        if not details:
            return objective, logs
        return objective, logs, {
            "mean": mean,
            "log_variance": log_variance,
            "recon": tf.reduce_mean(recon_per_sample, axis=0),
            "recon_shuffled": recon_shuffled,
        }

    def variance_draws(self, features, all_z_inv, batch, noise):
        """q(z_V | x) of each image and its reparameterized draws.

        Args:
            features: float32 `[B, F]`, this replica's backbone features f(x).
            all_z_inv: float32 `[global B, J]`, z_I of the global batch (`scale_to_intra_class`).
            batch: the step's `_Batch`.
            noise: float32 `[T, B, J]`, standard normal draws.

        Returns:
            `(mean, log_variance, z_var)`: `[B, J]`, `[B, J]` and `[T, B, J]`.
        """
        head_input = tf.stop_gradient(features) if self.detach_variance_heads else features
        mean = self.mean_head(head_input)
        log_variance = self.log_variance_head(head_input)
        scale = self.variance_scale
        if self.scale_to_intra_class:
            scale *= tf.stop_gradient(_intra_class_rms(all_z_inv, batch.all_labels))
        return mean, log_variance, scale * (mean + tf.exp(0.5 * log_variance) * noise)

    def partner_variance(self, z_var, batch):
        """z_V of a random image of another class of the global batch, for each image
        (`variance_transfer`): `[T, B, J]` from this replica's `z_var` `[T, B, J]`."""
        partners = batch.local_rows(
            losses_lib.synthesis.other_class_partners(batch.all_labels,
                                                      self._step_seed(_PARTNERS)))
        return tf.gather(batch.gather(z_var, axis=1), partners, axis=1)

    def _decode(self, decoder_input):
        """The decoder on [T, B, J] inputs -> [T, B, F]."""
        shape = tf.shape(decoder_input)
        flat = tf.reshape(decoder_input, [-1, self.embedding_dim])
        return tf.reshape(self.decoder(flat), [shape[0], shape[1], self.feature_dim])

    def _reconstruction_target(self, features, batch, training):
        """The reconstruction target (stop-gradient: f(x) is not moved towards the decoder's
        output) and the per-sample error function of `reconstruction`."""
        features = tf.stop_gradient(features)
        if self.reconstruction == "norm":
            return features, losses_lib.reconstruction_distance
        all_features = batch.gather(features)
        batch_mean = tf.reduce_mean(all_features, axis=0)
        batch_variance = tf.math.reduce_variance(all_features, axis=0)
        if training:
            # Running statistics of the global batch's features: the first step takes the batch
            # statistics, later steps an exponential average over about 100 steps.
            rate = 1.0 / (tf.cast(tf.minimum(self.step_counter, 99), "float32") + 1.0)
            mean = self.feature_mean + rate * (batch_mean - self.feature_mean)
            variance = self.feature_variance + rate * (batch_variance - self.feature_variance)
            self.feature_mean.assign(mean)
            self.feature_variance.assign(variance)
        else:
            # Inference-mode features (batch norm's moving statistics) differ from the training-
            # mode ones the running statistics follow: standardize by the batch's own.
            mean, variance = batch_mean, batch_variance
        standardized = (features - mean) * tf.math.rsqrt(floored_variance(variance))
        return standardized, losses_lib.half_squared_error

    def _kl_objective(self, kl_per_dim, batch):
        """The KL term to differentiate, summed over this replica's samples (the caller divides
        by the global batch size): with free bits, each dimension whose KL averaged over the
        global batch is below `kl_free_bits` exerts no pressure."""
        local_sums = tf.reduce_sum(kl_per_dim, axis=0)  # [J]
        if self.kl_free_bits <= 0:
            return tf.reduce_sum(local_sums)
        global_means = tf.stop_gradient(batch.all_reduce_sum(local_sums)) / tf.cast(
            batch.global_size, "float32")
        above = tf.cast(global_means > self.kl_free_bits, "float32")
        # The floor itself is a constant; it keeps the objective's value the free-bits KL.
        floor = (1.0 - above) * self.kl_free_bits * tf.cast(batch.local_size, "float32")
        return tf.reduce_sum(above * local_sums + floor)

    def _decoder_centre(self, z_inv, all_z_inv, batch):
        """What the decoder adds z_V to: the image's own z_I (paper), or the stop-gradient mean
        z_I of the other images of its class in the global batch (its own when it has none)."""
        if self.decoder_centre == "own":
            return z_inv
        same = tf.equal(batch.labels[:, None], batch.all_labels[None, :])
        others = tf.logical_and(same, tf.logical_not(tf.one_hot(
            batch.global_index, batch.global_size, on_value=True, off_value=False)))
        weights = tf.cast(others, "float32")
        count = tf.reduce_sum(weights, axis=1, keepdims=True)
        leave_one_out = tf.math.divide_no_nan(tf.matmul(weights, all_z_inv), count)
        return tf.stop_gradient(tf.where(count > 0, leave_one_out, z_inv))

    def synthesize(self, z_inv, z_var, features, noise, centre=None, batch=None):
        """The synthesized embeddings (paper Eq. 7): z = z_I + z_V, for the decoder and for L_syn.

        The decoder reconstructs f(x) from `centre` + z_V(x) (`decoder_centre`); L_syn is
        computed on z_I(x) + z_V(x), or on z_I(x) + z_V(x') with x' of another class
        (`variance_transfer`). A subclass can change how samples are synthesized (the research
        variants do) without touching the rest of the step.

        Args:
            z_inv: float32 `[B, J]`, this replica's z_I.
            z_var: float32 `[T, B, J]`, the reparameterized draws of z_V.
            features: float32 `[B, F]`, the backbone features f(x).
            noise: float32 `[T, B, J]`, the standard normal draws behind `z_var`.
            centre: float32 `[B, J]`, what the decoder adds z_V to (default: `z_inv`).
            batch: the step's `_Batch` (labels, gathering across replicas).

        Returns:
            `(decoder_input, metric_input)`, both `[T, B, J]`: what the decoder reconstructs
            f(x) from, and what the synthesized metric loss L_syn is computed on.
        """
        del features, noise  # used by subclasses
        centre = z_inv if centre is None else centre
        decoder_input = centre + z_var
        if not self.variance_transfer:
            return decoder_input, z_inv + z_var
        return decoder_input, z_inv + tf.stop_gradient(self.partner_variance(z_var, batch))

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
        # shadowed by it (Keras 3 reports the built-in tracker under that key).
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
                "reconstruction": self.reconstruction,
                "detach_variance_heads": self.detach_variance_heads,
                "kl_free_bits": self.kl_free_bits,
                "kl_warmup": self.kl_warmup,
                "decoder_centre": self.decoder_centre,
                "variance_transfer": self.variance_transfer,
                "scale_to_intra_class": self.scale_to_intra_class,
                "seed": self.seed,
            }
        )
        return config
