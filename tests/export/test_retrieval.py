"""retrieval.tflite: top-k gallery rows and scores equal a numpy brute force over the gallery."""

import json

import keras
import numpy as np
import pytest

from dvml_tf import task
from dvml_tf.export import inference as inference_lib
from dvml_tf.export import retrieval
from dvml_tf.testing import synthetic_data
from dvml_tf.training.config import TrainConfig

TOP_K = 5


@pytest.fixture(scope="module", params=["npair", "triplet"])
def retriever(request):
    config = TrainConfig(embedding_dim=16, loss=request.param)
    keras.utils.set_random_seed(0)
    model = task.build_model(config)
    spec = task.raw_form(config), task.preprocess_config(config)
    splits = synthetic_data.synthetic_raw_splits(*spec, train_classes=2, test_classes=6,
                                                 images_per_class=3)
    gallery, labels = inference_lib.embed_raw(inference_lib.inference_model(model, *spec),
                                              splits.test)
    content = retrieval.convert_retrieval_model(model, *spec, gallery, TOP_K,
                                                gallery_labels=labels)
    return model, spec, splits, gallery, labels, retrieval.Retriever(content)


def _brute_force(query, gallery, normalized):
    """Best-first gallery rows by cosine or by squared Euclidean distance (float64)."""
    query, gallery = query.astype(np.float64), gallery.astype(np.float64)
    if normalized:
        scores = gallery @ query / (np.linalg.norm(gallery, axis=1) * np.linalg.norm(query))
    else:
        scores = -np.sum((gallery - query) ** 2, axis=1)
    order = np.argsort(-scores, kind="stable")
    return order, scores


def test_top_k_equals_a_brute_force_search(retriever):
    model, spec, splits, gallery, _, runner = retriever
    normalized = model.normalize_embeddings
    raw_form, preprocess = spec
    queries = synthetic_data.synthetic_raw_images(raw_form, preprocess, 3, seed=7)
    queries = np.concatenate([queries, splits.test.images[[0, 7]]])
    for image in queries:
        query = model.embedder(raw_form.to_model_input(image[np.newaxis], preprocess)).numpy()[0]
        order, scores = _brute_force(query, gallery, normalized)
        indices, got = runner.query(image)
        assert indices.dtype == np.int32 and indices.shape == (TOP_K,)
        np.testing.assert_allclose(got, scores[indices], rtol=1e-4, atol=1e-4)
        # Same rows, up to ties within float noise.
        np.testing.assert_allclose(np.sort(scores[indices]), np.sort(scores[order[:TOP_K]]),
                                   rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(got) <= 1e-6)  # best first


def test_a_gallery_image_finds_itself_first(retriever):
    model, _, splits, _, labels, runner = retriever
    for row in (0, 5, 11):
        indices, scores = runner.query(splits.test.images[row])
        assert indices[0] == row
        # The labels come out of the model itself, row for row.
        np.testing.assert_array_equal(runner.last_labels(), labels[indices])
        assert runner.last_labels().dtype == np.int32
        if model.normalize_embeddings:
            assert scores[0] == pytest.approx(1.0, abs=1e-5)
        else:
            assert scores[0] == pytest.approx(0.0, abs=1e-3)
        assert labels[indices[0]] == splits.test.labels[row]


def test_gallery_json_describes_every_row(retriever, tmp_path):
    model, _, splits, _, labels, _ = retriever
    path = tmp_path / retrieval.GALLERY_FILE
    retrieval.write_gallery_json(path, labels, catalog=splits.test, dataset="omniglot",
                                 top_k=TOP_K, normalized=model.normalize_embeddings)
    content = json.loads(path.read_text())
    assert content["labels"] == splits.test.labels.tolist()
    assert content["num_images"] == len(labels) and content["top_k"] == TOP_K
    expected = "cosine" if model.normalize_embeddings else "negative_squared_euclidean"
    assert content["score"] == expected


def test_bad_gallery_or_k_is_a_clear_error(retriever):
    model, spec, _, gallery, _, runner = retriever
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 18\]"):
        retrieval.convert_retrieval_model(model, *spec, gallery, 19)
    with pytest.raises(ValueError, match=r"gallery_embeddings must be \[N >= 1, 16\]"):
        retrieval.convert_retrieval_model(model, *spec, gallery[:, :8], 3)
    with pytest.raises(ValueError, match=r"uint8 \[1, 105, 105, 3\]"):
        runner.query(np.zeros((28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match=r"gallery_labels must be integers \[18\]"):
        retrieval.convert_retrieval_model(model, *spec, gallery, 3, gallery_labels=np.zeros(17))


def test_a_retriever_without_labels_says_so(retriever):
    model, spec, splits, gallery, _, _ = retriever
    runner = retrieval.Retriever(retrieval.convert_retrieval_model(model, *spec, gallery, 2))
    assert not runner.has_labels
    assert runner.query(splits.test.images[0])[0].shape == (2,)
    with pytest.raises(ValueError, match="without gallery_labels"):
        runner.last_labels()
