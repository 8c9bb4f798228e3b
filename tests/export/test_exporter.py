"""export_model / export_run and export.py: layout, report, versions, atomicity, what E keeps,
bad folders. (The export's grading, parity and Recall@1, is `verify`: tests/export/test_verify.py.)
"""

import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from dvml_tf import task
from dvml_tf.export import exporter
from dvml_tf.export import layout
from dvml_tf.export import litert
from dvml_tf.export import retrieval
from dvml_tf.export import verify
from dvml_tf.training import trainer as trainer_lib
from dvml_tf.training.config import TrainConfig
from tests.test_evaluate_cli import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = dict(calibration_images=40)
ARTIFACTS = ["saved_model", "model.tflite", "model_dynamic_range.tflite", "model_int8.tflite",
             "retrieval.tflite", "retrieval_gallery.json", "export_report.json"]


def _snapshot(folder):
    """Every file under a folder with its bytes (to check that nothing changed)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def _visible(folder):
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


@pytest.fixture
def exported(tiny_export):
    return tiny_export.model, tiny_export.splits, tiny_export.result


@pytest.fixture
def config(tiny_export):
    return tiny_export.config


def test_layout_and_report(exported):
    model, splits, result = exported
    export_dir = result.export_dir
    assert result.version == 1
    assert _visible(export_dir) == sorted(ARTIFACTS)
    # Nothing besides them: no staging folder, no lock file is left behind.
    assert sorted(set(os.listdir(export_dir)) - set(ARTIFACTS)) == []
    assert os.listdir(os.path.join(export_dir, "saved_model")) == ["1"]
    assert result.saved_model_dir == os.path.join(export_dir, "saved_model", "1")
    # Readable by a model server running as another user (umask permitting).
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(export_dir).st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(os.path.join(export_dir, "export_report.json")).st_mode & 0o777 == (
        0o666 & ~umask)
    assert os.path.exists(os.path.join(export_dir, "saved_model", "1", "saved_model.pb"))
    with open(os.path.join(export_dir, "export_report.json")) as f:
        report = json.load(f)
    assert report == json.loads(json.dumps(result.report))
    # The SavedModel carries its own copy of the report.
    assert layout.read_version_report(result.saved_model_dir) == report
    # Sizes by role, as the files are named in `files`.
    sizes, files = report["sizes_bytes"], report["files"]
    assert files["float32"] == "model.tflite" and files["int8"] == "model_int8.tflite"
    assert files["retrieval"] == "retrieval.tflite"
    for name in ("float32", "dynamic_range", "int8", "retrieval", "retrieval_gallery"):
        assert sizes[name] == os.path.getsize(os.path.join(export_dir, files[name]))
    assert sizes["saved_model"] == exporter._path_size(result.saved_model_dir) - os.path.getsize(
        os.path.join(result.saved_model_dir, "assets.extra", "export_report.json"))
    # The exporter writes; it does not grade (verify.verify_export does).
    for measured in ("parity_vs_keras", "recall_at_1", "latency_ms_per_image", "checks"):
        assert measured not in report
    assert report["files"]["int8_calibration_images"] == 40
    assert report["files"]["saved_model"] == "saved_model/1"
    assert report["raw_input"]["raw_form"] == {"conversion": "omniglot_ink", "stored_size": 32,
                                               "raw_size": [105, 105]}
    assert report["raw_input"]["preprocess"]["crop_size"] == 28
    assert report["model"]["source"] == "tiny" and report["model"]["embedding_dim"] == 16
    assert report["model"]["normalized"] == bool(model.normalize_embeddings)
    assert report["signatures"]["serving_default"]["inputs"]["images"] == (
        "uint8 [None, 105, 105, 3]")
    # The pixel limit embed_bytes enforces: the run's (TrainConfig.max_image_pixels).
    assert report["signatures"]["embed_bytes"]["max_image_pixels"] == 8192 * 8192
    assert layout.max_image_pixels(report) == 8192 * 8192
    assert layout.max_image_pixels({"signatures": {}}) == 8192 * 8192  # older exports
    with open(os.path.join(export_dir, "retrieval_gallery.json")) as f:
        assert json.load(f)["labels"] == splits.test.labels.tolist()
    # The retriever carries the labels too: a gallery image's top row is itself, with its label.
    runner = retrieval.Retriever(os.path.join(export_dir, "retrieval.tflite"))
    indices, _ = runner.query(splits.test.images[3])
    assert indices[0] == 3
    np.testing.assert_array_equal(runner.last_labels(), splits.test.labels[indices])


def test_path_size(tmp_path):
    (tmp_path / "a").write_bytes(b"12345")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"123")
    assert exporter._path_size(tmp_path / "a") == 5
    assert exporter._path_size(tmp_path) == 8


def test_a_second_export_adds_a_version_and_keeps_the_first(exported, config, tmp_path):
    model, splits, result = exported
    export_dir = tmp_path / "E"
    shutil.copytree(result.export_dir, export_dir)
    before = _snapshot(export_dir)
    second = exporter.export_model(model, config, export_dir, raw_splits=splits,
                                   litert_models=False, **FAST)
    assert second.version == 2
    assert sorted(os.listdir(export_dir / "saved_model")) == ["1", "2"]
    assert layout.existing_versions(export_dir / "saved_model") == [1, 2]
    after = _snapshot(export_dir)
    # Version 1 and the LiteRT files of the first export are kept as they were: an export
    # writes its own artifacts and touches nothing else in E.
    for name, content in before.items():
        if name != "export_report.json":
            assert after[name] == content, name
    assert _visible(export_dir) == sorted(ARTIFACTS)
    # The report describes this export: version 2, no LiteRT files of its own; the LiteRT files
    # left in E are listed with the version of the export that wrote them.
    report = json.loads((export_dir / "export_report.json").read_text())
    assert report == json.loads(json.dumps(second.report))
    assert report["version"] == 2 and report["files"] == {"saved_model": "saved_model/2"}
    assert report["files_from_earlier_exports"] == {
        "model.tflite": {"role": "float32", "version": 1},
        "model_dynamic_range.tflite": {"role": "dynamic_range", "version": 1},
        "model_int8.tflite": {"role": "int8", "version": 1},
        "retrieval.tflite": {"role": "retrieval", "version": 1},
        "retrieval_gallery.json": {"role": "retrieval_gallery", "version": 1},
    }
    assert layout.read_version_report(export_dir / "saved_model" / "2") == report
    first = layout.read_version_report(export_dir / "saved_model" / "1")
    assert first["version"] == 1
    # The same model exported again: the same weights, hence the same contract fingerprint.
    assert report["model"]["weights"] == first["model"]["weights"]
    assert not [p for p in os.listdir(export_dir) if p.startswith(exporter.STAGING_PREFIX)]
    assert sorted(os.listdir(tmp_path)) == ["E"]


def test_a_re_export_keeps_a_users_files_and_folders(exported, config, tmp_path):
    model, splits, result = exported
    export_dir = tmp_path / "E"
    shutil.copytree(result.export_dir, export_dir)
    (export_dir / "notes.txt").write_text("version 1 is in production\n")
    (export_dir / "clients").mkdir()
    (export_dir / "clients" / "client.py").write_text("print('hello')\n")
    (export_dir / "clients" / "fixtures").mkdir()
    (export_dir / "clients" / "fixtures" / "query.png").write_bytes(b"\x89PNG...")
    sibling = tmp_path / "E.old"
    shutil.copytree(result.export_dir, sibling)
    (sibling / "notes.txt").write_text("the previous export\n")
    user_files = {name: content for name, content in _snapshot(export_dir).items()
                  if name == "notes.txt" or name.startswith("clients")}
    sibling_before = _snapshot(sibling)
    again = exporter.export_model(model, config, export_dir, raw_splits=splits, top_k=5, **FAST)
    assert again.version == 2
    after = _snapshot(export_dir)
    for name, content in user_files.items():
        assert after[name] == content, name
    assert _snapshot(sibling) == sibling_before
    assert sorted(os.listdir(tmp_path)) == ["E", "E.old"]
    assert _visible(export_dir) == sorted([*ARTIFACTS, "notes.txt", "clients"])
    # The report's copy lives inside the new version folder, equal to E's report.
    copy = export_dir / "saved_model" / "2" / "assets.extra" / "export_report.json"
    assert copy.is_file()
    assert json.loads(copy.read_text()) == json.loads(
        (export_dir / "export_report.json").read_text()) == json.loads(json.dumps(again.report))


def test_an_existing_version_is_kept_unless_overwrite(exported, config, tmp_path):
    model, splits, result = exported
    export_dir = tmp_path / "E"
    shutil.copytree(result.export_dir, export_dir)
    before = _snapshot(export_dir)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        exporter.export_model(model, config, export_dir, version=1, raw_splits=splits, **FAST)
    assert _snapshot(export_dir) == before
    again = exporter.export_model(model, config, export_dir, version=1, overwrite=True,
                                  raw_splits=splits, litert_models=False, **FAST)
    assert again.version == 1 and os.listdir(export_dir / "saved_model") == ["1"]
    assert layout.read_version_report(export_dir / "saved_model" / "1") == json.loads(
        json.dumps(again.report))
    assert not [p for p in os.listdir(export_dir) if p.startswith(exporter.STAGING_PREFIX)]


def test_a_failed_export_leaves_the_previous_one_untouched(exported, config, tmp_path,
                                                           monkeypatch):
    model, splits, result = exported
    export_dir = tmp_path / "E"
    shutil.copytree(result.export_dir, export_dir)
    before = _snapshot(export_dir)

    def fail(*args, **kwargs):
        raise RuntimeError("conversion crashed")

    monkeypatch.setattr(litert, "convert_embedding_model", fail)
    with pytest.raises(RuntimeError, match="conversion crashed"):
        exporter.export_model(model, config, export_dir, raw_splits=splits, **FAST)
    assert _snapshot(export_dir) == before
    # No staging folder left behind, neither in E nor next to it.
    assert sorted(os.listdir(export_dir)) == sorted(ARTIFACTS)
    assert sorted(os.listdir(tmp_path)) == ["E"]


def test_staging_folders_of_killed_exports_are_removed_and_nothing_else(tmp_path):
    export_dir = tmp_path / "E"
    export_dir.mkdir()
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    killed = export_dir / f"{exporter.STAGING_PREFIX}killed"
    killed.mkdir()
    (killed / "owner.json").write_text(json.dumps({"pid": int(dead.stdout), "host": host}))
    running = export_dir / f"{exporter.STAGING_PREFIX}running"
    running.mkdir()
    (running / "owner.json").write_text(json.dumps({"pid": os.getpid(), "host": host}))
    elsewhere = export_dir / f"{exporter.STAGING_PREFIX}other_host"
    elsewhere.mkdir()
    (elsewhere / "owner.json").write_text(json.dumps({"pid": int(dead.stdout),
                                                      "host": host + ".elsewhere"}))
    unowned = export_dir / f"{exporter.STAGING_PREFIX}unowned"
    unowned.mkdir()
    (export_dir / "user_folder").mkdir()
    assert exporter.remove_stale_staging(str(export_dir)) == [str(killed)]
    assert sorted(os.listdir(export_dir)) == sorted(
        [running.name, elsewhere.name, unowned.name, "user_folder"])


def test_refuses_folders_that_are_not_exports(exported, config, tmp_path):
    model, splits, _ = exported
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"...")
    with pytest.raises(ValueError, match="not a dvml_tf export"):
        exporter.export_model(model, config, foreign, raw_splits=splits, **FAST)
    assert os.listdir(foreign) == ["holiday.jpg"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        exporter.export_model(model, config, a_file, raw_splits=splits, **FAST)
    with pytest.raises(ValueError, match="--version must be an integer >= 1"):
        exporter.resolve_version(str(tmp_path / "new"), version=0)
    with pytest.raises(ValueError, match=r"--top_k must be in \[1, 24\]"):
        exporter.export_model(model, config, tmp_path / "K", raw_splits=splits, top_k=25, **FAST)
    assert not os.path.exists(tmp_path / "K")
    converted = dataclasses.replace(splits, raw=False)
    with pytest.raises(ValueError, match=r"hold converted images; pass raw ones"):
        exporter.export_model(model, config, tmp_path / "C", raw_splits=converted, **FAST)
    assert not os.path.exists(tmp_path / "C")


def test_without_data_litert_needs_it_and_the_saved_model_does_not(exported, config, tmp_path,
                                                                   monkeypatch):
    model, splits, _ = exported

    def unavailable(config, raw=False, data_dir=None):
        raise FileNotFoundError("omniglot is not prepared.")

    monkeypatch.setattr(task, "load_splits", unavailable)
    with pytest.raises(FileNotFoundError, match="--skip_litert"):
        exporter.export_model(model, config, tmp_path / "E", **FAST)
    assert not os.path.exists(tmp_path / "E")
    result = exporter.export_model(model, config, tmp_path / "E", litert_models=False, **FAST)
    assert _visible(tmp_path / "E") == ["export_report.json", "saved_model"]
    # Without data the input form follows the loader's rule for the dataset: Omniglot's.
    assert tuple(result.report["raw_input"]["raw_form"]["raw_size"]) == (105, 105)
    assert result.report["files"] == {"saved_model": "saved_model/1"}
    # Graded afterwards, on raw images of the same form: the SavedModel is the Keras model.
    figures = verify.verify_export(result.export_dir, model, config, splits, parity_images=8)
    parity = figures["parity_vs_keras"]
    assert parity["images"] == "8 images of the test split"
    assert parity["saved_model_serving_default"]["cosine_min"] >= 0.99999
    assert parity["saved_model_embed_bytes_png"]["cosine_min"] >= 0.99999
    assert not [key for key in parity if key.startswith("litert")]
    assert "recall_at_1" not in figures and "latency_ms_per_image" not in figures
    assert figures["checks"] == {"saved_model_cosine_min>=0.99999": True}


def _photo_folder(root):
    rng = np.random.default_rng(0)
    for c in range(8):
        os.makedirs(root / f"class{c}")
        base = rng.uniform(0, 255, 3)
        for i in range(4):
            image = np.clip(base + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_export_py_end_to_end_on_a_trained_folder_run(tmp_path, monkeypatch, capfd, caplog):
    data_dir = _photo_folder(tmp_path / "photos")
    model_dir = tmp_path / "run"
    config = TrainConfig(dataset="folder", data_dir=str(data_dir), model_dir=str(model_dir),
                         image_size=28, resize_size=32, embedding_dim=8, classes_per_batch=2,
                         steps=2, checkpoint_every=2, eval_batch_size=8)
    trainer_lib.Trainer(config, verbose=False).run()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    export_dir = tmp_path / "E"
    command = [sys.executable, os.path.join(ROOT, "export.py"), f"--model_dir={model_dir}",
               f"--export_dir={export_dir}", "--verify", "--int8_calibration_images=16",
               "--top_k=4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert "Exported version 1" in done.stdout, done.stderr[-4000:]
    with open(export_dir / "export_report.json") as f:
        report = json.load(f)
    assert report["raw_input"]["raw_form"]["stored_size"] == 32
    assert report["raw_input"]["raw_form"]["raw_size"] is None
    assert layout.read_version_report(export_dir / "saved_model" / "1") == report
    # --verify: the export graded against the Keras model, in E/verification.json.
    with open(export_dir / layout.VERIFICATION_FILE) as f:
        verification = json.load(f)
    parity = verification["parity_vs_keras"]
    assert parity["saved_model_serving_default"]["cosine_min"] >= 0.99999
    assert parity["saved_model_embed_bytes_png"]["cosine_min"] >= 0.99999
    assert parity["litert_float32"]["cosine_min"] >= 0.9999
    assert verification["recall_at_1"]["num_images"] == 16
    checks = verification["checks"]
    assert len(checks) == 3 and checks["saved_model_cosine_min>=0.99999"]
    assert checks["litert_float32_cosine_min>=0.9999"]
    # Exits 0 exactly when every check passed (the int8 Recall@1 check depends on the numbers).
    assert (done.returncode == 0) == all(checks.values()), done.stderr[-4000:]
    if done.returncode:
        assert "export.py: verification failed" in done.stderr

    # A run folder without a trained model, and a failed check (the rule itself:
    # test_verify.py): one-line exits of export.py's main, run in this process (a process of its
    # own would only add its TensorFlow import; the run above is export.py in a process).
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(model_dir / "config.json", untrained / "config.json")
    capfd.readouterr()
    caplog.clear()
    error = run_script("export.py", f"--model_dir={untrained}", f"--export_dir={tmp_path / 'E2'}",
                       *command[4:])
    assert "holds no trained model" in error
    assert "Traceback" not in capfd.readouterr().err + caplog.text  # nor a logged one
    assert not os.path.exists(tmp_path / "E2")

    monkeypatch.setattr(verify, "checks",
                        lambda parities, recall: {"saved_model_cosine_min>=0.99999": False})
    assert run_script("export.py", f"--model_dir={model_dir}",
                      f"--export_dir={tmp_path / 'E3'}", "--skip_litert", "--verify") == (
        "export.py: verification failed: saved_model_cosine_min>=0.99999 (see "
        "verification.json).")
    with open(tmp_path / "E3" / layout.VERIFICATION_FILE) as f:
        assert json.load(f)["checks"] == {"saved_model_cosine_min>=0.99999": False}


def test_files_from_earlier_exports_carry_over_and_drop_what_is_rewritten_or_gone(tmp_path):
    export_dir = tmp_path / "E"
    export_dir.mkdir()
    for name in ("model.tflite", "model_int8.tflite", "verification.json", "notes.txt"):
        (export_dir / name).write_text("{}")
    (export_dir / "verification.json").write_text(json.dumps({"saved_model_version": 2}))
    (export_dir / "export_report.json").write_text(json.dumps({
        "version": 3, "files": {"saved_model": "saved_model/3"},
        "files_from_earlier_exports": {"model.tflite": {"role": "float32", "version": 1},
                                       "model_int8.tflite": {"role": "int8", "version": 1},
                                       "retrieval.tflite": {"role": "retrieval", "version": 1}},
    }))
    # retrieval.tflite is gone, model.tflite is rewritten now; notes.txt is not an artifact.
    assert exporter.earlier_artifacts(str(export_dir), {"saved_model/4", "model.tflite"}) == {
        "model_int8.tflite": {"role": "int8", "version": 1},
        "verification.json": {"role": "verification", "version": 2},
    }


def test_the_litert_demo_reads_the_report_of_the_export_that_wrote_the_file(exported, tmp_path):
    """A re-export with --skip_litert of a model with normalized embeddings: E's report says
    normalized, model_int8.tflite (from version 1, unnormalized) must not be normalized."""
    import keras

    from dvml_tf.export import litert as litert_lib
    from dvml_tf.training.config import TrainConfig as Config

    model, splits, result = exported
    export_dir = tmp_path / "E"
    shutil.copytree(result.export_dir, export_dir)
    assert not model.normalize_embeddings
    triplet = Config(embedding_dim=16, loss="triplet", images_per_class=2)
    keras.utils.set_random_seed(1)
    other = task.build_model(triplet)
    assert other.normalize_embeddings
    exporter.export_model(other, triplet, export_dir, raw_splits=splits, litert_models=False)
    np.save(tmp_path / "query.npy", splits.test.images[0])
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['litert_retrieval.py', '--export_dir', {str(export_dir)!r}, '--image', "
        f"{str(tmp_path / 'query.npy')!r}, '--embed', '--model', 'model_int8.tflite']\n"
        f"runpy.run_path({os.path.join(ROOT, 'examples', 'litert_retrieval.py')!r}, "
        "run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("note: model_int8.tflite was written by the export of version 1; "
            "export_report.json describes version 2: using version 1's report.") in done.stdout
    expected = litert_lib.LiteRTModel(str(export_dir / "model_int8.tflite"))(
        splits.test.images[:1])[0]
    norm = float(re.search(r"L2 norm ([0-9.]+)", done.stdout)[1])
    assert norm == pytest.approx(np.linalg.norm(expected), abs=1e-3)
    assert abs(norm - 1.0) > 1e-2  # not normalized as the new report would have it


CHILD_EXPORT = """
import os, sys, time
import keras
from absl import logging
from dvml_tf import task
from dvml_tf.export import exporter
from dvml_tf.export import saved_model as saved_model_lib
from dvml_tf.testing import synthetic_data
from dvml_tf.training.config import TrainConfig

