"""TFDS loaders under `tfds.testing.mock_data`, and the offline fast failure (no network used)."""

import socket
import time
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dvml_tf.data import datasets
from dvml_tf.data import load_dataset
from dvml_tf.data import raw_form_of
from dvml_tf.data.catalog import ImageCatalog
from dvml_tf.data.catalog import materialize
from dvml_tf.data.raw_form import NO_CONVERSION
from dvml_tf.data.raw_form import OMNIGLOT_INK
from dvml_tf.data.raw_form import RawForm

# name -> (label boundary, number of label ids) of the zero-shot split, from the paper's §4.
SPLITS = {"omniglot": (964, 1623), "cub200": (100, 200), "cars196": (98, 196),
          "sop": (11318, 22634)}
# Mock labels are uniform over all label ids: enough examples per split that a few training
# classes get two images (birthday paradox), which the training-class check requires.
MOCK_EXAMPLES = {"omniglot": 300, "cub200": 60, "cars196": 60, "sop": 1500}


@pytest.fixture
def no_network():
    """Fails the test if the loader tries to check (let alone use) the network."""
    with mock.patch.object(datasets, "download_host_reachable",
                           side_effect=AssertionError("network checked")) as check:
        yield check


@pytest.mark.parametrize("name", list(SPLITS))
def test_mock_splits_are_class_disjoint_and_on_the_right_side(name, no_network, tmp_path):
    boundary, num_labels = SPLITS[name]
    num_examples = MOCK_EXAMPLES[name]
    with tfds.testing.mock_data(num_examples=num_examples):
        splits = load_dataset(name, data_dir=str(tmp_path / "never_created"))
    train, test = splits.train, splits.test
    assert train.num_images > 0 and test.num_images > 0
    assert train.labels.max() < boundary <= test.labels.min()
    assert test.labels.max() < num_labels
    assert not set(train.classes.tolist()) & set(test.classes.tolist())
    assert train.num_classes == len(np.unique(train.labels))
    assert len(train.class_names) == num_labels
    if name in ("cub200", "cars196"):
        # Merged and re-split: every mock example lands in exactly one split.
        assert train.num_images + test.num_images == 2 * num_examples
    image = test.image(0)
    assert image.dtype == np.uint8 and image.ndim == 3
    if name == "omniglot":
        assert splits.grayscale and splits.num_channels == 1
        assert train.storage == "decoded" and train.images.shape[1:] == (32, 32, 1)
    else:
        assert not splits.grayscale and splits.num_channels == 3
        assert train.storage == "encoded" and image.shape[-1] == 3
    no_network.assert_not_called()


def test_logs_classes_and_images_per_split(caplog, no_network):
    with caplog.at_level("INFO", logger="absl"), tfds.testing.mock_data(num_examples=30):
        splits = load_dataset("cub200")
    for split, catalog in splits.splits().items():
        assert (f"cub200 {split}: {catalog.num_classes} classes, {catalog.num_images} images"
                in caplog.text)


def test_validation_classes_are_carved_from_training_classes(no_network):
    with tfds.testing.mock_data(num_examples=200):
        plain = load_dataset("cub200")
        splits = load_dataset("cub200", validation_classes=5, seed=7)
        same = load_dataset("cub200", validation_classes=5, seed=7)
        other = load_dataset("cub200", validation_classes=5, seed=8)
    val = set(splits.validation.classes.tolist())
    assert len(val) == 5 and val <= set(plain.train.classes.tolist())
    assert not val & set(splits.train.classes.tolist())
    assert set(splits.train.classes.tolist()) | val == set(plain.train.classes.tolist())
    np.testing.assert_array_equal(splits.test.labels, plain.test.labels)
    assert set(same.validation.classes.tolist()) == val
    assert set(other.validation.classes.tolist()) != val
    with pytest.raises(ValueError, match="validation_classes=500"), \
            tfds.testing.mock_data(num_examples=50):
        load_dataset("cub200", validation_classes=500)


