"""Backbones: images (float32 pixels in [0, 255]) -> the globally pooled feature f(x).

Every backbone carries its own input normalization as its first layer, so the data pipeline and
the exported serving graph feed raw pixel values and cannot get the normalization wrong.
"""

import os
import re
import urllib.error

import keras

from dvml_tf.models import googlenet

# name -> (keras.applications constructor name, normalization mode)
_APPLICATIONS = {
    "resnet50": ("ResNet50", "caffe"),
    "inception_v3": ("InceptionV3", "tf"),
    "mobilenet_v2": ("MobileNetV2", "tf"),
    # EfficientNet normalizes inside its own graph and expects [0, 255].
    "efficientnet_b0": ("EfficientNetB0", None),
}
# Small CPU backbones: name -> the widths of their four conv blocks (the last is F).
_CONVNETS = {
    "convnet_small": (32, 64, 128, 128),
    # F = 512 > J = 128, like the paper's 1024 > 512: z_I is a bottleneck of f(x), so that the
    # decoder cannot rebuild f(x) from z_I alone and needs z_V.
    "convnet_wide": (32, 64, 128, 512),
}
BACKBONES = (*_CONVNETS, "googlenet", *_APPLICATIONS)

# ImageNet RGB means of the Caffe-trained networks (BVLC GoogLeNet, Keras ResNet50).
_CAFFE_RGB_MEAN = (123.68, 116.779, 103.939)


@keras.saving.register_keras_serializable(package="dvml_tf")
class PixelNormalization(keras.layers.Layer):
    """Per-channel `(x - mean) / std` on [0, 255] pixels, optionally reordering RGB to BGR.

    Args:
        mean: sequence of 3 floats, per-channel mean in RGB order.
        std: sequence of 3 floats, per-channel standard deviation in RGB order.
        bgr: bool. Reverse the channels after normalizing (Caffe-trained weights expect BGR).
        **kwargs: forwarded to `keras.layers.Layer`.
    """

    def __init__(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), bgr=False, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.bgr = bool(bgr)

    def call(self, images):
        mean = keras.ops.convert_to_tensor(self.mean, dtype=images.dtype)
        std = keras.ops.convert_to_tensor(self.std, dtype=images.dtype)
        normalized = (images - mean) / std
        return normalized[..., ::-1] if self.bgr else normalized

    def get_config(self):
        config = super().get_config()
        config.update({"mean": self.mean, "std": self.std, "bgr": self.bgr})
        return config


def _convnet_small(inputs, channels=(32, 64, 128, 128)):
    """Four conv-BN-ReLU-maxpool blocks and global average pooling: a fast CPU backbone.

    The widths trade accuracy for speed on a 2-core CPU: (64, 64, 128, 256) cost about 1.6x the
    step time for a similar validation Recall@1 on Omniglot (research/dvml_omniglot/zero_shot.py).
    """
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for block, width in enumerate(channels):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{block}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{block}")(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
        x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{block}")(x)
    return keras.layers.GlobalAveragePooling2D(name="pool_features")(x)


