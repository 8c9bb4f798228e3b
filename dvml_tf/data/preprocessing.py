"""The paper's image recipe, as pure TF functions usable eagerly, in tf.data and in SavedModels.

Train (paper §3): resize to 256 x 256 ignoring the aspect ratio, random 224 crop, random
horizontal flip. Test: resize to 256 x 256, centre 224 crop. Omniglot (not in the paper): resize
to 32, random 28 crop for training, centre 28 crop for testing, never flipped (mirrored
characters are other characters). Grayscale images are tiled to 3 channels.

Output: float32 pixels in [0, 255], [S, S, 3]; the backbones normalise their own inputs.
Randomness is stateless: the same seed gives the same crop and flip, eagerly or in tf.data.
"""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """How images are resized, cropped and flipped.

    Args:
        resize_size: side of the square resize, before cropping.
        crop_size: side S of the (random or centre) crop, the model's input size.
        random_flip: random horizontal flip at training time.
        antialias: antialias when resizing (matters when shrinking large photos).
    """

    resize_size: int = 256
    # Paper §3 is silent on the crop size: 224, as in the authors' lab pipeline (DAML).
    crop_size: int = 224
    random_flip: bool = True
    # Paper §3 is silent on the interpolation: bilinear with antialiasing.
    antialias: bool = True

    def __post_init__(self):
        if not 0 < self.crop_size <= self.resize_size:
            raise ValueError(f"Need 0 < crop_size <= resize_size, got crop_size={self.crop_size}, "
                             f"resize_size={self.resize_size}.")

    @classmethod
    def paper(cls):
        """Returns: the paper's recipe (256 resize, 224 crops, flips)."""
        return cls()

    @classmethod
    def omniglot(cls):
        """Returns: the small-image recipe (32 resize, 28 crops, no flip)."""
        # Paper §4 is silent (no Omniglot): 32 -> 28 crops, no flips (mirrored glyphs differ).
        return cls(resize_size=32, crop_size=28, random_flip=False)


def _to_rgb(images):
    """Tiles 1-channel images to 3 channels; 3-channel images pass through."""
    channels = images.shape[-1]
    if channels == 3:
        return images
    if channels == 1:
        return tf.repeat(images, 3, axis=-1)
    if channels is not None:
        raise ValueError(f"Images must have 1 or 3 channels, got {channels}.")
    return tf.cond(tf.equal(tf.shape(images)[-1], 1), lambda: tf.repeat(images, 3, axis=-1),
                   lambda: images)


def resize_square(images, size, antialias=True):
    """Bilinear resize to size x size, ignoring the aspect ratio (the paper's 256 x 256).

    Args:
        images: [H, W, C] or [B, H, W, C] tensor (uint8 or float).
        size: int, output side.
        antialias: antialias when an axis shrinks.

    Returns:
        float32 tensor [..., size, size, C] in [0, 255].
    """
    def resize(antialias):
        return lambda: tf.image.resize(images, [size, size], antialias=antialias)

    if antialias:
        # Antialiasing only changes downscaling (upscaling and identity give the same pixels,
        # to 2e-5), but costs ~2x the JPEG decode: use it only when an axis shrinks.
        height, width = images.shape[-3], images.shape[-2]
        if height is not None and width is not None:
            images = resize(height > size or width > size)()
        else:
            shrinks = tf.reduce_any(tf.shape(images)[-3:-1] > size)
            images = tf.cond(shrinks, resize(True), resize(False))
    else:
        images = resize(False)()
    # Bilinear weights (antialiased or not) are convex: this only removes float rounding noise.
    return tf.clip_by_value(images, 0.0, 255.0)


def _resize(images, config):
    # Paper §3 is silent: the resized image stays float32 (no re-quantization to uint8 as a
    # stored 256 x 256 JPEG would be) before cropping.
    return resize_square(images, config.resize_size, config.antialias)


def preprocess_train(image, seed, config):
    """Training transform of one image.

    Args:
        image: uint8 (or float) tensor [H, W, C], C in {1, 3}.
        seed: int tensor [2], the stateless seed of this image.
        config: `PreprocessConfig`.

    Returns:
        float32 tensor [S, S, 3] in [0, 255].
    """
    image = _resize(image, config)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    channels = image.shape[-1] if image.shape[-1] is not None else tf.shape(image)[-1]
    image = tf.image.stateless_random_crop(
        image, [config.crop_size, config.crop_size, channels], seed=crop_seed)
    if config.random_flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    image = _to_rgb(image)
    image.set_shape([config.crop_size, config.crop_size, 3])
    return image


def preprocess_test_batch(images, config):
    """Test transform of a batch: the function the SavedModel export reuses in its graph.

    Args:
        images: uint8 (or float) tensor [B, H, W, C] with C in {1, 3}.
        config: `PreprocessConfig`.

    Returns:
        float32 tensor [B, S, S, 3] in [0, 255].
    """
    images = _resize(images, config)
    # Paper §3 is silent on test-time cropping: the centre crop of the resize (lab pipeline).
    offset = (config.resize_size - config.crop_size) // 2
    images = images[:, offset:offset + config.crop_size, offset:offset + config.crop_size, :]
    images = _to_rgb(images)
    images.set_shape([None, config.crop_size, config.crop_size, 3])
    return images


def preprocess_test(image, config):
    """Test transform of one image (the batch function on a batch of one).

    Args:
        image: uint8 tensor [H, W, C], C in {1, 3}.
        config: `PreprocessConfig`.

    Returns:
        float32 tensor [S, S, 3] in [0, 255].
    """
    return preprocess_test_batch(image[tf.newaxis], config)[0]
