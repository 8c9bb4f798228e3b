"""A dataset's raw image form and its conversion to the model input, as graph ops.

Clients of the exported models send images in the form the dataset provides them, before our
loader converts them: Omniglot's TFDS images are uint8 RGB 105 x 105 black ink on white; the photo
datasets (CUB, Cars, SOP, folder) are decoded RGB photos of any size. The exported graphs apply
exactly the conversion of `dvml_tf.data.load_dataset` followed by `preprocess_test_batch`, so that
an image sent to a server gets the embedding `load_dataset` + `make_eval_dataset` + the model give.

The loader's conversion belongs to the data layer: `data.StoredForm.convert` (=
`data.convert_raw`), which the loader itself applies to every decoded RGB image. Omniglot: gray
with libpng's integer formula, inverted, resized to the stored size and rounded; photos held
decoded: resized and rounded; photos kept encoded: nothing. `DatasetSplits.stored_form` (or
`data.stored_form` when the data is not at hand) says which; `RawInputSpec` records it for the
export report. Then `preprocess_test_batch`: resize to `resize_size`, centre crop `crop_size`,
tile gray to RGB.

Two implementations of the model input:

* `to_model_input`: the data layer's own functions (any image size). SavedModels use it.
* `litert_model_input`: TFLite builtins only, for one fixed input size. TF's antialiased resize is
  the `ScaleAndTranslate` op, which LiteRT lacks, so each resize is a product with constant
  matrices obtained by resizing one-hot images with that very op (a resize is linear and
  separable). The gray conversion is the data layer's (`data.png_gray`), or its linear version
  for the full-integer model. The same pixels up to float summation order (tests pin max |diff|
  <= 1 gray level).
"""

import dataclasses

import numpy as np
import tensorflow as tf

from dvml_tf import data as data_lib
from dvml_tf.data import PreprocessConfig
from dvml_tf.data import conversion as conversion_lib
from dvml_tf.data import preprocess_test_batch


@dataclasses.dataclass(frozen=True)
class RawInputSpec:
    """How raw images of one dataset become the model input.

    Args:
        dataset: dataset name (for messages and metadata).
        preprocess: the run's test-time `PreprocessConfig`.
        ink: Omniglot's conversion ("omniglot_ink" of `data.StoredForm`): RGB to gray as TF's PNG
            decoder does it, then inverted.
        load_size: the side the loader resizes images to (rounded to uint8) when it holds them
            decoded in memory; None when it keeps them encoded (then only `preprocess` resizes).
        raw_size: (height, width) of every raw image when the dataset fixes it (Omniglot), else
            None (any size).
    """

    dataset: str
    preprocess: PreprocessConfig
    ink: bool = False
    load_size: int | None = None
    raw_size: tuple | None = None

    @property
    def stored_form(self):
        """`data.StoredForm`: the loader's conversion of the raw images this spec describes."""
        conversion = data_lib.OMNIGLOT_INK if self.ink else data_lib.NO_CONVERSION
        return data_lib.StoredForm(conversion, self.load_size, self.raw_size)

    @property
    def image_size(self):
        """int: side of the model's (cropped) input."""
        return self.preprocess.crop_size

    @property
    def litert_input_size(self):
        """(height, width) of the LiteRT models' input: the raw size, or the loader's square size
        for photos of any size (LiteRT graphs have fixed shapes)."""
        if self.raw_size is not None:
            return tuple(self.raw_size)
        side = self.load_size or self.preprocess.resize_size
        return (side, side)

    def describe(self):
        """One sentence: what a client sends."""
        if self.raw_size is not None:
            h, w = self.raw_size
            form = f"uint8 RGB images [batch, {h}, {w}, 3]"
        else:
            form = "uint8 RGB images [batch, height, width, 3] of any size"
        if self.ink:
            form += " with dark strokes on white (the raw form of TFDS omniglot)"
        return form

    def to_dict(self):
        values = dataclasses.asdict(self)
        values["preprocess"] = dataclasses.asdict(self.preprocess)
        return values

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        values["preprocess"] = PreprocessConfig(**values["preprocess"])
        if values.get("raw_size") is not None:
            values["raw_size"] = tuple(values["raw_size"])
        return cls(**values)


