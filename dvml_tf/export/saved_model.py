"""The SavedModel for TF Serving: only the inference path, two signatures, preprocessing inside.

Signatures (TF Serving's defaults: serve tag, `serving_default` used when none is named):

* `serving_default`: `images` uint8 [None, H, W, 3] in the dataset's raw form (see
  `data.RawForm`) -> `{"embedding": float32 [None, D]}`: the inference model
  (`inference.inference_model`: raw-form preprocessing, then the model's embedder).
* `embed_bytes`: `image_bytes` string [None], encoded JPEG/PNG/GIF/BMP/WebP files (REST clients
  send `{"b64": ...}`) -> the same output. Each string is decoded to RGB and preprocessed on its
  own by the same preprocessing layer (images may differ in size), then the same embedder runs.
  Before anything is decoded, each image's size is read from its header (`data.pixel_limit`):
  a request holding an image above the export's pixel limit fails as a whole, with one
  InvalidArgumentError naming the index and size of every such image (a signature has one
  output tensor, so it cannot answer some images and refuse others; `dvml_tf`'s own clients
  then retry image by image, so that only the refused images are left out).

Written with `keras.export.ExportArchive`, which saves only the variables the endpoints use (the
backbone and the z_I head): the decoder and the variance heads are not in the SavedModel. (A
bare `tf.Module` saved with `tf.saved_model.save` gave NaN LiteRT models; ExportArchive does not.)
"""

import re

import keras
import tensorflow as tf

from dvml_tf.data import pixel_limit
from dvml_tf.export import inference as inference_lib

SERVING_DEFAULT = "serving_default"
EMBED_BYTES = "embed_bytes"
IMAGES_KEY = "images"
IMAGE_BYTES_KEY = "image_bytes"
EMBEDDING_KEY = "embedding"


def _embed_batch(embed, images, embedding_dim):
    """Embeds a batch; an empty batch gives [0, D] (TF's oneDNN batch norm fails on a batch
    of 0)."""
    return tf.cond(
        tf.shape(images)[0] > 0,
        lambda: embed(images),
        lambda: tf.zeros([0, embedding_dim], tf.float32),
    )


def decode_raw_image(contents):
    """Decodes one encoded image to the raw RGB form (the decoder of `data.decode_image`).

    Args:
        contents: scalar string tensor.

    Returns:
        uint8 tensor [H, W, 3].
    """
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


# Signatures of the formats tf.io.decode_image reads, as it recognizes them.
_MAGIC_PREFIXES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"\xff\x0a",
                   b"\x00\x00\x00\x0cJXL \r\n\x87\n")


def _looks_like_image(image_bytes):
    """bool [N]: the string starts like a JPEG, PNG, GIF, BMP, WebP or JPEG XL file."""
    # Padded so that every slice below exists, also for short or empty strings.
    head = tf.strings.substr(image_bytes + b"\x00" * 12, 0, 12)
    matches = [
        tf.equal(tf.strings.substr(head, 0, len(prefix)), prefix) for prefix in _MAGIC_PREFIXES
    ]
    matches.append(
        tf.logical_and(
            tf.equal(tf.strings.substr(head, 0, 4), b"RIFF"),
            tf.equal(tf.strings.substr(head, 8, 4), b"WEBP"),
        )
    )
    return tf.reduce_any(tf.stack(matches, axis=0), axis=0)


def check_image_bytes(image_bytes):
    """In-graph check of `embed_bytes`' input: every string looks like an encoded image file.

    Strings that are empty or do not start like an image file fail with a message naming their
    indices. (A file with a valid header but corrupt data fails in the decoder with TF's own
    message: "Invalid PNG data, size ...", "jpeg::Uncompress failed. Invalid JPEG data ...".)

    Args:
        image_bytes: string tensor.

    Returns:
        `image_bytes`, with a control dependency on the check (its failure is an
        InvalidArgumentError carrying the message).
    """
    # (Its rank cannot be checked here: the signature declares [None], so TF folds tf.rank to 1.)
    bad = tf.where(tf.logical_not(_looks_like_image(image_bytes)))[:, 0]
    several = tf.size(bad) > 1
    shown = tf.strings.reduce_join(tf.strings.as_string(bad[:16]), separator=", ")
    shown = tf.where(tf.size(bad) > 16, shown + ", ...", shown)
    # One string, so that the message reads as one sentence (Assert prints each data item in
    # its own brackets); no quotes in it, which Assert would escape.
    message = tf.strings.join([
        f"{EMBED_BYTES}: could not decode image: {IMAGE_BYTES_KEY} at ",
        tf.where(several, "indices ", "index "), shown,
        tf.where(several, " are empty or not JPEG/PNG/GIF/BMP/WebP files",
                 " is empty or not a JPEG/PNG/GIF/BMP/WebP file"),
        "; send the bytes of the encoded file (REST: an object with the key b64 holding them "
        "base64-encoded).",
    ])
    content_check = tf.debugging.Assert(tf.equal(tf.size(bad), 0), [message])
    with tf.control_dependencies([content_check]):
        return tf.identity(image_bytes)


