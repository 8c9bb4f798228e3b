"""The baseline recipe shared by the glyph calibration and the premise measurement: one network,
one schedule, so that the glyph and Omniglot baselines differ only in their data."""

STEPS = 3000
NETWORK = ["--nodvml", "--backbone=convnet_wide", "--embedding_dim=128", "--loss=npair",
           "--classes_per_batch=64", "--images_per_class=2", "--learning_rate=1e-3",
           f"--steps={STEPS}", "--seed=0", "--eval_every=1000", "--log_every=250",
           "--checkpoint_every=1000"]
# Crop of the training recipe per image size: Omniglot's 32 -> 28, the same 7/8 for the others.
CROPS = {28: 24, 32: 28, 48: 42}


def size_flags(image_size):
    """The resize and crop flags of an image size."""
    return [f"--resize_size={image_size}", f"--image_size={CROPS[image_size]}"]
