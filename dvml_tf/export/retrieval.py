"""`retrieval.tflite`: an on-device retriever with the gallery embeddings baked in.

One raw uint8 image [1, H, W, 3] in (the input of `model.tflite`); out:

* `indices`: int32 [1, k], gallery rows of the k best matches, best first;
* `scores`: float32 [1, k], cosine similarity when the model L2-normalizes its embeddings,
  else the negative squared Euclidean distance (higher is better in both cases);
* `labels`: int32 [1, k], the class labels of those rows (when built with `gallery_labels`;
  the exporter always passes them).

Class names are strings, which TFLite outputs cannot carry well, so they ship next to the model
in `retrieval_gallery.json` (`write_gallery_json`) with the labels again, row i describing
gallery image i. k is fixed at export time.
"""

import json

import numpy as np
import tensorflow as tf

from dvml_tf.export import inference as inference_lib
from dvml_tf.export import litert
from dvml_tf.utils import atomic

RETRIEVAL_FILE = "retrieval.tflite"
GALLERY_FILE = "retrieval_gallery.json"
INDICES_KEY = "indices"
SCORES_KEY = "scores"
LABELS_KEY = "labels"
COSINE = "cosine"
NEGATIVE_SQUARED_EUCLIDEAN = "negative_squared_euclidean"


def score_name(normalized):
    """Returns: the score the retriever reports for a (non-)normalizing model."""
    return COSINE if normalized else NEGATIVE_SQUARED_EUCLIDEAN


def convert_retrieval_model(model, raw_form, preprocess, gallery_embeddings, top_k=10,
                            gallery_labels=None):
    """Builds the retriever of a trained model and a gallery: the LiteRT inference model
    followed by a scoring of the baked-in gallery.

    Args:
        model: a `DVMLModel`.
        raw_form: `data.RawForm` of its dataset.
        preprocess: the run's `data.PreprocessConfig`.
        gallery_embeddings: float array [N, D], the model's embeddings of the gallery images
            (as `serving_default` computes them).
        top_k: int in [1, N], results per query.
        gallery_labels: optional int array [N], the gallery's class labels; when given, the
            retriever also outputs the labels of its top-k rows.

    Returns:
        bytes, the `.tflite` flatbuffer.

    Raises:
        ValueError: bad gallery shape, labels or top_k.
    """
    inference = inference_lib.inference_model(model, raw_form, preprocess, fixed_size=True)
    normalized = bool(model.normalize_embeddings)
    gallery = np.asarray(gallery_embeddings, dtype=np.float32)
    if gallery.ndim != 2 or gallery.shape[1] != model.embedding_dim or len(gallery) == 0:
        raise ValueError(
            f"gallery_embeddings must be [N >= 1, {model.embedding_dim}]; got {gallery.shape}."
        )
    if not 1 <= top_k <= len(gallery):
        raise ValueError(f"top_k must be in [1, {len(gallery)}] (the gallery size); got {top_k}.")
    if gallery_labels is not None:
        gallery_labels = np.asarray(gallery_labels)
        if gallery_labels.shape != (len(gallery),) or not np.issubdtype(
            gallery_labels.dtype, np.integer
        ):
            raise ValueError(
                f"gallery_labels must be integers [{len(gallery)}] (one per gallery row); got "
                f"{gallery_labels.dtype} {gallery_labels.shape}."
            )
        if len(gallery_labels) and np.abs(gallery_labels).max() >= 2**31:
            raise ValueError("gallery_labels must fit in int32.")
    squared_norms = np.sum(np.square(gallery.astype(np.float64)), axis=1).astype(np.float32)

    def retrieve(images):
        query = inference(images)
        similarity = tf.matmul(query, tf.constant(gallery), transpose_b=True)
        if normalized:
            scores = similarity
        else:
            # -|q - g|^2 = 2 q.g - |g|^2 - |q|^2
            query_norm = tf.reduce_sum(tf.square(query), axis=1, keepdims=True)
            scores = 2.0 * similarity - tf.constant(squared_norms)[tf.newaxis] - query_norm
        scores, indices = tf.math.top_k(scores, k=int(top_k))
        outputs = {INDICES_KEY: tf.cast(indices, tf.int32), SCORES_KEY: scores}
        if gallery_labels is not None:
            outputs[LABELS_KEY] = tf.gather(tf.constant(gallery_labels, tf.int32), indices)
        return outputs

    return litert.convert_endpoint(inference, retrieve,
                                   litert.input_signature(raw_form, preprocess))


def write_gallery_json(path, labels, catalog=None, split="test", dataset="", top_k=10,
                       normalized=True, extra=None):
    """Writes the retriever's sidecar: what each gallery row is.

    Args:
        path: the `.json` file to write (atomically).
        labels: int labels of the gallery rows.
        catalog: optional `ImageCatalog` of the gallery, for class names.
        split: the gallery's split name.
        dataset: dataset name.
        top_k: k of the retriever.
        normalized: whether scores are cosine similarities.
        extra: optional dict merged into the JSON.

    Returns:
        the dict written.
    """
    labels = np.asarray(labels, dtype=np.int64)
    content = {
        "dataset": dataset,
        "split": split,
        "num_images": len(labels),
        "top_k": int(top_k),
        "score": score_name(normalized),
        "labels": labels.tolist(),
    }
    if catalog is not None and catalog.class_names is not None:
        content["class_names"] = {
            str(int(c)): catalog.class_name(int(c)) for c in np.unique(labels)
        }
    content.update(extra or {})
    atomic.write_text(path, json.dumps(content))
    return content


class Retriever(litert.LiteRTModel):
    """Runs `retrieval.tflite` with `ai_edge_litert`.

    Args:
        path_or_content: `.tflite` path or bytes.
        num_threads: interpreter threads.
    """

    def __init__(self, path_or_content, num_threads=None):
        super().__init__(path_or_content, num_threads=num_threads)

    def query(self, image):
        """The top-k gallery rows of one raw image.

        Args:
            image: uint8 array [H, W, 3] or [1, H, W, 3].

        Returns:
            `(indices int32 [k], scores float32 [k])`; the labels of those rows are
            `last_labels()` when the model carries them.
        """
        image = np.asarray(image)
        if image.ndim == 3:
            image = image[np.newaxis]
        if image.dtype != np.uint8 or image.shape != self.input_shape:
            raise ValueError(
                f"image must be uint8 {list(self.input_shape)}; got {image.dtype} {image.shape}."
            )
        self.invoke(image)
        return self._output(INDICES_KEY)[0].copy(), self._output(SCORES_KEY)[0].copy()

    @property
    def has_labels(self):
        """Whether the model outputs the labels of its top-k rows."""
        return LABELS_KEY in self.outputs

    def last_labels(self):
        """The labels int32 [k] of the last `query`'s rows (models built with gallery_labels)."""
        if not self.has_labels:
            raise ValueError("This retrieval model was built without gallery_labels.")
        return self._output(LABELS_KEY)[0].copy()
