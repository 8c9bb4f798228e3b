"""Class-balanced P x K batches as a pure function of (seed, step).

`ClassBalancedSampler.batch_indices(step)` depends on nothing but the seed and the step, so

* a run resumed at step N continues with exactly the batches of an uninterrupted run (no sampler
  state to checkpoint: rebuild the dataset with `start_step=N`);
* every worker of a multi-worker job computes the same global batch on its own and keeps its
  slice (`replica_slice`), without any communication.

Batches are class-major, `[c1]*K + [c2]*K + ...`: cutting a batch into R contiguous equal parts
gives every replica whole classes when P % R == 0 (in-batch mining is per replica under
MirroredStrategy).
"""

import numpy as np
import tensorflow as tf
from absl import logging

# Domain tags keep the random streams of the class permutation and of the image draws apart.
_EPOCH_STREAM = 0x5EED0001
_STEP_STREAM = 0x5EED0002


def replica_slice(batch, replica_id, num_replicas, images_per_class):
    """The contiguous part of a class-major global batch that belongs to one replica.

    Args:
        batch: array or tensor whose first axis is the global batch of P * K items.
        replica_id: int in [0, num_replicas).
        num_replicas: int R >= 1; P must be divisible by R so that classes stay whole.
        images_per_class: int K.

    Returns:
        `batch[r * P*K/R : (r + 1) * P*K/R]`.

    Raises:
        ValueError: for an invalid replica id, or when P is not divisible by R.
    """
    size = int(batch.shape[0])
    if images_per_class < 1 or size % images_per_class:
        raise ValueError(f"A batch of {size} items is not made of whole classes of "
                         f"images_per_class={images_per_class}.")
    classes = size // images_per_class
    if num_replicas < 1 or classes % num_replicas:
        raise ValueError(f"classes_per_batch={classes} must be divisible by num_replicas="
                         f"{num_replicas} so that every replica gets whole classes.")
    if not 0 <= replica_id < num_replicas:
        raise ValueError(f"replica_id={replica_id} must be in [0, {num_replicas}).")
    part = size // num_replicas
    return batch[replica_id * part:(replica_id + 1) * part]


