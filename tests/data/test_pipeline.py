"""Training and evaluation pipelines over decoded, encoded and file-backed catalogs."""

import io
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from dvml_tf.data.catalog import ImageCatalog
from dvml_tf.data.pipeline import load_thumbnails
from dvml_tf.data.pipeline import make_eval_dataset
from dvml_tf.data.pipeline import make_train_dataset
from dvml_tf.data.preprocessing import PreprocessConfig
from dvml_tf.data.sampler import ClassBalancedSampler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Resize to the stored size (an identity), so pixels can be checked exactly.
SMALL = PreprocessConfig(resize_size=20, crop_size=16, random_flip=True)


def constant_catalog(num_classes=12, per_class=5, channels=3):
    """Image i is a constant 20 x 20 image of value 4 * i: any crop or flip still names it."""
    n = num_classes * per_class
    labels = np.repeat(np.arange(num_classes) * 7 + 1, per_class)
    values = (4 * np.arange(n)).astype(np.uint8)
    images = np.broadcast_to(values[:, None, None, None], (n, 20, 20, channels)).copy()
    return ImageCatalog(labels, images=images, num_channels=channels)


def textured_images(n, size=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def take(dataset, n):
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(n)]


def test_train_batches_hold_the_sampled_images_and_labels():
    catalog = constant_catalog()
    sampler = ClassBalancedSampler(catalog.labels, classes_per_batch=4, images_per_class=3,
                                   seed=1)
    for step, (images, labels) in enumerate(take(make_train_dataset(catalog, sampler, SMALL), 6)):
        assert images.shape == (12, 16, 16, 3) and images.dtype == np.float32
        indices = sampler.batch_indices(step)
        np.testing.assert_array_equal(images[:, 0, 0, 0], 4 * indices)
        np.testing.assert_array_equal(labels, catalog.labels[indices])
        assert images.min() >= 0 and images.max() <= 255


def test_train_pipeline_is_deterministic_resumable_and_replica_invariant():
    labels = np.repeat(np.arange(8), 4)
    catalog = ImageCatalog(labels, images=textured_images(32))
    sampler = ClassBalancedSampler(labels, classes_per_batch=4, images_per_class=2, seed=3)
    full = take(make_train_dataset(catalog, sampler, SMALL, num_steps=6), 6)
    again = take(make_train_dataset(catalog, sampler, SMALL, num_steps=6), 6)
    resumed = take(make_train_dataset(catalog, sampler, SMALL, start_step=4), 2)
    halves = [take(make_train_dataset(catalog, sampler, SMALL, num_steps=6, replica_id=r,
                                      num_replicas=2), 6) for r in range(2)]
    for step in range(6):
        np.testing.assert_array_equal(full[step][0], again[step][0])
        merged = np.concatenate([halves[0][step][0], halves[1][step][0]])
        np.testing.assert_array_equal(merged, full[step][0])
        np.testing.assert_array_equal(
            np.concatenate([halves[0][step][1], halves[1][step][1]]), full[step][1])
    for got, want in zip(resumed, full[4:], strict=True):
        np.testing.assert_array_equal(got[0], want[0])
    other_seed = take(make_train_dataset(catalog, sampler, SMALL, seed=99), 1)
    assert not np.array_equal(other_seed[0][0], full[0][0])


@pytest.mark.parametrize("storage", ["decoded", "encoded", "files", "mixed"])
def test_eval_dataset_returns_every_image_once_in_order(storage, tmp_path):
    images = textured_images(10, seed=4)
    labels = np.array([5, 5, 6, 6, 7, 7, 8, 8, 9, 9])
    encoded = [png_bytes(im) for im in images]
    paths = []
    for i, data in enumerate(encoded):
        paths.append(str(tmp_path / f"{i}.png"))
        with open(paths[-1], "wb") as f:
            f.write(data)
    if storage == "decoded":
        catalog = ImageCatalog(labels, images=images)
    elif storage == "encoded":
        catalog = ImageCatalog(labels, sources=encoded)
    elif storage == "files":
        catalog = ImageCatalog(labels, sources=paths, source_is_path=True)
    else:
        is_path = np.arange(10) % 3 == 0
        sources = [p if f else e for p, e, f in zip(paths, encoded, is_path, strict=True)]
        catalog = ImageCatalog(labels, sources=sources, source_is_path=is_path)
    assert catalog.storage == storage
    batches = take(make_eval_dataset(catalog, SMALL, batch_size=4), 10)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    got = np.concatenate([x for x, _ in batches])
    np.testing.assert_array_equal(got, images[:, 2:18, 2:18].astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)


