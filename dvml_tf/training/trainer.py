"""The training loop behind `train.py`: one code path for one device, MirroredStrategy and
MultiWorkerMirroredStrategy.

Keras 3's `fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585), so the loop is
our own: it runs `DVMLModel.train_step` (the same step `fit` runs) through `strategy.run` on
per-replica batches that each hold whole classes of the global P x K batch. The state that a
resumed run needs (weights, optimizer, the step that drives the DVML phase, and through it the
sampler's position, since batches are a pure function of (seed, step)) is one `tf.train.Checkpoint`.

Faults: SIGTERM (preemption, Kubernetes, Slurm, `timeout`) finishes the current step, saves a
checkpoint at that step and raises `Terminated` (train.py exits with `EXIT_TERMINATED`, 143);
Ctrl-C saves one too. A latest checkpoint that cannot be read is moved aside (never deleted)
and training resumes from the newest readable one, with a warning. A resumed run must train on
the data it started with (`dataset.json`) and never describes fewer steps than it trained. One
run writes a folder at a time (`lock_model_dir`: a second process is refused). A full disk or a
read-only folder ends the run with a `WriteFailedError` naming the folder; a refused checkpoint
leaves no `ckpt-N_temp/` behind, and the last checkpoint stays.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dvml_tf import data as data_lib
from dvml_tf import losses as losses_lib
from dvml_tf import models
from dvml_tf import task
from dvml_tf.evaluation import metrics as metrics_lib
from dvml_tf.evaluation import runner
from dvml_tf.training import distribution
from dvml_tf.training.config import TrainConfig
from dvml_tf.utils import atomic
from dvml_tf.utils import locks
from dvml_tf.utils import write_errors

# metrics.json key of the variance branch's diagnostics (`Trainer.variance_diagnostics`).
DIAGNOSTICS_KEY = "dvml_diagnostics"
# Training batches the diagnostics are measured on (64 x 2 images each in the Omniglot preset).
DIAGNOSTIC_BATCHES = 8


# train.py's exit status after SIGTERM: 128 + 15, what a shell reports for a process SIGTERM
# killed, so schedulers and scripts read it as "terminated" (the checkpoint is saved).
EXIT_TERMINATED = 143
# Where checkpoints that cannot be read are moved (inside checkpoints/; never deleted).
UNREADABLE_DIR = "unreadable"
# The lock file of a run folder while a run writes it (removed when the run ends).
RUN_LOCK_FILE = ".train.lock"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left untouched."""


class Terminated(BaseException):
    """SIGTERM stopped the run. Derived from BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it.

    Args:
        step: the step at which a checkpoint was saved, or None when training had not started
            (or had finished).
        checkpoint: the checkpoint saved, or None.
    """

    def __init__(self, step=None, checkpoint=None):
        super().__init__(step, checkpoint)
        self.step = step
        self.checkpoint = checkpoint


class _StopOnSigterm:
    """Within the block, SIGTERM sets `requested` instead of killing the process; the training
    loop checks it after every step. Outside the main thread (where signals cannot be handled)
    it does nothing."""

    def __init__(self):
        self.requested = False
        self._installed = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True
        logging.warning("SIGTERM received: stopping after the current step.")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            # None: the previous handler was not installed from Python; the default it is.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False
        return False


def lock_model_dir(model_dir):
    """Takes the lock of a run folder, `<model_dir>/.train.lock`, or refuses at once.

    Re-entrant within a process (a test or a notebook may build a second `Trainer` of the same
    folder to resume it); another process is refused with the holder's pid, host and command.
    The kernel releases the lock when its process dies, and the last holder removes the file.

    Args:
        model_dir: the run folder.

    Returns:
        the held `locks.FileLock` (call `release`).

    Raises:
        locks.LockedError: another process holds it.
    """
    path = os.path.join(model_dir, RUN_LOCK_FILE)
    return locks.FileLock(path, reentrant=True, what="the run's lock file", busy=lambda holder: (
        f"Another training run is writing {os.path.abspath(model_dir)} ({holder}); wait for it "
        "to finish, or train into another --model_dir.")).acquire()


def _check_writable_model_dir(model_dir):
    """Refuses a --model_dir that is a file, lies below a file, or cannot be written, before any
    data is loaded."""
    try:
        atomic.check_writable(model_dir, directory=True)
    except ValueError as error:
        raise ValueError(f"--model_dir: {error}") from None
    except PermissionError as error:
        raise PermissionError(f"--model_dir: {error} Choose a folder you can write.") from None


