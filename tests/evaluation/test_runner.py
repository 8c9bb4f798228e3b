import keras
import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import data
from dvml_tf import models
from dvml_tf.evaluation import runner
from dvml_tf.export import layout


def test_compute_embeddings_keeps_dataset_order_and_labels():
    images = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    labels = np.array([3, 3, 1, 1, 2, 2, 0, 0, 5, 5])
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    embeddings, got_labels = runner.compute_embeddings(lambda x: 2.0 * x, dataset)
    np.testing.assert_array_equal(embeddings, 2.0 * images)
    np.testing.assert_array_equal(got_labels, labels)
    assert embeddings.dtype == np.float32 and got_labels.dtype == np.int64


def test_compute_embeddings_of_an_empty_split_is_an_error():
    empty = tf.data.Dataset.from_tensor_slices((np.zeros((0, 2), np.float32), np.zeros(0, int)))
    with pytest.raises(ValueError, match="empty"):
        runner.compute_embeddings(lambda x: x, empty.batch(4))


def test_inference_function_runs_in_inference_mode():
    # The one embedding wrapper of evaluation and export (the runner's model_embed_fn and
    # backbone_embed_fn before): models.inference_function(model or model.backbone).
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.99)])
    x = np.ones((4, 3), np.float32)
    np.testing.assert_array_equal(models.inference_function(model)(x).numpy(), x)
    backbone = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    backbone.layers[0].moving_mean.assign([1.0, 2.0, 3.0])
    expected = (x - [1.0, 2.0, 3.0]) / np.sqrt(1.0 + backbone.layers[0].epsilon)
    np.testing.assert_allclose(models.inference_function(backbone)(x).numpy(), expected,
                               rtol=1e-6)


def test_distance_metric_is_cosine_exactly_for_normalized_embeddings():
    assert runner.distance_metric(True) == "cosine"
    assert runner.distance_metric(False) == "euclidean"


def test_default_recall_ks_are_the_presets():
    assert runner.default_recall_ks("sop") == (1, 10, 100, 1000)
    assert runner.default_recall_ks("omniglot") == (1, 2, 4, 8)


def test_tables_list_the_metrics_in_the_papers_order_in_percent():
    metrics = {"map@r": 0.5, "recall@2": 0.9, "recall@1": 0.8, "f1": 0.6, "nmi": 0.7}
    assert runner.format_metrics(metrics) == (
        "nmi=0.7000 f1=0.6000 recall@1=0.8000 recall@2=0.9000 map@r=0.5000")
    table = runner.metrics_table(metrics, title="test")
    assert table.splitlines()[1] == "| NMI | F1 | R@1 | R@2 | map@r |"
    assert table.splitlines()[3] == "| 70.0 | 60.0 | 80.0 | 90.0 | 50.0 |"


def test_encoded_images_reads_files_and_bytes(tmp_path):
    (tmp_path / "a.png").write_bytes(b"file-bytes")
    catalog = data.ImageCatalog([0, 1, 2], sources=[str(tmp_path / "a.png"), b"inline",
                                                    str(tmp_path / "gone.png")],
                                source_is_path=[True, False, True])
    assert runner.encoded_images(catalog, [1, 0]) == [b"inline", b"file-bytes"]
    with pytest.raises(FileNotFoundError):
        runner.encoded_images(catalog, [2])
    errors = {}
    assert runner.encoded_images(catalog, [2, 1], errors=errors) == [None, b"inline"]
    assert errors == {2: "file disappeared since the dataset was loaded (deleted or moved): "
                         f"{tmp_path / 'gone.png'}"}
    # A file that became empty since the loader decoded it says so (not "cannot decode").
    (tmp_path / "a.png").write_bytes(b"")
    assert runner.encoded_images(catalog, [0], errors=errors) == [None]
    assert errors[0].startswith("file is empty now, though it was a readable image")
    with pytest.raises(ValueError, match="truncated or replaced since"):
        runner.encoded_images(catalog, [0])
    decoded = data.ImageCatalog([0], images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="decoded pixels"):
        runner.encoded_images(decoded, [0])


def _foreign_saved_model(path):
    class NotAnExport(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def double(self, x):
            return {"y": 2.0 * x}

    module = NotAnExport()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.double})
    return path


def test_a_saved_model_without_the_export_report_is_a_clear_error(tmp_path):
    _foreign_saved_model(tmp_path / "E" / "saved_model" / "3")
    with pytest.raises(FileNotFoundError, match=r"export_report\.json not found: .*3 was not "
                                                r"written by dvml_tf's export\.py"):
        runner.embed_saved_model(tmp_path / "E", dataset="omniglot")
    with pytest.raises(ValueError, match="split must be test, validation or train"):
        runner.saved_model_catalog({"model": {"dataset": "omniglot"}}, split="val")


def test_the_validation_split_of_an_export_is_the_runs_held_out_classes(tmp_path):
    import tensorflow_datasets as tfds

    report = {"model": {"dataset": "omniglot", "validation_classes": 3, "seed": 0}}
    with tfds.testing.mock_data(num_examples=300):
        catalog, _ = runner.saved_model_catalog(report, "validation")
        reference = data.load_dataset("omniglot", validation_classes=3, raw=True)
        assert catalog.labels.tolist() == reference.validation.labels.tolist()
        assert catalog.num_classes == 3
        without = {"model": {"dataset": "omniglot"}}  # an older export, or no held-out classes
        with pytest.raises(ValueError, match="held out no validation classes"):
            runner.saved_model_catalog(without, "validation")
        forced, _ = runner.saved_model_catalog(without, "validation", validation_classes=2)
        assert forced.num_classes == 2


def test_load_embed_bytes_checks_the_signatures(tmp_path):
    path = _foreign_saved_model(tmp_path / "1")
    layout.write_version_report(path, {"model": {"dataset": "omniglot", "normalized": True}})
    with pytest.raises(ValueError, match="needs the 'serving_default' and 'embed_bytes'"):
        runner.load_embed_bytes(str(path))
