"""Trains DVML (or its base-loss baseline) and evaluates it on the unseen test classes.

    python train.py                                 # DVML + N-pair on Omniglot (CPU preset)
    python train.py --dataset=sop                   # the paper recipe on Stanford Online Products
    python train.py --loss=triplet2_dws --images_per_class=4 --nodvml
    python train.py --dataset=folder --data_dir=/path/to/catalogue

Every field of `dvml_tf.training.TrainConfig` is a flag (`python train.py --helpfull`, or
docs/training.md); the preset (`--config`, default: the one named after `--dataset`) fills in
the rest. Rerunning the same command after an interruption resumes from the last checkpoint in
--model_dir. The run writes config.json, checkpoints/, logs/ (TensorBoard), model.keras and
metrics.json into --model_dir.
"""

from absl import app

from dvml_tf.training import cli

cli.define_flags()

if __name__ == "__main__":
    app.run(cli.main)
