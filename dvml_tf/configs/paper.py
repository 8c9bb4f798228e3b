"""The paper's recipe (DVML §4.1), shared by the cub200, cars196 and sop presets.

Stated in the paper: 256 x 256 resize, random crop and horizontal flip, embedding size 512,
batch 128 (N-pair: 64 classes x 2), Adam 1e-4 for every parameter, T = 20, the two-phase weights.
Not stated, our choice: 224 crops (the authors' Chainer pipeline), 25 % of the steps in phase 1,
and the backbone. The paper's GoogLeNet has no Keras ImageNet weights, so the presets use
InceptionV3 from keras.applications, the nearest pretrained relative (pass
`--backbone=googlenet --backbone_weights=...` with weights you ported to use the paper's own).
"""

from dvml_tf.training.config import TrainConfig


def paper_recipe(**overrides):
    values = dict(
        image_size=224,
        resize_size=256,
        backbone="inception_v3",
        pretrained=True,
        embedding_dim=512,
        loss="npair",
        dvml=True,
        num_samples=20,
        phase1_fraction=0.25,
        classes_per_batch=64,
        images_per_class=2,
        learning_rate=1e-4,
        eval_batch_size=128,
        log_every=100,
        checkpoint_every=1000,
    )
    values.update(overrides)
    return TrainConfig(**values)
