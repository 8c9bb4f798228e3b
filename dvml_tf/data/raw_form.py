"""The raw form of a dataset's images, and how it becomes what the loader stores and the model
input. One module and one name (`RawForm`) for the idea "the image as a client sends it vs the
image as the loader holds it".

The raw form is what the dataset provides and what a client of an exported model sends: RGB
uint8 at the original size (Omniglot: 105 x 105 black strokes on white; photos: any size).
`load_dataset` stores each image as `RawForm.to_stored(raw)`:

1. conversion "omniglot_ink" only: gray exactly as libpng's RGB -> gray conversion computes it
   (`png_gray`), then inverted (`255 - gray`: ink bright on a 0 background). "none" keeps RGB.
2. `stored_size` (datasets held decoded in memory): antialiased bilinear resize to
   stored_size x stored_size, ignoring the aspect ratio, rounded to uint8. None (datasets kept
   encoded): the original size.

Then the test transform (`preprocess_test_batch`: resize to `resize_size`, centre crop) makes the
model input. `RawImagePreprocessor` is that whole path as one Keras layer, which every export puts
in front of the model's embedder (`keras.Sequential([preprocessor, model.embedder])`):

* by default with the data layer's own TF ops (any image size; the SavedModel);
* with `fixed_size=True`, in TFLite builtin ops for one fixed input size (the LiteRT models).
  TF's antialiased resize is the `ScaleAndTranslate` op, which LiteRT lacks, so each resize is a
  product with constant matrices obtained by resizing one-hot images with that very op (a resize
  is linear and separable); the same pixels up to float summation order. `integer_steps=False`
  also leaves out the two half-gray-level rounding steps, which have no int8 kernels, so that the
  full-integer model is int8 throughout.

Everything here is pure TF (uint8 in), so it runs eagerly, in tf.data and in exported graphs.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from dvml_tf.data.preprocessing import PreprocessConfig
from dvml_tf.data.preprocessing import preprocess_test_batch
from dvml_tf.data.preprocessing import resize_square

NO_CONVERSION = "none"
OMNIGLOT_INK = "omniglot_ink"
CONVERSIONS = (NO_CONVERSION, OMNIGLOT_INK)
# libpng's RGB -> gray as TF's PNG decoder requests it (png_set_rgb_to_gray with 0.299, 0.587):
# weights in units of 1/32768, blue gets the rest, the sum is truncated. Equal to
# `tf.io.decode_png(..., channels=1)` on all 2^24 RGB triples (tests/data/test_raw_form.py).
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
    """Maps raw images to the images the loader stores (the functional core of `RawForm`).

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
class RawForm:
    """A dataset's raw images relative to what the loader stores and the model takes.

    Args:
        conversion: one of `CONVERSIONS` ("omniglot_ink": gray, inverted; "none": RGB kept).
        stored_size: the side the loader resizes the images to (rounded to uint8) because it
            holds them decoded in memory; None when it keeps them at their original size
            (encoded, decoded on the fly).
        raw_size: (height, width) of every raw image when the dataset fixes it (Omniglot:
            (105, 105)), else None (any size).
    """

    conversion: str = NO_CONVERSION
    stored_size: int | None = None
    raw_size: tuple | None = None

    def __post_init__(self):
        _check_conversion(self.conversion)
        _check_size(self.stored_size, "RawForm.stored_size")
        if self.raw_size is not None:
            raw_size = tuple(int(s) for s in self.raw_size)
            if len(raw_size) != 2 or min(raw_size) < 1:
                raise ValueError(f"RawForm.raw_size must be (height, width) or None, got "
                                 f"{self.raw_size!r}.")
            object.__setattr__(self, "raw_size", raw_size)
        if self.stored_size is not None:
            object.__setattr__(self, "stored_size", int(self.stored_size))

    @property
    def resized(self):
        """bool: whether the loader resizes the images at load time (it holds them decoded)."""
        return self.stored_size is not None

    @property
    def ink(self):
        """bool: Omniglot's conversion (gray, inverted)."""
        return self.conversion == OMNIGLOT_INK

    @property
    def num_channels(self):
        """int: channels of the stored images (1 for "omniglot_ink", else 3)."""
        return converted_channels(self.conversion)

    def to_stored(self, images):
        """The images the loader stores for these raw images (`convert_raw`).

        Args:
            images: uint8 tensor [H, W, 3] or [B, H, W, 3] of raw images.

        Returns:
            uint8 tensor of the stored images.
        """
        return convert_raw(images, self.conversion, self.stored_size)

    def to_model_input(self, images, preprocess):
        """The loader's conversion + the test transform: what `make_eval_dataset` yields.

        Args:
            images: uint8 tensor [B, H, W, 3], raw images (one size per batch).
            preprocess: the run's `PreprocessConfig`.

        Returns:
            float32 tensor [B, S, S, 3] in [0, 255].
        """
        return preprocess_test_batch(self.to_stored(images), preprocess)

    def fixed_size(self, preprocess):
        """(height, width) of a fixed-size model's raw input (LiteRT graphs have fixed shapes):
        the raw size, or the loader's square size for photos of any size.

        Args:
            preprocess: the run's `PreprocessConfig`.

        Returns:
            tuple of 2 ints.
        """
        if self.raw_size is not None:
            return tuple(self.raw_size)
        side = self.stored_size or preprocess.resize_size
        return (side, side)

    def describe(self):
        """One sentence: what a client sends."""
        if self.raw_size is not None:
            height, width = self.raw_size
            form = f"uint8 RGB images [batch, {height}, {width}, 3]"
        else:
            form = "uint8 RGB images [batch, height, width, 3] of any size"
        if self.ink:
            form += " with dark strokes on white (the raw form of TFDS omniglot)"
        return form

    def check_images(self, images, name):
        """An in-graph check of a raw image batch's shape, with a message naming the form.

        The shape in a signature's TensorSpec is not enforced by every caller (a loaded concrete
        function or TF Serving's session feed accept other sizes, which the resize would
        silently accept), hence the assertion.

        Args:
            images: uint8 tensor.
            name: what takes the images (a signature name), for the message.

        Returns:
            `images`, with a control dependency on the check.
        """
        shape = tf.shape(images)
        rank_ok = tf.equal(tf.rank(images), 4)
        expected = [*self.raw_size, 3] if self.raw_size else [-1, -1, 3]
        # Pad so that the comparison is defined for any rank; -1 matches any size.
        dims = tf.concat([shape, [0, 0, 0, 0]], axis=0)[1:4]
        matches = tf.logical_or(tf.equal(tf.constant(expected), -1), tf.equal(dims, expected))
        valid = tf.logical_and(rank_ok, tf.reduce_all(matches))
        # One string, so that the message reads as one sentence (Assert brackets each item).
        got = tf.strings.reduce_join(tf.strings.as_string(shape), separator=", ")
        message = tf.strings.join([f"{name}: `images` must be {self.describe()}; got shape [",
                                   got, "]"])
        check = tf.debugging.Assert(valid, [message])
        with tf.control_dependencies([check]):
            return tf.identity(images)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        return cls(**values)


