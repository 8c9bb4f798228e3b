"""`dvml_tf.testing.serving`, the test double of TF Serving: TF Serving's base-path layout and
versions, the REST formats, errors."""

import base64
import json
import re
import urllib.error
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import task
from dvml_tf.export import saved_model
from dvml_tf.testing import serving
from dvml_tf.testing import synthetic_data
from dvml_tf.training.config import TrainConfig


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two versions from two different models (different seeds)."""
    config = TrainConfig(embedding_dim=8)
    raw_form, preprocess = task.raw_form(config), task.preprocess_config(config)
    base = tmp_path_factory.mktemp("base")
    images = synthetic_data.synthetic_raw_images(raw_form, preprocess, 3, seed=5)
    references = {}
    for version in (1, 2):
        keras.utils.set_random_seed(version)
        model = task.build_model(config)
        saved_model.write_saved_model(model, raw_form, preprocess, str(base / str(version)))
        references[version] = model(
            raw_form.to_model_input(tf.constant(images), preprocess)).numpy()
    backend = serving.SavedModelBackend(base, model_name="dvml")
    server = serving.serve_rest(base, backend=backend)
    yield backend, server, images, references, base
    server.stop()


def _post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_latest_version_by_default_and_a_version_on_request(base):
    backend, _, images, references, _ = base
    assert sorted(backend.models) == [1, 2] and backend.latest == 2
    for version, expected in ((None, references[2]), (1, references[1])):
        out = backend.predict("dvml", version, "", {"images": images})["embedding"]
        np.testing.assert_allclose(out, expected, atol=1e-5)
    with pytest.raises(serving.PredictError, match="no version 3") as error:
        backend.predict("dvml", 3, "", {"images": images})
    assert error.value.code == "NOT_FOUND"


def test_a_single_saved_model_folder_is_version_1(base, tmp_path):
    _, _, images, references, path = base
    single = serving.SavedModelBackend(path / "1", "m")
    assert list(single.models) == [1]
    out = single.predict("m", None, "serving_default", {"images": images})["embedding"]
    np.testing.assert_allclose(out, references[1], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="No SavedModel"):
        serving.SavedModelBackend(tmp_path)


def test_rest_row_and_columnar_formats(base):
    _, server, images, references, _ = base
    url = f"{server.address}/v1/models/dvml:predict"
    status, answer = _post(url, {"instances": images.tolist()})
    assert status == 200
    np.testing.assert_allclose(answer["predictions"], references[2], atol=1e-5)
    status, answer = _post(url, {"inputs": {"images": images.tolist()}})
    assert status == 200
    np.testing.assert_allclose(answer["outputs"], references[2], atol=1e-5)
    png = [{"b64": base64.b64encode(tf.io.encode_png(i).numpy()).decode()} for i in images]
    status, answer = _post(f"{server.address}/v1/models/dvml/versions/1:predict",
                           {"signature_name": "embed_bytes", "instances": png})
    assert status == 200
    np.testing.assert_allclose(answer["predictions"], references[1], atol=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"instances": [[1, 2]], "inputs": {}}, 400, "exactly one of"),
        ({"instances": [{"b64": "%%%"}], "signature_name": "embed_bytes"}, 400, "invalid base64"),
        ({"instances": [[[[300] * 3] * 105] * 105]}, 400, r"integers in \[0, 255\]"),
        ({"instances": [[[[0] * 3] * 105] * 104]}, 400, "must have shape"),
        ({"instances": [1], "signature_name": "nope"}, 400, "'nope' not found"),
    ],
)
def test_rest_errors_are_json_answers(base, body, status, message):
    _, server, _, _, _ = base
    code, answer = _post(f"{server.address}/v1/models/dvml:predict", body)
    assert code == status
    assert set(answer) == {"error"}
    assert re.search(message, answer["error"]), answer["error"]


def test_rest_unknown_paths_and_models(base):
    _, server, images, _, _ = base
    assert _post(f"{server.address}/v2/predict", {})[0] == 404
    assert _post(f"{server.address}/v1/models/other:predict",
                 {"instances": images.tolist()})[0] == 404
    with urllib.request.urlopen(f"{server.address}/v1/models/dvml/versions/1") as response:
        status = json.loads(response.read())["model_version_status"]
    assert [s["version"] for s in status] == ["1"]


# ------------------------------------------------------------------- faults, on real sockets


def _image(value=0):
    return [[[value] * 3] * 105] * 105


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"instances": []}, r'^"instances" is empty: send at least one instance\.$'),
        ({"inputs": {"images": []}}, r"^Input 'images' is an empty batch"),
        ({"instances": [[]]}, r"^Input 'images' holds an empty image \(shape \[1, 0\]: 0 x 0 "
                              r"pixels\); expected uint8 \[None, 105, 105, 3\]"),
        ({"instances": [_image(), [[[0] * 3] * 10] * 10]},
         r"^Input 'images': the instances have different shapes \(e\.g\. \[\[105, 105, 3\], "
         r"\[10, 10, 3\]\]\); one batch must hold images of one size"),
        ({"instances": [_image(True)]},
         r"^Input 'images' holds booleans \(true/false\); expected uint8 values"),
        ({"instances": [[[[1, True, 3]] + [[0] * 3] * 104] + [[[0] * 3] * 105] * 104]},
         r"^Input 'images' holds booleans"),
        ({"signature_name": "embed_bytes", "instances": [{"b64": ""}, {"b64": "AAAA"}]},
         r"^embed_bytes: could not decode image: image_bytes at indices 0, 1 are empty or not "
         r"JPEG/PNG/GIF/BMP/WebP files; send the bytes of the encoded file \(REST: an object "
         r"with the key b64 holding them base64-encoded\)\.$"),
        ({"signature_name": "embed_bytes", "instances": [{"b64": "AAAA"}]},
         r"^embed_bytes: could not decode image: image_bytes at index 0 is empty or not a "
         r"JPEG/PNG/GIF/BMP/WebP file; send"),
    ],
)
def test_rest_bad_batches_get_400_naming_the_problem(base, body, message):
    _, server, _, _, _ = base
    code, answer = _post(f"{server.address}/v1/models/dvml:predict", body)
    assert (code, set(answer)) == (400, {"error"}), answer
    assert re.search(message, answer["error"]), answer["error"]


def _raw_request(port, data, timeout=30):
    """Sends bytes on a fresh connection to 127.0.0.1 and returns everything answered."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def _status_and_answer(response):
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_rest_deep_json_and_bad_content_length_get_400(base):
    _, server, images, references, _ = base
    deep = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    request = (b"POST /v1/models/dvml:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
               + str(len(deep)).encode() + b"\r\n\r\n" + deep)
    status, answer = _status_and_answer(_raw_request(server.port, request))
    assert status == 400
    assert answer == {"error": "The request body nests JSON 100001 levels deep; the limit is 64."}
    for length in (b"abc", b"-5"):
        status, answer = _status_and_answer(_raw_request(
            server.port, b"POST /v1/models/dvml:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: " + length + b"\r\n\r\n{}"))
        assert status == 400
        assert answer == {"error": f"Content-Length {length.decode()!r} is not a number of "
                                   "bytes."}
    # The server still serves.
    code, answer = _post(f"{server.address}/v1/models/dvml:predict",
                         {"instances": images.tolist()})
    assert code == 200
    np.testing.assert_allclose(answer["predictions"], references[2], atol=1e-5)


