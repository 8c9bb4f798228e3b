"""One preset per experiment (big_vision style): `get_config()` returns a `TrainConfig` and the
module docstring holds the exact command and the expected result.

`train.py --config=<name>` starts from a preset; any flag given on the command line overrides it.
Without `--config`, the preset is the one named after `--dataset`.
"""

import importlib

PRESETS = ("omniglot", "omniglot_paper", "cub200", "cars196", "sop", "folder", "folder_cpu",
           "csv", "glyphs")


def get_preset(name):
    """Returns the `TrainConfig` of preset `name`.

    Raises:
        ValueError: unknown preset (the message lists the valid ones).
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown config {name!r}; valid configs: {', '.join(PRESETS)}.")
    return importlib.import_module(f"dvml_tf.configs.{name}").get_config()
