"""The lock files of dvml_tf, with real processes: who holds a lock, killed holders, readers and
writers, and the removal of the file by its last holder (which must never let two processes in)."""

import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from dvml_tf.utils import locks
from dvml_tf.utils import write_errors
from tests import faults

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Child processes import the lock module without dvml_tf/__init__ (which imports TensorFlow).
PRELUDE = textwrap.dedent(f"""
    import os, sys, time, types
    package = types.ModuleType("dvml_tf")
    package.__path__ = [{str(ROOT / "dvml_tf")!r}]
    sys.modules["dvml_tf"] = package
    from dvml_tf.utils import locks
""")
# Holds a lock (exclusive, or shared with "shared") until the file `release` exists.
HOLDER = PRELUDE + textwrap.dedent("""
    path, ready, release, mode = sys.argv[1:5]
    with locks.FileLock(path, shared=mode == "shared"):
        open(ready, "w").close()
        while not os.path.exists(release):
            time.sleep(0.01)
""")
# Increments the number in `counter` `times` times, each under the lock (read, pause, write).
INCREMENTER = PRELUDE + textwrap.dedent("""
    path, counter, times = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for _ in range(times):
        with locks.FileLock(path, timeout=None):
            with open(counter) as f:
                value = int(f.read())
            time.sleep(0.001)
            with open(counter, "w") as f:
                f.write(str(value + 1))
""")


def start_holder(tmp_path, path, mode="exclusive", name="holder"):
    ready, release = tmp_path / f"{name}.ready", tmp_path / f"{name}.release"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(ready), str(release),
                                mode], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return process, release


def finish(process, release):
    release.touch()
    assert process.wait(timeout=60) == 0, process.stderr.read()


def test_a_second_process_is_refused_with_the_holders_pid_host_and_command(tmp_path):
    path = tmp_path / "run" / ".train.lock"  # the folder is created
    process, release = start_holder(tmp_path, path)
    try:
        owner = json.loads(path.read_text())
        assert owner["pid"] == process.pid and owner["host"] == socket.gethostname()
        with pytest.raises(locks.LockedError) as refused:
            locks.FileLock(path, busy=lambda holder: f"busy: {holder}").acquire()
        assert str(refused.value).startswith(f"busy: pid {process.pid} on "
                                             f"{socket.gethostname()}, started ")
        assert str(refused.value).endswith(f": -c {path} {tmp_path}/holder.ready "
                                           f"{tmp_path}/holder.release exclusive")
    finally:
        finish(process, release)
    assert not path.exists()  # its holder removed it on release
    with locks.FileLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert os.listdir(tmp_path / "run") == []


def test_a_killed_holder_never_blocks_the_next_one(tmp_path):
    path = tmp_path / ".I.build.lock"
    process, _ = start_holder(tmp_path, path)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert json.loads(path.read_text())["pid"] == process.pid  # left behind, but not held
    with locks.FileLock(path):
        pass
    assert not path.exists()


def test_removing_the_file_on_release_never_lets_two_processes_in(tmp_path):
    # Four processes take the lock 40 times each, and the file is removed after every release:
    # a process that opened it before its removal must not hold the lock together with one
    # that created the next file. Any overlap loses an increment.
    path, counter = tmp_path / ".lock", tmp_path / "counter"
    counter.write_text("0")
    processes = [subprocess.Popen([sys.executable, "-c", INCREMENTER, str(path), str(counter),
                                   "40"], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()
    assert counter.read_text() == "160"
    assert not path.exists()


def test_readers_share_the_lock_and_writers_wait_for_them(tmp_path):
    path = tmp_path / ".g.lock"
    process, release = start_holder(tmp_path, path, mode="shared")
    try:
        with locks.FileLock(path, shared=True, timeout=0):
            pass  # another reader
        assert path.exists()  # still held by the first reader
        with pytest.raises(locks.LockedError, match="locked by another process"):
            locks.FileLock(path).acquire()
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="still saving"):
            locks.FileLock(path, timeout=0.3, busy=lambda holder: "still saving").acquire()
        assert time.monotonic() - started >= 0.3
    finally:
        finish(process, release)
    assert not path.exists()  # the last reader removed it


def test_a_reentrant_lock_is_counted_within_the_process(tmp_path):
    path = tmp_path / ".train.lock"
    outer = locks.FileLock(path, reentrant=True).acquire()
    inner = locks.FileLock(path, reentrant=True).acquire()
    with pytest.raises(locks.LockedError):  # not re-entrant: conflicts like another process
        locks.FileLock(path).acquire()
    outer.release()
    assert path.exists()
    inner.release()
    assert not path.exists()


def test_a_read_only_folder_refuses_writers_clearly_and_lets_readers_read(tmp_path,
                                                                         monkeypatch):
    folder = tmp_path / "exports"
    folder.mkdir()
    with faults.read_only(folder, monkeypatch) as code:
        with pytest.raises(write_errors.WriteFailedError) as refused:
            locks.FileLock(folder / ".export.lock", what="the export's lock file").acquire()
        reason, advice = {errno.EROFS: ("read-only file system", "a writable folder"),
                          errno.EACCES: ("permission denied", "a folder you can write")}[code]
        assert str(refused.value) == (
            f"Cannot write the export's lock file in {folder}: {reason}. Nothing was "
            f"half-written. To go on, choose {advice}.")
        with locks.FileLock(folder / ".g.lock", shared=True):  # a reader reads without a lock
            pass
    assert os.listdir(folder) == []
