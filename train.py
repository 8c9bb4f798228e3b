"""Trains DVML (or its base-loss baseline) and evaluates it on the unseen test classes.

    python train.py                                 # DVML + N-pair on Omniglot (CPU preset)
    python train.py --dataset=sop                   # the paper recipe on Stanford Online Products
    python train.py --loss=triplet2_dws --images_per_class=4 --nodvml
    python train.py --dataset=folder --data_dir=/path/to/catalogue

Rerunning the same command after an interruption resumes from the last checkpoint in
--model_dir. The run writes config.json, checkpoints/, logs/ (TensorBoard), model.keras and
metrics.json into --model_dir.
"""

import ast
import os
import sys

from absl import app
from absl import flags
from absl import logging

from dvml_tf import configs
from dvml_tf.training import config as config_lib
from dvml_tf.training import trainer

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "config",
    None,
    configs.PRESETS,
    "Preset to start from; default: the preset named after --dataset.",
)
flags.DEFINE_enum("dataset", None, config_lib.DATASETS, "Dataset.")
flags.DEFINE_string(
    "data_dir", None, "TFDS data directory, or the image folder (--dataset=folder)."
)
flags.DEFINE_string(
    "model_dir",
    None,
    "Output directory; default: runs/<dataset>_<loss>_<dvml|baseline>_seed<seed>.",
)
flags.DEFINE_enum("loss", None, list(config_lib.METRIC_LOSSES), "Base metric loss.")
flags.DEFINE_string(
    "loss_options", None, "Loss arguments as key=value pairs, e.g. 'margin=0.3,normalize=True'."
)
flags.DEFINE_boolean(
    "dvml", None, "Train DVML (--dvml) or the plain base-loss baseline (--nodvml)."
)
flags.DEFINE_enum("backbone", None, config_lib.BACKBONES, "Backbone network.")
flags.DEFINE_boolean("pretrained", None, "Start the backbone from ImageNet weights.")
flags.DEFINE_string("backbone_weights", None, "A .weights.h5 file for the backbone.")
flags.DEFINE_integer("embedding_dim", None, "Embedding size (z_I, mu, log sigma^2).")
flags.DEFINE_integer("image_size", None, "Crop size fed to the backbone.")
flags.DEFINE_integer("resize_size", None, "Images are resized to this square side first.")
flags.DEFINE_integer("validation_classes", None, "Training classes held out for validation.")
flags.DEFINE_integer("classes_per_batch", None, "P: distinct classes per batch.")
flags.DEFINE_integer("images_per_class", None, "K: images per class (N-pair: 2).")
flags.DEFINE_integer("steps", None, "Training steps.")
flags.DEFINE_float("phase1_fraction", None, "Fraction of the steps in phase 1.")
flags.DEFINE_list("phase1_weights", None, "Phase-1 weights: KL,recon,synthesized,invariant.")
flags.DEFINE_list("phase2_weights", None, "Phase-2 weights: KL,recon,synthesized,invariant.")
flags.DEFINE_integer("num_samples", None, "T: z_V draws per image.")
flags.DEFINE_float("variance_scale", None, "s in z_V = s * (mu + sigma * eps); paper: 1.")
flags.DEFINE_boolean("normalize_before_sum", None,
                     "Synthesize normalize(z_I) + z_V instead of the paper's z_I + z_V.")
flags.DEFINE_enum("synthesis_gradient", None, ["full", "stop", "reverse"],
                  "What the synthesized-sample loss does to the variance heads; paper: full.")
flags.DEFINE_float("learning_rate", None, "Adam learning rate.")
flags.DEFINE_float("weight_decay", None, "Decoupled weight decay (AdamW) if > 0.")
flags.DEFINE_integer("seed", None, "Random seed (weights, batches, augmentation, noise).")
flags.DEFINE_integer("eval_every", None, "Evaluate on the validation split every N steps.")
flags.DEFINE_integer("log_every", None, "TensorBoard logging interval in steps.")
flags.DEFINE_integer("checkpoint_every", None, "Checkpoint interval in steps.")
flags.DEFINE_integer("eval_batch_size", None, "Batch size for embedding the test images.")
flags.DEFINE_list("recall_ks", None, "K of Recall@K, e.g. 1,10,100,1000.")
flags.DEFINE_enum("evaluation_split", None, config_lib.EVALUATION_SPLITS,
                  "Split evaluated at the end; 'validation' for model selection.")
flags.DEFINE_enum(
    "strategy",
    None,
    config_lib.STRATEGIES,
    "default: one device; mirrored: all local GPUs; multi_worker: TF_CONFIG cluster.",
)
flags.DEFINE_boolean("sync_batch_norm", None,
                     "All-reduce batch-norm statistics across replicas (GPUs/workers).")
flags.DEFINE_boolean("mixed_precision", None, "float16 compute (GPU), float32 variables/losses.")
flags.DEFINE_boolean("jit_compile", None, "Compile the training step with XLA.")

_CONVERTERS = {
    "phase1_weights": lambda v: tuple(float(x) for x in v),
    "phase2_weights": lambda v: tuple(float(x) for x in v),
    "recall_ks": lambda v: tuple(int(x) for x in v),
}


def parse_loss_options(text):
    """'margin=0.3,normalize=True' -> {'margin': 0.3, 'normalize': True}."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--loss_options: expected key=value, got {item!r}.")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def resolve_config(flag_values):
    """The preset named by --config (or --dataset) with every given flag applied on top."""
    dataset = flag_values.dataset
    preset_name = flag_values.config or (dataset if dataset in configs.PRESETS else "omniglot")
    config = configs.get_preset(preset_name)
    changes = {}
    for field in config.to_dict():
        if field in ("config", "loss_options") or field not in flag_values:
            continue
        if flag_values[field].present:
            value = flag_values[field].value
            changes[field] = _CONVERTERS.get(field, lambda v: v)(value)
    if flag_values["loss_options"].present:
        changes["loss_options"] = parse_loss_options(flag_values.loss_options)
    config = config.replace(config=preset_name, **changes)
    if not config.model_dir:
        kind = "dvml" if config.dvml else "baseline"
        config = config.replace(
            model_dir=os.path.join(
                "runs", f"{config.dataset}_{config.loss}_{kind}_seed{config.seed}"
            )
        )
    return config.validate()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    try:
        config = resolve_config(FLAGS)
        logging.info("Configuration:\n%s", config.to_json())
        trainer.Trainer(config).run()
    except (ValueError, FileNotFoundError, trainer.NonFiniteLossError) as error:
        sys.exit(f"train.py: error: {error}")
    except KeyboardInterrupt:
        sys.exit(
            "train.py: interrupted; the last checkpoint is saved. Rerun the same command to resume."
        )


if __name__ == "__main__":
    app.run(main)
