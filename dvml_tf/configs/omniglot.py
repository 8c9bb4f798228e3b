"""Omniglot on a CPU: DVML + N-pair, the default of `python train.py`.

    TFDS_DATA_DIR=../shared/tfds python train.py        # offline copy; online, just train.py

Trains on the 964 background classes (19,280 images, 28 px, grayscale tiled to 3 channels) and
evaluates on all 13,180 images of the 659 unseen evaluation classes.
"""

from dvml_tf.training.config import TrainConfig


def get_config():
    return TrainConfig(
        config="omniglot",
        dataset="omniglot",
        image_size=28,
        resize_size=32,
        backbone="convnet_small",
        embedding_dim=128,
        loss="npair",
        dvml=True,
        num_samples=20,
        classes_per_batch=64,
        images_per_class=2,
        steps=5000,
        learning_rate=1e-3,
        log_every=50,
        checkpoint_every=500,
    )
