"""Files of a saved `GalleryIndex`: the folder lock, checksums and durable writes.

A saved index is a folder that `save` assembles in a temporary sibling and swaps in with
`dvml_tf.utils.atomic.AtomicDirectory`, so a reader never sees a half-written index. Two writers
(or a writer and a reader) are kept apart by a lock file next to the folder,
``<parent>/.<name>.lock`` (`dvml_tf.utils.locks`: an flock, removed by its last holder). The lock
cannot live inside the folder because the swap renames the folder.
"""

import hashlib
import os

import numpy as np

from dvml_tf.utils import locks

# Blocks read per hashing step: large enough to keep hashlib's per-call overhead negligible.
_HASH_BLOCK_BYTES = 1 << 22


def lock_path(directory):
    """Path of the lock file that guards `directory`.

    Args:
        directory: the index folder.

    Returns:
        str, a hidden sibling of the folder: ``<parent>/.<name>.lock``.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent, name = os.path.split(directory.rstrip(os.sep))
    return os.path.join(parent, f".{name}.lock")


def exclusive_lock(directory, timeout):
    """An exclusive lock on `directory` for a save (a context manager; see `locks.FileLock`).

    Args:
        directory: the index folder about to be written.
        timeout: seconds to wait for another process's save or load to finish.

    Raises (on entry):
        TimeoutError: when the lock is still held by another process after `timeout` seconds.
        dvml_tf.utils.write_errors.WriteFailedError: the parent folder cannot be written.
    """
    path = lock_path(directory)
    return locks.FileLock(path, timeout=timeout, busy=lambda holder: (
        f"Another process has been saving or loading {directory} for more than {timeout:g} s "
        f"({holder}; lock file {path}); retry later or pass a larger lock_timeout."),
        what=f"the lock file of {os.path.basename(directory)}")


def shared_lock(directory, timeout):
    """A shared lock on `directory` while it is read (a context manager).

    A folder that lives on a read-only filesystem, or whose parent this process cannot write,
    is read without a lock (no writer can change it there either; the checksums in index.json
    still catch a folder that changed under the reader).

    Args:
        directory: the index folder about to be read.
        timeout: seconds to wait for a save into the folder to finish.

    Raises (on entry):
        TimeoutError: when a save holds the lock for more than `timeout` seconds.
    """
    path = lock_path(directory)
    return locks.FileLock(path, shared=True, timeout=timeout, busy=lambda holder: (
        f"A save into {directory} has held its lock ({path}, {holder}) for more than "
        f"{timeout:g} s; retry later."))


def file_digest(path):
    """SHA-256 and size of a file.

    Args:
        path: the file.

    Returns:
        dict {"sha256": hex digest, "bytes": size}.
    """
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK_BYTES):
            digest.update(block)
            size += len(block)
    return {"sha256": digest.hexdigest(), "bytes": size}


def fsync_folder(folder):
    """Flushes every file of `folder` and the folder entry itself to disk.

    Called before the folder is renamed into place, so that a power loss after the rename cannot
    leave the new name pointing at files whose data never reached the disk.

    Args:
        folder: a folder with regular files only (a saved index is flat).
    """
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_array(folder, name, dtype, shape):
    """np.load of a saved array (no pickles), with its dtype and shape checked.

    Args:
        folder: the index folder.
        name: the file name.
        dtype: expected dtype.
        shape: expected shape.

    Returns:
        the array.

    Raises:
        ValueError: if the file cannot be parsed or holds another dtype or shape.
    """
    path = f"{folder}/{name}"
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path} is corrupt: {error}") from None
    if array.dtype != dtype or array.shape != shape:
        raise ValueError(
            f"{path} holds {array.dtype} {array.shape}; expected {np.dtype(dtype)} {shape}."
        )
    return array
