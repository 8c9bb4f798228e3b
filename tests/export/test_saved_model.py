"""The serving SavedModel: signatures, inference path only, parity with Keras, saved_model_cli in
fresh processes without dvml_tf, bad inputs."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import data as data_lib
from dvml_tf import task
from dvml_tf.export import saved_model
from dvml_tf.export import verify
from dvml_tf.testing import synthetic_data
from dvml_tf.training.config import TrainConfig

CONFIG = TrainConfig(embedding_dim=16, loss="triplet", images_per_class=2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = task.build_model(CONFIG)
    raw_form, preprocess = task.raw_form(CONFIG), task.preprocess_config(CONFIG)
    path = str(tmp_path_factory.mktemp("export") / "1")
    saved_model.write_saved_model(model, raw_form, preprocess, path)
    images = synthetic_data.synthetic_raw_images(raw_form, preprocess, 6, seed=0)
    reference = model(raw_form.to_model_input(tf.constant(images), preprocess),
                      training=False).numpy()
    return model, (raw_form, preprocess), path, images, reference


@pytest.fixture(scope="module")
def loaded(exported):
    """The export loaded once for the tests that only call its signatures."""
    _, _, path, _, _ = exported
    return tf.saved_model.load(path)


def test_signatures_take_raw_uint8_and_bytes(loaded):
    assert set(loaded.signatures) == {"serving_default", "embed_bytes"}
    serve = loaded.signatures["serving_default"]
    (spec,) = serve.structured_input_signature[1].values()
    assert spec.name == "images" and spec.dtype == tf.uint8
    assert spec.shape.as_list() == [None, 105, 105, 3]
    assert serve.structured_outputs["embedding"].shape.as_list() == [None, 16]
    (spec,) = loaded.signatures["embed_bytes"].structured_input_signature[1].values()
    assert spec.name == "image_bytes" and spec.dtype == tf.string
    assert spec.shape.as_list() == [None]


def test_holds_only_the_backbone_and_the_embedding_head(exported):
    model, _, path, _, _ = exported
    saved = tf.train.list_variables(os.path.join(path, "variables", "variables"))
    weights = [(name, shape) for name, shape in saved if "/.ATTRIBUTES/VARIABLE_VALUE" in name]
    expected = model.backbone.weights + model.embedding_head.weights
    assert sorted(int(np.prod(s)) for _, s in weights) == sorted(
        int(np.prod(w.shape)) for w in expected)
    assert model.use_dvml  # the model has a decoder and variance heads; the export does not
    assert not any("decoder" in n or "variance" in n for n, _ in weights)


def test_both_signatures_match_keras(exported, loaded):
    _, _, _, images, reference = exported
    served = loaded.signatures["serving_default"](images=tf.constant(images))["embedding"]
    assert verify.cosine_rows(reference, served.numpy()).min() >= 0.99999
    # The SavedModel runs the Keras model's own layers: the very same numbers.
    assert np.max(np.abs(served.numpy() - reference)) == 0.0
    png = [tf.io.encode_png(image).numpy() for image in images]
    from_png = loaded.signatures["embed_bytes"](image_bytes=tf.constant(png))["embedding"]
    np.testing.assert_array_equal(from_png.numpy(), served.numpy())
    assert np.max(np.abs(from_png.numpy() - reference)) == 0.0
    # JPEG: the embedding of the decoded JPEG pixels.
    jpeg = tf.io.encode_jpeg(images[0]).numpy()
    decoded = tf.io.decode_jpeg(jpeg, channels=3)[tf.newaxis]
    from_jpeg = loaded.signatures["embed_bytes"](image_bytes=tf.constant([jpeg]))["embedding"]
    expected = loaded.signatures["serving_default"](images=decoded)["embedding"]
    np.testing.assert_allclose(from_jpeg.numpy(), expected.numpy(), atol=1e-6)


def test_empty_batch_gives_no_rows(loaded):
    out = loaded.signatures["serving_default"](images=tf.zeros([0, 105, 105, 3], tf.uint8))
    assert out["embedding"].shape == (0, 16)
    out = loaded.signatures["embed_bytes"](image_bytes=tf.constant([], tf.string))
    assert out["embedding"].shape == (0, 16)


@pytest.mark.slow
def test_saved_model_cli_shows_and_runs_the_signatures_without_dvml_tf(exported, tmp_path):
    _, _, path, images, reference = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    # Fresh processes that cannot import dvml_tf (a package of that name that refuses to load
    # comes first on their path): serving needs none of its code.
    poisoned = tmp_path / "poisoned" / "dvml_tf"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text(
        "raise ImportError('serving the export must not need dvml_tf')\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(poisoned.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    shown = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert shown.returncode == 0, shown.stderr[-3000:]
    text = shown.stdout
    for expected in ("signature_def['serving_default']", "signature_def['embed_bytes']",
                     "dtype: DT_UINT8", "shape: (-1, 105, 105, 3)", "dtype: DT_STRING",
                     "outputs['embedding']"):
        assert expected in text, expected
    # Both signatures from the command line, each in a fresh process; embed_bytes takes the PNG
    # files' bytes as a numpy bytes array.
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "image_bytes.npy", [tf.io.encode_png(image).numpy() for image in images])
    for signature, key in (("serving_default", "images"), ("embed_bytes", "image_bytes")):
        ran = subprocess.run(
            [cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def", signature,
             "--inputs", f"{key}={tmp_path / f'{key}.npy'}", "--outdir", str(tmp_path / key)],
            capture_output=True, text=True, timeout=300, env=env)
        assert ran.returncode == 0, ran.stderr[-3000:]
        out = np.load(tmp_path / key / "embedding.npy")
        assert verify.cosine_rows(reference, out).min() >= 0.99999, signature


def test_wrong_dtype_or_shape_is_a_clear_error(exported, loaded):
    _, _, _, images, _ = exported
    serve = loaded.signatures["serving_default"]
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError), match="uint8"):
        serve(images=tf.constant(images.astype(np.float32)))
    for bad, shape in ((images[:, :28, :28], "6, 28, 28, 3"), (images[0], "105, 105, 3"),
                       (np.concatenate([images, images[..., :1]], -1), "6, 105, 105, 4")):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"assertion failed: \[serving_default: `images` must be uint8 "
                                 r"RGB images \[batch, 105, 105, 3\] [^\]]*; got shape "
                                 rf"\[{shape}\]\]"):
            serve(images=tf.constant(bad))


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (b"", r"\[embed_bytes: could not decode image: image_bytes at index 1 is empty or not "
              r"a JPEG/PNG/GIF/BMP/WebP file; send the bytes of the encoded file \(REST: an "
              r"object with the key b64 holding them base64-encoded\)\.\]"),
        (b"definitely not an image",
         r"could not decode image: image_bytes at index 1 is empty or not a JPEG"),
        ("truncated_png", r"Invalid PNG data"),
        ("truncated_jpeg", r"Invalid JPEG data"),
    ],
)
def test_corrupt_or_empty_bytes_are_a_clear_error(exported, loaded, contents, message):
    _, _, _, images, _ = exported
    embed_bytes = loaded.signatures["embed_bytes"]
    good = tf.io.encode_png(images[0]).numpy()
    if contents == "truncated_png":
        contents = good[:200]
    elif contents == "truncated_jpeg":
        contents = tf.io.encode_jpeg(images[0]).numpy()[:300]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        embed_bytes(image_bytes=tf.constant([good, contents]))


def test_serves_the_models_own_embedder(exported):
    model, (raw_form, preprocess), _, images, reference = exported
    inference, endpoints = saved_model.serving_functions(model, raw_form, preprocess)
    assert set(endpoints) == {"serving_default", "embed_bytes"}
    preprocessor, embedder = inference.layers
    assert isinstance(preprocessor, data_lib.RawImagePreprocessor)
    assert embedder is model.embedder  # the inference path is the model's, not a copy
    assert model.normalize_embeddings and model.embedding_dim == 16
    assert tuple(embedder.inputs[0].shape[1:]) == (28, 28, 3)
    model_input = raw_form.to_model_input(tf.constant(images), preprocess)
    np.testing.assert_array_equal(embedder(model_input).numpy(), reference)
    serve, _ = endpoints["serving_default"]
    np.testing.assert_array_equal(serve(tf.constant(images))["embedding"].numpy(), reference)
    raw = model.unnormalized_embedder()(model_input).numpy()
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), reference,
                               atol=1e-5)
    assert json.dumps(raw_form.to_dict())  # serializable for the report


def test_images_above_the_pixel_limit_fail_the_request_naming_them(exported, loaded, tmp_path):
    from tests.data.oversized import png_bomb

    model, (raw_form, preprocess), _, images, reference = exported
    embed_bytes = loaded.signatures["embed_bytes"]
    good = tf.io.encode_png(images[0]).numpy()
    bomb = png_bomb()  # 20000 x 20000: 1.2 GB decoded, refused from its header in-graph
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        embed_bytes(image_bytes=tf.constant([good, bomb, good, bomb]))
    assert saved_model.error_message(error.value) == (
        "embed_bytes: image_bytes at indices 1 (20000 x 20000 pixels), 3 (20000 x 20000 pixels) "
        "are above the limit of this model, 67108864 pixels (width x height; export.py "
        "--max_image_pixels): downscale such images before sending them.")
    # The limit is the export's: at 11025, 105 x 105 = 11025 pixels pass and 74 x 149 = 11026
    # fail (one export shows both sides of the limit).
    version = str(tmp_path / "11025")
    saved_model.write_saved_model(model, raw_form, preprocess, version, max_pixels=11025)
    signature = tf.saved_model.load(version).signatures["embed_bytes"]
    out = signature(image_bytes=tf.constant([good]))["embedding"].numpy()
    # The check changes no output: the same numbers as the default export's.
    np.testing.assert_array_equal(
        out, embed_bytes(image_bytes=tf.constant([good]))["embedding"].numpy())
    np.testing.assert_allclose(out, reference[:1], atol=1e-6)
    above = tf.io.encode_png(np.zeros([149, 74, 3], np.uint8)).numpy()  # height 149, width 74
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"index 0 \(74 x 149 pixels\) is above"):
        signature(image_bytes=tf.constant([above]))
