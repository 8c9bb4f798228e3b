import json
import os
import re
import stat

import pytest

from dvml_tf.utils import atomic


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def ordinary(directory=False):
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def test_write_text_replaces_the_file_with_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    atomic.write_text(path, "first")
    atomic.write_text(path, "second")
    assert path.read_text() == "second"
    assert mode(path) == ordinary()  # not mkstemp's private 0600
    assert os.listdir(path.parent) == ["metrics.json"]  # no temporary file left behind


def test_a_failed_write_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "config.json"
    atomic.write_text(path, "good")
    with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "good"
    assert os.listdir(tmp_path) == ["config.json"]


def test_atomic_directory_replaces_only_a_complete_folder(tmp_path):
    target = tmp_path / "export"
    with atomic.AtomicDirectory(target) as tmp:
        (tmp_path / os.path.basename(tmp) / "a.txt").write_text("v1")
    assert (target / "a.txt").read_text() == "v1"
    assert mode(target) == ordinary(directory=True)
    with pytest.raises(FileExistsError):
        atomic.AtomicDirectory(target).__enter__()
    with pytest.raises(RuntimeError), atomic.AtomicDirectory(target, overwrite=True) as tmp:
        (tmp_path / os.path.basename(tmp) / "a.txt").write_text("half")
        raise RuntimeError("crash while exporting")
    assert (target / "a.txt").read_text() == "v1"  # the old export is untouched
    with atomic.AtomicDirectory(target, overwrite=True) as tmp:
        (tmp_path / os.path.basename(tmp) / "b.txt").write_text("v2")
    assert sorted(os.listdir(target)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary or .old folder left


def test_save_keras_model_writes_a_loadable_archive(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = tmp_path / "model.keras"
    atomic.save_keras_model(model, path)
    loaded = keras.saving.load_model(path)
    assert loaded.count_params() == model.count_params()
    assert mode(path) == ordinary()


def test_write_json_writes_indented_json_atomically(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    assert atomic.write_json(path, {"b": 1, "a": [0.5]}, sort_keys=True) == path
    assert path.read_text() == '{\n  "a": [\n    0.5\n  ],\n  "b": 1\n}'
    assert json.loads(path.read_text()) == {"a": [0.5], "b": 1}
    with pytest.raises(TypeError):
        atomic.write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": [0.5], "b": 1}  # the good file stays


def test_check_writable_refuses_files_in_the_way_and_unwritable_folders(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    atomic.check_writable(tmp_path / "new" / "deeper" / "metrics.json")  # parents are created
    atomic.check_writable(tmp_path / "folder", directory=True)
    cases = [
        (tmp_path / "file" / "metrics.json", False,
         f"Cannot write {tmp_path}/file/metrics.json: {tmp_path}/file is a file, not a folder."),
        (tmp_path / "file" / "a" / "b", True,
         f"Cannot write {tmp_path}/file/a/b: {tmp_path}/file is a file, not a folder."),
        (tmp_path / "file", True, f"{tmp_path}/file is a file, not a folder."),
        (tmp_path / "folder", False, f"{tmp_path}/folder is a folder, not a file."),
    ]
    for path, directory, message in cases:
        with pytest.raises(ValueError) as error:
            atomic.check_writable(path, directory=directory)
        assert str(error.value) == message
    # Tests run as root, who may write anywhere: os.access answers as for another user.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError,
                       match=f"Cannot write {tmp_path}/folder/m.json: {tmp_path}/folder is not "
                             "writable"):
        atomic.check_writable(tmp_path / "folder" / "m.json")
    with pytest.raises(PermissionError, match=f"{tmp_path}/folder is not writable"):
        atomic.check_writable(tmp_path / "folder", directory=True)


def test_atomic_directory_keeps_what_its_writer_does_not_own(tmp_path):
    target = tmp_path / "I"
    with atomic.AtomicDirectory(target) as tmp:
        for name in ("index.json", "ids.npy", "old_backend.faiss"):
            (tmp_path / os.path.basename(tmp) / name).write_text("v1")
    (target / "README.txt").write_text("mine")
    (target / "eval").mkdir()
    (target / "eval" / "metrics.json").write_text("{}")
    (target / "latest").symlink_to("eval/metrics.json")
    inode = os.stat(target / "README.txt").st_ino
    owned = {"index.json", "ids.npy", "old_backend.faiss"}
    # A failure leaves the old folder, the user's files included, as it was.
    with pytest.raises(RuntimeError), atomic.AtomicDirectory(target, True, owned) as tmp:
        (tmp_path / os.path.basename(tmp) / "index.json").write_text("half")
        raise RuntimeError("crash")
    assert sorted(os.listdir(target)) == ["README.txt", "eval", "ids.npy", "index.json",
                                          "latest", "old_backend.faiss"]
    with atomic.AtomicDirectory(target, overwrite=True, owned=owned) as tmp:
        for name in ("index.json", "ids.npy", "new_backend.npy"):
            (tmp_path / os.path.basename(tmp) / name).write_text("v2")
    assert sorted(os.listdir(target)) == ["README.txt", "eval", "ids.npy", "index.json",
                                          "latest", "new_backend.npy"]
    assert (target / "index.json").read_text() == "v2"
    assert (target / "README.txt").read_text() == "mine"
    assert os.stat(target / "README.txt").st_ino == inode  # the same file, not a copy
    assert (target / "eval" / "metrics.json").read_text() == "{}"
    assert os.readlink(target / "latest") == "eval/metrics.json"
    assert sorted(os.listdir(tmp_path)) == ["I"]


def test_write_json_never_writes_nan(tmp_path):
    path = tmp_path / "metrics.json"
    atomic.write_json(path, {"map@r": float("nan"), "recall@1": [0.5, float("inf")],
                             "nested": {"x": float("-inf"), "n": 3}})
    # Strict JSON (Python would otherwise write the tokens NaN and Infinity).
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"map@r": None, "recall@1": [0.5, None],
                                "nested": {"x": None, "n": 3}}


def test_check_writable_tries_the_write_root_passes_permissions(tmp_path):
    # A dangling symbolic link on the way: os.access saw a writable folder above it.
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=re.escape(
            f"Cannot write {tmp_path}/out/sub/m.json: {tmp_path}/out is a symbolic link to "
            f"{tmp_path}/nowhere, which does not exist.")):
        atomic.check_writable(tmp_path / "out" / "sub" / "m.json")
    # A folder name longer than the file system allows.
    with pytest.raises(ValueError, match=r"Cannot write .*: File name too long"):
        atomic.check_writable(tmp_path / ("x" * 300) / "m.json")
    # /proc, whose permission bits root passes (os.access says writable), makes no folder.
    with pytest.raises((ValueError, PermissionError),
                       match=r"Cannot write /proc/dvml_check/m\.json: .*(/proc/dvml_check\)|"
                             r"/proc is not writable)"):
        atomic.check_writable("/proc/dvml_check/m.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left behind
    # Where the write works, the folders it needs are made.
    atomic.check_writable(tmp_path / "a" / "b" / "m.json")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
