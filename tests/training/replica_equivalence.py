"""DVML training steps in two set-ups that must agree, in both phases (every base loss in float32
and under XLA, a pair-layout and a sampling loss in mixed precision).

Run as a script (the logical devices must exist before TensorFlow initializes):

    python -m tests.training.replica_equivalence                    # the three checks below
    python -m tests.training.replica_equivalence --float32          # 2 replicas vs 1 device
    python -m tests.training.replica_equivalence --mixed_precision  # the same in mixed_float16
    python -m tests.training.replica_equivalence --jit_compile      # XLA vs no XLA, 1 device

Each case trains two steps on one model per set-up: the first in phase 1, the second in phase 2
(the phase is in the graph, so one trace covers both, and the switch itself is checked).
XLA cannot place one computation over two logical CPU devices, so the XLA check compares a
compiled with an uncompiled step on one device; and XLA implements TF's stateless random ops with
other streams, so for that check both steps draw from `hashed_random_ops` instead, an integer-hash
generator that gives the same numbers compiled or not. Prints a JSON object
{"<check>": {"<case>/phase<n>": {"weights": max |diff|, "updates": max |diff|,
"update_scale": ..., "loss": |diff|, "steps": [steps of each set-up]}}}.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from dvml_tf import losses  # noqa: E402
from dvml_tf import models  # noqa: E402
from dvml_tf.training import trainer  # noqa: E402

NUM_CLASSES, IMAGES_PER_CLASS, SIZE = 8, 2, 6


def backbone():
    # No batch norm: per-replica batch statistics would legitimately differ from one device's.
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(24, activation="tanh")(x))


def global_batch(images_per_class):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (NUM_CLASSES * images_per_class, SIZE, SIZE, 3))
    labels = np.repeat(np.arange(NUM_CLASSES), images_per_class)
    return images.astype(np.float32), labels.astype(np.int64)


# Every option of the variance branch at once (they all act on the global batch).
OPTIONS = dict(reconstruction="standardized_squares", detach_variance_heads=True,
               kl_free_bits=0.05, kl_warmup=True, decoder_centre="class_mean",
               variance_transfer=True, scale_to_intra_class=True)


def two_steps(strategy, loss_name, images, labels, jit_compile=False, options=None,
              synthesis="none"):
    """Two training steps on the same global batch, the first in phase 1, the second in
    phase 2: per step, (weights after, their update, loss, the model's step counter)."""
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = models.DVMLModel(
            backbone(),
            losses.get_metric_loss(loss_name, synthesis=synthesis),
            embedding_dim=8,
            num_samples=3,
            phase1_steps=1,
            seed=1,
            **(options or {}),
        )
        model.compile(optimizer=keras.optimizers.SGD(0.5))
        model.optimizer.build(model.trainable_variables)
    replicas = strategy.num_replicas_in_sync
    local = len(labels) // replicas

    def dataset_fn(context):
        del context
        parts = [
            (images[r * local : (r + 1) * local], labels[r * local : (r + 1) * local])
            for r in range(replicas)
        ]
        return tf.data.Dataset.from_tensor_slices(
            (np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]))
        ).repeat()

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    step = trainer.make_distributed_step(strategy, model, jit_compile)
    results = []
    before = [v.numpy() for v in model.trainable_variables]
    for _ in range(2):
        loss = step(iterator)["loss"]
        after = [v.numpy() for v in model.trainable_variables]
        updates = [(b - a) for a, b in zip(after, before, strict=True)]
        results.append((after, updates, float(loss), int(model.step_counter.numpy())))
        before = after
    return results


