"""Tests of the evaluation figures: files exist, are valid PNGs of the expected size, and the
retrieval grid frames match a brute-force neighbour search."""

import numpy as np
import pytest
from PIL import Image

from dvml_tf.evaluation import plots


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    num_classes, per_class = 5, 12
    labels = np.repeat(np.arange(num_classes), per_class)
    # Overlapping classes, so that the retrieval grid has both green and red frames.
    centres = rng.standard_normal((num_classes, 6)) * 1.2
    x = (centres[labels] + rng.standard_normal((labels.size, 6))).astype(np.float32)
    colors = rng.integers(0, 256, (num_classes, 3))
    images = np.zeros((labels.size, 20, 28, 3), dtype=np.uint8) + colors[labels, None, None]
    images[:, 5:15, 8:20] = 255 - images[:, 5:15, 8:20]
    return x, labels, images.astype(np.uint8)


def open_png(path):
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_plot_tsne_writes_png_of_the_requested_size(data, tmp_path):
    x, labels, images = data
    path = plots.plot_tsne(x, labels, images, str(tmp_path / "tsne.png"), size_px=320, max_iter=250)
    pixels = open_png(path)
    assert pixels.shape == (320, 320, 3)
    # Thumbnails (not a blank figure) were drawn.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    assert not list(tmp_path.glob("*.tmp-*"))


def test_plot_central_latent_space_with_grayscale_images(data, tmp_path):
    x, labels, images = data
    gray = images.mean(axis=-1, keepdims=True).astype(np.uint8)
    path = plots.plot_central_latent_space(
        x, labels, gray, str(tmp_path / "central.png"), size_px=300, max_iter=250, max_points=40
    )
    assert open_png(path).shape == (300, 300, 3)


def test_subsample_limits_points_and_classes():
    labels = np.repeat(np.arange(30), 10)
    idx = plots.subsample(labels, max_points=50, max_classes=4, seed=1)
    assert idx.size == 40 and len(np.unique(labels[idx])) == 4
    idx = plots.subsample(labels, max_points=25, max_classes=None, seed=1)
    assert idx.size == 25 and (np.diff(idx) > 0).all()


def test_grayscale_thumbnails_are_gray():
    gray = np.arange(2 * 4 * 6, dtype=np.uint8).reshape(2, 4, 6, 1)
    thumbs = plots.square_thumbnails(gray, 6)
    assert thumbs.shape == (2, 6, 6, 3)
    assert (thumbs[..., 0] == thumbs[..., 1]).all() and (thumbs[..., 1] == thumbs[..., 2]).all()
    # Letterboxed: the 4 image rows sit in the middle of the 6-row square.
    np.testing.assert_array_equal(thumbs[0, 1:5, :, 0], gray[0, :, :, 0])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_retrieval_grid_frames_match_brute_force(data, tmp_path, metric):
    x, labels, images = data
    queries = np.array([0, 13, 27, 40, 59])
    top_k, thumb, frame_px = 6, 64, 6
    path = plots.plot_retrieval_grid(
        x, labels, images, str(tmp_path / f"grid_{metric}.png"), top_k=top_k, metric=metric,
        thumb_px=thumb, frame_px=frame_px, query_indices=queries,
    )
    pixels = open_png(path)
    width, height = plots.retrieval_grid_size(len(queries), top_k, thumb)
    assert pixels.shape == (height, width, 3)

    xx = x.astype(np.float64)
    if metric == "cosine":
        xx /= np.linalg.norm(xx, axis=1, keepdims=True)
        dist = 1 - xx @ xx.T
    else:
        dist = np.sqrt(((xx[:, None] - xx[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    expected = labels[np.argsort(dist[queries], axis=1)[:, :top_k]] == labels[queries, None]
    assert expected.any() and not expected.all()  # Both colours are exercised.

    gap, header, sep = thumb // 8, thumb // 2, thumb // 4
    step = thumb + gap
    for row in range(len(queries)):
        y = header + gap + row * step + thumb // 2
        for col in range(top_k):
            x0 = gap + step + sep + col * step + frame_px // 2
            want = plots.GREEN if expected[row, col] else plots.RED
            np.testing.assert_allclose(pixels[y, x0], want, atol=40)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda x, y, im: (x, y, im[:-1]), "one image per embedding"),
        (lambda x, y, im: (x, y, im.astype(np.float32)), "images must be uint8"),
        (lambda x, y, im: (x, y, im[..., :2]), "C in (1, 3)"),
        (lambda x, y, im: (x, y[:-1], im), "labels must be 1-D with one label per row"),
        (lambda x, y, im: (np.where(x > 2, np.nan, x), y, im), "NaN or Inf"),
    ],
)
def test_bad_input_raises(data, tmp_path, mutate, message):
    x, labels, images = mutate(*data)
    with pytest.raises(ValueError) as err:
        plots.plot_retrieval_grid(x, labels, images, str(tmp_path / "bad.png"))
    assert message in str(err.value)
    with pytest.raises(ValueError, match="top_k=60 exceeds"):
        plots.plot_retrieval_grid(*data, str(tmp_path / "bad.png"), top_k=60)
