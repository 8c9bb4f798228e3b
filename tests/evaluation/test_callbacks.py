"""RetrievalMetricsCallback under model.fit: the metrics of held-out data every N epochs, in
History, seen by EarlyStopping, equal to an independent computation, and in TensorBoard."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import dvml_tf
from dvml_tf import data as data_lib
from dvml_tf.evaluation import RetrievalMetricsCallback
from dvml_tf.evaluation import evaluate_embeddings

SIZE = 28


def _batches(prototypes):
    """Learnable P x K batches: 8 classes x 2 noisy copies of class prototypes."""
    step = 0
    while True:
        classes = np.random.default_rng(step).choice(len(prototypes), 8, replace=False)
        labels = np.repeat(classes, 2)
        noise = np.random.default_rng(1000 + step).normal(0, 20, (16, SIZE, SIZE, 3))
        yield np.clip(prototypes[labels] + noise, 0, 255).astype("float32"), labels
        step += 1


def _held_out(num_classes=6, per_class=4, seed=7):
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, (num_classes, SIZE, SIZE, 3))
    labels = np.repeat(np.arange(num_classes), per_class)
    images = np.clip(prototypes[labels] + rng.normal(0, 20, (len(labels), SIZE, SIZE, 3)),
                     0, 255).astype("float32")
    return images, labels


def _recall_at_1_by_hand(embeddings, labels, cosine):
    """Brute force: each image's nearest other image has its label."""
    if cosine:
        embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    distances = ((embeddings[:, None] - embeddings[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    return float(np.mean(labels[distances.argmin(1)] == labels))


@pytest.mark.parametrize("loss", ["npair", "triplet"])  # unnormalized and normalized embeddings
def test_metrics_every_n_epochs_in_history_early_stopping_and_tensorboard(tmp_path, loss):
    keras.utils.set_random_seed(0)
    backbone = dvml_tf.build_backbone("convnet_small", input_shape=(SIZE, SIZE, 3))
    model = dvml_tf.DVMLModel(backbone, loss, embedding_dim=16, num_samples=2, phase1_steps=6)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images, labels = _held_out()
    callback = RetrievalMetricsCallback((images, labels), every_n_epochs=2, recall_ks=(1, 2, 4),
                                        log_dir=tmp_path / "tb", batch_size=10)
    snapshots = {}
    remember = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: snapshots.update({epoch: model.predict(images,
                                                                                verbose=0)}))
    early = keras.callbacks.EarlyStopping(monitor="val_recall@1", mode="max", patience=100)
    prototypes = np.random.default_rng(0).uniform(0, 255, (20, SIZE, SIZE, 3))
    history = model.fit(_batches(prototypes), steps_per_epoch=4, epochs=4, verbose=0,
                        callbacks=[callback, remember, early])

    keys = ["val_recall@1", "val_recall@2", "val_recall@4", "val_map@r"]
    assert len(history.history["loss"]) == 4
    for key in keys:
        assert len(history.history[key]) == 2, key  # epochs 2 and 4 only
    assert sorted(callback.history) == [1, 3]
    cosine = loss == "triplet"
    assert bool(model.normalize_embeddings) == cosine
    metric = "cosine" if cosine else "euclidean"
    for position, epoch in enumerate((1, 3)):
        # Independently, from the model's own predictions at that epoch.
        expected = evaluate_embeddings(snapshots[epoch], labels, recall_ks=(1, 2, 4),
                                       metric=metric, compute_clustering=False)
        for key in keys:
            assert history.history[key][position] == pytest.approx(
                expected[key.removeprefix("val_")], abs=1e-6), (key, epoch)
        assert history.history["val_recall@1"][position] == pytest.approx(
            _recall_at_1_by_hand(snapshots[epoch], labels, cosine), abs=1e-6)
    assert early.best == max(history.history["val_recall@1"])

    # TensorBoard: one scalar per metric at the epochs evaluated.
    scalars = {}
    for path in glob.glob(os.path.join(tmp_path / "tb", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = float(
                    tf.make_ndarray(value.tensor))
    assert set(scalars) == set(keys)
    for key in keys:
        assert sorted(scalars[key]) == [1, 3]
        assert [scalars[key][1], scalars[key][3]] == pytest.approx(history.history[key])


def test_catalogs_and_datasets_and_bad_arguments(tmp_path):
    images, labels = _held_out(num_classes=3, per_class=2)
    keras.utils.set_random_seed(0)
    model = dvml_tf.DVMLModel(dvml_tf.build_backbone("convnet_small", input_shape=(SIZE,) * 2
                                                     + (3,)), "npair", embedding_dim=8)
    catalog = data_lib.ImageCatalog(labels, images=images.astype(np.uint8))
    preprocess = data_lib.PreprocessConfig(resize_size=SIZE, crop_size=SIZE, random_flip=False)
    results = []
    for data, extra in ((catalog, {"preprocess": preprocess}),
                        (tf.data.Dataset.from_tensor_slices((images, labels)).batch(4), {}),
                        ((images, labels), {})):
        callback = RetrievalMetricsCallback(data, recall_ks=(1,), compute_clustering=True,
                                            **extra)
        callback.set_model(model)
        logs = {}
        callback.on_epoch_end(0, logs)
        assert set(logs) == {"val_nmi", "val_f1", "val_recall@1", "val_map@r"}
        results.append(logs)
    assert results[0] == pytest.approx(results[1]) and results[1] == pytest.approx(results[2])
    with pytest.raises(ValueError, match="every_n_epochs must be an integer >= 1"):
        RetrievalMetricsCallback((images, labels), every_n_epochs=0)
    with pytest.raises(ValueError, match="needs preprocess="):
        RetrievalMetricsCallback(catalog)
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        RetrievalMetricsCallback((images[:4], labels[:3]))
    with pytest.raises(ValueError, match="recall_ks must be integers >= 1"):
        RetrievalMetricsCallback((images, labels), recall_ks=(0,))