export_dir, seed, ready, go, stall, go_again = sys.argv[1:7]
logging.set_verbosity(logging.INFO)
config = TrainConfig(embedding_dim=8)
keras.utils.set_random_seed(int(seed))
model = task.build_model(config)
splits = synthetic_data.synthetic_raw_splits(task.raw_form(config), task.preprocess_config(config),
                                             train_classes=3, test_classes=2, images_per_class=2)


def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.01)


open(ready, "w").close()
wait_for(go)
result = exporter.export_model(model, config, export_dir, raw_splits=splits, litert_models=False,
                               source=f"process {seed}")
print("EXPORTED", result.version, flush=True)
if stall != "-":
    write = saved_model_lib.write_saved_model

    def slow(*args, **kwargs):  # an export killed half-way, after its SavedModel
        write(*args, **kwargs)
        open(stall, "w").close()
        time.sleep(600)

    saved_model_lib.write_saved_model = slow
    wait_for(go_again)
    exporter.export_model(model, config, export_dir, raw_splits=splits, litert_models=False,
                          source=f"process {seed}, again")
"""


def _start_export(tmp_path, export_dir, seed, stall="-", go_again="-"):
    """A process exporting a model of its own into export_dir once `go` exists; with `stall`,
    it then exports again once `go_again` exists, and stops for good after that export's
    SavedModel, saying so in the file `stall`."""
    log = open(tmp_path / f"export{seed}.log", "w")  # noqa: SIM115 (closed by the caller)
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD_EXPORT, str(export_dir), str(seed),
         str(tmp_path / f"ready{seed}"), str(tmp_path / "go"), str(stall), str(go_again)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
             "PYTHONPATH": ROOT})
    return process, log


def _wait_for(condition, processes, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        for process in processes:
            assert process.poll() is None, f"a process exited while waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_concurrent_exports_land_as_two_versions_and_a_sigkilled_one_leaves_e_intact(
        exported, config, tmp_path, caplog):
    """Two export processes at once land as versions 2 and 3; one of them, SIGKILLed in its
    next export after writing that export's SavedModel, leaves E as it was, and the export
    after it removes the killed one's staging folder. (One process shows both the concurrent
    and the killed export: every process pays a TensorFlow import.)"""
    import tensorflow as tf

    model, splits, result = exported
    export_dir = tmp_path / "E"
    shutil.copytree(result.export_dir, export_dir)
    before = _snapshot(export_dir)
    children = [_start_export(tmp_path, export_dir, 11),
                _start_export(tmp_path, export_dir, 12, stall=tmp_path / "stalled",
                              go_again=tmp_path / "go_again")]
    (first, _), (second, _) = children
    logs = {seed: tmp_path / f"export{seed}.log" for seed in (11, 12)}
    try:
        _wait_for(lambda: all((tmp_path / f"ready{s}").exists() for s in (11, 12)),
                  [first, second], "both processes to build their model")
        # Hold E's lock while both start exporting, so that both are inside export_model at once
        # and find it taken; then let them go together.
        with open(export_dir / exporter.LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (tmp_path / "go").touch()
            _wait_for(lambda: all("Another export is writing into" in log.read_text()
                                  for log in logs.values()),
                      [first, second], "both exports to wait for the lock")
            fcntl.flock(lock, fcntl.LOCK_UN)
        assert first.wait(timeout=600) == 0
        # The second process waits for go_again once its export has returned.
        _wait_for(lambda: "EXPORTED" in logs[12].read_text(), [second],
                  "the second export to land")
        outputs = {seed: log.read_text() for seed, log in logs.items()}
        versions = {seed: int(re.search(r"EXPORTED (\d+)", text)[1])
                    for seed, text in outputs.items()}
        assert sorted(versions.values()) == [2, 3]
        assert layout.existing_versions(export_dir / "saved_model") == [1, 2, 3]
        # Each version is complete and is the model of the process that reported it.
        embeddings = {}
        images = splits.test.images[:2]
        for seed, version in versions.items():
            version_dir = export_dir / "saved_model" / str(version)
            assert layout.read_version_report(version_dir)["model"]["source"] == (
                f"process {seed}")
            serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
            embeddings[seed] = serve(images=tf.constant(images))["embedding"].numpy()
        assert np.abs(embeddings[11] - embeddings[12]).max() > 1e-3
        # E's report is the one of the last export; version 1 and the LiteRT files are
        # untouched.
        assert json.loads((export_dir / "export_report.json").read_text())["version"] == 3
        after = _snapshot(export_dir)
        for name, content in before.items():
            if name != "export_report.json":
                assert after[name] == content, name
        assert not [p for p in os.listdir(export_dir) if p.startswith(exporter.STAGING_PREFIX)]

        # The second process exports again and is SIGKILLed after that export's SavedModel.
        before = after
        (tmp_path / "go_again").touch()
        _wait_for(lambda: (tmp_path / "stalled").exists(), [second], "the export to stall")
        second.send_signal(signal.SIGKILL)
        assert second.wait(timeout=60) == -signal.SIGKILL
    finally:
        for process, log in children:
            process.kill()
            log.close()
    staging = [p for p in os.listdir(export_dir) if p.startswith(exporter.STAGING_PREFIX)]
    assert len(staging) == 1  # the killed export's half-made version, hidden in E
    assert os.path.isdir(export_dir / staging[0] / "saved_model" / "4")
    after = _snapshot(export_dir)
    # A SIGKILLed process cannot remove its lock file; the kernel released its lock, though.
    assert f'"pid": {second.pid}' in after.pop(exporter.LOCK_FILE).decode()
    assert {k: v for k, v in after.items()
            if not k.startswith(exporter.STAGING_PREFIX)} == before
    assert layout.existing_versions(export_dir / "saved_model") == [1, 2, 3]

    with caplog.at_level("WARNING"):
        again = exporter.export_model(model, config, export_dir, raw_splits=splits,
                                      litert_models=False, **FAST)
    assert again.version == 4
    assert f"Removing {export_dir / staging[0]}, left by an export (pid {second.pid}" \
        in caplog.text
    assert not [p for p in os.listdir(export_dir) if p.startswith(exporter.STAGING_PREFIX)]
    assert not (export_dir / exporter.LOCK_FILE).exists()  # the next holder removed it
    after = _snapshot(export_dir)
    for name, content in before.items():
        if name != "export_report.json":
            assert after[name] == content, name


def test_a_full_disk_is_a_clear_error_and_e_stays_as_it_was(exported, config, tmp_path):
    from dvml_tf.utils import write_errors
    from tests import faults

    model, splits, result = exported
    with faults.full_disk(tmp_path / "disk") as disk:
        export_dir = os.path.join(disk.path, "E")
        shutil.copytree(result.export_dir, export_dir)
        before = _snapshot(export_dir)
        disk.fill()
        reason = ("no space left on device" if disk.mounted
                  else "file too large for the file system")
        with pytest.raises(write_errors.WriteFailedError) as failed:
            exporter.export_model(model, config, export_dir, raw_splits=splits,
                                  litert_models=False, **FAST)
        assert str(failed.value).startswith(
            f"Cannot write the export (version 2) in {export_dir}: {reason}"), failed.value
        assert "What the folder held before is intact." in str(failed.value)
        # evaluate.py --calibrate's write of the thresholds into both reports.
        with pytest.raises(write_errors.WriteFailedError, match=(
                f"Cannot write export_report.json in {export_dir}/saved_model/1/assets.extra: "
                f"{reason}")):
            exporter.update_report(os.path.join(export_dir, "saved_model", "1"), "matching",
                                   {"thresholds": {"0.9": 0.5}})
        # No staging folder, no temporary file, no lock file: E is byte for byte as it was.
        assert _snapshot(export_dir) == before
        assert sorted(os.listdir(export_dir)) == sorted(ARTIFACTS)


def test_a_read_only_export_folder_is_a_clear_error(exported, config, tmp_path, monkeypatch):
    from dvml_tf.utils import write_errors
    from tests import faults

    model, splits, result = exported
    export_dir = tmp_path / "E"
    shutil.copytree(result.export_dir, export_dir)
    before = _snapshot(export_dir)
    with faults.read_only(export_dir, monkeypatch) as code:
        reason = os.strerror(code).lower()
        with pytest.raises(write_errors.WriteFailedError,
                           match=f"Cannot write the export's lock file in {export_dir}: {reason}"):
            exporter.export_model(model, config, export_dir, raw_splits=splits,
                                  litert_models=False, **FAST)
    assert _snapshot(export_dir) == before