def synchronize_batch_norm(model):
    """A copy of `model` (same weights) whose batch-norm layers use global batch statistics.

    Under a distribution strategy each replica normally normalizes with its own part of the
    batch; synchronized batch norm all-reduces the statistics, so R replicas compute what one
    device computes on the global batch (at the cost of one all-reduce per layer).

    Args:
        model: a functional `keras.Model`.

    Returns:
        A functional `keras.Model` with the same weights.
    """

    def clone_layer(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            config["synchronized"] = True
        elif isinstance(layer, keras.Model):
            return synchronize_batch_norm(layer)
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


def keras_weights_cache():
    """Where keras.applications caches downloaded weights: $KERAS_HOME/models or
    ~/.keras/models."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


def _is_download_failure(error):
    """Whether keras.applications failed to fetch its weights file (offline, HTTP error,
    truncated download): `keras.utils.get_file` raises a bare Exception for those."""
    text = str(error)
    return (isinstance(error, (urllib.error.URLError, ConnectionError, TimeoutError))
            or "URL fetch failure" in text or "corrupted file" in text)


def download_failure_message(name, constructor, error):
    """The advice when the ImageNet weights of a backbone cannot be downloaded.

    Args:
        name: our backbone name.
        constructor: the keras.applications constructor name.
        error: the exception Keras raised.

    Returns:
        str.
    """
    match = re.search(r"URL fetch failure on (\S+?): (.*)", str(error), re.S)
    url, reason = (match[1], match[2].strip()) if match else (None, str(error).strip())
    source = f" from {url}" if url else ""
    file_name = os.path.basename(url) if url else "its weights file"
    return (
        f"Could not download the ImageNet weights of --backbone={name} "
        f"(keras.applications.{constructor}){source}: {reason}. Offline? Train from scratch "
        f"with --nopretrained, or pass weights of this backbone with --nopretrained "
        f"--backbone_weights=FILE.weights.h5, or copy {file_name} (downloaded on a machine "
        f"with network access) into {keras_weights_cache()}/ (the Keras cache; set KERAS_HOME "
        "to use another folder) and rerun."
    )


def build_backbone(
    name, input_shape=(224, 224, 3), pretrained=False, weights_path=None, sync_batch_norm=False
):
    """Builds a backbone by name.

    Args:
        name: one of `BACKBONES`.
        input_shape: tuple `(height, width, 3)` of the (cropped) input images.
        pretrained: bool. Load ImageNet weights from `keras.applications` (downloaded once to
            ~/.keras/models, or $KERAS_HOME/models, on a machine with internet access).
        weights_path: optional path of a `.weights.h5` file for this backbone (e.g. GoogLeNet
            weights ported by the user); loaded after building.
        sync_batch_norm: bool. Synchronize batch-norm statistics across replicas
            (see `synchronize_batch_norm`).

    Returns:
        A functional `keras.Model` named `backbone_<name>` mapping `[B, H, W, 3]` float32 pixels in
        [0, 255] to the pooled feature `[B, F]`.

    Raises:
        ValueError: unknown name, bad input shape, or `pretrained` for a backbone without
            published Keras weights.
        FileNotFoundError: the ImageNet weights cannot be downloaded (offline); the message
            names the URL, the Keras cache folder and the alternatives.
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}.")
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"Backbone input shape must be (height, width, 3); got {input_shape}.")
    inputs = keras.Input(shape=input_shape, name="images")
    if name in _CONVNETS:
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights; drop --pretrained.")
        features = _convnet_small(inputs, _CONVNETS[name])
    elif name == "googlenet":
        if pretrained:
            raise ValueError(
                "Keras ships no ImageNet weights for GoogLeNet (Inception-v1), the paper's "
                "backbone. Train it from scratch (drop --pretrained), pass weights you ported "
                "with --backbone_weights=PATH.weights.h5, or use a pretrained backbone from "
                "keras.applications such as --backbone=inception_v3 --pretrained."
            )
        x = PixelNormalization(mean=_CAFFE_RGB_MEAN, name="normalize")(inputs)
        features = googlenet.inception_v1_features(x)
    else:
        constructor, mode = _APPLICATIONS[name]
        if mode == "caffe":
            x = PixelNormalization(mean=_CAFFE_RGB_MEAN, bgr=True, name="normalize")(inputs)
        elif mode == "tf":
            x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
        else:
            x = inputs
        try:
            network = getattr(keras.applications, constructor)(
                include_top=False,
                weights="imagenet" if pretrained else None,
                input_shape=input_shape,
                pooling="avg",
            )
        except Exception as error:
            if pretrained and _is_download_failure(error):
                raise FileNotFoundError(
                    download_failure_message(name, constructor, error)) from None
            raise
        features = network(x)
    backbone = keras.Model(inputs, features, name=f"backbone_{name}")
    if weights_path:
        backbone.load_weights(weights_path)
    return synchronize_batch_norm(backbone) if sync_batch_norm else backbone