def test_a_stalled_request_body_times_out_and_others_are_served_meanwhile(base):
    import socket
    import time

    backend, _, images, references, path = base
    with serving.serve_rest(path, backend=backend, read_timeout=1.5) as server:
        stalled = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        dripping = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        try:
            head = (b"POST /v1/models/dvml:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Length: 1000\r\n\r\n")
            stalled.sendall(head + b'{"instances"')  # half a body, then nothing
            dripping.sendall(head)
            started = time.monotonic()
            # Served while the two wait for their bodies.
            code, answer = _post(f"{server.address}/v1/models/dvml:predict",
                                 {"instances": images.tolist()})
            assert code == 200
            np.testing.assert_allclose(answer["predictions"], references[2], atol=1e-5)
            for _ in range(8):  # a byte every 0.5 s: the whole body is still due in 1.5 s
                try:
                    dripping.sendall(b" ")
                except OSError:
                    break
                time.sleep(0.5)
            for connection in (stalled, dripping):
                received = b""
                while chunk := connection.recv(65536):
                    received += chunk
                status, answer = _status_and_answer(received)
                assert status == 408, answer
                assert answer["error"].startswith("The request body was not received within "
                                                  "1.5 s (Content-Length 1000, ")
            assert time.monotonic() - started < 15
        finally:
            stalled.close()
            dripping.close()
        code, _ = _post(f"{server.address}/v1/models/dvml:predict", {"instances": images.tolist()})
        assert code == 200
