"""A test double of TF Serving: an in-process PredictionService backed by `tf.saved_model.load`,
for integration tests of clients (yours and ours) where no `tensorflow_model_server` runs.

It serves the SavedModel versions under a base path (TF Serving's layout, `<base>/<version>/`)
through the same two front ends as the real server, on 127.0.0.1:

* gRPC `PredictionService.Predict` (`serve_grpc`), with the `tensorflow-serving-api` protos;
* the REST predict API subset the clients use (`serve_rest`): row ("instances") and columnar
  ("inputs") requests, `{"b64": ...}` strings, `{"predictions"|"outputs": ...}` answers,
  `{"error": ...}` with HTTP 400/404 on failure, and `GET /v1/models/<name>` (version status).

Bad requests (unknown model, version or signature, wrong input names or dtypes, and whatever the
graph rejects: wrong shapes, undecodable bytes) become INVALID_ARGUMENT / NOT_FOUND answers, never
a crashed server. On REST also: an empty batch or an empty (0 x 0) image, images of different
sizes in one batch, booleans as pixels, JSON nested deeper than `MAX_JSON_DEPTH`, and a
`Content-Length` that is not a number get HTTP 400; a request body not received within
`read_timeout` seconds gets HTTP 408 and the connection is closed, so a stalled client never
holds a handler thread. This is not TF Serving: no batching, no model reloading, no metadata
API.
"""

import base64
import concurrent.futures
import http.server
import json
import os
import re
import threading
import time

import numpy as np
import tensorflow as tf

from dvml_tf.export import layout
from dvml_tf.export import serving_client
from dvml_tf.export.saved_model import error_message as _tf_error_message

# REST: deepest JSON nesting accepted (an image batch needs 5 levels), and how long a request
# body may take to arrive.
MAX_JSON_DEPTH = 64
DEFAULT_READ_TIMEOUT_SECONDS = 30.0

INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
INTERNAL = "INTERNAL"
_HTTP_STATUS = {INVALID_ARGUMENT: 400, NOT_FOUND: 404, INTERNAL: 500}


class PredictError(Exception):
    """A request the backend refuses.

    Args:
        code: INVALID_ARGUMENT, NOT_FOUND or INTERNAL.
        message: what is wrong.
    """

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _shape_text(shape):
    return "[" + ", ".join("None" if d is None else str(d) for d in shape.as_list()) + "]"


class SavedModelBackend:
    """Runs signatures of the SavedModel versions under a base path.

    Args:
        base_path: folder of numeric version folders (`E/saved_model`), or one SavedModel
            folder (served as version 1).
        model_name: the name clients address.
    """

    def __init__(self, base_path, model_name="dvml"):
        base_path = os.fspath(base_path)
        if os.path.exists(os.path.join(base_path, "saved_model.pb")):
            paths = {1: base_path}
        else:
            paths = {version: os.path.join(base_path, str(version))
                     for version in layout.existing_versions(base_path)}
        if not paths:
            raise FileNotFoundError(
                f"No SavedModel under {base_path!r} (expected <version>/saved_model.pb)."
            )
        self.model_name = model_name
        self.models = {version: tf.saved_model.load(path) for version, path in paths.items()}
        self.latest = max(self.models)

    def signature(self, model_name, version, signature_name):
        """Looks up a signature; raises `PredictError` NOT_FOUND / INVALID_ARGUMENT."""
        if model_name != self.model_name:
            raise PredictError(NOT_FOUND, f"Servable not found for request: {model_name!r} "
                                          f"(this server serves {self.model_name!r}).")
        version = self.latest if version is None else int(version)
        if version not in self.models:
            raise PredictError(NOT_FOUND, f"Model {model_name!r} has no version {version} "
                                          f"(versions: {sorted(self.models)}).")
        signatures = self.models[version].signatures
        name = signature_name or serving_client.SERVING_DEFAULT
        if name not in signatures:
            raise PredictError(INVALID_ARGUMENT, f"Serving signature name {name!r} not found; "
                                                 f"signatures: {sorted(signatures)}.")
        return signatures[name]

    @staticmethod
    def input_specs(signature):
        """dict input name -> `tf.TensorSpec` of a signature."""
        return dict(signature.structured_input_signature[1])

    def predict(self, model_name, version, signature_name, inputs):
        """Runs one request.

        Args:
            model_name: str.
            version: int or None (latest).
            signature_name: str or "" (serving_default).
            inputs: dict name -> numpy array (strings as object arrays of bytes).

        Returns:
            dict output name -> numpy array.

        Raises:
            PredictError.
        """
        signature = self.signature(model_name, version, signature_name)
        specs = self.input_specs(signature)
        if set(inputs) != set(specs):
            raise PredictError(
                INVALID_ARGUMENT,
                f"Signature expects inputs {sorted(specs)}; the request has {sorted(inputs)}.",
            )
        tensors = {}
        for name, value in inputs.items():
            spec = specs[name]
            value = np.asarray(value)
            if spec.dtype == tf.string:
                if value.dtype.kind not in ("O", "S"):
                    raise PredictError(
                        INVALID_ARGUMENT, f"Input {name!r} must be strings; got {value.dtype}."
                    )
            elif value.dtype != spec.dtype.as_numpy_dtype:
                raise PredictError(
                    INVALID_ARGUMENT,
                    f"Expects input {name!r} to be {spec.dtype.name} but {value.dtype} is "
                    "provided.",
                )
            if not spec.shape.is_compatible_with(value.shape):
                # TF would fold the declared rank into the graph and fail obscurely later.
                raise PredictError(
                    INVALID_ARGUMENT,
                    f"Input {name!r} must have shape {_shape_text(spec.shape)}; got "
                    f"{list(value.shape)}.",
                )
            tensors[name] = tf.constant(value, dtype=spec.dtype)
        try:
            outputs = signature(**tensors)
        except tf.errors.InvalidArgumentError as error:
            raise PredictError(INVALID_ARGUMENT, _tf_error_message(error)) from None
        except (TypeError, ValueError) as error:
            raise PredictError(INVALID_ARGUMENT, str(error).splitlines()[0]) from None
        except tf.errors.OpError as error:
            raise PredictError(INTERNAL, _tf_error_message(error)) from None
        return {name: tensor.numpy() for name, tensor in outputs.items()}