def test_image_size_holds_other_datasets_decoded(no_network):
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES["cars196"]):
        splits = load_dataset("cars196", image_size=24)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES["omniglot"]):
        omniglot = load_dataset("omniglot", image_size=105)
    assert splits.train.storage == "decoded" and splits.train.images.shape[1:] == (24, 24, 3)
    assert omniglot.train.images.shape[1:] == (105, 105, 1)
    assert splits.raw_form == RawForm(NO_CONVERSION, 24)
    assert omniglot.raw_form == RawForm(OMNIGLOT_INK, 105, (105, 105))


def test_image_size_keeps_large_datasets_encoded(no_network, caplog):
    with mock.patch.object(datasets, "MAX_DECODED_BYTES", 1000), caplog.at_level("WARNING"), \
            tfds.testing.mock_data(num_examples=MOCK_EXAMPLES["cars196"]):
        splits = load_dataset("cars196", image_size=24)
    assert splits.train.storage == "encoded"
    assert "keeping them encoded" in caplog.text
    assert splits.raw_form == RawForm() and not splits.raw_form.resized


def test_omniglot_ink_becomes_bright_on_black():
    # Black strokes on white, like the real Omniglot PNGs (105 x 105 x 3).
    image = np.full((105, 105, 3), 255, np.uint8)
    image[20:80, 45:55] = 0
    buffer = tf.io.encode_png(image).numpy()
    catalog = ImageCatalog(np.array([0]), sources=[buffer], num_channels=3)
    out = materialize(catalog, RawForm(OMNIGLOT_INK, 105)).images[0, ..., 0]
    assert out[50, 52] == 255 and out[5, 5] == 0 and out[50, 10] == 0
    small = materialize(catalog, RawForm(OMNIGLOT_INK, 32)).images[0, ..., 0]
    assert small.max() > 200 and small[:5].max() == 0
    with pytest.raises(ValueError, match="nothing to materialize"):
        materialize(catalog, RawForm(OMNIGLOT_INK))  # kept encoded: no stored size


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="omniglot, cub200, cars196, sop, folder"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("omniglot", image_size=0)


def test_mock_data_is_detected():
    assert not datasets.tfds_is_mocked()
    with tfds.testing.mock_data(num_examples=1):
        assert datasets.tfds_is_mocked()


@pytest.mark.parametrize("name", ["omniglot", "sop", "cars196"])
def test_unprepared_dataset_offline_fails_fast(name, tmp_path):
    started = time.monotonic()
    with mock.patch.object(datasets, "download_host_reachable", return_value=False) as check, \
            pytest.raises(FileNotFoundError) as error:
        load_dataset(name, data_dir=str(tmp_path / "nonexistent"))
    assert time.monotonic() - started < 5
    check.assert_called_once()
    message = str(error.value)
    assert "TFDS_DATA_DIR" in message and "data_dir" in message
    assert "not prepared" in message and "cannot be reached" in message
    if name == "cars196":
        assert "broken upstream" in message and "folder" in message


def test_cars196_download_failure_points_to_the_folder_layout(tmp_path):
    with mock.patch.object(datasets, "download_host_reachable", return_value=True), \
            mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                              side_effect=OSError("404 Not Found")), \
            mock.patch.object(datasets, "tfds_is_mocked", return_value=False), \
            pytest.raises(FileNotFoundError, match=r"404 Not Found.*folder"):
        load_dataset("cars196", data_dir=str(tmp_path))


def test_host_check_is_bounded_and_correct():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert datasets.download_host_reachable("127.0.0.1", port, timeout=2)
    # The port is closed now: refused at once.
    assert not datasets.download_host_reachable("127.0.0.1", port, timeout=2)
    started = time.monotonic()
    # ".invalid" never resolves (RFC 6761); a hanging resolver is cut off by the timeout.
    assert not datasets.download_host_reachable("dvml-tf-test.invalid", 443, timeout=1.0)
    assert time.monotonic() - started < 2.5


