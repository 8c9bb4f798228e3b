"""Lock files: one writer per folder (or one writer and several readers), across processes.

    with locks.FileLock(path, busy=lambda holder: f"Another build is writing I ({holder})."):
        ...                                  # refused at once: LockedError(busy(holder))
    with locks.FileLock(path, timeout=None, waiting="Waiting for the other export."): ...
    with locks.FileLock(path, shared=True, timeout=600.0, busy=...): ...   # a reader

Every lock of dvml_tf (train.py's run folder, export.py's export folder, index builds, and
`GalleryIndex` saves and loads) is this one helper: an `fcntl.flock` on a small file.

* The kernel releases a flock when its process dies (Ctrl-C, SIGKILL, OOM killer), so a crashed
  writer never blocks the next one: there are no stale locks to clean up by hand.
* An exclusive holder writes its pid, host, start time and command into the file, so that a
  refused process can say who holds it.
* The file is removed when its last holder releases it, so nothing is left beside the folder.
  Removing a lock file is safe only with a check: a process that opened the file before it was
  removed would lock an orphan inode while a newcomer locks a fresh file. So a process that got
  the flock checks that the path still names the file it locked, and starts again if not; the
  file is only ever removed by a process holding it exclusively.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time

from absl import logging

from dvml_tf.utils import write_errors

# How often a waiting process retries a lock: short against a save, long against a syscall.
_POLL_SECONDS = 0.05
# Locks this process holds re-entrantly: absolute path -> [descriptor, count].
_HELD = {}
_HELD_GUARD = threading.Lock()


class LockedError(RuntimeError):
    """Another process holds the lock; the message names it and says what to do."""


def holder_of(path):
    """Who holds the lock file `path`, in words (its owner record), for error messages."""
    try:
        with open(path) as f:
            owner = json.load(f)
        return (f"pid {owner['pid']} on {owner['host']}, started {owner['started']}: "
                f"{owner['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "its owner is unknown"


def _same_file(fd, path):
    """Whether `path` still names the file open as `fd` (it was not removed and replaced)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)


def _try_flock(fd, mode):
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False


class FileLock:
    """An flock on a lock file, removed by its last holder (see the module docstring).

    Args:
        path: the lock file (its folder is created if needed).
        timeout: seconds to wait while another process holds the lock: 0 refuses at once
            (`LockedError`), None waits as long as it takes, a number waits that long and then
            raises `TimeoutError`.
        shared: take a shared (reader) lock. A reader whose lock file cannot be created (a
            read-only folder, where no writer can be either) reads without a lock.
        busy: callable holder -> message of the `LockedError` or `TimeoutError`, where holder
            says who holds the lock (`holder_of`).
        waiting: message logged once when the lock is busy and this process waits for it.
        reentrant: this process may take the lock again while it holds it (counted; released
            by the last release). Other processes are still refused.
        what: the lock file in words, for a folder that cannot be written.
    """

    def __init__(self, path, *, timeout=0.0, shared=False, busy=None, waiting=None,
                 reentrant=False, what="the lock file"):
        self.path = os.path.abspath(os.fspath(path))
        self.timeout = timeout
        self.shared = shared
        self.busy = busy or (lambda holder: f"{self.path} is locked by another process "
                                            f"({holder}).")
        self.waiting = waiting
        self.reentrant = reentrant
        self.what = what
        self._fd = None
        self._counted = False

    # ------------------------------------------------------------------------------ acquire

    def _open(self):
        """The lock file's descriptor, or None for a reader of a folder it cannot write."""
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            if self.shared:
                try:
                    return os.open(self.path, os.O_RDONLY)
                except OSError:
                    return None
            raise write_errors.failure(error, folder, self.what) or error from None

    def _refuse(self, error_class):
        raise error_class(self.busy(holder_of(self.path)))

    def acquire(self):
        """Takes the lock (see the class docstring for waiting and refusing).

        Returns:
            self.

        Raises:
            LockedError, TimeoutError: another process holds it.
            write_errors.WriteFailedError: an exclusive lock in a folder that cannot be written.
        """
        if self.reentrant:
            with _HELD_GUARD:
                held = _HELD.get(self.path)
                if held is not None:
                    held[1] += 1
                    self._counted = True
                    return self
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        logged = False
        while True:
            fd = self._open()
            if fd is None:
                return self  # a reader of a read-only folder: no lock
            try:
                if not _try_flock(fd, mode):
                    if self.timeout == 0:
                        self._refuse(LockedError)
                    if self.waiting and not logged:
                        logging.warning("%s", self.waiting)
                        logged = True
                    if deadline is None:
                        fcntl.flock(fd, mode)
                    else:
                        while not _try_flock(fd, mode):
                            if time.monotonic() >= deadline:
                                self._refuse(TimeoutError)
                            time.sleep(_POLL_SECONDS)
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed it on release: lock the current file instead
        self._fd = fd
        if not self.shared:
            owner = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
            with contextlib.suppress(OSError):  # who holds it is a courtesy: a full disk may refuse
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(owner).encode(), 0)
        if self.reentrant:
            with _HELD_GUARD:
                _HELD[self.path] = [fd, 1]
                self._counted = True
        return self

    # ------------------------------------------------------------------------------ release

    def release(self):
        """Releases the lock; the last holder removes the lock file."""
        fd, self._fd = self._fd, None
        if self._counted:
            self._counted = False
            with _HELD_GUARD:
                held = _HELD[self.path]
                held[1] -= 1
                if held[1]:
                    return
                del _HELD[self.path]
                fd = held[0]
        if fd is None:
            return
        try:
            # A reader removes the file only when no one else holds it (the exclusive lock is
            # then free); a writer already holds it exclusively.
            if (not self.shared or _try_flock(fd, fcntl.LOCK_EX)) and _same_file(fd, self.path):
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