def error_message(error):
    """The useful part of the error of a signature call (drops TF's "Graph execution error"
    framing), e.g. "could not decode image: Invalid PNG. Failed to initialize decoder.".

    Args:
        error: a `tf.errors.OpError`.

    Returns:
        str.
    """
    lines = [line.strip() for line in str(error.message).splitlines()]
    lines = [
        line for line in lines
        if line and not line.startswith(("Graph execution error", "Detected at node", "[[",
                                          "<stack traces"))
    ]
    # An in-graph check's one-sentence message, as tf.debugging.Assert frames it.
    lines = [re.sub(r"^assertion failed: \[(.*)\]$", r"\1", line) for line in lines]
    message = " ".join(lines) or str(error)
    if (("DecodeImage" in str(error) or "ExtractJpegShape" in str(error))
            and "could not decode" not in message):
        # TF Serving returns the decoder's message as is; say which step failed.
        message = f"could not decode image: {message}"
    return message


def serving_functions(model, raw_form, preprocess, max_pixels=pixel_limit.DEFAULT_MAX_PIXELS):
    """The two endpoint functions and their input signatures.

    Args:
        model: a `DVMLModel`.
        raw_form: `data.RawForm` of its dataset.
        preprocess: the run's `data.PreprocessConfig`.
        max_pixels: `embed_bytes` refuses images above this many pixels (width x height) before
            decoding them.

    Returns:
        `(inference, {name: (fn, input_signature)})` where `inference` is the
        `inference.inference_model` both functions run.
    """
    inference = inference_lib.inference_model(model, raw_form, preprocess)
    preprocessor, embedder = inference.layers
    height, width = raw_form.raw_size or (None, None)
    size, dim = preprocess.crop_size, model.embedding_dim

    def serve_images(images):
        images = raw_form.check_images(images, SERVING_DEFAULT)
        return {EMBEDDING_KEY: _embed_batch(inference, images, dim)}

    def serve_bytes(image_bytes):
        image_bytes = pixel_limit.batch_within_limit(check_image_bytes(image_bytes), max_pixels,
                                                     f"{EMBED_BYTES}: {IMAGE_BYTES_KEY}")
        images = tf.map_fn(
            lambda contents: preprocessor(decode_raw_image(contents)[tf.newaxis])[0],
            image_bytes,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
        )
        return {EMBEDDING_KEY: _embed_batch(embedder, images, dim)}

    endpoints = {
        SERVING_DEFAULT: (
            serve_images,
            [tf.TensorSpec([None, height, width, 3], tf.uint8, name=IMAGES_KEY)],
        ),
        EMBED_BYTES: (
            serve_bytes,
            [tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_KEY)],
        ),
    }
    return inference, endpoints


def write_saved_model(model, raw_form, preprocess, path,
                      max_pixels=pixel_limit.DEFAULT_MAX_PIXELS):
    """Writes the serving SavedModel of a trained model.

    Args:
        model: a `DVMLModel`.
        raw_form: `data.RawForm` of its dataset.
        preprocess: the run's `data.PreprocessConfig`.
        path: the version folder to create (e.g. `E/saved_model/1`); must not exist.
        max_pixels: the pixel limit of `embed_bytes` (see `serving_functions`).

    Returns:
        `path`.
    """
    _, endpoints = serving_functions(model, raw_form, preprocess, max_pixels)
    archive = keras.export.ExportArchive()
    # No `archive.track(inference)`: add_endpoint already saves the variables the endpoints use,
    # and tracking the Keras model too would save every weight a second time (as the Keras
    # variable besides the tf.Variable the functions capture), doubling the SavedModel.
    for name, (fn, signature) in endpoints.items():
        archive.add_endpoint(name, fn, input_signature=signature)
    archive.write_out(path, verbose=False)
    return path
