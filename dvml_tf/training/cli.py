"""The command line of `train.py`: flags from `TrainConfig`, then `Trainer(config).run()`.

A script with more flags (the research variants) defines them next to these and calls
`run(config, model_builder=...)`.
"""

import signal
import sys
import threading

import tensorflow as tf
from absl import flags
from absl import logging

from dvml_tf.training import flags as flags_lib
from dvml_tf.training import trainer
from dvml_tf.utils import locks
from dvml_tf.utils import write_errors

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """Defines `--config` and one flag per `TrainConfig` field."""
    flags_lib.define_flags(flag_values)


def _raise_terminated(signum, frame):
    raise trainer.Terminated()


def run(config, model_builder=None, adapt_classes_per_batch=False):
    """Trains (or resumes) and evaluates one run, turning expected failures into one-line exits.

    SIGTERM during training saves a checkpoint at the current step (see `trainer.Trainer.train`);
    before or after training it stops the run at once. Either way the process exits with
    `trainer.EXIT_TERMINATED` (143) and a one-line message.

    Args:
        config: a validated `TrainConfig`.
        model_builder: optional `config -> DVMLModel` (see `Trainer`).
        adapt_classes_per_batch: classes_per_batch is the preset's (not given on the command
            line): lower it for a small training split (see `Trainer`).

    Returns:
        The final metrics (dict).
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        logging.info("Configuration:\n%s", config.to_json())
        return trainer.Trainer(config, model_builder=model_builder,
                               adapt_classes_per_batch=adapt_classes_per_batch).run()
    except (ValueError, FileNotFoundError, PermissionError, trainer.NonFiniteLossError,
            locks.LockedError, write_errors.WriteFailedError) as error:
        sys.exit(f"train.py: error: {error}")
    except KeyboardInterrupt:
        sys.exit(
            "train.py: interrupted; the last checkpoint is saved. Rerun the same command to resume."
        )
    except trainer.Terminated as stop:
        if stop.checkpoint:
            message = (f"train.py: terminated (SIGTERM) at step {stop.step}; checkpoint "
                       f"{stop.checkpoint} saved. Rerun the same command to resume.")
        else:
            message = ("train.py: terminated (SIGTERM); every finished step is checkpointed. "
                       "Rerun the same command to resume.")
        print(message, file=sys.stderr, flush=True)
        sys.exit(trainer.EXIT_TERMINATED)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def config_from_flags(flag_values=FLAGS):
    """The run's `TrainConfig` from the flags, or a one-line exit naming the bad flag."""
    try:
        return flags_lib.config_from_flags(flag_values)
    except ValueError as error:
        sys.exit(f"train.py: error: {error}")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"train.py: error: unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    config = config_from_flags()
    if config.config == "folder" and not tf.config.list_physical_devices("GPU"):
        logging.warning(
            "The folder preset is the paper's GPU recipe (%s at %d px, %d steps): hours on a "
            "CPU. Without a GPU, --config=folder_cpu trains a small pretrained network "
            "(docs/training.md, Presets).", config.backbone, config.image_size, config.steps)
    # A preset's batch adapts to a small catalogue; a value given on the command line does not.
    run(config, adapt_classes_per_batch=not FLAGS["classes_per_batch"].present)
