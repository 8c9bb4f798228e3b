"""Real full disks and read-only folders for the fault tests.

    with full_disk(tmp_path / "disk") as disk:     # a small file system of its own
        ... write what must succeed ...
        disk.fill()                                 # from now on every write fails
        ... the operation that must fail cleanly ...
        disk.free()                                 # and succeed again

`full_disk` mounts a small tmpfs when this process may mount (root with CAP_SYS_ADMIN, as on
the development machine) and `fill` writes a file that takes all of its free space: the writes
that follow fail with ENOSPC at the write call, in Python, numpy, faiss and TensorFlow's C++
alike. Where mounting is not allowed (CI containers), it falls back to the kernel's file size
limit (RLIMIT_FSIZE, set to 0 by `fill` for this process, or for the child processes started
with `command`): writes then fail with EFBIG at the same write calls. Python ignores the SIGXFSZ
that comes with it, so the error reaches the code as an OSError, as a full disk's does.

`read_only` bind-mounts a folder read-only (EROFS) when it may mount. Elsewhere a non-root user
loses the folder's write permission (EACCES); root, whom permission bits do not stop, gets EROFS
injected at `os.open` for paths in the folder (the first write of the lock files these tests
check), which is the documented reason for that last fallback.

DVML_TEST_NO_MOUNT=1 python -m pytest ... runs the fallbacks on a machine that may mount.
"""

import contextlib
import errno
import os
import resource
import subprocess
import sys
import textwrap

# Set (to anything) to run the fallbacks where mounting works too, as CI without it would.
NO_MOUNT = "DVML_TEST_NO_MOUNT"
_FILLER = ".filler"
_BLOCK = 1 << 20
# Runs sys.argv[1] as __main__ with a file size limit of 0, set after the heavy imports.
_LIMITED = textwrap.dedent("""
    import resource, runpy, sys
    import dvml_tf, tensorflow  # noqa: F401  (they write temporary files while importing)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def _mount(*args):
    if os.environ.get(NO_MOUNT):
        return False
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


class Disk:
    """A folder on a small file system whose free space a test takes away and gives back.

    Args:
        path: the folder (the mount point).
        mounted: whether it is a tmpfs (else the RLIMIT_FSIZE fallback).
    """

    def __init__(self, path, mounted):
        self.path = path
        self.mounted = mounted
        self.kind = "tmpfs" if mounted else "RLIMIT_FSIZE"
        self._limit = None
        self._children_full = False

    def fill(self, in_process=True):
        """Makes every later write fail (ENOSPC on the tmpfs, EFBIG under the size limit).

        Args:
            in_process: under the size limit, limit this process (else only the processes
                started with `command`: a Python process limited from its start could not
                even import its modules, which write temporary files).
        """
        if not self.mounted:
            if not in_process:
                self._children_full = True
                return
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            self._limit = (soft, hard)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
            return
        fd = os.open(os.path.join(self.path, _FILLER), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            block = _BLOCK
            while block:
                try:
                    os.write(fd, b"\0" * block)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    block //= 2
        finally:
            os.close(fd)
        assert os.statvfs(self.path).f_bavail == 0

    def command(self, script, *args):
        """The command line running the Python `script` in a child that finds the disk full
        (under the size limit, the limit is set once the script's modules are imported)."""
        if not self._children_full:
            return [sys.executable, script, *args]
        return [sys.executable, "-c", _LIMITED, script, *args]

    def free(self):
        """Gives the space back."""
        self._children_full = False
        if self._limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self._limit)
            self._limit = None
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.path, _FILLER))


@contextlib.contextmanager
def full_disk(path, size=64 << 20):
    """A `Disk` at `path` (created), unmounted or restored at the end."""
    os.makedirs(path, exist_ok=True)
    mounted = os.geteuid() == 0 and _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                           str(path))
    disk = Disk(str(path), mounted)
    try:
        yield disk
    finally:
        disk.free()
        if mounted:
            _umount(path)


@contextlib.contextmanager
def read_only(path, monkeypatch):
    """Makes the existing folder `path` read-only for the block (see the module docstring).

    Yields:
        the errno a write there fails with (EROFS or EACCES).
    """
    path = os.path.abspath(path)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield errno.EACCES
        finally:
            os.chmod(path, 0o755)
        return
    if _mount("--bind", path, path):
        try:
            if _mount("-o", "remount,bind,ro", path):
                yield errno.EROFS
                return
        finally:
            _umount(path)
    original = os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def refusing(file, flags, *args, **kwargs):
        if flags & writing and os.path.abspath(os.fspath(file)).startswith(path + os.sep):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
        return original(file, flags, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", refusing)
        yield errno.EROFS


class PickledPayload:
    """Unpickling it creates the file `marker`: what a planted pickle could run (a test saves
    an object array of these and checks that the marker never appears).

    Args:
        marker: the path of the file to create.
    """

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
