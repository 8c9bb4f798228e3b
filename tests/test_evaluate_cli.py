"""evaluate.py end to end on a tiny trained run (a subprocess, as users run it); its flag and
folder checks in-process (`run_script`), each kind of exit still once in a real process."""

import functools
import importlib.util
import inspect
import json
import os
import pathlib
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from absl import app
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from dvml_tf.training import trainer
from dvml_tf.training.config import TrainConfig
from tests.test_train_cli import write_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def evaluate(*flags):
    return subprocess.run([sys.executable, "evaluate.py", *flags], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


@functools.cache
def script_module(script):
    """A top-level script (evaluate.py, export.py) imported as a module whose absl flags live in
    a FlagValues of its own: the test modules of a process define train.py's flags (this one
    imports tests.test_train_cli, which imports train), and evaluate.py's and export.py's
    --model_dir, --dataset, ... would clash with them in absl's global FLAGS."""
    own = flags.FlagValues()
    # Every absl.flags function that defines or marks flags, bound to `own` while the script's
    # module body runs (the scripts call them as flags.DEFINE_string(...), FLAGS = flags.FLAGS).
    binders = {name: functools.partial(function, flag_values=own)
               for name, function in vars(flags).items()
               if inspect.isfunction(function)
               and "flag_values" in inspect.signature(function).parameters}
    spec = importlib.util.spec_from_file_location(f"{script[:-3]}_script", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    with mock.patch.multiple(flags, FLAGS=own, **binders):
        spec.loader.exec_module(module)
    assert module.FLAGS is own
    return module


def run_script(script, *flag_args):
    """Runs `python <script> <flag_args>`'s main in this process (without paying a process's
    TensorFlow import): the message it stops with (its SystemExit, or the UsageError app.run
    would print), None if it finished. Any other exception, a traceback for the user, fails the
    calling test."""
    module = script_module(script)
    module.FLAGS.unparse_flags()
    argv = module.FLAGS([script, *flag_args])
    with flagsaver.flagsaver():  # main sets absl's --verbosity (a global flag)
        try:
            module.main(argv)
        except SystemExit as stop:
            assert stop.code not in (None, 0), stop
            return str(stop)
        except app.UsageError as error:
            return str(error)
    return None


def evaluate_in_process(*flag_args):
    return run_script("evaluate.py", *flag_args)


def run_metrics(run):
    """The metrics of a run's metrics.json (without the DVML diagnostics train.py adds)."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop(trainer.DIAGNOSTICS_KEY, None)
    return metrics


@pytest.fixture(scope="module")
def trained_folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    images = write_folder(root / "images")
    config = TrainConfig(
        config="folder", dataset="folder", data_dir=str(images), model_dir=str(root / "run"),
        image_size=16, resize_size=18, embedding_dim=8, num_samples=2, loss="triplet",
        classes_per_batch=4, images_per_class=2, steps=6, checkpoint_every=3, log_every=3,
        eval_batch_size=64,
    )
    trainer.Trainer(config, verbose=False).run()
    return root / "run"


def test_writes_metrics_figures_and_projector_and_agrees_with_tfsim(trained_folder_run, tmp_path):
    pytest.importorskip("tensorflow_similarity")
    output = tmp_path / "metrics.json"
    result = evaluate(f"--model_dir={trained_folder_run}", f"--output_json={output}",
                      f"--plots={tmp_path}/plots", f"--projector={tmp_path}/projector",
                      "--plot_points=20", "--tfsim")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(output.read_text())
    # The same keys and values as the run's own metrics.json (same model, same split).
    assert metrics == pytest.approx(run_metrics(trained_folder_run))
    assert "| NMI | F1 | R@1 | R@2 | R@4 | R@8 | map@r |" in result.stdout
    tfsim_rows = [line for line in result.stdout.splitlines()
                  if line.startswith(("| recall@", "| map@r"))]
    assert len(tfsim_rows) == 5 and all(float(r.split("|")[4]) <= 1e-6 for r in tfsim_rows)
    for name in ("tsne.png", "central_latent_space.png", "retrieval.png"):
        with Image.open(tmp_path / "plots" / name) as image:
            image.verify()
    names = {p.name for p in (tmp_path / "projector").iterdir()}
    assert {"vectors.tsv", "metadata.tsv", "projector_config.pbtxt"} <= names
    vectors = np.loadtxt(tmp_path / "projector" / "vectors.tsv", delimiter="\t")
    assert vectors.shape == (20, 8)  # 4 test classes x 5 images, 8-d embeddings


def test_the_exported_saved_model_scores_what_the_run_scored(trained_folder_run, tmp_path):
    from dvml_tf.export import exporter

    exporter.export_run(trained_folder_run, tmp_path / "export", litert_models=False)
    config = json.loads((trained_folder_run / "config.json").read_text())
    output = tmp_path / "served.json"
    result = evaluate(f"--saved_model={tmp_path}/export/saved_model", "--dataset=folder",
                      f"--data_dir={config['data_dir']}", f"--output_json={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    # Encoded files through embed_bytes (decode, conversion and preprocessing in the graph)
    # give the same metrics as the loader + Keras path of train.py.
    assert json.loads(output.read_text()) == pytest.approx(run_metrics(trained_folder_run),
                                                          abs=1e-6)


def test_bad_inputs_give_clear_errors(tmp_path):
    # A usage error as app.run reports it, in a real process.
    result = evaluate("--dataset=omniglot")
    assert result.returncode != 0
    assert "exactly one of --model_dir and --saved_model" in result.stderr
    (tmp_path / "not_a_run").mkdir()
    assert "not a training run folder" in evaluate_in_process(f"--model_dir={tmp_path}/not_a_run")
    assert "no saved_model.pb" in evaluate_in_process(f"--saved_model={tmp_path}/not_a_run",
                                                      "--dataset=omniglot")
    assert "--calibrate needs --saved_model (indexes and thresholds belong" in (
        evaluate_in_process(f"--model_dir={tmp_path}/not_a_run", "--calibrate"))


def test_a_saved_model_not_written_by_export_py_is_refused(tmp_path, capfd, caplog):
    import tensorflow as tf

    from dvml_tf.export import layout

    class NotAnExport(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def double(self, x):
            return {"y": 2.0 * x}

    module = NotAnExport()
    tf.saved_model.save(module, str(tmp_path / "foreign" / "1"),
                        signatures={"serving_default": module.double})
    # Without the export report inside the version folder: which dataset, which distance?
    # (A one-line exit: an exception other than SystemExit would fail evaluate_in_process.)
    assert "was not written by dvml_tf's export.py" in evaluate_in_process(
        f"--saved_model={tmp_path}/foreign", "--dataset=omniglot")
    # With a report but without the signatures export.py writes.
    layout.write_version_report(tmp_path / "foreign" / "1",
                                {"model": {"dataset": "omniglot", "normalized": True}})
    assert "needs the 'serving_default' and 'embed_bytes' signatures" in evaluate_in_process(
        f"--saved_model={tmp_path}/foreign", "--dataset=omniglot")
    assert "Traceback" not in capfd.readouterr().err + caplog.text  # nor a logged one


def test_unwritable_outputs_are_refused_before_evaluating(trained_folder_run, tmp_path, capfd,
                                                          caplog):
    (tmp_path / "a_file").write_text("notes")
    assert evaluate_in_process(f"--model_dir={trained_folder_run}",
                               f"--output_json={tmp_path}/a_file/metrics.json") == (
        f"evaluate.py: error: --output_json: Cannot write {tmp_path}/a_file/metrics.json: "
        f"{tmp_path}/a_file is a file, not a folder.")
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err + caplog.text
    assert "R@1" not in printed.out  # nothing was evaluated
    assert evaluate_in_process(f"--model_dir={trained_folder_run}", f"--plots={tmp_path}/a_file",
                               "--recall_ks=1,2") == (
        f"evaluate.py: error: --plots: {tmp_path}/a_file is a file, not a folder.")
    assert evaluate_in_process(f"--model_dir={trained_folder_run}", "--recall_ks=1,x") == (
        "evaluate.py: error: --recall_ks: expected comma-separated integers, got 'x' in '1,x'.")
    assert (tmp_path / "a_file").read_text() == "notes"


def test_a_full_disk_is_a_one_line_error_that_changes_nothing(catalogue_export, tmp_path):
    import shutil

    from dvml_tf.export import layout
    from tests import faults

    with faults.full_disk(tmp_path / "disk") as disk:
        export_dir = pathlib.Path(disk.path, "E")
        shutil.copytree(catalogue_export.export_dir, export_dir)
        output = pathlib.Path(disk.path, "metrics.json")
        output.write_text('{"recall@1": 0.5}')
        reports = [export_dir / layout.REPORT_FILE,
                   export_dir / "saved_model" / "1" / layout.ASSETS_EXTRA_DIR / layout.REPORT_FILE]
        before = [path.read_bytes() for path in reports]
        disk.fill(in_process=False)
        reason = ("no space left on device" if disk.mounted
                  else "file too large for the file system")
        data = [f"--saved_model={export_dir}", "--dataset=csv",
                f"--data_dir={catalogue_export.manifest}", "--noclustering"]
        for flags, folder, name in (([f"--output_json={output}"], disk.path, "metrics.json"),
                                    (["--calibrate", "--precisions=0.5"], reports[1].parent,
                                     layout.REPORT_FILE)):
            result = subprocess.run(disk.command("evaluate.py", *data, *flags), cwd=ROOT,
                                    env=ENV, capture_output=True, text=True, timeout=600)
            assert result.returncode == 1 and "Traceback" not in result.stderr, flags
            line = result.stderr.strip().splitlines()[-1]
            assert line.startswith(f"evaluate.py: error: Cannot write {name} in {folder}: "
                                   f"{reason}"), line
            assert line.endswith("Nothing was half-written. To go on, free some space or choose "
                                 "another folder." if disk.mounted
                                 else "choose another folder or raise the limit."), line
        # The earlier metrics and both reports are as they were; no temporary or lock file.
        assert output.read_text() == '{"recall@1": 0.5}'
        assert [path.read_bytes() for path in reports] == before
        assert sorted(os.listdir(disk.path)) == sorted(
            ["E", "metrics.json", *([".filler"] if disk.mounted else [])])
        assert not [name for name in os.listdir(export_dir) if name.startswith(".")]
