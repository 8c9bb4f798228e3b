"""Your own catalogue on a CPU: DVML + N-pair on an ImageNet-pretrained MobileNetV2 at 128 px.

    python train.py --dataset=folder --config=folder_cpu --data_dir=/path/to/catalogue \
        --model_dir=runs/catalogue_cpu

The `folder` preset is the paper's GPU recipe (InceptionV3 at 224 px, 128 images per step,
5,000 steps): at the 7.9 images/s an InceptionV3 step reaches on 2 CPU cores (docs/training.md,
The input pipeline) about 16 s per step, a day in all. This one is sized for a CPU:
MobileNetV2 (3.5 M parameters) at 128 px crops of 146 px images, 32 classes x 2 images per
batch, 1,000 steps, Adam 1e-4 (the paper's rate, for a pretrained network), a checkpoint every
100 steps. The ImageNet weights are
downloaded once (about 9 MB, into ~/.keras/models); offline, see docs/training.md.

Measured step time (`Trainer.train`, 20 steps after 5 warm-up steps, a generated 64-class folder
of 320 x 240 JPEGs, TF 2.21): 3.6 s per step on a 2-core x86_64 shared with two other trainings
(load average 6), i.e. about 1 h per 1,000 steps there; with `--classes_per_batch=16`, 2.0 s per
step. An idle machine of that size is faster; a run of 1,000 steps of this preset is an
overnight job at worst. Accuracy on a real catalogue is not measured here (no photo dataset on
this machine); judge it with `evaluate.py` on the test classes, and train longer (`--steps`) if
Recall@1 still rises at the end.

For a catalogue of fewer than 32 training classes the batch adapts (see docs/training.md,
Batches); with a GPU, use the `folder` preset.
"""

from dvml_tf.training.config import TrainConfig


def get_config():
    return TrainConfig(
        config="folder_cpu",
        dataset="folder",
        image_size=128,
        resize_size=146,
        backbone="mobilenet_v2",
        pretrained=True,
        embedding_dim=128,
        loss="npair",
        dvml=True,
        num_samples=20,
        phase1_fraction=0.25,
        classes_per_batch=32,
        images_per_class=2,
        steps=1000,
        learning_rate=1e-4,
        eval_batch_size=64,
        log_every=20,
        checkpoint_every=100,
        validation_classes=0,
        eval_every=0,
    )
