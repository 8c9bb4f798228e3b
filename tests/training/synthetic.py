"""Small generated datasets for training tests: class prototypes plus noise, learnable in a few
hundred steps, with class-disjoint train / validation / test splits."""

import numpy as np

from dvml_tf import data


def prototype_images(num_classes, per_class, size=12, channels=1, seed=0, first_label=0):
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, size=(num_classes, size, size, channels))
    noise = rng.normal(0, 40, size=(num_classes, per_class, size, size, channels))
    images = np.clip(prototypes[:, None] + noise, 0, 255).astype(np.uint8)
    labels = np.repeat(np.arange(first_label, first_label + num_classes), per_class)
    return images.reshape(-1, size, size, channels), labels


def splits(train_classes=16, test_classes=8, validation_classes=0, per_class=6, size=12):
    def catalog(num, first, seed, name):
        images, labels = prototype_images(num, per_class, size, seed=seed, first_label=first)
        return data.ImageCatalog(labels, images=images, num_channels=1, name=name)

    validation = catalog(validation_classes, 1000, 2, "validation") if validation_classes else None
    return data.DatasetSplits(
        name="omniglot",
        train=catalog(train_classes, 0, 0, "train"),
        test=catalog(test_classes, 500, 1, "test"),
        validation=validation,
        num_channels=1,
        grayscale=True,
    )
