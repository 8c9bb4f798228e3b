"""`train.py` with the research variants of `variants.py`: the same flags, plus
`--research_variant=unit|stop|reverse|decoded`.

    python research/dvml_omniglot/train.py --research_variant=stop --model_dir=runs/stop ...

The variant is recorded in `<model_dir>/research_variant.txt`; a model_dir trained with another
variant is refused.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dvml_tf.training import cli  # noqa: E402
from research.dvml_omniglot import variants  # noqa: E402

cli.define_flags()
flags.DEFINE_enum("research_variant", None, variants.VARIANTS,
                  "Research variant of the synthesis (see variants.py); default: none.")
FLAGS = flags.FLAGS
VARIANT_FILE = "research_variant.txt"


def main(argv):
    if len(argv) > 1:
        sys.exit(f"train.py: error: unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    config = cli.config_from_flags()
    variant = FLAGS.research_variant
    os.makedirs(config.model_dir, exist_ok=True)
    path = os.path.join(config.model_dir, VARIANT_FILE)
    recorded = None
    if os.path.exists(path):
        with open(path) as f:
            recorded = f.read().strip()
    if recorded is not None and recorded != str(variant):
        sys.exit(f"train.py: error: {config.model_dir} was trained with research_variant="
                 f"{recorded}, not {variant}.")
    with open(path, "w") as f:
        f.write(str(variant))
    cli.run(config, model_builder=variants.model_builder(variant))


if __name__ == "__main__":
    app.run(main)