def _check_model_dir(config, model_dir, ignore=()):
    """Refuses to resume a run that was trained with a configuration that changes the result.

    A folder without a checkpoint has trained nothing yet (e.g. an earlier attempt failed while
    loading the data): any configuration may start there.

    Args:
        config: the configuration asked for.
        model_dir: the run folder.
        ignore: fields not compared (yet).
    """
    path = os.path.join(model_dir, task.CONFIG_FILE)
    checkpoints = os.path.join(model_dir, task.CHECKPOINT_DIR)
    if not os.path.exists(path) or tf.train.latest_checkpoint(checkpoints) is None:
        return
    with open(path) as f:
        saved = TrainConfig.from_dict(json.load(f))
    differences = {key: value for key, value in config.differences(saved).items()
                   if key not in ignore}
    if differences:
        lines = "\n".join(
            f"  {k}: {old!r} in {path} vs {new!r} now"
            for k, (old, new) in sorted(differences.items())
        )
        raise ValueError(
            f"model_dir {model_dir} holds a run with a different configuration:\n{lines}\n"
            "Rerun with the same flags to resume it, or choose another --model_dir."
        )


def _check_dataset(identity, model_dir, data_dir):
    """Refuses to resume a run on other data than it was trained on (`dataset.json`).

    Args:
        identity: `data.identity.dataset_identity` of the data loaded now.
        model_dir: the run folder.
        data_dir: where the data was loaded from (for the message).
    """
    path = os.path.join(model_dir, task.DATASET_FILE)
    checkpoints = os.path.join(model_dir, task.CHECKPOINT_DIR)
    if tf.train.latest_checkpoint(checkpoints) is None:
        return
    if not os.path.exists(path):
        logging.info("%s has no %s (written by older versions): recording the dataset now.",
                     model_dir, task.DATASET_FILE)
        return
    with open(path) as f:
        saved = json.load(f)
    changes = data_lib.identity_changes(saved, identity)
    if changes:
        lines = "\n".join(f"  {change}" for change in changes)
        where = f"--data_dir {data_dir!r}" if data_dir else "the data loaded now"
        raise ValueError(
            f"model_dir {model_dir} was trained on other data than {where} ({path}):\n{lines}\n"
            "Resume it on the data it was trained on (it may have moved: the content is "
            "compared, not the path), or start a new run with another --model_dir."
        )


def fit_classes_per_batch(config, catalog, num_replicas=1):
    """Lowers a preset's classes_per_batch to what a small training split can fill.

    Args:
        config: the `TrainConfig`.
        catalog: the training `ImageCatalog`.
        num_replicas: replicas in sync (P must stay divisible by it).

    Returns:
        `config`, or a copy with the largest classes_per_batch <= the training classes with at
        least 2 images that is a multiple of `num_replicas` and >= 2 (with a logged note).
    """
    _, counts = catalog.class_counts()
    usable = int((counts >= 2).sum())
    if config.classes_per_batch <= usable:
        return config
    lowered = usable - usable % max(num_replicas, 1)
    if lowered < 2:
        return config  # nothing fits: the sampler's check explains
    logging.warning(
        "classes_per_batch lowered from %d (preset %s) to %d: the training split has %d classes "
        "with at least 2 images. Batches hold %d x %d images. Set --classes_per_batch to choose "
        "another value.", config.classes_per_batch, config.config, lowered, usable, lowered,
        config.images_per_class)
    return config.replace(classes_per_batch=lowered)


def make_distributed_step(strategy, model, jit_compile=False):
    """A `tf.function(iterator) -> logs` running one `model.train_step` on every replica.

    The structure is Keras's own (`fit`): the per-replica step is a `tf.function` called through
    `strategy.run` inside an outer `tf.function`; the logs are averaged over the replicas.

    Args:
        strategy: a `tf.distribute.Strategy`.
        model: a compiled `DVMLModel` built in `strategy.scope()`.
        jit_compile: compile the per-replica step with XLA.

    Returns:
        The step function; it takes an iterator over (distributed) `(images, labels)` batches.
    """
    replica_step = tf.function(model.train_step, jit_compile=jit_compile)

    @tf.function
    def step(iterator):
        logs = strategy.run(replica_step, args=(next(iterator),))
        return {
            key: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
            for key, value in logs.items()
        }

    return step


