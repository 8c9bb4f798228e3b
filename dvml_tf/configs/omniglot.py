"""Omniglot on a CPU: DVML + N-pair, the default of `python train.py`.

    TFDS_DATA_DIR=/path/to/tfds python train.py       # offline copy; online, just train.py

Trains on the 964 background classes (19,280 images, 28 px, grayscale tiled to 3 channels) and
evaluates on all 13,180 images of the 659 unseen evaluation classes.

Expected: Recall@1 84.0 % (R@8 97.4, NMI 90.8, F1 65.0, MAP@R 50.4) in 9 minutes on an idle
2-core x86_64 CPU (measured; docs/results.md, "The default run"). DVML does not beat its
baseline here: at 2,500 steps and 3 seeds, `--nodvml` is about 2 points of Recall@1 better
(docs/results.md, research/dvml_omniglot/zero_shot.py).
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
        # Chosen on held-out background alphabets (research/dvml_omniglot/zero_shot.py):
        # a N(0, 0.1^2 I) prior on z_V instead of the paper's N(0, I), whose samples swamp z_I.
        variance_scale=0.1,
        classes_per_batch=64,
        images_per_class=2,
        steps=5000,
        learning_rate=1e-3,
        log_every=50,
        checkpoint_every=500,
    )