class LoopbackServer:
    """A running server; `stop()` it (or use it as a context manager).

    Args:
        address: "127.0.0.1:<port>" (gRPC target) or "http://127.0.0.1:<port>" (REST root).
        port: int.
        stop_fn: callable stopping the server.
    """

    def __init__(self, address, port, stop_fn):
        self.address = address
        self.port = port
        self._stop = stop_fn

    def stop(self):
        """Stops the server (idempotent)."""
        if self._stop is not None:
            self._stop()
            self._stop = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


def _make_servicer(backend):
    grpc, _, stubs = serving_client.serving_apis()
    from tensorflow_serving.apis import predict_pb2

    class PredictionServicer(stubs.PredictionServiceServicer):
        """`PredictionService.Predict` over a `SavedModelBackend`."""

        def Predict(self, request, context):
            spec = request.model_spec
            version = spec.version.value if spec.HasField("version") else None
            try:
                inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
                outputs = backend.predict(spec.name, version, spec.signature_name, inputs)
            except PredictError as error:
                context.abort(getattr(grpc.StatusCode, error.code), error.message)
            except Exception as error:  # a bug here must not kill the server thread pool
                context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
            response = predict_pb2.PredictResponse()
            response.model_spec.name = spec.name
            response.model_spec.signature_name = spec.signature_name or "serving_default"
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
            return response

    return grpc, stubs, PredictionServicer()


def serve_grpc(base_path, model_name="dvml", host="127.0.0.1", port=0,
               max_message_bytes=serving_client.DEFAULT_MAX_MESSAGE_BYTES, backend=None):
    """Starts a gRPC `PredictionService` on `host:port` (0: a free port).

    Args:
        base_path: SavedModel base path (see `SavedModelBackend`).
        model_name: served model name.
        host: interface to listen on.
        port: int, 0 picks a free port.
        max_message_bytes: gRPC message size limit.
        backend: optional existing `SavedModelBackend` (shares the loaded models).

    Returns:
        `LoopbackServer` whose `address` is the gRPC target.
    """
    backend = backend or SavedModelBackend(base_path, model_name)
    grpc, stubs, servicer = _make_servicer(backend)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=4),
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ],
    )
    stubs.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return LoopbackServer(f"{host}:{port}", port, lambda: server.stop(grace=None))


_PREDICT_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")
_STATUS_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?$")


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BOOLEAN = re.compile(rb"\b(?:true|false)\b")


def _json_structure(body):
    """The JSON body without its strings: what nesting depth and literals are read from."""
    return _JSON_STRING.sub(b'""', body)


def _json_depth(structure):
    """The deepest nesting of arrays and objects in a JSON text without strings (vectorized:
    no recursion, whatever the depth)."""
    codes = np.frombuffer(structure, np.uint8)
    steps = (np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
             - np.isin(codes, (ord("]"), ord("}"))).astype(np.int64))
    return int(np.cumsum(steps).max()) if len(steps) else 0


