"""What a refused write means to the user: one line naming the folder, the reason, and the space
it needed when that is known.

A full disk, a quota, a read-only mount or a folder the user may not write reaches our code in
several shapes: an `OSError` with an errno, numpy's errno-less ``OSError: 47264 requested and
14304 written``, a TensorFlow op error (``ResourceExhaustedError ... No space left on device
[Op:SaveV2]``) or faiss's ``RuntimeError: ... write error ... (No space left on device)``.
`failure` recognises all of them and turns them into a `WriteFailedError`; the command-line
front ends print its message as their one-line error.

    with write_errors.reported(folder, "the checkpoint", needed=bytes_needed):
        manager.save()
"""

import contextlib
import errno
import os
import re
import shutil

# errno -> (reason, what to do about it)
_REASONS = {
    errno.ENOSPC: ("no space left on device", "free some space or choose another folder"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another folder"),
    errno.EFBIG: ("file too large for the file system (or for the process's file size limit, "
                  "ulimit -f)", "choose another folder or raise the limit"),
    errno.EROFS: ("read-only file system", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a folder you can write"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write"),
}
# The same conditions as TensorFlow's C++ file system and numpy's tofile word them.
_MESSAGES = (
    ("no space left on device", errno.ENOSPC),
    ("disk quota exceeded", errno.EDQUOT),
    ("file too large", errno.EFBIG),
    ("read-only file system", errno.EROFS),
    ("permission denied", errno.EACCES),
)
# numpy's ndarray.tofile on a short write: the disk filled up under it.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


class WriteFailedError(OSError):
    """The file system refused a write (full, over quota, read-only, not permitted). The message
    names the folder; what was being written was not left half-written."""

    def __str__(self):
        return self.strerror  # the message alone, without OSError's "[Errno 28]" prefix


def _errno_of(error):
    """The errno a failed write stands for, or None when `error` is not a refused write."""
    if isinstance(error, WriteFailedError):
        return error.errno
    if isinstance(error, OSError) and error.errno in _REASONS:
        return error.errno
    text = str(getattr(error, "message", None) or error).lower()
    if isinstance(error, OSError) and error.errno is None and _SHORT_WRITE.search(text):
        return errno.ENOSPC
    # TensorFlow's errors and faiss's RuntimeError carry the OS's words, not an errno.
    if (type(error).__module__.startswith("tensorflow")
            or isinstance(error, (OSError, RuntimeError))):
        for words, code in _MESSAGES:
            if words in text:
                return code
    return None


def free_bytes(folder):
    """Bytes available to this user on the file system of `folder` (or of its nearest existing
    parent), or None when that cannot be read."""
    path = os.path.abspath(os.fspath(folder))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human_bytes(count):
    """1536 -> "1.5 KB" (powers of 1024, one decimal)."""
    value = float(count)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # unreachable; keeps linters sure of a return


def failure(error, folder, what, needed=None, kept=None, replace=False):
    """The `WriteFailedError` that explains `error`, or None when `error` is no refused write.

    Args:
        error: the exception raised by the write.
        folder: the folder being written (named in the message).
        what: what was being written, e.g. "the checkpoint", "the index".
        needed: bytes the write needed, when known.
        kept: what the user still has, e.g. "The last checkpoint, ckpt-4, is intact."
            Default: "Nothing was half-written."
        replace: describe a `WriteFailedError` of an inner step again at this level (e.g. the
            export rather than a file of its hidden staging folder); by default it is kept.

    Returns:
        `WriteFailedError` or None.
    """
    code = _errno_of(error)
    if code is None:
        return None
    if isinstance(error, WriteFailedError) and not replace:
        return error
    folder = os.path.abspath(os.fspath(folder))
    reason, advice = _REASONS[code]
    space = []
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = free_bytes(folder)
        if free is not None:
            space.append(f"{human_bytes(free)} free")
        if needed:
            space.append(f"about {human_bytes(needed)} needed")
    detail = f" ({', '.join(space)})" if space else ""
    message = (f"Cannot write {what} in {folder}: {reason}{detail}. "
               f"{kept or 'Nothing was half-written.'} To go on, {advice}.")
    return WriteFailedError(code, message)


@contextlib.contextmanager
def reported(folder, what, needed=None, kept=None, replace=False):
    """Turns a refused write inside the block into a `WriteFailedError` (see `failure`); any
    other exception passes unchanged.

    Args:
        folder, what, needed, kept, replace: see `failure`.
    """
    try:
        yield
    except Exception as error:
        explained = failure(error, folder, what, needed, kept, replace)
        if explained is None or explained is error:
            raise
        raise explained from None