def hashed_random_ops():
    """Replaces tf.random.stateless_normal / stateless_categorical by integer-hash versions."""

    def uniform(count, seed):
        seed = tf.cast(seed, tf.int64)
        x = tf.range(count, dtype=tf.int64) * 2654435761 + tf.reduce_sum(
            tf.cast(seed, tf.int64) * tf.constant([40503, 2246822519], tf.int64)
        )
        for shift in (13, 17, 5):
            x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, shift)) * 2246822519
        return (tf.cast(tf.math.floormod(x, 2**24), tf.float32) + 0.5) / 2**24

    def normal(shape, seed, alg=None, **kwargs):
        count = tf.reduce_prod(shape)
        return tf.reshape(tf.math.erfinv(2.0 * uniform(count, seed) - 1.0) * 2.0**0.5, shape)

    def categorical(logits, num_samples, seed, dtype=tf.int64, **kwargs):
        rows, classes = tf.shape(logits)[0], tf.shape(logits)[1]
        gumbel = -tf.math.log(-tf.math.log(uniform(rows * num_samples * classes, seed)))
        gumbel = tf.reshape(gumbel, [rows, num_samples, classes])
        return tf.cast(tf.argmax(logits[:, None, :] + tf.cast(gumbel, logits.dtype), -1), dtype)

    def stateless_uniform(shape, seed, minval=0.0, maxval=1.0, dtype=tf.float32, **kwargs):
        count = tf.reduce_prod(shape)
        values = minval + (maxval - minval) * uniform(count, seed)
        return tf.cast(tf.reshape(values, shape), dtype)

    tf.random.stateless_normal = normal
    tf.random.stateless_categorical = categorical
    tf.random.stateless_uniform = stateless_uniform


def compare(single, other, other_jit, option_losses, base_losses=tuple(losses.METRIC_LOSSES)):
    """{"<case>/phase<n>": differences} of `base_losses` and of the variance-branch options
    with a reference synthesis on `option_losses`, between `single` and `other`."""
    results = {}
    cases = [(name, name, {}, "none") for name in base_losses]
    cases += [(f"{name}+options", name, OPTIONS, "embedding_expansion")
              for name in option_losses]
    for case, loss_name, options, synthesis in cases:
        k = 2 if loss_name == "npair" else 4
        images, labels = global_batch(k)
        one = two_steps(single, loss_name, images, labels, options=options, synthesis=synthesis)
        two = two_steps(other, loss_name, images, labels, jit_compile=other_jit,
                        options=options, synthesis=synthesis)
        for phase, (a, b) in enumerate(zip(one, two, strict=True), start=1):
            results[f"{case}/phase{phase}"] = {
                "weights": max(float(np.abs(x - y).max()) for x, y in zip(a[0], b[0], strict=True)),
                "updates": max(float(np.abs(x - y).max()) for x, y in zip(a[1], b[1], strict=True)),
                "update_scale": max(float(np.abs(x).max()) for x in a[1]),
                "loss": abs(a[2] - b[2]),
                "steps": [a[3], b[3]],
            }
    return results


CHECKS = ("float32", "mixed_precision", "jit_compile")


def main():
    checks = [c for c in CHECKS if f"--{c}" in sys.argv] or list(CHECKS)
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {}
    # The variance-branch options, and a reference synthesis on top: for both a pair-layout
    # and a sampling loss in float32, for one of them under mixed precision and XLA (each case
    # costs a trace of both set-ups). Mixed precision changes the step's loss scaling, not
    # the losses (each computes in float32, tests/losses/test_registry.py): a pair-layout and
    # a sampling loss show it. XLA compiles each loss's own ops: every loss.
    if "float32" in checks:
        results["float32"] = compare(single, mirrored, False, ("npair", "triplet2_dws"))
    if "mixed_precision" in checks:
        keras.mixed_precision.set_global_policy("mixed_float16")
        results["mixed_precision"] = compare(single, mirrored, False, ("npair",),
                                             base_losses=("npair", "triplet2_dws"))
        keras.mixed_precision.set_global_policy("float32")
    if "jit_compile" in checks:
        hashed_random_ops()  # last: it replaces TF's random ops for the rest of the process
        results["jit_compile"] = compare(single, single, True, ("triplet2_dws",))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
