import keras
import numpy as np
import pytest
import tensorflow as tf

from dvml_tf.evaluation import runner


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


def test_model_embed_fn_runs_in_inference_mode():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.99)])
    x = np.ones((4, 3), np.float32)
    np.testing.assert_array_equal(runner.model_embed_fn(model)(x).numpy(), x)


def test_tables_list_the_metrics_in_the_papers_order_in_percent():
    metrics = {"map@r": 0.5, "recall@2": 0.9, "recall@1": 0.8, "f1": 0.6, "nmi": 0.7}
    assert runner.format_metrics(metrics) == (
        "nmi=0.7000 f1=0.6000 recall@1=0.8000 recall@2=0.9000 map@r=0.5000")
    table = runner.metrics_table(metrics, title="test")
    assert table.splitlines()[1] == "| NMI | F1 | R@1 | R@2 | map@r |"
    assert table.splitlines()[3] == "| 70.0 | 60.0 | 80.0 | 90.0 | 50.0 |"


def test_encoded_images_reads_files_and_bytes(tmp_path):
    from dvml_tf import data

    (tmp_path / "a.png").write_bytes(b"file-bytes")
    catalog = data.ImageCatalog([0, 1], sources=[str(tmp_path / "a.png"), b"inline"],
                                source_is_path=[True, False])
    assert runner.encoded_images(catalog, [1, 0]) == [b"inline", b"file-bytes"]
    decoded = data.ImageCatalog([0], images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="decoded pixels"):
        runner.encoded_images(decoded, [0])
