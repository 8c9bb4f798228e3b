"""Writes that never leave a half-written file or folder in place of a good one.

Everything is first written to a temporary sibling (same filesystem, so the final rename is
atomic) and then moved over the destination.
"""

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile


def check_writable(path, directory=False):
    """Checks, before any work, that `path` can be written (a file, or a folder to fill).

    Missing folders on the way are created and a scratch file is written and removed there:
    permissions alone cannot tell (root passes them, but not a read-only file system, /proc or
    /sys, a dangling symbolic link or an over-long name).

    Args:
        path: the file or folder to be written.
        directory: whether `path` is a folder.

    Raises:
        ValueError: `path` (or one of its parents) is a file where a folder is needed, or a
            folder where a file is needed, or the folder cannot be made there.
        PermissionError: the folder that would hold it is not writable.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if directory and not os.path.isdir(path):
            raise ValueError(f"{path} is a file, not a folder.")
        if not directory and os.path.isdir(path):
            raise ValueError(f"{path} is a folder, not a file.")
        if not os.access(path if directory else os.path.dirname(path), os.W_OK):
            raise PermissionError(f"{path} is not writable.")
    else:
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"Cannot write {path}: {parent} is a file, not a folder.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"Cannot write {path}: {parent} is not writable.")
    _try_writing_in(path if directory else os.path.dirname(path), path)


def _try_writing_in(folder, path):
    """Creates `folder` (kept: the write needs it) and a scratch file in it, or raises naming
    why not; folders it created are removed again on failure."""
    missing, current = [], folder
    while not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    created = []
    try:
        for name in reversed(missing):
            if os.path.islink(name):
                raise ValueError(f"Cannot write {path}: {name} is a symbolic link to "
                                 f"{os.readlink(name)}, which does not exist.")
            os.mkdir(name)
            created.append(name)
        fd, scratch = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.remove(scratch)
    except BaseException as error:
        for name in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(name)
        if not isinstance(error, OSError):
            raise
        kind = PermissionError if error.errno in (errno.EACCES, errno.EPERM,
                                                  errno.EROFS) else ValueError
        raise kind(f"Cannot write {path}: {error.strerror} ({error.filename}).") from None


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _ordinary_permissions(path, directory=False):
    """mkstemp/mkdtemp create private 0600/0700 entries; give them what open/mkdir would, so that
    e.g. a model server running as another user can read an export."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def replacing(path, suffix=".tmp"):
    """Yields a temporary sibling of `path` to write; on success it replaces `path` atomically.

    On an exception the temporary file is removed and `path` is untouched.

    Args:
        path: the destination file.
        suffix: suffix of the temporary name (some writers check it, e.g. ".keras").
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        _ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path, data):
    """Atomically writes `data` (bytes) to `path`; returns `path`."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def write_text(path, text):
    """Atomically writes `text` (UTF-8) to `path`; returns `path`."""
    return write_bytes(path, text.encode("utf-8"))


def _finite(value):
    """`value` with every NaN or infinite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path, value, sort_keys=False):
    """Atomically writes `value` as indented JSON to `path`; returns `path`.

    NaN and infinities, which JSON cannot hold (Python would write the invalid tokens NaN and
    Infinity), are written as null.
    """
    text = json.dumps(_finite(value), indent=2, sort_keys=sort_keys, allow_nan=False)
    return write_text(path, text)


def save_keras_model(model, path):
    """Atomically saves `model` as a `.keras` archive at `path`."""
    with replacing(path, suffix=".keras") as tmp:
        model.save(tmp)


class AtomicDirectory:
    """Context manager yielding a temporary folder that replaces `path` only on success.

    An existing `path` is kept until the new folder is complete; on an exception the temporary
    folder is removed and `path` is untouched.

    Args:
        path: the destination folder.
        overwrite: bool. Replace an existing `path`; when False, an existing `path` raises
            FileExistsError before anything is written.
    """

    def __init__(self, path, overwrite=False):
        self.path = os.path.abspath(path)
        self.overwrite = overwrite
        self.tmp = None

    def __enter__(self):
        if os.path.exists(self.path) and not self.overwrite:
            raise FileExistsError(f"{self.path} already exists; pass overwrite to replace it.")
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(self.path)}.")
        _ordinary_permissions(self.tmp, directory=True)
        return self.tmp

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.path):
            # Move the old folder aside first so that a crash between the two renames leaves
            # either the old or the new folder under a recognisable name, never a mix.
            old = self.path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        return False