def resize_matrix(size_in, size_out, antialias):
    """The matrix of TF's bilinear resize along one axis.

    Args:
        size_in: int, input length.
        size_out: int, output length.
        antialias: bool, as passed to `tf.image.resize`.

    Returns:
        float32 numpy array [size_out, size_in]: `resize(x)[i] = sum_j M[i, j] x[j]`.
    """
    # size_in one-hot "images" of size_in x 1 pixels; the width axis (1 -> 1) is the identity.
    # Computed eagerly even while a graph is being traced.
    with tf.init_scope():
        one_hot = tf.eye(size_in)[:, :, tf.newaxis, tf.newaxis]
        resized = tf.image.resize(one_hot, [size_out, 1], antialias=antialias)
        return np.ascontiguousarray(resized.numpy()[:, :, 0, 0].T)


def _resize_and_crop(images, size, antialias, crop=None):
    """Resizes a [B, H, W, C] float batch to size x size (then crops) with constant matrices."""
    height, width = int(images.shape[1]), int(images.shape[2])
    # resize_square antialiases both axes when either shrinks.
    antialias = antialias and (height > size or width > size)
    rows = resize_matrix(height, size, antialias)
    cols = resize_matrix(width, size, antialias)
    if crop is not None:
        offset, length = crop
        rows, cols = rows[offset : offset + length], cols[offset : offset + length]
    images = tf.einsum("ih,bhwc->biwc", tf.constant(rows), images)
    images = tf.einsum("bhwc,jw->bhjc", images, tf.constant(cols))
    return tf.clip_by_value(images, 0.0, 255.0)


