"""The command line of `train.py`: flags from `TrainConfig`, then `Trainer(config).run()`.

A script with more flags (the research variants) defines them next to these and calls
`run(config, model_builder=...)`.
"""

import sys

from absl import flags
from absl import logging

from dvml_tf.training import flags as flags_lib
from dvml_tf.training import trainer

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """Defines `--config` and one flag per `TrainConfig` field."""
    flags_lib.define_flags(flag_values)


def run(config, model_builder=None):
    """Trains (or resumes) and evaluates one run, turning expected failures into one-line exits.

    Args:
        config: a validated `TrainConfig`.
        model_builder: optional `config -> DVMLModel` (see `Trainer`).

    Returns:
        The final metrics (dict).
    """
    try:
        logging.info("Configuration:\n%s", config.to_json())
        return trainer.Trainer(config, model_builder=model_builder).run()
    except (ValueError, FileNotFoundError, trainer.NonFiniteLossError) as error:
        sys.exit(f"train.py: error: {error}")
    except KeyboardInterrupt:
        sys.exit(
            "train.py: interrupted; the last checkpoint is saved. Rerun the same command to resume."
        )


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
    run(config_from_flags())
