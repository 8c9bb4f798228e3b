"""GoogLeNet (Inception-v1, Szegedy et al. 2015), the backbone of the DVML paper.

The layout (stem, nine inception modules with the paper's filter counts, 1024-d pool5) follows
Table 1 of the GoogLeNet paper. Two departures, both those of TF-slim's `inception_v1` and
torchvision's `googlenet`: batch normalization after every convolution instead of local response
normalization, and no auxiliary classifiers (DVML uses only pool5). Keras ships no ImageNet
weights for this network.
"""

import keras

# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection) per module, GoogLeNet Table 1.
_MODULES = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def _conv(x, filters, kernel, name, strides=1):
    x = keras.layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _inception(x, name):
    b1, b3_reduce, b3, b5_reduce, b5, pool_proj = _MODULES[name]
    branch1 = _conv(x, b1, 1, f"inception{name}_1x1")
    branch3 = _conv(x, b3_reduce, 1, f"inception{name}_3x3_reduce")
    branch3 = _conv(branch3, b3, 3, f"inception{name}_3x3")
    branch5 = _conv(x, b5_reduce, 1, f"inception{name}_5x5_reduce")
    branch5 = _conv(branch5, b5, 5, f"inception{name}_5x5")
    pool = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"inception{name}_pool")(x)
    pool = _conv(pool, pool_proj, 1, f"inception{name}_pool_proj")
    return keras.layers.Concatenate(name=f"inception{name}_concat")(
        [branch1, branch3, branch5, pool]
    )


def inception_v1_features(x):
    """Applies GoogLeNet up to pool5.

    Args:
        x: a normalized image tensor `[B, H, W, 3]` (a Keras functional tensor).

    Returns:
        The pooled 1024-d feature tensor `[B, 1024]`.
    """
    x = _conv(x, 64, 7, "conv1", strides=2)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    x = _conv(x, 64, 1, "conv2_reduce")
    x = _conv(x, 192, 3, "conv2")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool2")(x)
    x = _inception(x, "3a")
    x = _inception(x, "3b")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool3")(x)
    for name in ("4a", "4b", "4c", "4d", "4e"):
        x = _inception(x, name)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool4")(x)
    x = _inception(x, "5a")
    x = _inception(x, "5b")
    return keras.layers.GlobalAveragePooling2D(name="pool5")(x)