def test_grayscale_catalog_gives_three_channels():
    catalog = constant_catalog(channels=1)
    config = PreprocessConfig(resize_size=20, crop_size=16, random_flip=False)
    images, _ = take(make_eval_dataset(catalog, config, batch_size=8), 1)[0]
    assert images.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    sampler = ClassBalancedSampler(catalog.labels, 2, 2)
    images, _ = take(make_train_dataset(catalog, sampler, config), 1)[0]
    assert images.shape == (4, 16, 16, 3)


def test_thumbnails():
    catalog = constant_catalog(channels=1)
    thumbs = load_thumbnails(catalog, [3, 0, 7], size=8)
    assert thumbs.shape == (3, 8, 8, 3) and thumbs.dtype == np.uint8
    np.testing.assert_array_equal(thumbs[:, 0, 0, 0], [12, 0, 28])
    with pytest.raises(ValueError, match="indices must be in"):
        load_thumbnails(catalog, [60])


def test_sampler_must_match_the_catalog():
    catalog = constant_catalog()
    sampler = ClassBalancedSampler(catalog.labels[:30], 2, 2)
    with pytest.raises(ValueError, match="built on 30 labels"):
        make_train_dataset(catalog, sampler, SMALL)


def test_sop_scale_encoded_catalog():
    # 60,000 encoded images (SOP's test split size) of ~1 kB each, labels shaped like SOP's.
    rng = np.random.default_rng(0)
    counts = rng.integers(2, 13, size=9000)
    counts = counts[np.cumsum(counts) <= 60_000]
    labels = np.repeat(np.arange(len(counts)), counts)
    labels = np.concatenate([labels, np.full(60_000 - len(labels), len(counts))])
    pool = [png_bytes(np.full((20, 20, 3), v, np.uint8)) + b"\0" * 900 for v in range(250)]
    started = time.perf_counter()
    catalog = ImageCatalog(labels, sources=[pool[i % 250] for i in range(60_000)])
    sampler = ClassBalancedSampler(labels, classes_per_batch=32, images_per_class=2)
    dataset = make_train_dataset(catalog, sampler, SMALL, start_step=10_000)
    batches = take(dataset, 5)
    elapsed = time.perf_counter() - started
    for step, (images, batch_labels) in enumerate(batches, start=10_000):
        indices = sampler.batch_indices(step)
        np.testing.assert_array_equal(images[:, 0, 0, 0], indices % 250)
        np.testing.assert_array_equal(batch_labels, labels[indices])
    assert elapsed < 30, f"{elapsed:.1f} s"


@pytest.mark.slow
def test_mirrored_strategy_gives_each_replica_whole_classes():
    script = textwrap.dedent("""
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from dvml_tf.data.catalog import ImageCatalog
        from dvml_tf.data.pipeline import make_train_dataset
        from dvml_tf.data.preprocessing import PreprocessConfig
        from dvml_tf.data.sampler import ClassBalancedSampler
        labels = np.repeat(np.arange(10), 3)
        images = np.random.default_rng(0).integers(0, 256, (30, 20, 20, 3), np.uint8)
        catalog = ImageCatalog(labels, images=images)
        sampler = ClassBalancedSampler(labels, 4, 3, seed=0)
        config = PreprocessConfig(20, 16)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        dataset = strategy.experimental_distribute_dataset(
            make_train_dataset(catalog, sampler, config))
        for step, (x, y) in zip(range(3), dataset):
            parts = [t.numpy() for t in strategy.experimental_local_results(y)]
            assert [len(p) for p in parts] == [6, 6], parts
            assert not set(parts[0]) & set(parts[1]), parts
            np.testing.assert_array_equal(np.concatenate(parts),
                                          labels[sampler.batch_indices(step)])
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
