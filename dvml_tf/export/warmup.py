"""TF Serving warm-up requests stored with the SavedModel.

TF Serving replays `<version>/assets.extra/tf_serving_warmup_requests` when it loads a version,
before the version serves traffic, so the first real requests do not pay for TF's lazy
initialisation (graph optimisation, kernel selection, the decoder's first use). The file is a
TFRecord of `PredictionLog` protos whose `predict_log.request` is a `PredictRequest` (at most
1,000 records; https://www.tensorflow.org/tfx/serving/saved_model_warmup).

The export writes four requests: `serving_default` and `embed_bytes`, each with one image and
with a small batch, built from real images of the dataset's test split in its raw form when the
data is at hand (otherwise generated images of that form), PNG-encoded for `embed_bytes`.
Writing needs `tensorflow-serving-api` (requirements-serving.txt), an optional extra: without it
the file is skipped with a logged note.
"""

import os

import numpy as np
import tensorflow as tf
from absl import logging

from dvml_tf import data as data_lib
from dvml_tf.export import layout
from dvml_tf.export import saved_model as saved_model_lib
from dvml_tf.testing import synthetic_data

WARMUP_FILE = "tf_serving_warmup_requests"
# Images of the batched requests; the single-image requests use the first of them.
NUM_IMAGES = 4
# The model name TF Serving serves the export under in the docs; warm-up ignores it.
MODEL_NAME = "dvml"


def _apis():
    """(predict_pb2, prediction_log_pb2), or None when tensorflow-serving-api is missing."""
    try:
        from tensorflow_serving.apis import predict_pb2
        from tensorflow_serving.apis import prediction_log_pb2
    except ImportError:
        return None
    return predict_pb2, prediction_log_pb2


def warmup_images(raw_form, preprocess, raw_splits=None, num_images=NUM_IMAGES):
    """Raw images for the warm-up requests, all of one size.

    Args:
        raw_form: the export's `data.RawForm`.
        preprocess: the run's `data.PreprocessConfig`.
        raw_splits: optional raw `DatasetSplits`: its first test images are used (photos resized
            to the raw form's fixed size, as the loader resizes them).
        num_images: int.

    Returns:
        (uint8 [n, H, W, 3], source): source is "test split" or "generated".
    """
    size = raw_form.fixed_size(preprocess)
    if raw_splits is not None and raw_splits.test.num_images:
        count = min(num_images, raw_splits.test.num_images)
        return data_lib.fixed_size_images(raw_splits.test, np.arange(count), size), "test split"
    return synthetic_data.synthetic_raw_images(raw_form, preprocess, num_images), "generated"


def predict_requests(images, model_name=MODEL_NAME):
    """The warm-up `PredictRequest`s of a set of raw images.

    Args:
        images: uint8 [n, H, W, 3].
        model_name: the request's model name (TF Serving's warm-up does not check it).

    Returns:
        list of `PredictRequest`: serving_default with 1 and n images, embed_bytes with 1 and n
        PNG files.

    Raises:
        ImportError: tensorflow-serving-api is not installed.
    """
    apis = _apis()
    if apis is None:
        raise ImportError("The warm-up requests need tensorflow-serving-api: "
                          "pip install -r requirements-serving.txt")
    predict_pb2, _ = apis
    images = np.asarray(images, np.uint8)
    encoded = np.array([tf.io.encode_png(image).numpy() for image in images], dtype=object)
    requests = []
    for signature, key, values in (
        (saved_model_lib.SERVING_DEFAULT, saved_model_lib.IMAGES_KEY, images),
        (saved_model_lib.EMBED_BYTES, saved_model_lib.IMAGE_BYTES_KEY, encoded),
    ):
        for batch in (values[:1], values):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            request.inputs[key].CopyFrom(tf.make_tensor_proto(batch))
            requests.append(request)
    return requests


def write_warmup_requests(version_dir, images):
    """Writes `<version_dir>/assets.extra/tf_serving_warmup_requests`.

    Args:
        version_dir: the SavedModel version folder (being assembled: it is moved into place
            whole, so the file needs no atomic write of its own).
        images: uint8 [n, H, W, 3] raw images (`warmup_images`).

    Returns:
        dict for the export report: "file" (relative to the version folder) and "requests"
        (signature and batch size of each record), or "file": None and a "note" when
        tensorflow-serving-api is missing.
    """
    if _apis() is None:
        note = ("tensorflow-serving-api is not installed (pip install -r "
                "requirements-serving.txt): no TF Serving warm-up requests were written")
        logging.warning("%s.", note)
        return {"file": None, "note": note}
    _, prediction_log_pb2 = _apis()
    requests = predict_requests(images)
    folder = os.path.join(version_dir, layout.ASSETS_EXTRA_DIR)
    os.makedirs(folder, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(folder, WARMUP_FILE)) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return {
        "file": f"{layout.ASSETS_EXTRA_DIR}/{WARMUP_FILE}",
        "requests": [{"signature": r.model_spec.signature_name,
                      "batch": int(next(iter(r.inputs.values())).tensor_shape.dim[0].size)}
                     for r in requests],
    }


def read_warmup_requests(version_dir):
    """The `PredictRequest`s of a version's warm-up file (for checks and replays).

    Args:
        version_dir: a SavedModel version folder.

    Returns:
        list of `PredictRequest`.

    Raises:
        FileNotFoundError: the version has no warm-up file.
        ImportError: tensorflow-serving-api is not installed.
    """
    path = os.path.join(version_dir, layout.ASSETS_EXTRA_DIR, WARMUP_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the export wrote no warm-up requests.")
    apis = _apis()
    if apis is None:
        raise ImportError("Reading warm-up requests needs tensorflow-serving-api.")
    _, prediction_log_pb2 = apis
    requests = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        requests.append(log.predict_log.request)
    return requests