def _batch_shape_error(name, value, spec):
    """The message for instances that numpy cannot stack into one array (a ragged batch)."""
    sizes = []
    if isinstance(value, list):
        for item in value[:3]:
            try:
                sizes.append(list(np.shape(item)))
            except ValueError:
                sizes.append("ragged")
    return (f"Input {name!r}: the instances have different shapes (e.g. {sizes}); one batch "
            f"must hold images of one size, {_shape_text(spec.shape)}. Send images of other "
            "sizes in separate requests, or as encoded files to the embed_bytes signature.")


def _decode_json_value(value, spec, name, booleans=False):
    """A JSON value of one input -> numpy array of the signature's dtype (b64 for strings).

    Args:
        value: the decoded JSON value.
        spec: the input's `tf.TensorSpec`.
        name: the input's name (for messages).
        booleans: the request holds JSON true/false outside strings.
    """

    def unwrap(item):
        if isinstance(item, dict):
            if set(item) != {"b64"}:
                raise PredictError(INVALID_ARGUMENT, f"Input {name!r}: objects must be "
                                                     '{"b64": "<base64>"}.')
            try:
                return base64.b64decode(item["b64"], validate=True)
            except (ValueError, TypeError) as error:
                raise PredictError(INVALID_ARGUMENT,
                                   f"Input {name!r}: invalid base64 ({error}).") from None
        if isinstance(item, list):
            return [unwrap(x) for x in item]
        return item

    value = unwrap(value)
    if isinstance(value, list) and not value:
        raise PredictError(INVALID_ARGUMENT, f"Input {name!r} is an empty batch: send at least "
                                             "one instance.")
    if spec.dtype == tf.string:
        try:
            array = np.array(value, dtype=object)
        except ValueError:
            raise PredictError(INVALID_ARGUMENT, _batch_shape_error(name, value, spec)) from None
        flat = array.reshape(-1)
        for i, item in enumerate(flat):
            if isinstance(item, str):
                flat[i] = item.encode()
            elif not isinstance(item, bytes):
                raise PredictError(INVALID_ARGUMENT, f"Input {name!r} holds strings; got "
                                                     f"{type(item).__name__}.")
        return array
    try:
        array = np.asarray(value)
    except ValueError:
        raise PredictError(INVALID_ARGUMENT, _batch_shape_error(name, value, spec)) from None
    dtype = np.dtype(spec.dtype.as_numpy_dtype)
    if array.dtype == object:
        raise PredictError(INVALID_ARGUMENT, _batch_shape_error(name, value, spec))
    if array.size == 0:
        raise PredictError(INVALID_ARGUMENT,
                           f"Input {name!r} holds an empty image (shape {list(array.shape)}: "
                           f"0 x 0 pixels); expected {dtype.name} {_shape_text(spec.shape)} "
                           "with at least one pixel per image.")
    if dtype != np.bool_ and (array.dtype == np.bool_ or booleans):
        raise PredictError(INVALID_ARGUMENT,
                           f"Input {name!r} holds booleans (true/false); expected {dtype.name} "
                           "values" + (" (integers in [0, 255])." if dtype == np.uint8 else "."))
    if array.dtype.kind not in "iufb":
        raise PredictError(INVALID_ARGUMENT, f"Input {name!r}: not a numeric array of "
                                             "consistent shape.")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if array.dtype.kind == "f" or (array.size and (array.min() < info.min
                                                       or array.max() > info.max)):
            raise PredictError(INVALID_ARGUMENT, f"Input {name!r} must hold {dtype.name} values "
                                                 f"(integers in [{info.min}, {info.max}]).")
    return array.astype(dtype)


def _handle_rest_predict(backend, model_name, version, body):
    """A REST predict request body -> (HTTP status, answer dict)."""
    try:
        structure = _json_structure(body or b"")
        depth = _json_depth(structure)
        if depth > MAX_JSON_DEPTH:
            raise PredictError(INVALID_ARGUMENT, f"The request body nests JSON {depth} levels "
                                                 f"deep; the limit is {MAX_JSON_DEPTH}.")
        booleans = bool(_JSON_BOOLEAN.search(structure))
        try:
            request = json.loads(body or b"{}")
        except (ValueError, RecursionError) as error:
            raise PredictError(INVALID_ARGUMENT, f"Request body is not JSON: {error}") from None
        if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
            raise PredictError(INVALID_ARGUMENT, 'The request needs exactly one of "instances" '
                                                 '(row format) or "inputs" (columnar format).')
        signature = backend.signature(model_name, version, request.get("signature_name"))
        specs = backend.input_specs(signature)
        if "instances" in request:
            instances = request["instances"]
            if not isinstance(instances, list):
                raise PredictError(INVALID_ARGUMENT, '"instances" must be a list.')
            if not instances:
                raise PredictError(INVALID_ARGUMENT, '"instances" is empty: send at least one '
                                                     "instance.")
            if len(specs) == 1:
                (name,) = specs
                inputs = {name: _decode_json_value(instances, specs[name], name, booleans)}
            else:
                if not all(isinstance(row, dict) and set(row) == set(specs)
                           for row in instances):
                    raise PredictError(INVALID_ARGUMENT, f"Every instance must be an object "
                                                         f"with the inputs {sorted(specs)}.")
                inputs = {
                    name: _decode_json_value([row[name] for row in instances], spec, name,
                                             booleans)
                    for name, spec in specs.items()
                }
        else:
            columns = request["inputs"]
            if len(specs) == 1 and not isinstance(columns, dict):
                columns = {next(iter(specs)): columns}
            inputs = {
                name: _decode_json_value(value, specs.get(name, tf.TensorSpec(None)), name,
                                         booleans)
                for name, value in columns.items()
            }
        outputs = backend.predict(model_name, version, request.get("signature_name"), inputs)
    except PredictError as error:
        return _HTTP_STATUS[error.code], {"error": error.message}
    if "instances" in request:
        if len(outputs) == 1:
            return 200, {"predictions": next(iter(outputs.values())).tolist()}
        rows = len(next(iter(outputs.values())))
        return 200, {"predictions": [{k: v[i].tolist() for k, v in outputs.items()}
                                     for i in range(rows)]}
    if len(outputs) == 1:
        return 200, {"outputs": next(iter(outputs.values())).tolist()}
    return 200, {"outputs": {k: v.tolist() for k, v in outputs.items()}}


