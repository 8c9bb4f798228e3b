"""load_dataset("glyphs"): a built glyph folder as zero-shot splits, its raw form, its errors."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from dvml_tf.data import PreprocessConfig
from dvml_tf.data import glyph_builder
from dvml_tf.data import glyphs
from dvml_tf.data import load_dataset
from dvml_tf.data import make_eval_dataset
from dvml_tf.data import raw_form_of
from dvml_tf.data.raw_form import OMNIGLOT_INK
from tests.data import fonts

SIZES = glyph_builder.SplitSizes(train=0, validation=8, test=12, pretrain=6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("glyphs") / "set")
    spec = glyph_builder.BuildSpec(fonts=fonts.DEJAVU[:4],
                                   characters=glyph_builder.parse_characters(fonts.LETTERS),
                                   image_size=16, splits=SIZES)
    glyph_builder.build(spec, output, processes=1, log=lambda _: None)
    return output


def test_splits_follow_the_built_ones(folder):
    arrays = glyphs.read_arrays(folder)
    built = glyphs.split_classes(arrays["manifest"])
    everything = load_dataset("glyphs", data_dir=folder)
    # validation_classes=0: training on every training class (train + validation).
    assert set(everything.train.classes) == set(built["train"]) | set(built["validation"])
    assert set(everything.test.classes) == set(built["test"])
    assert everything.validation is None
    held_out = load_dataset("glyphs", data_dir=folder, validation_classes=8)
    assert set(held_out.train.classes) == set(built["train"])
    assert set(held_out.validation.classes) == set(built["validation"])
    pretrain = set(built["pretrain"])
    for splits in (everything, held_out):
        for catalog in splits.splits().values():
            assert not pretrain & set(catalog.classes)  # the pool is never loaded
    assert everything.grayscale and everything.num_channels == 1
    assert everything.raw_form.conversion == OMNIGLOT_INK
    assert everything.raw_form.stored_size == 16 and everything.raw_form.raw_size == (16, 16)


def test_stored_images_are_the_built_ones(folder):
    arrays = glyphs.read_arrays(folder)
    splits = load_dataset("glyphs", data_dir=folder)
    rows = np.flatnonzero(np.isin(arrays["labels"], splits.test.classes))
    np.testing.assert_array_equal(splits.test.images[..., 0], arrays["images"][rows])
    np.testing.assert_array_equal(splits.test.labels, arrays["labels"][rows])
    assert splits.test.class_name(int(splits.test.labels[0])).startswith("U+")


def test_raw_images_map_back_to_the_stored_ones(folder):
    stored = load_dataset("glyphs", data_dir=folder)
    raw = load_dataset("glyphs", data_dir=folder, raw=True)
    assert raw.raw and raw.test.storage == "encoded" and raw.num_channels == 3
    np.testing.assert_array_equal(raw.test.labels, stored.test.labels)
    decoded = np.stack([raw.test.image(i) for i in range(raw.test.num_images)])
    assert decoded.shape[1:] == (16, 16, 3)
    assert decoded[:, 0, 0].min() == 255  # dark ink on white
    # The loader's conversion of the raw image (libpng gray, inverted) is the stored image.
    np.testing.assert_array_equal(raw.raw_form.to_stored(decoded).numpy(), stored.test.images)


def test_another_image_size_resizes_like_omniglot(folder):
    splits = load_dataset("glyphs", data_dir=folder, image_size=24)
    assert splits.test.images.shape[1:] == (24, 24, 1)
    stored = load_dataset("glyphs", data_dir=folder)
    expected = tf.cast(tf.round(tf.image.resize(
        tf.cast(stored.test.images, tf.float32), [24, 24], antialias=True)), tf.uint8)
    assert np.abs(splits.test.images.astype(int) - expected.numpy().astype(int)).max() <= 1
    # The training pipeline takes it as it takes Omniglot (gray tiled to 3 channels).
    batch, _ = next(iter(make_eval_dataset(
        splits.test, PreprocessConfig(resize_size=24, crop_size=20, random_flip=False), 8)))
    assert batch.shape == (8, 20, 20, 3)


def test_identity_survives_a_move(folder, tmp_path):
    moved = str(tmp_path / "moved")
    shutil.copytree(folder, moved)
    assert load_dataset("glyphs", data_dir=folder).identity == load_dataset(
        "glyphs", data_dir=moved).identity


def test_errors_name_the_problem(folder, tmp_path):
    with pytest.raises(ValueError, match="built with 8 validation classes"):
        load_dataset("glyphs", data_dir=folder, validation_classes=5)
    with pytest.raises(ValueError, match="needs --data_dir"):
        load_dataset("glyphs")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*glyph_builder"):
        load_dataset("glyphs", data_dir=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="not a glyph folder"):
        load_dataset("glyphs", data_dir=str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    os.remove(broken / glyphs.DESIGNS)
    with pytest.raises(FileNotFoundError, match=r"designs\.npy not found.*incomplete"):
        load_dataset("glyphs", data_dir=str(broken))
    manifest = json.loads((broken / glyphs.MANIFEST).read_text())
    manifest["format_version"] = 99
    (broken / glyphs.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"version 1.*rebuild"):
        load_dataset("glyphs", data_dir=str(broken))
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    np.save(truncated / glyphs.LABELS, np.load(truncated / glyphs.LABELS)[:-1])
    with pytest.raises(ValueError, match=r"labels\.npy has shape"):
        load_dataset("glyphs", data_dir=str(truncated))


def test_raw_form_without_the_data():
    form = raw_form_of("glyphs")
    assert form.conversion == OMNIGLOT_INK and form.stored_size == glyphs.DEFAULT_IMAGE_SIZE
