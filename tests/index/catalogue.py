"""A tiny catalogue (generated PNGs and a CSV manifest) and a tiny untrained SavedModel export of
it, shared by the index, CLI and evaluation tests (the session fixture `catalogue_export` in
tests/conftest.py builds it once)."""

import csv
import dataclasses

import keras
import numpy as np
from PIL import Image

from dvml_tf import data as data_lib
from dvml_tf import task
from dvml_tf.export import exporter
from dvml_tf.training.config import TrainConfig

# split of each class of the catalogue: 4 train, 2 validation, 3 test classes.
CLASS_SPLITS = ("train",) * 4 + ("validation",) * 2 + ("test",) * 3
PER_CLASS = 5


def write_catalogue(root, class_splits=CLASS_SPLITS, per_class=PER_CLASS, size=20, seed=0,
                    roles=None):
    """Writes class-structured PNGs under root/img and root/manifest.csv (paths relative).

    Args:
        roles: optional callable (split, class, i) -> (is_query, is_gallery) for the evaluation
            rows; adds the two columns.

    Returns:
        (manifest path, list of row dicts as written).
    """
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for c, split in enumerate(class_splits):
        base = rng.uniform(0, 255, (4, 4, 3))
        for i in range(per_class):
            coarse = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            pixels = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
            name = f"img/c{c}_{i}.png"
            Image.fromarray(pixels).save(root / name)
            row = {"path": name, "label": f"glyph_{c}", "split": split}
            if roles is not None:
                query, gallery = roles(split, c, i) if split != "train" else ("", "")
                row.update(is_query=str(query), is_gallery=str(gallery))
            rows.append(row)
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest, rows


@dataclasses.dataclass
class CatalogueExport:
    manifest: object
    rows: list
    config: TrainConfig
    export_dir: str
    version_dir: str


def tiny_config(manifest, **changes):
    return TrainConfig(config="csv", dataset="csv", data_dir=str(manifest), image_size=16,
                       resize_size=18, embedding_dim=8, num_samples=2, loss="triplet",
                       classes_per_batch=2, images_per_class=2, **changes)


def export_catalogue_model(manifest, export_dir, seed=0):
    config = tiny_config(manifest, seed=seed)
    keras.utils.set_random_seed(seed)
    model = task.build_model(config)
    splits = data_lib.load_dataset("csv", data_dir=str(manifest), image_size=config.resize_size,
                                   raw=True)
    result = exporter.export_model(model, config, str(export_dir), raw_splits=splits,
                                   litert_models=False, source=f"tiny seed {seed}")
    return config, result


def make_catalogue_export(root):
    """An untrained 8-d triplet model (cosine) exported as a SavedModel, and its catalogue."""
    manifest, rows = write_catalogue(root)
    config, result = export_catalogue_model(manifest, root / "E")
    return CatalogueExport(manifest, rows, config, result.export_dir, result.saved_model_dir)
