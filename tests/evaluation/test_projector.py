"""Tests of the TensorBoard projector files."""

import logging
import math

import numpy as np
import pytest
from PIL import Image

from dvml_tf.evaluation import projector


def sample(num=23, dim=5, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, dim)).astype(np.float32)
    labels = rng.integers(0, 4, num)
    images = rng.integers(0, 256, (num, 10, 14, channels), dtype=np.uint8)
    return x, labels, images


def test_files_contents_and_sizes(tmp_path):
    x, labels, images = sample()
    out = projector.write_projector(
        x, labels, str(tmp_path), images=images, class_names=["cat", "dog", "car", "tree"],
        thumbnail_size=32,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metadata.tsv", "projector_config.pbtxt", "sprite.png", "vectors.tsv"
    ]
    assert out["num_points"] == 23
    vectors = np.loadtxt(tmp_path / "vectors.tsv", delimiter="\t")
    np.testing.assert_allclose(vectors, x, rtol=1e-6, atol=1e-7)
    assert "label" not in (tmp_path / "vectors.tsv").read_text()  # No header.
    lines = (tmp_path / "metadata.tsv").read_text().splitlines()
    assert lines[0] == "label\tclass_name" and len(lines) == 24
    names = ["cat", "dog", "car", "tree"]
    assert lines[1:] == [f"{lab}\t{names[lab]}" for lab in labels]
    with Image.open(tmp_path / "sprite.png") as sprite:
        assert sprite.format == "PNG"
        assert sprite.size == (5 * 32, 5 * 32)  # ceil(sqrt(23)) = 5 thumbnails per side.
    config = (tmp_path / "projector_config.pbtxt").read_text()
    for needle in (
        'tensor_path: "vectors.tsv"', 'metadata_path: "metadata.tsv"',
        'image_path: "sprite.png"', "single_image_dim: 32",
    ):
        assert needle in config


def test_sprite_cells_hold_the_images_in_order(tmp_path):
    x, labels, images = sample(num=5, channels=1)
    images = np.broadcast_to(np.arange(5, dtype=np.uint8)[:, None, None, None] * 50, (5, 8, 8, 1))
    projector.write_projector(x, labels, str(tmp_path), images=images.copy(), thumbnail_size=8)
    sprite = np.asarray(Image.open(tmp_path / "sprite.png"))
    assert sprite.shape == (24, 24, 3)  # 3 x 3 grid of 8 px cells, grayscale as RGB.
    for i in range(5):
        row, col = divmod(i, 3)
        np.testing.assert_array_equal(sprite[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8], 50 * i)
    assert (sprite[16:, 16:] == 0).all()  # Unused cells are black.


def test_without_images_there_is_no_sprite(tmp_path):
    x, labels, _ = sample()
    projector.write_projector(x, labels, str(tmp_path))
    assert not (tmp_path / "sprite.png").exists()
    assert "sprite" not in (tmp_path / "projector_config.pbtxt").read_text()
    lines = (tmp_path / "metadata.tsv").read_text().splitlines()
    assert lines[1] == f"{labels[0]}\t{labels[0]}"


def test_sprite_limit_subsamples_consistently(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(projector, "MAX_SPRITE_SIZE", 64)  # Room for (64 // 16)^2 = 16 points.
    x, labels, images = sample(num=40)
    with caplog.at_level(logging.WARNING):
        out = projector.write_projector(x, labels, str(tmp_path), images=images, thumbnail_size=16)
    assert out["num_points"] == 16 and "subsampled 16 of 40" in caplog.text
    idx = out["indices"]
    np.testing.assert_allclose(np.loadtxt(tmp_path / "vectors.tsv"), x[idx], rtol=1e-6)
    assert len((tmp_path / "metadata.tsv").read_text().splitlines()) == 17
    with Image.open(tmp_path / "sprite.png") as sprite:
        assert sprite.size == (64, 64) and math.isqrt(16) * 16 == 64


def test_max_points(tmp_path):
    x, labels, _ = sample(num=30)
    out = projector.write_projector(x, labels, str(tmp_path), max_points=7, seed=3)
    assert out["num_points"] == 7 and (np.diff(out["indices"]) > 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"thumbnail_size": 65}, "thumbnail_size must be in [1, 64]"),
        ({"images": np.zeros((23, 4, 4, 3), np.float32)}, "images must be uint8"),
        ({"images": np.zeros((22, 4, 4, 3), np.uint8)}, "one image per embedding"),
        ({"class_names": ["a"]}, "class_names has 1 entries"),
        ({"class_names": {0: "a"}}, "class_names has no entry for labels"),
        ({"max_points": 0}, "max_points must be >= 1"),
    ],
)
def test_bad_input_raises(tmp_path, kwargs, message):
    x, labels, _ = sample()
    with pytest.raises(ValueError) as err:
        projector.write_projector(x, labels, str(tmp_path), **kwargs)
    assert message in str(err.value)
