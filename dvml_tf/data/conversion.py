"""A dataset's raw images and the loader's conversion of them to the images it stores.

The raw form is what the dataset provides and what a client of an exported model sends: RGB
uint8 at the original size (Omniglot: 105 x 105 black strokes on white; photos: any size).
`load_dataset` stores each image as `convert_raw(raw, conversion, size)`:

1. `conversion` "omniglot_ink" only: gray exactly as libpng's RGB -> gray conversion computes it
   (`png_gray`), then inverted (`255 - gray`: ink bright on a 0 background). "none" keeps RGB.
2. `size` (datasets held decoded in memory): antialiased bilinear resize to size x size, ignoring
   the aspect ratio, rounded to uint8. None (datasets kept encoded): the original size.

`convert_raw` is pure TF (uint8 in, uint8 out), so the same function runs in the loader's
tf.data map and in the exported serving graphs; `StoredForm` records its arguments for a dataset
(`DatasetSplits.stored_form`).
"""

import dataclasses

import tensorflow as tf

from dvml_tf.data.preprocessing import resize_square

NO_CONVERSION = "none"
OMNIGLOT_INK = "omniglot_ink"
CONVERSIONS = (NO_CONVERSION, OMNIGLOT_INK)
# libpng's RGB -> gray as TF's PNG decoder requests it (png_set_rgb_to_gray with 0.299, 0.587):
# weights in units of 1/32768, blue gets the rest, the sum is truncated. Equal to
# `tf.io.decode_png(..., channels=1)` on all 2^24 RGB triples (tests/data/test_conversion.py).
PNG_GRAY_WEIGHTS = (9797, 19234, 3737)
PNG_GRAY_SHIFT = 15


def png_gray(images):
    """RGB -> gray with libpng's integer formula `(9797 R + 19234 G + 3737 B) >> 15`.

    Args:
        images: uint8 tensor [..., 3].

    Returns:
        uint8 tensor [..., 1], equal to decoding an RGB PNG of `images` with one channel.
    """
    return tf.cast(_png_gray_int32(images), tf.uint8)


def _png_gray_int32(images):
    pixels = tf.cast(images, tf.int32)
    red, green, blue = PNG_GRAY_WEIGHTS
    # At most 255 * 32768 < 2^31: exact in int32.
    weighted = pixels[..., 0] * red + pixels[..., 1] * green + pixels[..., 2] * blue
    return tf.bitwise.right_shift(weighted, PNG_GRAY_SHIFT)[..., tf.newaxis]


def converted_channels(conversion, channels=3):
    """Channels of the stored images.

    Args:
        conversion: one of `CONVERSIONS`.
        channels: channels of the input images (3 for raw images).

    Returns:
        int: 1 for "omniglot_ink", else `channels`.
    """
    _check_conversion(conversion)
    return 1 if conversion == OMNIGLOT_INK else channels


def convert_raw(images, conversion=NO_CONVERSION, size=None):
    """Maps raw images to the images the loader stores (see the module docstring).

    Works eagerly, in tf.data map functions and inside `tf.function`s and SavedModels.

    Args:
        images: uint8 tensor [H, W, 3] or [B, H, W, 3] of raw images ("none" also accepts other
            channel counts).
        conversion: one of `CONVERSIONS`.
        size: optional int, the side the loader resizes to (rounding to uint8); None keeps the
            size.

    Returns:
        uint8 tensor [..., size, size, C] (original height and width when `size` is None), with
        C = `converted_channels(conversion, channels)`. "none" without `size` is the identity.

    Raises:
        ValueError: an unknown conversion, a bad size, or "omniglot_ink" on non-RGB images.
    """
    _check_conversion(conversion)
    _check_size(size, "size")
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8:
        raise ValueError(f"convert_raw takes uint8 raw images, got {images.dtype.name}.")
    if conversion == OMNIGLOT_INK:
        if images.shape[-1] is not None and images.shape[-1] != 3:
            raise ValueError(f"conversion={OMNIGLOT_INK!r} takes RGB images [..., 3], got shape "
                             f"{images.shape}.")
        # Paper §4 is silent (no Omniglot): inverted, so the zero padding of convs matches
        # the background. Inverted in int32 (integer ops only, all of them LiteRT builtins).
        images = tf.cast(255 - _png_gray_int32(images), tf.uint8)
    if size is not None:
        images = tf.cast(tf.round(resize_square(images, size)), tf.uint8)
    return images


@dataclasses.dataclass(frozen=True)
class StoredForm:
    """How the loader stores a dataset's images, relative to their raw form.

    Args:
        conversion: one of `CONVERSIONS` ("omniglot_ink": gray, inverted; "none": RGB kept).
        size: the side the loader resized the images to (rounded to uint8) because it holds them
            decoded in memory; None when it keeps them at their original size (encoded, decoded
            on the fly).
        raw_size: (height, width) of every raw image when the dataset fixes it (Omniglot:
            (105, 105)), else None (any size).
    """

    conversion: str = NO_CONVERSION
    size: int | None = None
    raw_size: tuple | None = None

    def __post_init__(self):
        _check_conversion(self.conversion)
        _check_size(self.size, "StoredForm.size")
        if self.raw_size is not None:
            raw_size = tuple(int(s) for s in self.raw_size)
            if len(raw_size) != 2 or min(raw_size) < 1:
                raise ValueError(f"StoredForm.raw_size must be (height, width) or None, got "
                                 f"{self.raw_size!r}.")
            object.__setattr__(self, "raw_size", raw_size)
        if self.size is not None:
            object.__setattr__(self, "size", int(self.size))

    @property
    def resized(self):
        """bool: whether the loader resized the images at load time (it holds them decoded)."""
        return self.size is not None

    @property
    def num_channels(self):
        """int: channels of the stored images (1 for "omniglot_ink", else 3)."""
        return converted_channels(self.conversion)

    def convert(self, images):
        """`convert_raw(images, self.conversion, self.size)`.

        Args:
            images: uint8 tensor [H, W, 3] or [B, H, W, 3] of raw images.

        Returns:
            uint8 tensor of the stored images.
        """
        return convert_raw(images, self.conversion, self.size)


def _check_conversion(conversion):
    if conversion not in CONVERSIONS:
        raise ValueError(f"Unknown conversion {conversion!r}; valid: {', '.join(CONVERSIONS)}.")


def _check_size(size, name):
    if size is not None and (isinstance(size, bool) or int(size) != size or size < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {size!r}.")
