"""Writes that never leave a half-written file or folder in place of a good one.

Everything is first written to a temporary sibling (same filesystem, so the final rename is
atomic) and then moved over the destination. A write the file system refuses (a full disk, a
read-only folder) removes the temporary and raises `write_errors.WriteFailedError` naming the
folder.
"""

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile

from dvml_tf.utils import write_errors


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
def replacing(path, suffix=".tmp", needed=None):
    """Yields a temporary sibling of `path` to write; on success it replaces `path` atomically.

    On an exception the temporary file is removed and `path` is untouched; a refused write (full
    disk, read-only folder) becomes a `write_errors.WriteFailedError` naming the folder.

    Args:
        path: the destination file.
        suffix: suffix of the temporary name (some writers check it, e.g. ".keras").
        needed: bytes the file needs, when known (for the message of a full disk).
    """
    directory = os.path.dirname(os.path.abspath(path))
    what = os.path.basename(path)
    with write_errors.reported(directory, what, needed):
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{what}.", suffix=suffix)
        os.close(fd)
    try:
        with write_errors.reported(directory, what, needed):
            yield tmp
            _ordinary_permissions(tmp)
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path, data):
    """Atomically writes `data` (bytes) to `path`; returns `path`."""
    with replacing(path, needed=len(data)) as tmp, open(tmp, "wb") as f:
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


def write_json_files(values):
    """Atomically writes several JSON files together: every file is written in full before any
    replaces its destination, so a failed write (a full disk) leaves all of them as they were.

    Args:
        values: dict path -> JSON value (written indented, as `write_json`).
    """
    texts = {path: json.dumps(value, indent=2).encode("utf-8") for path, value in values.items()}
    with contextlib.ExitStack() as stack:
        for path, data in texts.items():
            tmp = stack.enter_context(replacing(path, needed=len(data)))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())


def save_keras_model(model, path):
    """Atomically saves `model` as a `.keras` archive at `path`."""
    with replacing(path, suffix=".keras") as tmp:
        model.save(tmp)


class AtomicDirectory:
    """Context manager yielding a temporary folder that replaces `path` only on success.

    An existing `path` is kept until the new folder is complete; on an exception the temporary
    folder is removed and `path` is untouched (a refused write becomes a
    `write_errors.WriteFailedError` naming the folder).

    With `owned`, replacing a folder replaces only what its writer wrote: the old folder's other
    entries (a README.txt, an eval/ folder the user keeps beside an index) are carried into the
    new folder. They are hard-linked in before the swap (no data is copied, and the originals stay
    where they are until the new folder is in place), so no crash can lose them.

    Args:
        path: the destination folder.
        overwrite: bool. Replace an existing `path`; when False, an existing `path` raises
            FileExistsError before anything is written.
        owned: None (the old folder is replaced whole) or the names of the old folder's entries
            that the writer owns; entries the new folder writes are replaced too.
        what: what the folder is, for messages (e.g. "the index").
    """

    def __init__(self, path, overwrite=False, owned=None, what=None):
        self.path = os.path.abspath(path)
        self.overwrite = overwrite
        self.owned = None if owned is None else set(owned)
        self.what = what or os.path.basename(self.path)
        self.tmp = None

    def __enter__(self):
        if os.path.exists(self.path) and not self.overwrite:
            raise FileExistsError(f"{self.path} already exists; pass overwrite to replace it.")
        parent = os.path.dirname(self.path)
        with write_errors.reported(parent, self.what):
            os.makedirs(parent, exist_ok=True)
            self.tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(self.path)}.")
            _ordinary_permissions(self.tmp, directory=True)
        return self.tmp

    def _kept(self, old, new):
        """The entries of the `old` folder that are not the writer's (see `owned`) and that the
        `new` folder does not have."""
        if self.owned is None or not os.path.isdir(old):
            return []
        written = set(os.listdir(new))
        return [name for name in sorted(os.listdir(old))
                if name not in self.owned and name not in written]

    def _carry_over(self):
        """Hard-links the user's entries of the old folder into the new one."""
        for name in self._kept(self.path, self.tmp):
            source, target = os.path.join(self.path, name), os.path.join(self.tmp, name)
            try:
                if os.path.isdir(source) and not os.path.islink(source):
                    shutil.copytree(source, target, symlinks=True, copy_function=os.link)
                else:
                    os.link(source, target, follow_symlinks=False)
            except OSError as error:
                raise OSError(
                    f"Cannot keep {source} in the new {self.what} (hard link: "
                    f"{error.strerror or error}); nothing was changed: move it out of "
                    f"{self.path} and run again.") from None

    def _swap(self):
        if not os.path.exists(self.path):
            os.replace(self.tmp, self.path)
            return
        # Move the old folder aside first so that a crash between the two renames leaves either
        # the old or the new folder under a recognisable name, never a mix.
        old = self.path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        # What reached the old folder after the links were made is moved over, not lost.
        for name in self._kept(old, self.path):
            os.replace(os.path.join(old, name), os.path.join(self.path, name))
        shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            try:
                self._carry_over()
                self._swap()
                return False
            except Exception as error:
                exc = error
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, Exception):
            # Described as this folder's write, not as a file of its hidden temporary folder.
            explained = write_errors.failure(exc, os.path.dirname(self.path), self.what,
                                             replace=True)
            if explained is not None and explained is not exc:
                raise explained from None
        if exc_type is None:
            raise exc
        return False
