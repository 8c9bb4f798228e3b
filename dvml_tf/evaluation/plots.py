"""Figures of the evaluation: t-SNE with image thumbnails, the central latent space, a retrieval
grid.

* `plot_tsne`: Barnes-Hut t-SNE (scikit-learn) of the embeddings; each point is drawn as its
  image thumbnail framed in its class colour (the DVML paper's Fig. 4).
* `plot_central_latent_space`: the same, of the features minus their class mean, i.e. the
  intra-class variation that DVML models as shared across classes (the paper's Fig. 1).
* `plot_retrieval_grid`: one row per query: the query, then its top-k neighbours (the query
  itself excluded), framed green when they share its class and red otherwise.

The thumbnails are composed into one RGB canvas with numpy and shown with a single ``imshow``,
which is much faster than one matplotlib artist per image. matplotlib is imported lazily (the
package imports without it) and only through its object-oriented API with the Agg canvas, so
no global pyplot state or GUI backend is touched. The PNG written has exactly
``size_px x size_px`` (t-SNE) or ``width x height`` (grid, see its docstring) pixels. Files are
written to a temporary sibling and renamed into place.
"""

import io

import numpy as np

from dvml_tf.evaluation import knn
from dvml_tf.evaluation.projector import _check_images
from dvml_tf.evaluation.projector import square_thumbnails
from dvml_tf.utils import atomic

GREEN = (0, 170, 0)
RED = (220, 0, 0)
QUERY_FRAME = (40, 40, 40)
_DPI = 100


def _matplotlib():
    """Imports matplotlib lazily; returns (Figure, FigureCanvasAgg)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment.
        raise ImportError(
            "The evaluation figures need matplotlib: pip install matplotlib (or the 'plots' "
            "extra)."
        ) from err
    return Figure, FigureCanvasAgg


def _save_figure(fig, path):
    """Renders a figure to PNG bytes and writes them atomically."""
    _, canvas_cls = _matplotlib()
    canvas_cls(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    atomic.write_bytes(path, buf.getvalue())
    return path


def class_colors(num_classes):
    """Distinct RGB colours, one per class.

    Args:
        num_classes: int.

    Returns:
        uint8 [num_classes, 3].
    """
    from matplotlib import colormaps

    if num_classes <= 10:
        rgba = colormaps["tab10"](np.arange(num_classes))
    elif num_classes <= 20:
        rgba = colormaps["tab20"](np.arange(num_classes))
    else:
        # Evenly spaced hues; neighbouring classes still differ enough to tell frames apart.
        rgba = colormaps["hsv"](np.arange(num_classes) / num_classes)
    return np.round(rgba[:, :3] * 255).astype(np.uint8)


def frame(thumbs, colors, width):
    """Draws a coloured border inside each thumbnail.

    Args:
        thumbs: uint8 [M, S, S, 3].
        colors: uint8 [M, 3] (or [3]) border colours.
        width: border width in pixels.

    Returns:
        uint8 [M, S, S, 3], a framed copy.
    """
    out = thumbs.copy()
    size = thumbs.shape[1]
    border = np.zeros((size, size), dtype=bool)
    border[:width] = border[-width:] = True
    border[:, :width] = border[:, -width:] = True
    colors = np.broadcast_to(np.asarray(colors, dtype=np.uint8), (thumbs.shape[0], 3))
    out[:, border] = colors[:, None, :]
    return out


def _validate(embeddings, labels, images, name="embeddings"):
    embeddings = knn.check_embeddings(embeddings, name)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one label per row of {name} ({embeddings.shape[0]}); got "
            f"shape {labels.shape}."
        )
    images = _check_images(images, embeddings.shape[0])
    return embeddings, labels, images


def subsample(labels, max_points, max_classes, seed=0):
    """Picks up to `max_classes` random classes, then up to `max_points` random samples of them.

    Args:
        labels: [N] labels.
        max_points: int >= 1.
        max_classes: int >= 1, or None for all classes.
        seed: seed.

    Returns:
        int64 indices, ascending.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if max_classes is not None and classes.size > max_classes:
        classes = rng.choice(classes, size=max_classes, replace=False)
    candidates = np.flatnonzero(np.isin(labels, classes))
    if candidates.size > max_points:
        candidates = rng.choice(candidates, size=max_points, replace=False)
    return np.sort(candidates).astype(np.int64)


