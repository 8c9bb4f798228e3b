"""TensorBoard Embedding Projector files for a set of embeddings.

`write_projector` writes, into one directory:

* ``vectors.tsv``: one embedding per line, tab-separated floats, no header;
* ``metadata.tsv``: a header row (required by the projector when there are >= 2 columns), then
  ``label<TAB>class_name`` per embedding;
* ``sprite.png`` (only with images): a square grid of thumbnails, row-major in embedding order,
  each thumbnail at most 64 px and the sprite at most 8192 px per side (the projector's limits);
* ``projector_config.pbtxt``: the ``ProjectorConfig`` text proto that references them, written
  as text so that the ``tensorboard`` package is not needed.

Point TensorBoard at the directory (``tensorboard --logdir DIR``) to open it. Every file is
written to a temporary sibling and renamed into place, so a reader never sees a partial file.
"""

import io
import logging
import math
import os

import numpy as np

from dvml_tf.utils import atomic

MAX_THUMBNAIL_SIZE = 64
MAX_SPRITE_SIZE = 8192
VECTORS_FILE = "vectors.tsv"
METADATA_FILE = "metadata.tsv"
SPRITE_FILE = "sprite.png"
CONFIG_FILE = "projector_config.pbtxt"

_LOG = logging.getLogger(__name__)


def _check_images(images, num):
    images = np.asarray(images)
    if images.ndim == 3:  # [N, H, W] grayscale without a channel axis.
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 [N, H, W, C] with C in (1, 3); got shape {images.shape}."
        )
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8; got dtype {images.dtype}.")
    if images.shape[0] != num:
        raise ValueError(
            f"images must have one image per embedding; got {images.shape[0]} images and "
            f"{num} embeddings."
        )
    return images


