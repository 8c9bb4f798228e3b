"""The identity of a dataset as loaded, so that a resumed run can tell whether it still trains on
the images it started with (the data may move: paths are compared relative to their class).

* folder datasets (`folder.folder_identity`): per split, per class name, the number of images
  and a digest of their paths relative to the class folder and of their sizes;
* TFDS datasets: the builder's name and version, and the images and classes of each split;
* anything else (generated splits): the images, classes and a digest of the labels per split.
"""

import hashlib

import numpy as np

_LISTED_CHANGES = 10


def dataset_identity(splits):
    """The identity of loaded `DatasetSplits` (the loader's, or one computed from the labels).

    Args:
        splits: `DatasetSplits`.

    Returns:
        dict (JSON-serializable).
    """
    if splits.identity is not None:
        return splits.identity
    identity = {"dataset": splits.name}
    for split, catalog in splits.splits().items():
        labels = np.ascontiguousarray(catalog.labels, np.int64)
        identity[split] = {"images": int(catalog.num_images),
                           "classes": int(catalog.num_classes),
                           "labels": hashlib.sha256(labels.tobytes()).hexdigest()[:16]}
    return identity


def _class_changes(split, old, new):
    """What changed between two {class name: {"images", "files"}} maps of a folder split."""
    removed = sorted(set(old) - set(new))
    added = sorted(set(new) - set(old))
    changes = []
    for name in list(removed):
        same = [other for other in added if new[other] == old[name]]
        if same:  # the same files under another name
            changes.append(f"{split} class {name!r} was renamed to {same[0]!r}")
            removed.remove(name)
            added.remove(same[0])
    changes += [f"{split} class {name!r} ({old[name]['images']} images) is gone"
                for name in removed]
    changes += [f"{split} class {name!r} ({new[name]['images']} images) is new"
                for name in added]
    for name in sorted(set(old) & set(new)):
        if old[name]["images"] != new[name]["images"]:
            changes.append(f"{split} class {name!r} has {new[name]['images']} images instead of "
                           f"{old[name]['images']}")
        elif old[name] != new[name]:
            changes.append(f"{split} class {name!r} holds other files (names or sizes changed)")
    return changes


def identity_changes(old, new):
    """How a dataset's identity differs from the one recorded, in words.

    Args:
        old: the recorded identity (dict).
        new: the identity of the data loaded now.

    Returns:
        list of str (empty when they are the same).
    """
    if old == new:
        return []
    folders = old.get("dataset") == new.get("dataset") == "folder"
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if folders and isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            changes += _class_changes(key, old[key], new[key])
        else:
            changes.append(f"{key}: {old.get(key)!r} then, {new.get(key)!r} now")
    if len(changes) > _LISTED_CHANGES:
        changes = [*changes[:_LISTED_CHANGES],
                   f"... and {len(changes) - _LISTED_CHANGES} more differences"]
    return changes
