"""What a refused write tells the user: the shapes a full disk or a read-only folder takes
(errno, numpy's short write, TensorFlow's and faiss's messages) and the one line they become."""

import errno
import shutil

import pytest
import tensorflow as tf

from dvml_tf.utils import write_errors


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError("47264 requested and 14304 written"),  # numpy's ndarray.tofile
    tf.errors.ResourceExhaustedError(None, None, "ckpt-4_temp/part-00000-of-00001.data-00000-of-"
                                     "00001; No space left on device [Op:SaveV2]"),
    RuntimeError("Error in void faiss::write_HNSW(...): write error in I/hnsw.faiss: 10331 != "
                 "34320 (No space left on device)"),
])
def test_every_shape_of_a_full_disk_is_recognised(tmp_path, error):
    failed = write_errors.failure(error, tmp_path, "the index", needed=1536)
    free = write_errors.human_bytes(shutil.disk_usage(tmp_path).free)
    assert failed.errno == errno.ENOSPC
    assert str(failed) == (f"Cannot write the index in {tmp_path}: no space left on device "
                           f"({free} free, about 1.5 KB needed). Nothing was half-written. To go "
                           "on, free some space or choose another folder.")


def test_a_read_only_folder_and_what_the_user_keeps(tmp_path):
    failed = write_errors.failure(OSError(errno.EROFS, "Read-only file system"), tmp_path / "E",
                                  "the export", needed=10, kept="Version 1 is intact.")
    assert str(failed) == (f"Cannot write the export in {tmp_path / 'E'}: read-only file system. "
                           "Version 1 is intact. To go on, choose a writable folder.")
    # TensorFlow's words for it.
    error = tf.errors.FailedPreconditionError(None, None, "x; Read-only file system")
    assert write_errors.failure(error, tmp_path, "x").errno == errno.EROFS


@pytest.mark.parametrize("error", [
    ValueError("bad value"), OSError(errno.ENOENT, "No such file or directory"),
    RuntimeError("faiss: invalid metric"), tf.errors.InvalidArgumentError(None, None, "shape"),
])
def test_other_errors_are_not_write_failures(tmp_path, error):
    assert write_errors.failure(error, tmp_path, "x") is None
    with pytest.raises(type(error)), write_errors.reported(tmp_path, "x"):
        raise error


def test_an_inner_failure_is_kept_unless_replaced(tmp_path):
    inner = write_errors.failure(OSError(errno.ENOSPC, "full"), tmp_path / ".staging", "a.json")
    assert write_errors.failure(inner, tmp_path, "the export") is inner
    with pytest.raises(write_errors.WriteFailedError, match=f"Cannot write the export in "
                                                            f"{tmp_path}: no space left"), \
            write_errors.reported(tmp_path, "the export", replace=True):
        raise inner


def test_human_bytes():
    assert [write_errors.human_bytes(n) for n in (69, 1536, 3 << 30, 5 << 40)] == [
        "69 bytes", "1.5 KB", "3.0 GB", "5.0 TB"]
