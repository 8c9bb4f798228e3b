"""Generated raw images and datasets in a dataset's raw form, for tests and benchmarks that
must run without the real data (no network, no prepared TFDS copy).

    raw_form = data.raw_form_of("omniglot")                  # strokes on white, 105 x 105
    images = synthetic_raw_images(raw_form, preprocess, 16)  # uint8 [16, 105, 105, 3]
    splits = synthetic_raw_splits(raw_form, preprocess)      # raw DatasetSplits, 8 + 6 classes
"""

import numpy as np
import tensorflow as tf

from dvml_tf import data as data_lib


def _draw_strokes(segments, height, width, shift=(0.0, 0.0)):
    """Dark line segments on white: uint8 [H, W]. Segments are (y0, x0, y1, x1, thickness) with
    coordinates in fractions of the image size."""
    image = np.full([height, width], 255, np.uint8)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    for y0, x0, y1, x1, thickness in segments:
        y0, y1 = (y0 + shift[0]) * height, (y1 + shift[0]) * height
        x0, x1 = (x0 + shift[1]) * width, (x1 + shift[1]) * width
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((rows - y0) * dy + (cols - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
        image[np.hypot(rows - (y0 + t * dy), cols - (x0 + t * dx)) < thickness] = 0
    return image


def _random_segments(rng):
    count = int(rng.integers(2, 6))
    ends = rng.uniform(0.15, 0.85, (count, 4))
    return np.concatenate([ends, rng.uniform(1.5, 4.0, (count, 1))], axis=1)


def _photo(rng, height, width, base=None):
    coarse = rng.uniform(0, 255, [4, 4, 3]) if base is None else base
    image = tf.image.resize(coarse[np.newaxis].astype(np.float32), [height, width],
                            method="bicubic").numpy()[0]
    return np.clip(np.round(image + rng.normal(0, 8, image.shape)), 0, 255).astype(np.uint8)


def synthetic_raw_images(raw_form, preprocess, num_images, seed=0):
    """Generated raw images in a dataset's raw form (when the dataset itself is not at hand).

    Omniglot-like data gets dark strokes (random line segments) on white, R = G = B; photos get
    smooth random colour fields with noise. Sized `raw_form.fixed_size(preprocess)`.

    Args:
        raw_form: `data.RawForm`.
        preprocess: `data.PreprocessConfig`.
        num_images: int.
        seed: int.

    Returns:
        np.uint8 [num_images, H, W, 3].
    """
    rng = np.random.default_rng(seed)
    height, width = raw_form.fixed_size(preprocess)
    if raw_form.ink:
        images = [_draw_strokes(_random_segments(rng), height, width) for _ in range(num_images)]
        return np.repeat(np.stack(images)[..., np.newaxis], 3, axis=-1)
    return np.stack([_photo(rng, height, width) for _ in range(num_images)])


def synthetic_raw_splits(raw_form, preprocess, train_classes=8, test_classes=6,
                         images_per_class=4, seed=0, name=None):
    """A generated dataset in raw form: each class is a prototype (strokes or a colour field),
    each image a jittered copy.

    Args:
        raw_form: `data.RawForm` (ink or photos, size `raw_form.fixed_size(preprocess)`).
        preprocess: `data.PreprocessConfig`.
        train_classes: classes of the train split (labels 0..).
        test_classes: classes of the test split (labels after the train ones).
        images_per_class: int >= 2.
        seed: int.
        name: dataset name; default: "omniglot" for ink, else "folder".

    Returns:
        raw `data.DatasetSplits` of decoded raw catalogs (uint8 [N, H, W, 3]), with
        `raw_form`.
    """
    rng = np.random.default_rng(seed)
    height, width = raw_form.fixed_size(preprocess)
    catalogs = {}
    first = 0
    for split, classes in (("train", train_classes), ("test", test_classes)):
        images, labels = [], []
        for label in range(first, first + classes):
            if raw_form.ink:
                segments = _random_segments(rng)
                for _ in range(images_per_class):
                    shift = tuple(rng.uniform(-0.05, 0.05, 2))
                    gray = _draw_strokes(segments, height, width, shift)
                    images.append(np.repeat(gray[..., np.newaxis], 3, axis=-1))
            else:
                base = rng.uniform(0, 255, [4, 4, 3])
                images.extend(_photo(rng, height, width, base) for _ in range(images_per_class))
            labels.extend([label] * images_per_class)
        catalogs[split] = data_lib.ImageCatalog(labels, images=np.stack(images), num_channels=3,
                                                name=split)
        first += classes
    name = name or ("omniglot" if raw_form.ink else "folder")
    return data_lib.DatasetSplits(name=name, train=catalogs["train"], test=catalogs["test"],
                                  grayscale=raw_form.ink, raw=True, raw_form=raw_form)
