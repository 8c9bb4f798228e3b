"""TF Serving warm-up requests written with the SavedModel: the file TF Serving reads, requests it
can replay (against the SavedModel and through the gRPC test double), the note when the optional
package is missing, and the documented batching configuration."""

import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import text_format

from dvml_tf import task
from dvml_tf.export import inference
from dvml_tf.export import layout
from dvml_tf.export import warmup

ROOT = pathlib.Path(__file__).resolve().parents[2]
BATCHING_FILE = ROOT / "examples" / "tf_serving" / "batching_parameters.txt"

pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")


def replay(loaded, request):
    """Runs one PredictRequest against a loaded SavedModel, as TF Serving's warm-up does."""
    signature = loaded.signatures[request.model_spec.signature_name]
    inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
    return signature(**inputs)["embedding"].numpy()


def test_the_export_writes_replayable_warmup_requests(tiny_export):
    version_dir = tiny_export.result.saved_model_dir
    path = pathlib.Path(version_dir, layout.ASSETS_EXTRA_DIR, warmup.WARMUP_FILE)
    assert path.is_file()
    # TFRecord of PredictionLog protos, each with a predict_log.request.
    from tensorflow_serving.apis import prediction_log_pb2

    records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in records]
    assert all(log.WhichOneof("log_type") == "predict_log" for log in logs)
    requests = [log.predict_log.request for log in logs]
    assert [(r.model_spec.signature_name, list(r.inputs)) for r in requests] == [
        ("serving_default", ["images"]), ("serving_default", ["images"]),
        ("embed_bytes", ["image_bytes"]), ("embed_bytes", ["image_bytes"])]
    report = tiny_export.result.report["warmup"]
    assert report["file"] == "assets.extra/tf_serving_warmup_requests"
    assert report["images"] == "test split"
    assert [r["batch"] for r in report["requests"]] == [1, 4, 1, 4]
    # Real test images in the raw form: the batch of serving_default holds the split's first 4.
    images = tf.make_ndarray(requests[1].inputs["images"])
    assert images.dtype == np.uint8 and images.shape == (4, 105, 105, 3)
    np.testing.assert_array_equal(images, tiny_export.splits.test.images[:4])
    # Replayed against the SavedModel, the requests give the Keras model's embeddings of those
    # images (embed_bytes receives them PNG-encoded, which is lossless).
    loaded = tf.saved_model.load(version_dir)
    model = inference.inference_model(tiny_export.model, task.raw_form(tiny_export.config),
                                      task.preprocess_config(tiny_export.config))
    expected = model(tf.constant(images)).numpy()
    for request in requests:
        out = replay(loaded, request)
        np.testing.assert_allclose(out, expected[:len(out)], atol=1e-5)


def test_warmup_requests_replay_through_the_grpc_test_double(tiny_export):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from dvml_tf.testing import serving

    version_dir = tiny_export.result.saved_model_dir
    requests = warmup.read_warmup_requests(version_dir)
    loaded = tf.saved_model.load(version_dir)
    base = pathlib.Path(version_dir).parent
    import grpc

    with serving.serve_grpc(base) as server, grpc.insecure_channel(server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for request in requests:
            response = stub.Predict(request, timeout=60)  # sent as stored, model name included
            out = tf.make_ndarray(response.outputs["embedding"])
            np.testing.assert_allclose(out, replay(loaded, request), atol=1e-6)


def test_without_tensorflow_serving_api_the_file_is_skipped_with_a_note(tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(warmup, "_apis", lambda: None)
    record = warmup.write_warmup_requests(str(tmp_path), np.zeros((2, 8, 8, 3), np.uint8))
    assert record["file"] is None and "tensorflow-serving-api is not installed" in record["note"]
    assert not (tmp_path / layout.ASSETS_EXTRA_DIR / warmup.WARMUP_FILE).exists()
    with pytest.raises(ImportError, match="tensorflow-serving-api"):
        warmup.predict_requests(np.zeros((1, 8, 8, 3), np.uint8))


def batching_parameters_class():
    """TF Serving's BatchingParameters message (session_bundle_config.proto), which the
    tensorflow-serving-api wheel does not ship: built here from its field list."""
    file = descriptor_pb2.FileDescriptorProto(name="dvml_test_batching.proto",
                                              package="dvml_test", syntax="proto3",
                                              dependency=["google/protobuf/wrappers.proto"])
    message = file.message_type.add(name="BatchingParameters")
    label, optional = (descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
                       descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    types = descriptor_pb2.FieldDescriptorProto
    for number, name, kind, type_name, repeated in (
        (1, "max_batch_size", types.TYPE_MESSAGE, ".google.protobuf.Int64Value", False),
        (2, "batch_timeout_micros", types.TYPE_MESSAGE, ".google.protobuf.Int64Value", False),
        (3, "max_enqueued_batches", types.TYPE_MESSAGE, ".google.protobuf.Int64Value", False),
        (4, "num_batch_threads", types.TYPE_MESSAGE, ".google.protobuf.Int64Value", False),
        (5, "thread_pool_name", types.TYPE_MESSAGE, ".google.protobuf.StringValue", False),
        (6, "allowed_batch_sizes", types.TYPE_INT64, None, True),
        (7, "pad_variable_length_inputs", types.TYPE_BOOL, None, False),
    ):
        field = message.field.add(name=name, number=number, type=kind,
                                  label=label if repeated else optional)
        if type_name:
            field.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    from google.protobuf import wrappers_pb2

    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("dvml_test.BatchingParameters"))


def test_the_documented_batching_configuration_is_valid_and_shown_in_the_docs():
    text = BATCHING_FILE.read_text()
    params = text_format.Parse(text, batching_parameters_class()())  # unknown fields fail
    sizes = list(params.allowed_batch_sizes)
    # TF Serving's rules: increasing, and the last one equals max_batch_size.
    assert sizes == sorted(set(sizes)) and sizes[-1] == params.max_batch_size.value
    assert params.num_batch_threads.value >= 1 and params.batch_timeout_micros.value > 0
    # Photos of any size reach serving_default unpadded: padding would change the pixels.
    assert not params.pad_variable_length_inputs
    docs = (ROOT / "docs" / "deployment.md").read_text()
    block = re.search(r"```\n# examples/tf_serving/batching_parameters.txt\n(.*?)```", docs, re.S)
    assert block, "docs/deployment.md must show the batching file"
    assert block.group(1).strip() == "\n".join(
        line for line in text.strip().splitlines()).strip()