def tsne_2d(vectors, seed=0, perplexity=30.0, max_iter=1000):
    """Barnes-Hut t-SNE to 2-D.

    Args:
        vectors: float [M, D], M >= 2.
        seed: random state.
        perplexity: t-SNE perplexity, lowered to (M - 1) / 3 for small M (scikit-learn needs
            perplexity < M).
        max_iter: optimisation steps (scikit-learn needs >= 250).

    Returns:
        float64 [M, 2].
    """
    from sklearn.manifold import TSNE

    num = vectors.shape[0]
    if num < 2:
        raise ValueError(f"t-SNE needs at least 2 points; got {num}.")
    perplexity = float(min(perplexity, max(1.0, (num - 1) / 3.0)))
    tsne = TSNE(
        n_components=2,
        perplexity=perplexity,
        init="pca",
        method="barnes_hut",
        random_state=seed,
        max_iter=max(250, int(max_iter)),
    )
    return tsne.fit_transform(np.asarray(vectors, dtype=np.float32)).astype(np.float64)


def thumbnail_canvas(points, thumbs, canvas_size, background=255):
    """Pastes thumbnails centred at 2-D positions scaled into a square canvas.

    Args:
        points: float [M, 2] positions (any scale; y grows upwards as in a scatter plot).
        thumbs: uint8 [M, S, S, 3].
        canvas_size: canvas side in pixels (> S).
        background: grey level of the background.

    Returns:
        uint8 [canvas_size, canvas_size, 3]. Later thumbnails cover earlier ones.
    """
    num, size = thumbs.shape[0], thumbs.shape[1]
    canvas = np.full((canvas_size, canvas_size, 3), background, dtype=np.uint8)
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = np.maximum(hi - lo, 1e-12)
    # Same scale on both axes so that the t-SNE geometry is not distorted.
    scale = (canvas_size - size) / span.max()
    offset = (canvas_size - size - span * scale) / 2
    top_left = np.floor((points - lo) * scale + offset).astype(np.int64)
    cols = top_left[:, 0]
    rows = (canvas_size - size) - top_left[:, 1]  # Image rows grow downwards.
    grid = np.arange(size)
    # One vectorized scatter for all thumbnails.
    row_idx = rows[:, None, None] + grid[None, :, None]
    col_idx = cols[:, None, None] + grid[None, None, :]
    row_idx, col_idx = np.broadcast_arrays(row_idx, col_idx)
    canvas[row_idx.reshape(-1), col_idx.reshape(-1)] = thumbs.reshape(num * size * size, 3)
    return canvas


def _plot_thumbnail_map(
    vectors, labels, images, path, title, size_px, thumb_px, frame_px, seed, perplexity, max_iter,
    class_names,
):
    """t-SNE of `vectors` drawn as framed thumbnails; returns the figure path."""
    figure_cls, _ = _matplotlib()
    points = tsne_2d(vectors, seed=seed, perplexity=perplexity, max_iter=max_iter)
    classes, codes = np.unique(labels, return_inverse=True)
    colors = class_colors(classes.size)
    thumbs = frame(square_thumbnails(images, thumb_px), colors[codes], frame_px)
    # Draw in random order so that no class is systematically hidden under another.
    order = np.random.default_rng(seed).permutation(points.shape[0])
    canvas = thumbnail_canvas(points[order], thumbs[order], size_px)

    fig = figure_cls(figsize=(size_px / _DPI, size_px / _DPI), dpi=_DPI)
    legend = classes.size <= 20
    ax = fig.add_axes((0.0, 0.0, 0.84 if legend else 1.0, 0.96))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, y=0.99, fontsize=12)
    if legend:
        from matplotlib.patches import Patch

        names = classes if class_names is None else [class_names[c] for c in classes.tolist()]
        handles = [
            Patch(facecolor=colors[i] / 255.0, edgecolor="black", label=str(names[i]))
            for i in range(classes.size)
        ]
        fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    return _save_figure(fig, path)


def plot_tsne(
    embeddings,
    labels,
    images,
    path,
    max_points=500,
    max_classes=20,
    size_px=1600,
    thumb_px=40,
    frame_px=3,
    seed=0,
    perplexity=30.0,
    max_iter=1000,
    class_names=None,
    title="t-SNE of the test embeddings",
):
    """Barnes-Hut t-SNE of the embeddings drawn as class-framed image thumbnails (DVML Fig. 4).

    Args:
        embeddings: float [N, D].
        labels: [N] class labels.
        images: uint8 [N, H, W, C], C in (1, 3).
        path: output PNG path.
        max_points: at most this many points are embedded and drawn (t-SNE of 500 points takes
            a few seconds on 2 cores).
        max_classes: at most this many random classes are drawn (None: all); with <= 20 a
            colour legend is added.
        size_px: the PNG is size_px x size_px pixels.
        thumb_px: thumbnail side in pixels.
        frame_px: class-colour frame width in pixels.
        seed: seed of the subsampling, t-SNE and drawing order.
        perplexity: t-SNE perplexity.
        max_iter: t-SNE iterations (>= 250).
        class_names: optional mapping or sequence from label to name, for the legend.
        title: figure title.

    Returns:
        The PNG path.

    Raises:
        ValueError: on invalid inputs.
    """
    embeddings, labels, images = _validate(embeddings, labels, images)
    idx = subsample(labels, max_points, max_classes, seed)
    return _plot_thumbnail_map(
        embeddings[idx], labels[idx], images[idx], path, title, size_px, thumb_px, frame_px,
        seed, perplexity, max_iter, class_names,
    )