def test_omniglot_validation_holds_out_the_last_classes_whole_alphabets():
    from dvml_tf.data import catalog as catalog_lib

    labels = np.repeat(np.arange(10), 3)
    train = catalog_lib.ImageCatalog(labels, images=np.zeros((30, 4, 4, 1), np.uint8),
                                     num_channels=1, name="train")
    test = catalog_lib.ImageCatalog(labels + 100, images=np.zeros((30, 4, 4, 1), np.uint8),
                                    num_channels=1, name="test")
    splits = catalog_lib.DatasetSplits("omniglot", train, test, num_channels=1, grayscale=True)
    carved = catalog_lib.carve_validation(splits, 3, seed=5, last=True)
    assert list(carved.validation.classes) == [7, 8, 9]
    assert list(carved.train.classes) == list(range(7))
    random_pick = catalog_lib.carve_validation(splits, 3, seed=5)
    assert set(random_pick.validation.classes) | set(random_pick.train.classes) == set(range(10))


def test_raw_form_of_is_the_loaders_memory_rule():
    assert raw_form_of("omniglot", 32).resized
    assert raw_form_of("cub200", 256).resized
    assert not raw_form_of("sop", 256).resized
    with pytest.raises(ValueError, match="num_images"):
        raw_form_of("folder", 256)
    assert raw_form_of("omniglot") == RawForm(OMNIGLOT_INK, 32, (105, 105))
    assert raw_form_of("cars196") == RawForm()
    assert raw_form_of("folder", 32, num_images=10) == RawForm(NO_CONVERSION, 32)
    # SOP's 120,053 images: 256 px is 23.6 GB, 64 px 1.5 GB.
    assert raw_form_of("sop", 64).stored_size == 64
    with pytest.raises(ValueError, match="valid datasets"):
        raw_form_of("mnist")


def _tfds_records(tfds_name, split, label_key="label"):
    """The encoded images and labels of a (mocked) TFDS split, read independently of the loader."""
    builder = tfds.builder(tfds_name)
    # The loader's feature selection: mock_data draws different examples for other selections.
    decoders = tfds.decode.PartialDecoding({"image": True, label_key: True},
                                           decoders={"image": tfds.decode.SkipDecoding()})
    records = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    images, labels = [], []
    for record in records.as_numpy_iterator():
        images.append(record["image"])
        labels.append(record[label_key])
    return images, np.asarray(labels)


@pytest.mark.parametrize("image_size", [105, 32])
def test_omniglot_stored_pixels_are_the_one_channel_decode(no_network, image_size):
    """The loader decodes RGB and converts (`convert_raw`); it used to decode the PNG with one
    channel (libpng's gray) and invert: the stored pixels must not change. Mock Omniglot images
    are random RGB noise, so every weight of the gray conversion matters."""
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES["omniglot"]):
        splits = load_dataset("omniglot", image_size=image_size)
        encoded, labels = _tfds_records("omniglot", "test")
    keep = labels >= SPLITS["omniglot"][0]
    encoded = [e for e, k in zip(encoded, keep, strict=True) if k]
    np.testing.assert_array_equal(splits.test.labels, labels[keep])
    decoded = np.stack([tf.io.decode_png(e, channels=1).numpy() for e in encoded])
    inverted = 255 - decoded
    assert len(np.unique(inverted)) > 200  # noise: gray levels all over the range
    if image_size == 105:
        expected = inverted
    else:
        resized = tf.image.resize(inverted.astype(np.float32), [image_size, image_size],
                                  antialias=True).numpy()
        expected = np.round(np.clip(resized, 0, 255)).astype(np.uint8)
    assert splits.test.images.shape == (len(encoded), image_size, image_size, 1)
    np.testing.assert_array_equal(splits.test.images, expected)


# name -> (load_dataset kwargs, mock examples); sop keeps its own splits, cub/cars are merged.
RAW_CASES = {
    "omniglot": (dict(validation_classes=3), 300),
    "cub200": (dict(validation_classes=4, seed=3), 60),
    "cars196": (dict(image_size=24), 60),
    "sop": (dict(image_size=32, validation_classes=5), 1500),
}


