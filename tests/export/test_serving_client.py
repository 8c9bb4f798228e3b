"""REST and gRPC clients against the test servers (`dvml_tf.testing.serving`) backed by an
exported SavedModel."""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import task
from dvml_tf.export import saved_model
from dvml_tf.export import serving_client
from dvml_tf.export import verify
from dvml_tf.testing import serving
from dvml_tf.testing import synthetic_data
from dvml_tf.training.config import TrainConfig


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config = TrainConfig(embedding_dim=16)
    keras.utils.set_random_seed(0)
    model = task.build_model(config)
    raw_form, preprocess = task.raw_form(config), task.preprocess_config(config)
    base = tmp_path_factory.mktemp("saved_model")
    saved_model.write_saved_model(model, raw_form, preprocess, str(base / "1"))
    images = synthetic_data.synthetic_raw_images(raw_form, preprocess, 4, seed=3)
    reference = model(raw_form.to_model_input(tf.constant(images), preprocess), training=False)
    backend = serving.SavedModelBackend(base)
    grpc_server = serving.serve_grpc(base, backend=backend)
    rest_server = serving.serve_rest(base, backend=backend)
    yield images, reference.numpy(), grpc_server, rest_server
    grpc_server.stop()
    rest_server.stop()


def _png(images):
    return [tf.io.encode_png(image).numpy() for image in images]


def test_rest_client_embeds_images_and_bytes(served):
    images, reference, _, rest = served
    client = serving_client.RestClient(rest.address, model_name="dvml")
    assert client.status()["model_version_status"][0]["state"] == "AVAILABLE"
    embeddings = client.embed(images)
    assert embeddings.dtype == np.float32 and embeddings.shape == (4, 16)
    assert verify.cosine_rows(reference, embeddings).min() >= 0.99999
    np.testing.assert_allclose(client.embed_bytes(_png(images)), embeddings, atol=1e-6)
    versioned = serving_client.RestClient(rest.address, version=1)
    np.testing.assert_allclose(versioned.embed(images[:1]), embeddings[:1], atol=1e-6)


def test_grpc_client_embeds_images_and_bytes(served):
    images, reference, grpc_server, _ = served
    with serving_client.GrpcClient(grpc_server.address, model_name="dvml") as client:
        embeddings = client.embed(images)
        from_bytes = client.embed_bytes(_png(images))
    assert embeddings.dtype == np.float32 and embeddings.shape == (4, 16)
    assert verify.cosine_rows(reference, embeddings).min() >= 0.99999
    np.testing.assert_array_equal(from_bytes, embeddings)


def test_grpc_bad_requests_get_invalid_argument_and_the_server_survives(served):
    images, _, grpc_server, _ = served
    with serving_client.GrpcClient(grpc_server.address) as client:
        cases = [
            (lambda: client.embed_bytes([_png(images)[0], b"not an image"]),
             "INVALID_ARGUMENT", "could not decode image"),
            (lambda: client.embed_bytes([b""]), "INVALID_ARGUMENT", "could not decode image"),
            (lambda: client.embed_bytes([_png(images)[0][:100]]), "INVALID_ARGUMENT",
             "could not decode image: Invalid PNG data"),
            (lambda: client.predict({"images": images.astype(np.float32)}), "INVALID_ARGUMENT",
             "to be uint8 but float32"),
            (lambda: client.embed(images[:, :50]), "INVALID_ARGUMENT",
             r"must have shape \[None, 105, 105, 3\]"),
            (lambda: client.predict({"image_bytes": np.array([[b"x"]], dtype=object)},
                                    "embed_bytes"), "INVALID_ARGUMENT", r"shape \[None\]"),
            (lambda: client.predict({"pictures": images}), "INVALID_ARGUMENT",
             r"expects inputs \['images'\]"),
            (lambda: client.predict({"images": images}, "embed_text"), "INVALID_ARGUMENT",
             "signature name 'embed_text' not found"),
        ]
        for call, code, message in cases:
            with pytest.raises(serving_client.ServingError, match=message) as error:
                call()
            assert error.value.code == code
        assert client.embed(images[:1]).shape == (1, 16)  # still serving
    with serving_client.GrpcClient(grpc_server.address, model_name="other") as client, \
            pytest.raises(serving_client.ServingError) as error:
        client.embed(images[:1])
    assert error.value.code == "NOT_FOUND"


def test_rest_bad_requests_get_an_error_answer(served):
    images, _, _, rest = served
    client = serving_client.RestClient(rest.address)
    with pytest.raises(serving_client.ServingError, match="could not decode image") as error:
        client.embed_bytes([b"\x89PNG but broken"])
    assert error.value.code == 400
    with pytest.raises(serving_client.ServingError, match="uint8 values") as error:
        client.predict((images / 255.0).tolist())
    assert error.value.code == 400
    with pytest.raises(serving_client.ServingError) as error:
        serving_client.RestClient(rest.address, version=7).embed(images[:1])
    assert error.value.code == 404
    assert client.embed(images[:1]).shape == (1, 16)


def test_clients_check_their_arguments():
    client = serving_client.RestClient("http://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"uint8 array \[N, H, W, 3\]"):
        client.embed(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="list of bytes"):
        client.embed_bytes(b"one file")
    with pytest.raises(ValueError, match=r"encoded_images\[1\] must be bytes"):
        client.embed_bytes([b"a", "b"])


def test_missing_serving_api_names_the_requirements_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_serving", None)
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with pytest.raises(ImportError, match=r"requirements-serving\.txt"):
        serving_client.GrpcClient("127.0.0.1:1")