def serve_rest(base_path, model_name="dvml", host="127.0.0.1", port=0, backend=None,
               read_timeout=DEFAULT_READ_TIMEOUT_SECONDS):
    """Starts the REST predict API on `host:port` (0: a free port), in a daemon thread.

    Args:
        base_path: SavedModel base path (see `SavedModelBackend`).
        model_name: served model name.
        host: interface.
        port: int, 0 picks a free port.
        backend: optional existing `SavedModelBackend`.
        read_timeout: seconds a client has to send its request line and headers, and then its
            whole body; a slower (stalled) request gets HTTP 408 and is closed.

    Returns:
        `LoopbackServer` whose `address` is the REST root URL.
    """
    backend = backend or SavedModelBackend(base_path, model_name)

    class Handler(http.server.BaseHTTPRequestHandler):
        # StreamRequestHandler applies it to the socket: reading the request line and headers
        # of an idle connection times out (and the connection is closed) too.
        timeout = read_timeout

        def _send(self, status, answer):
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 400 and self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self, length):
            """The body, or None after answering 408: the whole body must arrive within
            `read_timeout` seconds (a client sending a byte now and then is cut off too)."""
            deadline = time.monotonic() + read_timeout
            chunks, received = [], 0
            try:
                while received < length:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    self.connection.settimeout(remaining)
                    chunk = self.rfile.read1(min(length - received, 1 << 20))
                    if not chunk:
                        break  # the client closed its side: the body is short
                    chunks.append(chunk)
                    received += len(chunk)
            except (TimeoutError, OSError):
                self.close_connection = True
                self._send(408, {"error": f"The request body was not received within "
                                          f"{read_timeout:g} s (Content-Length {length}, "
                                          f"{received} bytes received)."})
                return None
            finally:
                self.connection.settimeout(read_timeout)
            if received < length:
                self.close_connection = True
                self._send(400, {"error": f"The request body ended after {received} of "
                                          f"Content-Length {length} bytes."})
                return None
            return b"".join(chunks)

        def do_POST(self):
            match = _PREDICT_PATH.match(self.path)
            if not match:
                self.close_connection = True  # the body is not read
                self._send(404, {"error": f"Unknown path {self.path!r}."})
                return
            header = self.headers.get("Content-Length")
            try:
                length = int(header or 0)
                if length < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                self._send(400, {"error": f"Content-Length {header!r} is not a number of "
                                          "bytes."})
                return
            body = self._read_body(length)
            if body is None:
                return
            try:
                status, answer = _handle_rest_predict(backend, match[1], match[2], body)
            except Exception as error:  # keep serving whatever happens
                status, answer = 500, {"error": f"{type(error).__name__}: {error}"}
            self._send(status, answer)

        def do_GET(self):
            match = _STATUS_PATH.match(self.path)
            if not match or match[1] != backend.model_name:
                self._send(404, {"error": f"Servable not found: {self.path!r}."})
                return
            versions = [int(match[2])] if match[2] else sorted(backend.models)
            if any(v not in backend.models for v in versions):
                self._send(404, {"error": f"Version {match[2]} not found."})
                return
            self._send(200, {"model_version_status": [
                {"version": str(v), "state": "AVAILABLE",
                 "status": {"error_code": "OK", "error_message": ""}} for v in versions]})

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="dvml-rest")
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    port = server.server_address[1]
    return LoopbackServer(f"http://{host}:{port}", port, stop)
