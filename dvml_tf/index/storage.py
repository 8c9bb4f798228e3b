"""Files of a saved `GalleryIndex`: the folder lock, checksums and durable writes.

A saved index is a folder that `save` assembles in a temporary sibling and swaps in with
`dvml_tf.utils.atomic.AtomicDirectory`, so a reader never sees a half-written index. Two writers
(or a writer and a reader) are kept apart by `fcntl.flock` on a lock file next to the folder:
``<parent>/.<name>.lock``. The lock cannot live inside the folder because the swap renames the
folder. The lock file stays in place after use: deleting it would let a late process lock an
unlinked inode while a newer one locks a fresh file, i.e. both would hold "the" lock.
"""

import contextlib
import errno
import fcntl
import hashlib
import os
import time

import numpy as np

# Blocks read per hashing step: large enough to keep hashlib's per-call overhead negligible.
_HASH_BLOCK_BYTES = 1 << 22
# How often a waiting save retries the lock; short against a save, long against a syscall.
_LOCK_POLL_SECONDS = 0.05


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


@contextlib.contextmanager
def exclusive_lock(directory, timeout):
    """Holds an exclusive flock on the lock file of `directory` (creating the file if needed).

    Args:
        directory: the index folder about to be written.
        timeout: seconds to wait for another process's save or load to finish.

    Yields:
        The lock file's path.

    Raises:
        TimeoutError: when the lock is still held by another process after `timeout` seconds.
    """
    path = lock_path(directory)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _wait_for_flock(fd, fcntl.LOCK_EX, timeout, (
            f"Another process has been saving or loading {directory} for more than {timeout:g} s "
            f"(lock file {path}); retry later or pass a larger lock_timeout."))
        yield path
    finally:
        os.close(fd)  # Closing the descriptor releases the flock.


def _wait_for_flock(fd, mode, timeout, message):
    """Takes a flock (`fcntl.LOCK_EX` or `LOCK_SH`) on `fd`, polling until `timeout` seconds
    have passed; then raises TimeoutError(message)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() >= deadline:
                raise TimeoutError(message) from None
            time.sleep(_LOCK_POLL_SECONDS)


@contextlib.contextmanager
def shared_lock(directory, timeout):
    """Holds a shared flock on the lock file of `directory` while it is read, if there is one.

    A folder that was copied elsewhere, or lives on a read-only filesystem, has no lock file that
    this process can open; it is then read without a lock (the checksums in index.json still
    catch a folder that changed under the reader).

    Args:
        directory: the index folder about to be read.
        timeout: seconds to wait for a save into the folder to finish.

    Yields:
        The lock file's path, or None when the folder is read without a lock.

    Raises:
        TimeoutError: when a save holds the lock for more than `timeout` seconds.
    """
    path = lock_path(directory)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield None
        return
    try:
        _wait_for_flock(fd, fcntl.LOCK_SH, timeout, (
            f"A save into {directory} has held its lock ({path}) for more than {timeout:g} s; "
            "retry later."))
        yield path
    finally:
        os.close(fd)


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