class ClassBalancedSampler:
    """Draws batches of P distinct classes x K images per class, class-major.

    Epochs: the eligible classes are visited in a permutation that depends on (seed, epoch), P per
    batch, so each of them appears at most once per epoch of `batches_per_epoch = C // P` batches
    and only `C % P` of them (different ones every epoch) sit an epoch out. Within a class, K
    distinct images are drawn uniformly at random (Floyd's algorithm, vectorized over the P
    classes); a class with 2 <= n < K images contributes each of its n images once and fills
    the remaining K - n slots by drawing with replacement; classes with fewer than 2 images are
    left out (logged). Positions within a class are shuffled, so the first image (the N-pair
    anchor) is uniform among the class's images.

    Args:
        labels: int array [N], the label of each image of the training catalog.
        classes_per_batch: P >= 2.
        images_per_class: K >= 1.
        seed: int; batches are a pure function of (seed, step).
    """

    def __init__(self, labels, classes_per_batch, images_per_class, seed=0):
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
        if int(classes_per_batch) != classes_per_batch or classes_per_batch < 2:
            raise ValueError(f"classes_per_batch must be an integer >= 2, got {classes_per_batch}.")
        if int(images_per_class) != images_per_class or images_per_class < 1:
            raise ValueError(f"images_per_class must be an integer >= 1, got {images_per_class}.")
        self.classes_per_batch = int(classes_per_batch)
        self.images_per_class = int(images_per_class)
        self.batch_size = self.classes_per_batch * self.images_per_class
        self.seed = int(seed)
        self.num_images = len(labels)

        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        eligible = counts >= 2
        if not eligible.all():
            left_out = classes[~eligible]
            logging.warning("ClassBalancedSampler leaves out %d class(es) with fewer than 2 "
                            "images (labels %s%s).", len(left_out), left_out[:10].tolist(),
                            " ..." if len(left_out) > 10 else "")
        if self.classes_per_batch > int(eligible.sum()):
            raise ValueError(f"classes_per_batch={self.classes_per_batch} exceeds the "
                             f"{int(eligible.sum())} classes with at least 2 images (of "
                             f"{len(classes)} classes, {len(labels)} images).")
        # Image indices grouped by class, each group in catalog order.
        order = np.argsort(inverse, kind="stable").astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.classes = classes[eligible]
        self._order = order
        self._starts = starts[eligible]
        self._counts = counts[eligible].astype(np.int64)
        self.num_classes = len(self.classes)
        # Paper §3 is silent on epochs: an epoch is C // P batches; C % P classes sit it out.
        self.batches_per_epoch = self.num_classes // self.classes_per_batch
        self._permutations = {}

    def _rng(self, stream, value):
        return np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, stream, int(value)])

    def class_permutation(self, epoch):
        """The order in which epoch `epoch` visits the eligible classes.

        Args:
            epoch: int >= 0.

        Returns:
            np.int64 [C], positions into `self.classes`.
        """
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = self._rng(_EPOCH_STREAM, epoch).permutation(self.num_classes)
            # A tiny cache: consecutive steps share their epoch's permutation. It never changes
            # a result, so batch_indices stays a pure function of (seed, step).
            if len(self._permutations) >= 4:
                self._permutations.clear()
            self._permutations[epoch] = perm
        return perm

    def batch_classes(self, step):
        """The P labels of the batch at `step`, in batch order.

        Args:
            step: int >= 0.

        Returns:
            np.int64 [P].
        """
        return self.classes[self._class_positions(step)]

    def _class_positions(self, step):
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        epoch, batch = divmod(int(step), self.batches_per_epoch)
        p = self.classes_per_batch
        return self.class_permutation(epoch)[batch * p:(batch + 1) * p]

    def batch_indices(self, step):
        """The image indices of the batch at `step`: a pure function of (seed, step).

        Args:
            step: int >= 0.

        Returns:
            np.int64 [P * K], class-major.
        """
        positions = self._class_positions(step)
        n = self._counts[positions][:, None]                      # [P, 1]
        p, k = self.classes_per_batch, self.images_per_class
        u_distinct, u_fill, u_order = self._rng(_STEP_STREAM, step).random((3, p, k))
        m = np.minimum(n, k)                                      # distinct images per class
        chosen = np.zeros((p, k), np.int64)
        for slot in range(k):
            # Floyd's algorithm: slot j of m draws t in [0, n - m + j]; on a collision it takes
            # n - m + j itself, which no earlier slot can hold. The result is a uniform m-subset.
            top = n[:, 0] - m[:, 0] + slot
            t = np.floor(u_distinct[:, slot] * (top + 1)).astype(np.int64)
            taken = (chosen[:, :slot] == t[:, None]).any(axis=1)
            floyd = np.where(taken, top, t)
            # Paper §3 is silent: classes with n < K images repeat images only after using all n.
            fill = np.floor(u_fill[:, slot] * n[:, 0]).astype(np.int64)
            chosen[:, slot] = np.where(slot < m[:, 0], floyd, fill)
        chosen = np.take_along_axis(chosen, np.argsort(u_order, axis=1), axis=1)
        indices = self._order[self._starts[positions][:, None] + chosen]
        return indices.reshape(-1)

    def replica_indices(self, step, replica_id, num_replicas):
        """One replica's contiguous share of the global batch at `step`.

        Args:
            step: int >= 0.
            replica_id: int in [0, num_replicas).
            num_replicas: int R; classes_per_batch must be divisible by R.

        Returns:
            np.int64 [P * K / R].
        """
        return replica_slice(self.batch_indices(step), replica_id, num_replicas,
                             self.images_per_class)

    def dataset(self, start_step=0, num_steps=None, replica_id=0, num_replicas=1):
        """The index batches from `start_step` on, as a tf.data pipeline.

        Args:
            start_step: int >= 0, the first step (resume point).
            num_steps: optional int; None repeats forever.
            replica_id: int, which slice of the global batch to yield.
            num_replicas: int R; 1 yields the whole global batch.

        Returns:
            `tf.data.Dataset` of int64 [P * K / R] index batches.
        """
        return self.steps_and_indices(start_step, num_steps, replica_id, num_replicas).map(
            lambda step, indices: indices)

    def steps_and_indices(self, start_step=0, num_steps=None, replica_id=0, num_replicas=1):
        """Like `dataset`, but also yields the step of each batch (the pipeline seeds from it).

        Args:
            start_step: int >= 0.
            num_steps: optional int; None repeats forever.
            replica_id: int in [0, num_replicas).
            num_replicas: int R.

        Returns:
            `tf.data.Dataset` of (step int64 scalar, indices int64 [P * K / R]).
        """
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}.")
        if num_steps is not None and num_steps < 0:
            raise ValueError(f"num_steps must be >= 0 or None, got {num_steps}.")
        # Validates the replica arguments once, eagerly, with a clear message.
        size = len(replica_slice(np.zeros(self.batch_size), replica_id, num_replicas,
                                 self.images_per_class))

        def indices_of(step):
            return self.replica_indices(int(step), replica_id, num_replicas)

        def tf_indices(step):
            indices = tf.numpy_function(indices_of, [step], tf.int64, stateful=False)
            indices.set_shape([size])
            return step, indices

        if num_steps is None:
            steps = tf.data.Dataset.counter(start_step, dtype=tf.int64)
        else:
            steps = tf.data.Dataset.range(start_step, start_step + num_steps, dtype=tf.int64)
        return steps.map(tf_indices)