def _fixed_size_model_input(images, raw_form, preprocess, integer_steps):
    """`RawForm.to_model_input` in TFLite builtin ops, for one fixed input size."""
    height, width = int(images.shape[1]), int(images.shape[2])
    if (height, width) != raw_form.fixed_size(preprocess):
        raise ValueError(
            f"The fixed-size input must be {raw_form.fixed_size(preprocess)}; got "
            f"{(height, width)}."
        )
    if raw_form.ink and not integer_steps:
        # The gray conversion without its truncation: a linear map.
        x = tf.cast(images, tf.float32)
        red, green, blue = PNG_GRAY_WEIGHTS
        weighted = x[..., 0:1] * red + x[..., 1:2] * green + x[..., 2:3] * blue
        x = 255.0 - weighted / float(2**PNG_GRAY_SHIFT)
    else:
        # The loader's conversion, without the load resize (done below with matrices).
        x = tf.cast(convert_raw(images, raw_form.conversion), tf.float32)
    size = raw_form.stored_size
    if size is not None and (height, width) != (size, size):
        x = _resize_and_crop(x, size, antialias=True)
        if integer_steps:
            x = tf.round(x)
        height = width = size
    offset = (preprocess.resize_size - preprocess.crop_size) // 2
    if (height, width) == (preprocess.resize_size, preprocess.resize_size):
        # The resize is the identity (exactly, for bilinear at scale 1): only crop.
        x = x[:, offset : offset + preprocess.crop_size, offset : offset + preprocess.crop_size]
    else:
        x = _resize_and_crop(x, preprocess.resize_size, preprocess.antialias,
                             crop=(offset, preprocess.crop_size))
    if x.shape[-1] == 1:
        x = tf.concat([x, x, x], axis=-1)
    return x