def raw_input_spec(config, stored_form=None):
    """The raw-input conversion of a training run.

    Args:
        config: the run's `TrainConfig` (dataset, resize_size, image_size).
        stored_form: the `data.StoredForm` of the run's dataset (`DatasetSplits.stored_form` of
            `load_dataset(config.dataset, image_size=config.resize_size, ...)`, raw or not);
            default: `data.stored_form(config.dataset, config.resize_size)`, the loader's rule
            for the real dataset's size (a ValueError for "folder", whose size is unknown).

    Returns:
        `RawInputSpec`.
    """
    if stored_form is None:
        stored_form = data_lib.stored_form(config.dataset, config.resize_size)
    omniglot = config.dataset == "omniglot"
    # As train.py's Trainer: load at resize_size, Omniglot never flipped (flips: training only).
    preprocess = PreprocessConfig(
        resize_size=config.resize_size, crop_size=config.image_size, random_flip=not omniglot
    )
    return RawInputSpec(
        dataset=config.dataset,
        preprocess=preprocess,
        ink=stored_form.conversion == data_lib.OMNIGLOT_INK,
        load_size=stored_form.size,
        raw_size=stored_form.raw_size,
    )


def to_model_input(images, spec):
    """The loader's conversion + the test transform, with the data layer's own TF ops.

    Args:
        images: uint8 tensor [B, H, W, 3], raw images (one size per batch).
        spec: `RawInputSpec`.

    Returns:
        float32 tensor [B, S, S, 3] in [0, 255], what `make_eval_dataset` yields for them.
    """
    return preprocess_test_batch(spec.stored_form.convert(images), spec.preprocess)


def check_raw_images(images, spec, signature_name):
    """An in-graph check of a raw image batch's shape, with a message naming what is expected.

    The shape in a signature's TensorSpec is not enforced by every caller (a loaded concrete
    function or TF Serving's session feed accept other sizes, which the resize would silently
    accept), hence the assertion.

    Args:
        images: uint8 tensor.
        spec: `RawInputSpec`.
        signature_name: for the message.

    Returns:
        `images`, with a control dependency on the check.
    """
    shape = tf.shape(images)
    rank_ok = tf.equal(tf.rank(images), 4)
    expected = [spec.raw_size[0], spec.raw_size[1], 3] if spec.raw_size else [-1, -1, 3]
    # Pad so that the comparison is defined for any rank; -1 matches any size.
    dims = tf.concat([shape, [0, 0, 0, 0]], axis=0)[1:4]
    matches = tf.logical_or(tf.equal(tf.constant(expected), -1), tf.equal(dims, expected))
    valid = tf.logical_and(rank_ok, tf.reduce_all(matches))
    check = tf.debugging.Assert(
        valid,
        [
            f"{signature_name}: `images` must be {spec.describe()}; got shape",
            shape,
        ],
        summarize=8,
    )
    with tf.control_dependencies([check]):
        return tf.identity(images)


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


def litert_model_input(images, spec, integer_steps=True):
    """`to_model_input` in TFLite builtin ops, for the fixed input size `spec.litert_input_size`.

    Args:
        images: uint8 tensor [B, H, W, 3] with (H, W) = `spec.litert_input_size`.
        spec: `RawInputSpec`.
        integer_steps: keep the loader's integer steps (the truncation of the gray conversion and
            the rounding to uint8 after the load resize). False leaves them out, so that the graph
            is linear and fully int8-quantizable (full-integer models, whose quantization error
            is far larger than these half-level steps).

    Returns:
        float32 tensor [B, S, S, 3] in [0, 255].
    """
    height, width = (int(images.shape[1]), int(images.shape[2]))
    if (height, width) != tuple(spec.litert_input_size):
        raise ValueError(
            f"LiteRT input must be {spec.litert_input_size}; got {(height, width)}."
        )
    if spec.ink and not integer_steps:
        # The data layer's gray conversion without its truncation: a linear map.
        x = tf.cast(images, tf.float32)
        red, green, blue = conversion_lib.PNG_GRAY_WEIGHTS
        weighted = x[..., 0:1] * red + x[..., 1:2] * green + x[..., 2:3] * blue
        x = 255.0 - weighted / float(2**conversion_lib.PNG_GRAY_SHIFT)
    else:
        # The data layer's conversion, without the load resize (done below with matrices).
        x = tf.cast(data_lib.convert_raw(images, spec.stored_form.conversion), tf.float32)
    config = spec.preprocess
    if spec.load_size is not None and (height, width) != (spec.load_size, spec.load_size):
        x = _resize_and_crop(x, spec.load_size, antialias=True)
        if integer_steps:
            x = tf.round(x)
        height = width = spec.load_size
    offset = (config.resize_size - config.crop_size) // 2
    crop = (offset, config.crop_size)
    if (height, width) == (config.resize_size, config.resize_size):
        # The resize is the identity (exactly, for bilinear at scale 1): only crop.
        x = x[:, offset : offset + config.crop_size, offset : offset + config.crop_size, :]
    else:
        x = _resize_and_crop(x, config.resize_size, config.antialias, crop=crop)
    if x.shape[-1] == 1:
        x = tf.concat([x, x, x], axis=-1)
    return x