@pytest.mark.parametrize("name", list(RAW_CASES))
def test_raw_splits_align_row_by_row_with_the_converted_splits(name, no_network):
    kwargs, examples = RAW_CASES[name]
    with tfds.testing.mock_data(num_examples=examples):
        converted = load_dataset(name, **kwargs)
        raw = load_dataset(name, raw=True, **kwargs)
    assert raw.raw and not converted.raw
    assert raw.raw_form == converted.raw_form
    assert raw.num_channels == 3 and raw.grayscale == converted.grayscale == (name == "omniglot")
    assert raw.splits().keys() == converted.splits().keys()
    if "validation_classes" in kwargs:
        assert raw.validation.num_classes == kwargs["validation_classes"]
    for split, raw_catalog in raw.splits().items():
        catalog = converted.splits()[split]
        np.testing.assert_array_equal(raw_catalog.labels, catalog.labels)
        assert raw_catalog.class_names == catalog.class_names
        assert raw_catalog.storage == "encoded" and raw_catalog.num_channels == 3
        rows = np.unique(np.linspace(0, catalog.num_images - 1, 12).astype(int))
        for i in rows:
            image = raw_catalog.image(i)
            assert image.dtype == np.uint8 and image.shape[-1] == 3
            if name == "omniglot":
                assert image.shape == (105, 105, 3)
            stored = raw.raw_form.to_stored(image).numpy()
            np.testing.assert_array_equal(stored, catalog.image(i), err_msg=f"{split} row {i}")


def prepare_tiny_omniglot(data_dir):
    """A real prepared TFDS omniglot in `data_dir` (tfrecords, dataset_info.json, features.json)
    with 6 images per split, written through TFDS's own feature encoding: no download.

    Returns:
        the version folder (omniglot/3.0.0).
    """
    builder = tfds.builder("omniglot", data_dir=str(data_dir))
    rng = np.random.default_rng(0)
    infos = []
    for split, labels in (("train", [0, 0, 1, 1, 2, 2]), ("test", [964, 964, 965, 965, 966,
                                                                    966])):
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name="omniglot", split=split, filetype_suffix="tfrecord")
        path = template.sharded_filepath(shard_index=0, num_shards=1)
        tf.io.gfile.makedirs(builder.data_dir)
        with tf.io.TFRecordWriter(str(path)) as writer:
            for label in labels:
                image = (rng.integers(0, 2, (105, 105, 3)) * 255).astype(np.uint8)
                writer.write(builder.info.features.serialize_example(
                    {"image": image, "alphabet": 0, "alphabet_char_id": 0, "label": label}))
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(labels)],
                                         num_bytes=tf.io.gfile.stat(str(path)).length,
                                         filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(builder.data_dir)
    return builder.data_dir


def test_a_damaged_prepared_dataset_says_to_prepare_it_again(tmp_path, no_network):
    version = prepare_tiny_omniglot(tmp_path)
    assert load_dataset("omniglot", data_dir=str(tmp_path), raw=True).test.num_images == 6
    records = f"{version}/omniglot-train.tfrecord-00000-of-00001"
    with open(records, "rb") as f:
        data = f.read()
    with open(records, "wb") as f:
        f.write(data[:len(data) // 2])  # a truncated copy
    with pytest.raises(ValueError, match=rf"The prepared TFDS dataset 'omniglot' in {version} is "
                                         r"damaged: its train split cannot be read \(truncated "
                                         rf"record .*\)\. Prepare it again: remove {version} and "
                                         r"load the dataset once with network access"):
        load_dataset("omniglot", data_dir=str(tmp_path))
    with open(f"{version}/dataset_info.json", "w") as f:
        f.write('{"name": "omniglot", "splits": [')  # truncated JSON
    with pytest.raises(ValueError, match=rf"The prepared TFDS dataset 'omniglot' in "
                                         rf"{tmp_path}/omniglot is corrupt: its "
                                         r"dataset_info\.json \(or features\.json\) cannot be "
                                         r"read \(.*\)\. Prepare it again"):
        load_dataset("omniglot", data_dir=str(tmp_path))
