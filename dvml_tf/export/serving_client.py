"""Clients of a TF Serving model server running the exported SavedModel.

    client = RestClient("http://localhost:8501", model_name="dvml")      # REST, stdlib only
    embeddings = client.embed(images)              # uint8 [N, H, W, 3] raw images -> [N, D]
    embeddings = client.embed_bytes([open("a.png", "rb").read()])       # encoded files

    with GrpcClient("localhost:8500", model_name="dvml") as client:     # gRPC
        embeddings = client.embed(images)

REST follows TF Serving's predict API: `POST /v1/models/<name>[/versions/<v>]:predict` with
`{"signature_name": ..., "instances": [...]}`, binary strings as `{"b64": "<base64>"}`; the
answer is `{"predictions": [...]}` (one output: one value per instance) or `{"error": "..."}`.
gRPC uses `PredictionService.Predict` from `tensorflow-serving-api`, an optional extra
(`pip install -r requirements-serving.txt`), imported only when a `GrpcClient` is created.
"""

import base64
import json
import urllib.error
import urllib.request

import numpy as np

from dvml_tf.export.saved_model import EMBED_BYTES
from dvml_tf.export.saved_model import EMBEDDING_KEY
from dvml_tf.export.saved_model import IMAGE_BYTES_KEY
from dvml_tf.export.saved_model import IMAGES_KEY
from dvml_tf.export.saved_model import SERVING_DEFAULT

# Large enough for a batch of photos; TF Serving's own limit is set with --grpc_max_message_size
# (or similar) on the server side.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ServingError(RuntimeError):
    """The model server refused or failed a request.

    Args:
        message: the server's error message.
        code: gRPC status name (e.g. "INVALID_ARGUMENT") or HTTP status code.
    """

    def __init__(self, message, code=None):
        super().__init__(f"[{code}] {message}" if code is not None else message)
        self.message = message
        self.code = code


def _check_images(images):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be a uint8 array [N, H, W, 3] of raw RGB images; got {images.dtype} "
            f"{images.shape}."
        )
    return images


def _check_encoded(encoded_images):
    if isinstance(encoded_images, bytes | str):
        raise ValueError("encoded_images must be a list of bytes (one encoded file per image).")
    encoded = list(encoded_images)
    for i, item in enumerate(encoded):
        if not isinstance(item, bytes):
            raise ValueError(f"encoded_images[{i}] must be bytes; got {type(item).__name__}.")
    return encoded


def _embedding_array(values):
    embeddings = np.asarray(values, dtype=np.float32)
    return embeddings.reshape(len(embeddings), -1) if embeddings.ndim != 2 else embeddings


