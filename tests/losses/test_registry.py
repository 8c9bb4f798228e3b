import numpy as np
import pytest
import tensorflow as tf

from dvml_tf import losses


def test_every_name_builds_and_round_trips_its_config():
    for name, cls in losses.METRIC_LOSSES.items():
        loss = losses.get_metric_loss(name)
        assert isinstance(loss, cls)
        clone = cls.from_config(loss.get_config())
        assert clone.get_config() == loss.get_config()


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"valid losses: triplet, npair, triplet2_dws"):
        losses.get_metric_loss("lifted")


@pytest.mark.parametrize("name", list(losses.METRIC_LOSSES))
def test_shape_errors_name_the_problem(name):
    loss = losses.get_metric_loss(name)
    with pytest.raises(ValueError, match="6 embeddings but 4 labels"):
        loss(np.zeros((6, 3), np.float32), np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"shape \[batch\]"):
        loss(np.zeros((4, 3), np.float32), np.zeros((4, 1), np.int32))
    with pytest.raises(ValueError, match=r"\[\.\.\., batch, dim\]"):
        loss(np.zeros((4,), np.float32), np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="integers"):
        loss(np.zeros((4, 3), np.float32), np.array([0.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("name", list(losses.METRIC_LOSSES))
def test_batch_with_single_images_is_rejected(name):
    loss = losses.get_metric_loss(name)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"K >= 2|laid out in pairs"):
        loss(x, np.array([0, 1, 2, 3]))


@pytest.mark.parametrize("name", list(losses.METRIC_LOSSES))
def test_mixed_precision_inputs_are_computed_in_float32(name):
    x = tf.random.normal((8, 4), dtype=tf.float16)
    loss = losses.get_metric_loss(name)
    value = loss(x, tf.constant([0, 0, 1, 1, 2, 2, 3, 3]), seed=tf.constant([1, 2], tf.int64))
    assert value.dtype == tf.float32