def plot_central_latent_space(
    features,
    labels,
    images,
    path,
    max_points=500,
    max_classes=20,
    size_px=1600,
    thumb_px=40,
    frame_px=3,
    seed=0,
    perplexity=30.0,
    max_iter=1000,
    class_names=None,
    title="Central latent space: features minus their class mean",
):
    """t-SNE of the features minus their class mean (DVML Fig. 1, the "central latent space").

    The class means are computed over all N samples (not only the drawn subset), so the
    centring is the same whatever is drawn. If DVML has disentangled the intra-class variance,
    images of different classes with the same nuisance (pose, background) land together.

    Args:
        features: float [N, D], e.g. backbone (pool5) features or embeddings.
        labels: [N] class labels.
        images: uint8 [N, H, W, C], C in (1, 3).
        path: output PNG path.
        max_points: see `plot_tsne`.
        max_classes: see `plot_tsne`.
        size_px: see `plot_tsne`.
        thumb_px: see `plot_tsne`.
        frame_px: see `plot_tsne`.
        seed: see `plot_tsne`.
        perplexity: see `plot_tsne`.
        max_iter: see `plot_tsne`.
        class_names: see `plot_tsne`.
        title: figure title.

    Returns:
        The PNG path.

    Raises:
        ValueError: on invalid inputs.
    """
    features, labels, images = _validate(features, labels, images, "features")
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    sums = np.zeros((counts.size, features.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, features)
    centred = (features - sums[codes] / counts[codes, None]).astype(np.float32)
    idx = subsample(labels, max_points, max_classes, seed)
    return _plot_thumbnail_map(
        centred[idx], labels[idx], images[idx], path, title, size_px, thumb_px, frame_px,
        seed, perplexity, max_iter, class_names,
    )


def retrieval_neighbors(embeddings, query_indices, top_k, metric):
    """Top-k neighbours of some rows among all rows, each query excluded by index.

    Args:
        embeddings: float32 [N, D] (validated).
        query_indices: int [Q] rows used as queries.
        top_k: int, 1 <= top_k <= N - 1.
        metric: "euclidean" or "cosine".

    Returns:
        int64 [Q, top_k] neighbour rows, nearest first.
    """
    ids, _ = knn.nearest_neighbors(
        embeddings[query_indices], top_k + 1, gallery=embeddings, metric=metric
    )
    is_self = ids == np.asarray(query_indices)[:, None]
    # A stable sort on "is the query itself" moves the (at most one) self-match to the end and
    # keeps the others in distance order.
    order = np.argsort(is_self, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1)[:, :top_k]


def plot_retrieval_grid(
    embeddings,
    labels,
    images,
    path,
    num_queries=8,
    top_k=8,
    metric="euclidean",
    thumb_px=96,
    frame_px=5,
    seed=0,
    title=None,
    query_indices=None,
):
    """One row per query: the query image, then its top-k retrieved images, framed green when
    they share the query's class and red otherwise.

    Queries are drawn at random (seeded) among the samples whose class has another sample, so
    every row can be right.

    Args:
        embeddings: float [N, D].
        labels: [N] class labels.
        images: uint8 [N, H, W, C], C in (1, 3).
        path: output PNG path.
        num_queries: rows.
        top_k: retrieved images per row.
        metric: "euclidean" or "cosine".
        thumb_px: cell side in pixels.
        frame_px: frame width in pixels.
        seed: seed of the query choice.
        title: figure title (default names the metric).
        query_indices: optional rows to use as queries (overrides num_queries and seed).

    Returns:
        The PNG path. Its pixel size is `retrieval_grid_size(rows, top_k, thumb_px)` with
        rows = min(num_queries, number of samples whose class has another sample).

    Raises:
        ValueError: on invalid inputs.
    """
    embeddings, labels, images = _validate(embeddings, labels, images)
    if metric not in knn.METRICS:
        raise ValueError(f"metric must be one of {knn.METRICS}; got {metric!r}.")
    num = embeddings.shape[0]
    for name, value in (("num_queries", num_queries), ("top_k", top_k)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1; got {value}.")
    if top_k > num - 1:
        raise ValueError(f"top_k={top_k} exceeds the {num - 1} other samples.")
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    eligible = np.flatnonzero(counts[codes] > 1)
    if eligible.size == 0:
        raise ValueError("no sample has another sample of its class; nothing can be retrieved.")
    if query_indices is None:
        rng = np.random.default_rng(seed)
        queries = np.sort(rng.choice(eligible, size=min(num_queries, eligible.size), replace=False))
    else:
        queries = np.asarray(query_indices, dtype=np.int64).reshape(-1)
        if queries.size == 0 or queries.min() < 0 or queries.max() >= num:
            raise ValueError(f"query_indices must be non-empty rows in [0, {num}).")
    neighbors = retrieval_neighbors(embeddings, queries, top_k, metric)
    correct = codes[neighbors] == codes[queries, None]

    gap, header = thumb_px // 8, thumb_px // 2
    width, height = retrieval_grid_size(queries.size, top_k, thumb_px)
    canvas = np.full((height - header, width, 3), 255, dtype=np.uint8)
    query_thumbs = frame(square_thumbnails(images[queries], thumb_px), QUERY_FRAME, frame_px)
    result_colors = np.where(correct[..., None], np.array(GREEN), np.array(RED)).reshape(-1, 3)
    result_thumbs = frame(
        square_thumbnails(images[neighbors.reshape(-1)], thumb_px), result_colors, frame_px
    ).reshape(queries.size, top_k, thumb_px, thumb_px, 3)
    # Cell (row, col) starts at gap + index * (thumb + gap); results are shifted right by an
    # extra separator after the query column.
    step = thumb_px + gap
    sep = thumb_px // 4
    for row in range(queries.size):  # Loop over (at most num_queries) rows of the figure.
        y = gap + row * step
        canvas[y : y + thumb_px, gap : gap + thumb_px] = query_thumbs[row]
        x0 = gap + step + sep
        strip = result_thumbs[row].transpose(1, 0, 2, 3)  # [S, top_k, S, 3]
        padded = np.full((thumb_px, top_k, step, 3), 255, dtype=np.uint8)
        padded[:, :, :thumb_px] = strip
        canvas[y : y + thumb_px, x0 : x0 + top_k * step] = padded.reshape(thumb_px, -1, 3)

    figure_cls, _ = _matplotlib()
    fig = figure_cls(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    ax = fig.add_axes((0.0, 0.0, 1.0, (height - header) / height))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    if title is None:
        accuracy = correct.mean()
        title = (
            f"Top-{top_k} retrieval ({metric}); green = same class, red = other class; "
            f"precision@{top_k} of these rows = {accuracy:.2f}"
        )
    fig.text(0.5, 1.0 - 0.5 * header / height, title, ha="center", va="center", fontsize=10)
    return _save_figure(fig, path)


def retrieval_grid_size(num_rows, top_k, thumb_px):
    """Pixel size (width, height) of the PNG written by `plot_retrieval_grid`.

    Args:
        num_rows: number of query rows drawn.
        top_k: retrieved images per row.
        thumb_px: cell side in pixels.

    Returns:
        (width, height) ints.
    """
    gap, header = thumb_px // 8, thumb_px // 2
    step = thumb_px + gap
    width = gap + step + thumb_px // 4 + top_k * step
    height = header + gap + num_rows * step
    return int(width), int(height)



def write_figures(directory, embedded, num_points=500, seed=0):
    """Writes the three figures of a split into a folder (what `evaluate.py --plots` does).

    The maps show whole classes, so that clusters are visible: random classes are added until
    `num_points` images are chosen.

    Args:
        directory: output folder (created).
        embedded: `runner.EmbeddedSplit`; the central-latent-space figure needs its `features`.
        num_points: images shown in the t-SNE figures.
        seed: picks the classes.

    Returns:
        list of the PNG paths written.
    """
    import os

    from dvml_tf import data as data_lib

    os.makedirs(directory, exist_ok=True)
    labels = embedded.labels
    rng = np.random.default_rng(seed)
    chosen = []
    for label in rng.permutation(np.unique(labels)):
        if len(chosen) >= num_points:
            break
        chosen.extend(np.flatnonzero(labels == label).tolist())
    chosen = np.sort(np.asarray(chosen[:num_points]))
    thumbnails = data_lib.load_thumbnails(embedded.catalog, chosen, size=48)
    written = [
        plot_tsne(embedded.embeddings[chosen], labels[chosen], thumbnails,
                  os.path.join(directory, "tsne.png"), max_points=num_points),
        plot_retrieval_grid(
            embedded.embeddings, labels,
            data_lib.load_thumbnails(embedded.catalog, np.arange(len(labels)), size=48),
            os.path.join(directory, "retrieval.png"), metric=embedded.metric),
    ]
    if embedded.features is not None:
        written.append(plot_central_latent_space(
            embedded.features()[chosen], labels[chosen], thumbnails,
            os.path.join(directory, "central_latent_space.png"), max_points=num_points))
    return written
