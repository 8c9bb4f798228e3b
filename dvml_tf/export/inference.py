"""The inference model every export converts: raw images -> embedding.

    inference = inference_model(model, raw_form, preprocess)   # keras.Sequential
    embeddings = inference(raw_uint8_images)

It is `keras.Sequential([RawImagePreprocessor(raw_form, preprocess), model.embedder])`: the
data layer's raw-form preprocessing in front of the trained model's own embedder (backbone ->
z_I -> L2 normalization), sharing its layers. The SavedModel, the LiteRT models and the
retrieval model are conversions of it, never re-implementations of the forward pass.
"""

import keras
import numpy as np
import tensorflow as tf

from dvml_tf import data as data_lib
from dvml_tf import models


def inference_model(model, raw_form, preprocess, fixed_size=False, integer_steps=True,
                    normalize=True):
    """Raw uint8 images in the dataset's raw form -> the model's embedding.

    Args:
        model: a trained `DVMLModel`.
        raw_form: the dataset's `data.RawForm`.
        preprocess: the run's `data.PreprocessConfig`.
        fixed_size: TFLite builtin preprocessing for the one input size
            `raw_form.fixed_size(preprocess)` (LiteRT); else any size (SavedModel).
        integer_steps: see `data.RawImagePreprocessor` (False for full-integer models).
        normalize: end with the embedder's L2 normalization (when the model normalizes); False
            stops at z_I (full-integer models are normalized by the caller after dequantizing).

    Returns:
        `keras.Sequential`, built, with uint8 input [None, H, W, 3].
    """
    height, width = raw_form.fixed_size(preprocess) if fixed_size else (None, None)
    preprocessor = data_lib.RawImagePreprocessor(
        raw_form, preprocess, fixed_size=fixed_size, integer_steps=integer_steps,
        name="raw_preprocessing",
    )
    embedder = model.embedder if normalize else model.unnormalized_embedder()
    return keras.Sequential(
        [keras.Input(shape=(height, width, 3), dtype="uint8", name="images"), preprocessor,
         embedder],
        name="inference",
    )


def embed_raw(inference, catalog, indices=None, batch_size=256):
    """Embeds raw images of a catalog as the serving signature does.

    Images may differ in size (photos), so each is preprocessed on its own in the tf.data map,
    then the embedder runs on batches.

    Args:
        inference: an `inference_model` (any-size preprocessing).
        catalog: raw `data.ImageCatalog` (`task.load_splits(config, raw=True)`).
        indices: optional image indices (default: all, in order).
        batch_size: int.

    Returns:
        `(embeddings float32 [N, D], labels int64 [N])`.
    """
    preprocessor, embedder = inference.layers
    fetch = catalog.fetch_fn()
    indices = np.arange(catalog.num_images) if indices is None else np.asarray(indices)
    labels = tf.constant(catalog.labels)

    def load(index):
        return preprocessor(fetch(index)[tf.newaxis])[0], tf.gather(labels, index)

    dataset = (
        tf.data.Dataset.from_tensor_slices(indices.astype(np.int64))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    embed = models.inference_function(embedder)
    embeddings, batch_labels = [], []
    for images, labels_ in dataset:
        embeddings.append(embed(images).numpy())
        batch_labels.append(labels_.numpy())
    if not embeddings:
        raise ValueError(f"{catalog!r}: nothing to embed.")
    return np.concatenate(embeddings).astype(np.float32), np.concatenate(batch_labels)