@keras.saving.register_keras_serializable(package="dvml_tf")
class RawImagePreprocessor(keras.layers.Layer):
    """Raw uint8 images in a dataset's raw form -> the model input, as one Keras layer.

    Exactly the loader's conversion followed by the test transform, so that an image a client
    sends gets the embedding `load_dataset` + `make_eval_dataset` + the model give.

    Args:
        raw_form: the dataset's `RawForm` (or its dict).
        preprocess: the run's test-time `PreprocessConfig` (or its dict).
        fixed_size: bool. TFLite builtin ops for the one input size `raw_form.fixed_size(...)`
            (LiteRT models) instead of the data layer's TF ops for any size.
        integer_steps: bool (fixed_size only). Keep the loader's integer steps (the truncation
            of the gray conversion and the rounding after the load resize). False makes the
            graph linear and fully int8-quantizable (full-integer models, whose quantization
            error is far larger than these half-level steps).
        **kwargs: forwarded to `keras.layers.Layer`.
    """

    def __init__(self, raw_form, preprocess, fixed_size=False, integer_steps=True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(raw_form, dict):
            raw_form = RawForm.from_dict(raw_form)
        if isinstance(preprocess, dict):
            preprocess = PreprocessConfig(**preprocess)
        self.raw_form = raw_form
        self.preprocess = preprocess
        self.fixed_size = bool(fixed_size)
        self.integer_steps = bool(integer_steps)

    def call(self, images):
        images = tf.convert_to_tensor(images)
        if self.fixed_size:
            return _fixed_size_model_input(images, self.raw_form, self.preprocess,
                                           self.integer_steps)
        return self.raw_form.to_model_input(images, self.preprocess)

    def compute_output_shape(self, input_shape):
        size = self.preprocess.crop_size
        return (input_shape[0], size, size, 3)

    def get_config(self):
        config = super().get_config()
        config.update({
            "raw_form": self.raw_form.to_dict(),
            "preprocess": dataclasses.asdict(self.preprocess),
            "fixed_size": self.fixed_size,
            "integer_steps": self.integer_steps,
        })
        return config


def fixed_size_images(catalog, indices, size, batch_size=256):
    """Raw images of a catalog at one fixed size, as a fixed-size (LiteRT) model takes them.

    Args:
        catalog: an `ImageCatalog` of raw 3-channel images (`load_dataset(..., raw=True)`).
        indices: int image indices.
        size: (height, width). Images of another size (photos) are resized as the loader
            resizes them (antialiased bilinear, rounded).
        batch_size: images decoded per batch.

    Returns:
        np.uint8 [len(indices), height, width, 3].
    """
    if catalog.num_channels != 3:
        raise ValueError(f"{catalog!r} must hold raw RGB images (3 channels): load the dataset "
                         "with load_dataset(..., raw=True).")
    height, width = size
    fetch = catalog.fetch_fn()

    def load(index):
        image = fetch(index)
        shape = tf.shape(image)
        same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
        image = tf.cond(same, lambda: image,
                        lambda: tf.cast(tf.round(resize_square(image, height)), tf.uint8))
        return tf.ensure_shape(image, [height, width, 3])

    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    out = np.zeros([len(indices), height, width, 3], np.uint8)
    dataset = (tf.data.Dataset.from_tensor_slices(indices)
               .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .batch(batch_size))
    start = 0
    for batch in dataset.as_numpy_iterator():
        out[start:start + len(batch)] = batch
        start += len(batch)
    return out


def calibration_images(catalog, sampler, num_images=200, size=None, start_step=0):
    """Raw images for the full-integer (int8) calibration of a model that takes raw images.

    Such a model is calibrated on what it is fed: raw images. These are the first `num_images`
    images the class-balanced training sampler draws from `start_step` on (Model Garden
    calibrates on its training input pipeline), in sampling order, without augmentation.

    Args:
        catalog: the raw training `ImageCatalog` (3 channels).
        sampler: `ClassBalancedSampler` built on `catalog.labels`.
        num_images: int >= 1.
        size: optional (height, width): images are resized to it as the loader resizes them
            (`fixed_size_images`), for a fixed-size model. None keeps them as they are (a dataset
            of one fixed size, such as Omniglot's 105 x 105).
        start_step: first sampler step.

    Returns:
        np.uint8 [num_images, H, W, 3], a pure function of (catalog, sampler seed, num_images,
        size, start_step).

    Raises:
        ValueError: a catalog that is not RGB, a sampler of another catalog, num_images < 1, or
            raw images of different sizes without `size`.
    """
    if sampler.num_images != catalog.num_images:
        raise ValueError(f"The sampler was built on {sampler.num_images} labels but {catalog!r} "
                         f"has {catalog.num_images} images: build it on this catalog's labels.")
    if int(num_images) != num_images or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}.")
    chosen, count, step = [], 0, start_step
    while count < num_images:
        chosen.append(np.asarray(sampler.batch_indices(step), dtype=np.int64))
        count += len(chosen[-1])
        step += 1
    indices = np.concatenate(chosen)[:num_images]
    if size is None:
        images = [catalog.image(int(i)) for i in indices]
        if len({image.shape for image in images}) != 1 or images[0].shape[-1] != 3:
            raise ValueError(f"{catalog!r} holds raw images of different sizes (or not RGB): "
                             "pass size=(height, width).")
        return np.stack(images)
    return fixed_size_images(catalog, indices, size)


def _check_conversion(conversion):
    if conversion not in CONVERSIONS:
        raise ValueError(f"Unknown conversion {conversion!r}; valid: {', '.join(CONVERSIONS)}.")


def _check_size(size, name):
    if size is not None and (isinstance(size, bool) or int(size) != size or size < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {size!r}.")