def square_thumbnails(images, size):
    """Letterboxes images to squares (keeping the aspect ratio) and resizes them.

    Args:
        images: uint8 [N, H, W, C], C in (1, 3).
        size: side of the output thumbnails in pixels.

    Returns:
        uint8 [N, size, size, 3] (grayscale is replicated to RGB).
    """
    # Imported here so that the package imports without pillow.
    from PIL import Image

    num, height, width, _ = images.shape
    side = max(height, width)
    padded = np.zeros((num, side, side, 3), dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    padded[:, top : top + height, left : left + width] = images  # Broadcasts C = 1 to RGB.
    if side == size:
        return padded
    # PIL resizes one image at a time; this loop is over the (bounded) thumbnails of a figure.
    return np.stack(
        [
            np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
            for img in padded
        ]
    )


def make_sprite(images, thumbnail_size=MAX_THUMBNAIL_SIZE):
    """Builds a square sprite of thumbnails in row-major order.

    Args:
        images: uint8 [N, H, W, C], C in (1, 3).
        thumbnail_size: thumbnail side in pixels.

    Returns:
        uint8 [S, S, 3] with S = ceil(sqrt(N)) * thumbnail_size; unused cells are black.
    """
    thumbs = square_thumbnails(images, thumbnail_size)
    num = thumbs.shape[0]
    grid = math.ceil(math.sqrt(num))
    cells = np.zeros((grid * grid, thumbnail_size, thumbnail_size, 3), dtype=np.uint8)
    cells[:num] = thumbs
    # [row, col, y, x, c] -> [row, y, col, x, c] lays the cells out as one image.
    return (
        cells.reshape(grid, grid, thumbnail_size, thumbnail_size, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(grid * thumbnail_size, grid * thumbnail_size, 3)
    )


def _tsv_field(value):
    # Tabs and newlines would break the TSV layout.
    return str(value).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def write_projector(
    embeddings,
    labels,
    path,
    images=None,
    class_names=None,
    thumbnail_size=MAX_THUMBNAIL_SIZE,
    max_points=None,
    seed=0,
    tensor_name="embedding",
):
    """Writes TensorBoard projector files (vectors, metadata, sprite, config) into a directory.

    Args:
        embeddings: float array [N, D].
        labels: [N] class labels (ints or strings).
        path: output directory (created if needed).
        images: optional uint8 [N, H, W, C], C in (1, 3), for the sprite.
        class_names: optional class names: a mapping or a sequence indexed by label, or a
            sequence of N per-sample names. Defaults to the label itself.
        thumbnail_size: sprite thumbnail side in pixels, 1..64.
        max_points: optional cap on the number of points written.
        seed: seed of the subsampling.
        tensor_name: name of the tensor shown in the projector.

    Returns:
        dict with "path" (directory), "files" (written file paths), "num_points" and
        "indices" (int64 [num_points], the rows of `embeddings` written, in file order).
        With images, at most (8192 // thumbnail_size)^2 points fit in the sprite (16,384 at
        64 px); larger sets (or sets above `max_points`) are subsampled uniformly at random
        (in ascending index order), and a warning is logged.

    Raises:
        ValueError: on invalid embeddings, labels, images, class names or sizes.
    """
    # Imported here so that importing the projector does not import the metrics' dependencies.
    from dvml_tf.evaluation import knn

    embeddings = knn.check_embeddings(embeddings)
    num = embeddings.shape[0]
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != num:
        raise ValueError(
            f"labels must be 1-D with one label per embedding ({num}); got shape {labels.shape}."
        )
    if not 1 <= thumbnail_size <= MAX_THUMBNAIL_SIZE:
        raise ValueError(
            f"thumbnail_size must be in [1, {MAX_THUMBNAIL_SIZE}]; got {thumbnail_size}."
        )
    names = _class_names(labels, class_names)
    if images is not None:
        images = _check_images(images, num)

    limit = num if max_points is None else int(max_points)
    if limit < 1:
        raise ValueError(f"max_points must be >= 1; got {max_points}.")
    if images is not None:
        limit = min(limit, (MAX_SPRITE_SIZE // thumbnail_size) ** 2)
    if num > limit:
        indices = np.sort(np.random.default_rng(seed).choice(num, size=limit, replace=False))
        _LOG.warning(
            "Projector: subsampled %d of %d points (sprite limit %d px per side, %d px "
            "thumbnails, max_points=%s).",
            limit,
            num,
            MAX_SPRITE_SIZE,
            thumbnail_size,
            max_points,
        )
    else:
        indices = np.arange(num)

    os.makedirs(path, exist_ok=True)
    files = []
    buf = io.StringIO()
    np.savetxt(buf, embeddings[indices], delimiter="\t", fmt="%.7g")
    files.append(atomic.write_bytes(os.path.join(path, VECTORS_FILE), buf.getvalue().encode()))

    rows = ["label\tclass_name"]
    rows += [
        f"{_tsv_field(lab)}\t{_tsv_field(nm)}"
        for lab, nm in zip(labels[indices], names[indices], strict=True)
    ]
    files.append(
        atomic.write_bytes(os.path.join(path, METADATA_FILE), ("\n".join(rows) + "\n").encode())
    )

    config = [
        "embeddings {",
        f'  tensor_name: "{tensor_name}"',
        f'  tensor_path: "{VECTORS_FILE}"',
        f'  metadata_path: "{METADATA_FILE}"',
    ]
    if images is not None:
        from PIL import Image

        sprite = make_sprite(images[indices], thumbnail_size)
        png = io.BytesIO()
        Image.fromarray(sprite).save(png, format="PNG")
        files.append(atomic.write_bytes(os.path.join(path, SPRITE_FILE), png.getvalue()))
        config += [
            "  sprite {",
            f'    image_path: "{SPRITE_FILE}"',
            f"    single_image_dim: {thumbnail_size}",
            f"    single_image_dim: {thumbnail_size}",
            "  }",
        ]
    config.append("}")
    files.append(
        atomic.write_bytes(os.path.join(path, CONFIG_FILE), ("\n".join(config) + "\n").encode())
    )
    return {"path": path, "files": files, "num_points": int(indices.size), "indices": indices}


def _class_names(labels, class_names):
    """Per-sample class names as a numpy array of str."""
    if class_names is None:
        return labels.astype(str)
    if isinstance(class_names, dict):
        missing = set(np.unique(labels).tolist()) - set(class_names)
        if missing:
            raise ValueError(f"class_names has no entry for labels {sorted(missing)[:10]}.")
        return np.array([str(class_names[lab]) for lab in labels.tolist()])
    names = np.asarray(class_names, dtype=str)
    if names.ndim != 1:
        raise ValueError(f"class_names must be 1-D; got shape {names.shape}.")
    if names.shape[0] == labels.shape[0] and not np.issubdtype(labels.dtype, np.integer):
        return names
    if np.issubdtype(labels.dtype, np.integer):
        if labels.min() < 0 or labels.max() >= names.shape[0]:
            if names.shape[0] == labels.shape[0]:
                return names
            raise ValueError(
                f"class_names has {names.shape[0]} entries but labels range over "
                f"[{labels.min()}, {labels.max()}]; give one name per class id or per sample."
            )
        return names[labels]
    raise ValueError(
        "class_names must be a mapping, a sequence indexed by integer labels, or one name per "
        "sample."
    )