class RestClient:
    """TF Serving's REST API (port 8501 by default), standard library only.

    Args:
        url: server root, e.g. "http://localhost:8501".
        model_name: the served model's name (MODEL_NAME of the tensorflow/serving image).
        version: optional model version (default: the server's latest).
        timeout: seconds per request.
    """

    def __init__(self, url="http://localhost:8501", model_name="dvml", version=None,
                 timeout=60.0):
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.version = version
        self.timeout = timeout

    @property
    def model_url(self):
        """str: `<url>/v1/models/<name>[/versions/<v>]`."""
        url = f"{self.url}/v1/models/{self.model_name}"
        return url if self.version is None else f"{url}/versions/{self.version}"

    def _request(self, url, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            url, data=data, headers={"Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            try:
                message = json.loads(text).get("error", text)
            except ValueError:
                message = text
            raise ServingError(message, code=error.code) from None

    def status(self):
        """The model's version status (`GET /v1/models/<name>`).

        Returns:
            dict, TF Serving's `{"model_version_status": [...]}`.
        """
        return self._request(self.model_url)

    def predict(self, instances, signature_name=SERVING_DEFAULT):
        """One predict call in the row ("instances") format.

        Args:
            instances: JSON-serializable list, one entry per instance.
            signature_name: the signature to run.

        Returns:
            the "predictions" list of the answer.

        Raises:
            ServingError: the server answered with an error.
        """
        body = {"signature_name": signature_name, "instances": instances}
        return self._request(f"{self.model_url}:predict", body)["predictions"]

    def embed(self, images):
        """Embeddings of raw images through `serving_default`.

        Args:
            images: uint8 array [N, H, W, 3] in the dataset's raw form.

        Returns:
            float32 array [N, D].
        """
        return _embedding_array(self.predict(_check_images(images).tolist(), SERVING_DEFAULT))

    def embed_bytes(self, encoded_images):
        """Embeddings of encoded image files through `embed_bytes`.

        Args:
            encoded_images: list of bytes (JPEG/PNG/GIF/BMP/WebP files).

        Returns:
            float32 array [N, D].
        """
        instances = [{"b64": base64.b64encode(b).decode("ascii")}
                     for b in _check_encoded(encoded_images)]
        return _embedding_array(self.predict(instances, EMBED_BYTES))


def serving_apis():
    """Imports the TF Serving protos and gRPC stubs (the optional `serving` extra).

    Returns:
        `(grpc, predict_pb2, prediction_service_pb2_grpc)`.

    Raises:
        ImportError: naming the requirements file to install.
    """
    try:
        import grpc
        from tensorflow_serving.apis import predict_pb2
        from tensorflow_serving.apis import prediction_service_pb2_grpc
    except ImportError as error:
        raise ImportError(
            "The gRPC client needs tensorflow-serving-api and grpcio: pip install -r "
            f"requirements-serving.txt (missing: {error.name or error})."
        ) from error
    return grpc, predict_pb2, prediction_service_pb2_grpc


class GrpcClient:
    """TF Serving's gRPC `PredictionService` (port 8500 by default).

    Args:
        target: "host:port".
        model_name: the served model's name.
        version: optional model version (default: the server's latest).
        timeout: seconds per request.
        max_message_bytes: gRPC message size limit of this client.
    """

    def __init__(self, target="localhost:8500", model_name="dvml", version=None, timeout=60.0,
                 max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES):
        self._grpc, self._predict_pb2, stubs = serving_apis()
        import tensorflow as tf  # tensorflow-serving-api depends on it: TensorProto helpers.

        self._tf = tf
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self.channel = self._grpc.insecure_channel(target, options=options)
        self.stub = stubs.PredictionServiceStub(self.channel)
        self.model_name = model_name
        self.version = version
        self.timeout = timeout

    def predict(self, inputs, signature_name=SERVING_DEFAULT):
        """One `Predict` call.

        Args:
            inputs: dict input name -> array (converted with `tf.make_tensor_proto`).
            signature_name: the signature to run.

        Returns:
            dict output name -> numpy array.

        Raises:
            ServingError: with the gRPC status name as `code`.
        """
        request = self._predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature_name
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(self._tf.make_tensor_proto(value))
        try:
            response = self.stub.Predict(request, timeout=self.timeout)
        except self._grpc.RpcError as error:
            raise ServingError(error.details(), code=error.code().name) from None
        return {name: self._tf.make_ndarray(proto) for name, proto in response.outputs.items()}

    def embed(self, images):
        """Embeddings of raw images through `serving_default`.

        Args:
            images: uint8 array [N, H, W, 3].

        Returns:
            float32 array [N, D].
        """
        outputs = self.predict({IMAGES_KEY: _check_images(images)}, SERVING_DEFAULT)
        return outputs[EMBEDDING_KEY].astype(np.float32)

    def embed_bytes(self, encoded_images):
        """Embeddings of encoded image files through `embed_bytes`.

        Args:
            encoded_images: list of bytes.

        Returns:
            float32 array [N, D].
        """
        encoded = np.array(_check_encoded(encoded_images), dtype=object)
        outputs = self.predict({IMAGE_BYTES_KEY: encoded}, EMBED_BYTES)
        return outputs[EMBEDDING_KEY].astype(np.float32)

    def close(self):
        """Closes the channel."""
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
