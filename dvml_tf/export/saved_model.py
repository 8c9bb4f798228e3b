"""The SavedModel for TF Serving: only the inference path, two signatures, preprocessing inside.

Signatures (TF Serving's defaults: serve tag, `serving_default` used when none is named):

* `serving_default`: `images` uint8 [None, H, W, 3] in the dataset's raw form (see
  `raw_input.RawInputSpec`) -> `{"embedding": float32 [None, D]}`.
* `embed_bytes`: `image_bytes` string [None], encoded JPEG/PNG/GIF/BMP/WebP files (REST clients
  send `{"b64": ...}`) -> the same output. Each string is decoded to RGB, converted and
  preprocessed on its own (images may differ in size).

Written with `keras.export.ExportArchive`, which saves only the variables the endpoints use (the
backbone and the z_I head): the decoder and the variance heads are not in the SavedModel.
(stack.md §8: a bare `tf.Module` saved with `tf.saved_model.save` gave NaN LiteRT models;
ExportArchive does not.)
"""

import keras
import tensorflow as tf

from dvml_tf.export import raw_input

SERVING_DEFAULT = "serving_default"
EMBED_BYTES = "embed_bytes"
IMAGES_KEY = "images"
IMAGE_BYTES_KEY = "image_bytes"
EMBEDDING_KEY = "embedding"


class EmbeddingModel(keras.Model):
    """The inference path of a `DVMLModel`: backbone, z_I head, optional L2 normalization.

    It shares (does not copy) the layers of the trained model, so exporting it saves only their
    variables.

    Args:
        model: a `DVMLModel`.
        normalize: L2-normalize z_I; default: as the model does (`model.normalize_embeddings`).
    """

    def __init__(self, model, normalize=None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = model.backbone
        self.embedding_head = model.embedding_head
        self.normalize = model.normalize_embeddings if normalize is None else bool(normalize)
        self.image_size = int(model.backbone.inputs[0].shape[1])
        self.embedding_dim = int(model.embedding_dim)
        self(tf.zeros([1, self.image_size, self.image_size, 3]))

    def call(self, images):
        # The same ops as DVMLModel.call in inference mode.
        features = tf.cast(self.backbone(images, training=False), "float32")
        embeddings = self.embedding_head(features)
        if self.normalize:
            embeddings = tf.math.l2_normalize(embeddings, axis=-1)
        return embeddings


def _embed_batch(embedder, images):
    """Embeds a preprocessed batch; an empty batch gives [0, D] (TF's oneDNN batch norm fails on
    a batch of 0)."""
    return tf.cond(
        tf.shape(images)[0] > 0,
        lambda: embedder(images),
        lambda: tf.zeros([0, embedder.embedding_dim], tf.float32),
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
    content_check = tf.debugging.Assert(
        tf.equal(tf.size(bad), 0),
        [
            f"{EMBED_BYTES}: could not decode image: `{IMAGE_BYTES_KEY}` at index",
            bad,
            "is empty or not a JPEG/PNG/GIF/BMP/WebP file; send the encoded file's bytes "
            "(REST: {\"b64\": base64 of the file}).",
        ],
        summarize=16,
    )
    with tf.control_dependencies([content_check]):
        return tf.identity(image_bytes)


def serving_functions(model, spec):
    """The two endpoint functions and their input signatures.

    Args:
        model: a `DVMLModel`.
        spec: `raw_input.RawInputSpec`.

    Returns:
        `(embedder, {name: (fn, input_signature)})` where `embedder` is the `EmbeddingModel` the
        functions call (track it in the archive).
    """
    embedder = EmbeddingModel(model)
    height, width = spec.raw_size or (None, None)
    size = spec.image_size

    def serve_images(images):
        images = raw_input.check_raw_images(images, spec, SERVING_DEFAULT)
        return {EMBEDDING_KEY: _embed_batch(embedder, raw_input.to_model_input(images, spec))}

    def preprocess_one(contents):
        image = decode_raw_image(contents)
        return raw_input.to_model_input(image[tf.newaxis], spec)[0]

    def serve_bytes(image_bytes):
        image_bytes = check_image_bytes(image_bytes)
        images = tf.map_fn(
            preprocess_one,
            image_bytes,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
        )
        return {EMBEDDING_KEY: _embed_batch(embedder, images)}

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
    return embedder, endpoints


def write_saved_model(model, spec, path):
    """Writes the serving SavedModel of a trained model.

    Args:
        model: a `DVMLModel`.
        spec: `raw_input.RawInputSpec` of its dataset.
        path: the version folder to create (e.g. `E/saved_model/1`); must not exist.

    Returns:
        `path`.
    """
    _, endpoints = serving_functions(model, spec)
    archive = keras.export.ExportArchive()
    # No `archive.track(embedder)`: add_endpoint already saves the variables the endpoints use,
    # and tracking the Keras model too would save every weight a second time (as the Keras
    # variable besides the tf.Variable the functions capture), doubling the SavedModel.
    for name, (fn, signature) in endpoints.items():
        archive.add_endpoint(name, fn, input_signature=signature)
    archive.write_out(path, verbose=False)
    return path