class Trainer:
    """Trains, checkpoints, resumes and evaluates one `TrainConfig`.

    Args:
        config: a `TrainConfig` (validated here).
        splits: optional `data.DatasetSplits`; loaded from the config when omitted (tests pass
            generated data).
        strategy: optional `tf.distribute.Strategy`; made from `config.strategy` when omitted.
        verbose: show the progress bar and the final table.
        model_builder: optional callable `config -> DVMLModel` replacing `task.build_model`
            (research variants).
        adapt_classes_per_batch: the configuration's classes_per_batch is a preset's, not the
            user's: lower it when the training split has fewer usable classes
            (`adapt_classes_per_batch`). When False, too large a value is an error.

    Raises:
        ValueError, PermissionError: a bad model_dir, or a run there that this configuration or
            this data cannot resume.
        dvml_tf.utils.locks.LockedError: another process trains into the same model_dir (the
            chief holds the folder's lock from here to the end of `run`, or until `close`).
    """

    def __init__(self, config, splits=None, strategy=None, verbose=True, model_builder=None,
                 adapt_classes_per_batch=False):
        config = config.validate()
        if not config.model_dir:
            raise ValueError("model_dir must be set (train.py derives one from the flags).")
        _check_writable_model_dir(config.model_dir)
        self.strategy = strategy or distribution.make_strategy(config.strategy)
        self.is_chief = distribution.is_chief(self.strategy)
        self.verbose = verbose and self.is_chief
        self.write_dir = distribution.worker_directory(config.model_dir, self.strategy)
        try:
            os.makedirs(self.write_dir, exist_ok=True)
        except OSError as error:
            raise ValueError(f"--model_dir: cannot create {self.write_dir}: {error}") from None
        # One writer per run folder, from before anything is read to the end of `run`.
        self._run_lock = lock_model_dir(config.model_dir) if self.is_chief else None
        try:
            self._set_up(config, splits, model_builder, adapt_classes_per_batch)
        except BaseException:
            self.close()
            raise

    def _set_up(self, config, splits, model_builder, adapt_classes_per_batch):
        """Loads the data, builds the model, restores the last checkpoint (see __init__)."""
        # Before loading any data; classes_per_batch is compared once it is known.
        _check_model_dir(config, config.model_dir,
                         ignore=("classes_per_batch",) if adapt_classes_per_batch else ())

        self.splits = splits or task.load_splits(config)
        self.num_replicas = self.strategy.num_replicas_in_sync
        if adapt_classes_per_batch:
            config = fit_classes_per_batch(config, self.splits.train, self.num_replicas)
            _check_model_dir(config, config.model_dir)
        self.config = config
        self.identity = data_lib.dataset_identity(self.splits)
        _check_dataset(self.identity, config.model_dir, config.data_dir)
        self.preprocess = task.preprocess_config(config)
        logging.info(
            "Strategy %s: %d replica(s) in sync, %d classes x %d images per replica.",
            config.strategy, self.num_replicas,
            config.classes_per_batch // max(self.num_replicas, 1), config.images_per_class,
        )
        if config.classes_per_batch % self.num_replicas:
            raise ValueError(
                f"classes_per_batch ({config.classes_per_batch}) must be divisible by the "
                f"number of replicas ({self.num_replicas}) so that every replica gets whole "
                "classes."
            )
        usable = int((self.splits.train.class_counts()[1] >= 2).sum())
        if config.classes_per_batch > usable:
            raise ValueError(
                f"--classes_per_batch={config.classes_per_batch} exceeds the {usable} training "
                f"classes with at least 2 images ({self.splits.train.num_classes} training "
                f"classes, {self.splits.train.num_images} images): lower --classes_per_batch "
                f"to at most {usable}."
            )
        self.sampler = data_lib.ClassBalancedSampler(
            self.splits.train.labels,
            config.classes_per_batch,
            config.images_per_class,
            seed=config.seed,
        )

        if config.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        with self.strategy.scope():
            keras.utils.set_random_seed(config.seed)
            self.model = (model_builder or task.build_model)(config)
            self.model.compile(optimizer=task.build_optimizer(config))
            # Under mixed precision compile() wraps the optimizer in a LossScaleOptimizer: build
            # (and checkpoint) the wrapper, so no variable is created inside the replicated step.
            self.optimizer = self.model.optimizer
            self.optimizer.build(self.model.trainable_variables)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
        self._any_flag = None
        self._restore()
        # Created after the restore: it reads the state file as the restore left it.
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self.write_dir, task.CHECKPOINT_DIR), max_to_keep=3
        )
        if self.step > config.steps:
            raise ValueError(
                f"model_dir {config.model_dir} has trained {self.step} steps; --steps="
                f"{config.steps} would record fewer steps than were trained. Rerun with "
                f"--steps={self.step} to evaluate it again, more steps to continue training, "
                "or choose another --model_dir."
            )
        if self.is_chief:
            # Written once everything loaded and built: the configuration this run continues
            # with, and the data it trains on.
            atomic.write_text(os.path.join(self.write_dir, task.CONFIG_FILE), config.to_json())
            atomic.write_json(os.path.join(self.write_dir, task.DATASET_FILE), self.identity,
                              sort_keys=True)

    # ------------------------------------------------------------------------- state and data

    def _restore(self):
        """Restores the newest readable checkpoint of the chief's folder (every worker reads the
        chief's: only the chief's are kept). Unreadable newer ones are moved aside by the chief,
        with a warning; if none can be read, a ValueError says so."""
        directory = os.path.join(self.config.model_dir, task.CHECKPOINT_DIR)
        state = tf.train.get_checkpoint_state(directory)
        candidates = list(state.all_model_checkpoint_paths) if state else []
        if state and state.model_checkpoint_path not in candidates:
            candidates.append(state.model_checkpoint_path)
        unreadable = []
        for path in reversed(candidates):
            path = path if os.path.isabs(path) else os.path.join(directory, path)
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except (tf.errors.OpError, IndexError, ValueError, AssertionError,
                    OSError) as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
                logging.warning("Checkpoint %s cannot be read (%s): falling back to the previous "
                                "one.", path, reason)
                unreadable.append((path, reason))
                continue
            if unreadable and self.is_chief:
                self._set_aside(directory, state, [p for p, _ in unreadable], path)
            logging.info(
                "Resumed from %s at step %d (phase %d).", path, self.step, self.model.phase
            )
            return
        if unreadable:
            listed = "; ".join(f"{p} ({reason})" for p, reason in unreadable)
            raise ValueError(
                f"No checkpoint in {directory} can be read: {listed}. Nothing was changed. "
                "Move the folder aside to train from the start, or choose another --model_dir."
            )

    @staticmethod
    def _set_aside(directory, state, paths, restored):
        """Moves unreadable checkpoints into checkpoints/unreadable/ (the user may want them)
        and removes them from the state file, so that new checkpoints of the same steps neither
        overwrite them nor are mistaken for them."""
        aside = os.path.join(directory, UNREADABLE_DIR)
        os.makedirs(aside, exist_ok=True)
        for path in paths:
            for name in tf.io.gfile.glob(path + ".*"):
                target = os.path.join(aside, os.path.basename(name))
                suffix = 1
                while os.path.exists(target):
                    target = os.path.join(aside, f"{os.path.basename(name)}.{suffix}")
                    suffix += 1
                shutil.move(name, target)
            logging.warning("Moved the unreadable checkpoint %s into %s/ (not deleted).", path,
                            aside)
        # The state file names checkpoints relative to its folder, so that the run folder can
        # move; it is rewritten atomically by TF.
        bad = {os.path.basename(p) for p in paths}
        names = [os.path.basename(p) for p in state.all_model_checkpoint_paths]
        timestamps = list(state.all_model_checkpoint_timestamps)
        keep = [i for i, name in enumerate(names) if name not in bad]
        tf.compat.v1.train.update_checkpoint_state(
            directory, os.path.basename(restored),
            all_model_checkpoint_paths=[names[i] for i in keep],
            all_model_checkpoint_timestamps=([timestamps[i] for i in keep]
                                             if len(timestamps) == len(names) else None),
            last_preserved_timestamp=state.last_preserved_timestamp or None)

    @property
    def step(self):
        return int(self.model.step_counter.numpy())

    def _replica_dataset(self, input_context):
        """Per-replica batches for this worker: replica r's slice (whole classes) of each global
        batch, in replica order, as `distribute_datasets_from_function` expects."""
        replicas_here = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        first_replica = input_context.input_pipeline_id * replicas_here
        per_replica = [
            data_lib.make_train_dataset(
                self.splits.train,
                self.sampler,
                self.preprocess,
                start_step=self.step,
                replica_id=replica_id,
                num_replicas=self.num_replicas,
            )
            for replica_id in range(first_replica, first_replica + replicas_here)
        ]
        if len(per_replica) == 1:
            return per_replica[0]
        # Round robin: the local replicas take consecutive elements, in replica order.
        order = tf.data.Dataset.range(replicas_here).repeat()
        return tf.data.Dataset.choose_from_datasets(per_replica, order)

    # --------------------------------------------------------------------------------- train

    def _save_checkpoint(self):
        if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(
            f"-{self.step}"
        ):
            return
        # A step's loss is computed before its update: check the weights themselves, so that a
        # checkpoint is only ever replaced by a good one.
        if not all(
            bool(tf.reduce_all(tf.math.is_finite(v)))
            for v in self.model.variables
            if "float" in str(v.dtype)
        ):
            raise NonFiniteLossError(
                f"The weights became non-finite by step {self.step}. Training stopped; the last "
                f"good checkpoint ({self.manager.latest_checkpoint or 'none yet'}) is intact. "
                "Lower --learning_rate or check the data."
            )
        directory = self.manager.directory
        before = set(os.listdir(directory)) if os.path.isdir(directory) else set()
        try:
            self.manager.save(checkpoint_number=self.step)
        except Exception as error:
            failed = write_errors.failure(
                error, directory, f"checkpoint ckpt-{self.step}", needed=self._checkpoint_bytes(),
                kept=f"The last checkpoint ({self.manager.latest_checkpoint or 'none yet'}) is "
                "intact.")
            if failed is None:
                raise
            # SaveV2 leaves its temporary folder (ckpt-N_temp/) behind, and perhaps part of
            # ckpt-N: remove what this save created, nothing else.
            for name in set(os.listdir(directory)) - before:
                path = os.path.join(directory, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(path)
            raise failed from None

    def _checkpoint_bytes(self):
        """About the size of a checkpoint: the bytes of the variables it saves."""
        variables = [*self.model.variables, *self.optimizer.variables]
        return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)

    @contextlib.contextmanager
    def _refused_writes(self):
        """A write the file system refuses (a checkpoint, TensorBoard events, model.keras, the
        metrics) ends the run with a `WriteFailedError` naming the folder; the last checkpoint
        stays as it was."""
        try:
            yield
        except Exception as error:
            failed = write_errors.failure(
                error, self.write_dir, "the run's files", kept=(
                    f"The last checkpoint ({self.manager.latest_checkpoint or 'none yet'}) is "
                    "intact."))
            if failed is None or failed is error:
                raise
            raise failed from None

    def train(self, stop_at=None):
        """Runs the remaining steps (or up to step `stop_at`). Returns the last step's logs.

        Raises:
            write_errors.WriteFailedError: the disk refused a checkpoint or the TensorBoard
                events (a full disk, a read-only folder); the last checkpoint is intact.
        """
        with self._refused_writes():
            return self._train(stop_at)

    def _train(self, stop_at):
        config = self.config
        last_step = config.steps if stop_at is None else min(stop_at, config.steps)
        if self.step >= last_step:
            logging.info("Training already finished at step %d.", self.step)
            return {}
        dataset = self.strategy.distribute_datasets_from_function(self._replica_dataset)
        iterator = iter(dataset)
        step_fn = make_distributed_step(self.strategy, self.model, config.jit_compile)
        writer = (
            tf.summary.create_file_writer(os.path.join(self.write_dir, task.LOGS_DIR, "train"))
            if self.is_chief
            else tf.summary.create_noop_writer()
        )
        # A live bar on a terminal; in a log file, one line per logging interval instead.
        interactive = self.verbose and sys.stdout.isatty()
        progbar = keras.utils.Progbar(
            config.steps, stateful_metrics=models.LOG_KEYS, verbose=1 if interactive else 0
        )
        progbar.update(self.step)
        sigterm = _StopOnSigterm()
        try:
            with sigterm:
                logs = self._train_loop(iterator, step_fn, writer, progbar, interactive,
                                        last_step, sigterm)
        except KeyboardInterrupt:
            self._save_checkpoint()  # the interrupted step either finished or did not start
            logging.warning(
                "Interrupted at step %d; checkpoint saved. Rerun the same command to resume.",
                self.step,
            )
            raise
        self._save_checkpoint()
        writer.flush()
        return logs

    def _stop_requested(self, sigterm):
        """Whether any worker received SIGTERM: under several workers a collective, so that all
        stop after the same step (a worker that stopped alone would leave the others waiting)."""
        if distribution.num_workers(self.strategy) > 1:
            if self._any_flag is None:
                strategy = self.strategy

                @tf.function
                def any_flag(flag):
                    values = strategy.run(lambda: tf.identity(flag))
                    return strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)

                self._any_flag = any_flag
            return float(self._any_flag(tf.constant(float(sigterm.requested)))) > 0
        return sigterm.requested

    def _train_loop(self, iterator, step_fn, writer, progbar, interactive, last_step, sigterm):
        config = self.config
        logs, started = {}, time.time()
        while self.step < last_step:
            logs = {k: float(v) for k, v in step_fn(iterator).items()}
            step = self.step
            if not all(math.isfinite(v) for v in logs.values()):
                raise NonFiniteLossError(
                    f"Non-finite loss at step {step}: {logs}. Training stopped; the last "
                    f"good checkpoint ({self.manager.latest_checkpoint or 'none yet'}) is "
                    "intact. Lower --learning_rate or check the data."
                )
            progbar.update(step, values=list(logs.items()))
            if step % config.log_every == 0 or step == config.steps:
                if self.verbose and not interactive:
                    logging.info(
                        "step %d/%d %s",
                        step,
                        config.steps,
                        " ".join(f"{k}={v:.4g}" for k, v in logs.items()),
                    )
                with writer.as_default(step=step):
                    for key, value in logs.items():
                        tf.summary.scalar(f"train/{key}", value)
                    tf.summary.scalar(
                        "train/steps_per_second",
                        config.log_every / max(time.time() - started, 1e-9),
                    )
                started = time.time()
                for tracker in self.model.metrics:
                    tracker.reset_state()
            if config.eval_every and step % config.eval_every == 0:
                self._evaluate_validation(step)
            if step % config.checkpoint_every == 0:
                self._save_checkpoint()
            if self._stop_requested(sigterm):
                self._save_checkpoint()
                writer.flush()
                logging.warning("Terminated (SIGTERM) at step %d; checkpoint %s saved. Rerun "
                                "the same command to resume.", step,
                                self.manager.latest_checkpoint)
                raise Terminated(step, self.manager.latest_checkpoint)
        return logs

    # ------------------------------------------------------------------------------ evaluate

    def _evaluate_validation(self, step):
        if not self.is_chief or self.splits.validation is None:
            return None
        metrics = runner.evaluate_model(
            self.model,
            self.splits.validation,
            self.preprocess,
            batch_size=self.config.eval_batch_size,
            recall_ks=self.config.recall_ks,
            compute_clustering=False,
        )
        writer = tf.summary.create_file_writer(
            os.path.join(self.write_dir, task.LOGS_DIR, "validation")
        )
        with writer.as_default(step=step):
            for key, value in metrics.items():
                tf.summary.scalar(f"validation/{key}", value)
        writer.flush()
        logging.info("step %d validation: %s", step, runner.format_metrics(metrics))
        return metrics

    def evaluate_final(self):
        """Evaluates z_I on `config.evaluation_split` (the test classes unless doing model
        selection); writes the metrics JSON and TensorBoard scalars."""
        split = self.config.evaluation_split
        catalog = getattr(self.splits, split)
        metrics = runner.evaluate_model(
            self.model,
            catalog,
            self.preprocess,
            batch_size=self.config.eval_batch_size,
            recall_ks=self.config.recall_ks,
        )
        diagnostics = self.variance_diagnostics() if self.config.dvml else None
        if self.is_chief:
            # How many queries Recall@K and MAP@R leave out (no possible positive), as
            # evaluate.py records it.
            record = {**metrics, "excluded_queries": metrics_lib.queries_without_positive(
                catalog.labels, catalog.is_query, catalog.is_gallery)}
            if diagnostics is not None:
                record[DIAGNOSTICS_KEY] = diagnostics
            atomic.write_json(os.path.join(self.write_dir, task.metrics_file(split)), record,
                              sort_keys=True)
            writer = tf.summary.create_file_writer(os.path.join(self.write_dir, task.LOGS_DIR,
                                                                split))
            with writer.as_default(step=self.step):
                for key, value in metrics.items():
                    tf.summary.scalar(f"{split}/{key}", value)
                for key, value in (diagnostics or {}).items():
                    if key == "kl_per_dim":
                        tf.summary.histogram("dvml/kl_per_dim", value)
                    else:
                        tf.summary.scalar(f"dvml/{key}", value)
            writer.flush()
        return metrics

    def variance_diagnostics(self, num_batches=DIAGNOSTIC_BATCHES):
        """Is the variance branch informative? Measured on the first training batches of the
        sampler, in inference mode, at the end of training.

        Returns:
            dict: `active_units` (latent dimensions whose posterior mean varies across the
            images by more than `models.dvml_model.ACTIVE_UNIT_VARIANCE`, in units of the
            prior), `kl_per_dim` (nats, mean over images, one value per dimension), `kl`
            (their sum), `recon` and `recon_shuffled` (reconstruction error with each image's
            own z_V and with the z_V of another image of the batch: a decoder that uses z_V
            does worse shuffled), `metric_inv`, `metric_syn`, `syn_to_inv`, `images`.
        """
        dataset = data_lib.make_train_dataset(self.splits.train, self.sampler, self.preprocess,
                                              num_steps=num_batches)
        parts = {"mean": [], "log_variance": [], "recon": [], "recon_shuffled": []}
        metric_inv, metric_syn = [], []
        for images, labels in dataset:
            _, logs, details = self.model.loss_terms(images, labels, training=False,
                                                     details=True)
            for key in parts:
                parts[key].append(details[key].numpy())
            metric_inv.append(float(logs["metric_inv"]))
            metric_syn.append(float(logs["metric_syn"]))
        mean, log_variance = (np.concatenate(parts[k]) for k in ("mean", "log_variance"))
        kl_per_dim = np.mean(
            losses_lib.kl_per_dimension(mean, log_variance).numpy(), axis=0).astype(float)
        diagnostics = {
            "active_units": int(np.sum(np.var(mean, axis=0) > models.ACTIVE_UNIT_VARIANCE)),
            "kl": float(np.sum(kl_per_dim)),
            "kl_per_dim": [round(v, 5) for v in kl_per_dim.tolist()],
            "recon": float(np.mean(np.concatenate(parts["recon"]))),
            "recon_shuffled": float(np.mean(np.concatenate(parts["recon_shuffled"]))),
            "metric_inv": float(np.mean(metric_inv)),
            "metric_syn": float(np.mean(metric_syn)),
            "images": len(mean),
        }
        diagnostics["syn_to_inv"] = diagnostics["metric_syn"] / max(diagnostics["metric_inv"],
                                                                    1e-12)
        logging.info(
            "DVML diagnostics on %d training images: %d/%d active units, KL %.3f nats, recon "
            "%.4f (own z_V) vs %.4f (shuffled z_V), L_syn/L_inv %.3f.", len(mean),
            diagnostics["active_units"], self.config.embedding_dim, diagnostics["kl"],
            diagnostics["recon"], diagnostics["recon_shuffled"], diagnostics["syn_to_inv"])
        return diagnostics

    def save_model(self):
        """Writes `<model_dir>/model.keras` (atomically) on the chief."""
        if self.is_chief:
            atomic.save_keras_model(self.model, os.path.join(self.write_dir, task.MODEL_FILE))

    def close(self):
        """Releases the run folder's lock (`run` does it when it ends)."""
        lock, self._run_lock = self._run_lock, None
        if lock is not None:
            lock.release()

    def run(self):
        """Trains (or resumes), saves the model and evaluates on the test classes."""
        try:
            with self._refused_writes():
                self.train()
                self.save_model()
                metrics = self.evaluate_final()
        finally:
            distribution.remove_worker_directory(self.write_dir, self.config.model_dir)
            self.close()
        if self.verbose:
            metric = runner.distance_metric(self.model.normalize_embeddings)
            title = (f"{self.config.evaluation_split.capitalize()} classes "
                     f"({self.config.dataset}), {metric} distance")
            print(runner.metrics_table(metrics, title=title))
        return metrics
