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
