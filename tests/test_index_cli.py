"""index.py end to end, as users run it (subprocesses): build, search, merge, evaluate.py --index
and --calibrate, and the faults: a killed build and its resumption, two builds into one folder
at once (real processes and signals), undecodable query images, another model's index."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dvml_tf.export import layout
from dvml_tf.index import GalleryIndex
from dvml_tf.index import builder
from tests.index.catalogue import PER_CLASS
from tests.index.catalogue import write_catalogue

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}

pytestmark = pytest.mark.slow


def run(script, *args, timeout=600):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def index_py(*args):
    return run("index.py", *args)


def build_flags(export, output, *extra):
    return ["build", f"--saved_model={export.version_dir}", "--dataset=csv",
            f"--data_dir={export.manifest}", f"--output={output}", *extra]


# A build that stops (sleeps) in its third SavedModel call, after its first checkpoint, and says
# so in a file: a real process holding the lock mid-build, to be signalled by the test.
STALLING_BUILD = textwrap.dedent("""
    import runpy, sys, time
    from dvml_tf.evaluation import runner
    original, calls, flag = runner.run_embed_bytes, [], sys.argv.pop(1)

    def stalling(signature, encoded):
        calls.append(1)
        if len(calls) == 3:
            open(flag, "w").close()
            time.sleep(600)
        return original(signature, encoded)

    runner.run_embed_bytes = stalling
    runpy.run_path("index.py", run_name="__main__")
""")


def wait_for(path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"the build ended early:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the build never reached its stall"
        time.sleep(0.2)


def test_build_and_search_end_to_end(catalogue_export, tmp_path):
    output = tmp_path / "I"
    result = index_py(*build_flags(catalogue_export, output, "--backend=hnsw"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Wrote index {output}: {3 * PER_CLASS} images" in result.stdout
    assert "images/s" in result.stderr  # the embedding's throughput is logged
    root = os.path.dirname(catalogue_export.manifest)
    queries = [os.path.join(root, "img", name) for name in ("c6_0.png", "c8_4.png")]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    result = index_py("search", f"--index={output}", "--k=3",
                      f"--images={queries[0]},{tmp_path / 'broken.png'},{queries[1]},"
                      f"{tmp_path / 'missing.png'}")
    # Every query is answered (one JSON line each); the bad ones are errors and fail the run.
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == [queries[0], str(tmp_path / "broken.png"),
                                                  queries[1], str(tmp_path / "missing.png")]
    assert "error" in lines[1] and "cannot read" in lines[3]["error"]
    assert result.returncode != 0
    assert "index.py: error: 2 of 4 query image(s) could not be searched" in result.stderr
    for line, path in ((lines[0], queries[0]), (lines[2], queries[1])):
        first = line["results"][0]
        # A gallery image searched for itself: its own row first, score 1 (cosine; hnsw stores
        # float16 vectors).
        assert first["path"] == path and first["score"] == pytest.approx(1.0, abs=1e-3)
        assert set(first) == {"id", "label", "class_name", "score", "matched", "path"}
        assert first["matched"] is None  # the model is not calibrated
        assert len(line["results"]) == 3
        assert [r["score"] for r in line["results"]] == sorted(
            (r["score"] for r in line["results"]), reverse=True)
    assert lines[2]["results"][0]["class_name"] == "glyph_8"


def test_a_killed_build_resumes_and_a_concurrent_build_is_refused(catalogue_export, tmp_path):
    output = tmp_path / "I"
    flag = tmp_path / "stalled"
    stalling = subprocess.Popen(
        [sys.executable, "-c", STALLING_BUILD, str(flag),
         *build_flags(catalogue_export, output, "--batch_size=2", "--checkpoint_images=4")],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(flag, stalling)
        # A second build into the same folder is refused at once, naming the first.
        second = index_py(*build_flags(catalogue_export, output, "--batch_size=2",
                                       "--checkpoint_images=4"))
        assert second.returncode != 0
        assert f"Another build is writing {output} (pid {stalling.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        stalling.send_signal(signal.SIGKILL)  # no chance to clean up
        stalling.wait(timeout=60)
    staging = builder.staging_path(output)
    progress = json.loads(pathlib.Path(staging, builder.PROGRESS_FILE).read_text())
    assert [chunk["count"] for chunk in progress["chunks"]] == [4]
    assert not output.exists()  # nothing half-written in its place
    resumed = index_py(*build_flags(catalogue_export, output, "--batch_size=2",
                                    "--checkpoint_images=4"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming: 4 of {3 * PER_CLASS} images are embedded already" in resumed.stderr
    assert f"({3 * PER_CLASS - 4} embedded by this run" in resumed.stdout
    assert not os.path.exists(staging)
    index = GalleryIndex.load(output)
    assert index.ids.tolist() == list(range(3 * PER_CLASS))
    assert not np.isnan(index.search(np.ones((1, 8), np.float32), 3)[1]).any()


def test_shards_built_by_parallel_processes_merge(catalogue_export, tmp_path):
    shards = [subprocess.Popen(
        [sys.executable, "index.py", *build_flags(catalogue_export, tmp_path / "parts" / str(i),
                                                  "--num_shards=2", f"--shard_index={i}",
                                                  "--shard_by=modulo")],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    for proc in shards:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        assert "Wrote shard" in stdout
    result = index_py("merge", f"--inputs={tmp_path}/parts/*", f"--output={tmp_path / 'I'}")
    assert result.returncode == 0, result.stderr[-3000:]
    index = GalleryIndex.load(tmp_path / "I")
    assert index.ids.tolist() == list(range(3 * PER_CLASS))
    assert index.info["shards"] == 2


def test_bad_command_lines_get_one_line_errors(catalogue_export, tmp_path):
    for args, message in (
        ((), "expected one command, build | merge | search"),
        (("build", "--k=3", f"--saved_model={catalogue_export.version_dir}",
          f"--output={tmp_path}/I"), "--k do(es) not apply to `index.py build`"),
        (("build", f"--saved_model={tmp_path}", f"--output={tmp_path}/I"), "no saved_model.pb"),
    ):
        result = index_py(*args)
        assert result.returncode != 0, args
        assert result.stderr.strip().splitlines()[-1].startswith("index.py: error: "), args
        assert message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def in_shop_roles(split, label, i):
    """Image 0 of a class is a query, image 1 a query in the gallery, the others gallery."""
    return int(i <= 1), int(i >= 1)


def test_in_shop_evaluation_through_the_index_calibration_and_matches(catalogue_export,
                                                                      tmp_path):
    export_dir = tmp_path / "E"
    shutil.copytree(catalogue_export.export_dir, export_dir)  # calibration writes its reports
    version_dir = export_dir / "saved_model" / "1"
    manifest, _ = write_catalogue(tmp_path / "shop", roles=in_shop_roles)
    data = ["--dataset=csv", f"--data_dir={manifest}"]
    result = index_py("build", f"--saved_model={version_dir}", *data, f"--output={tmp_path}/I")
    assert result.returncode == 0, result.stderr[-3000:]
    assert GalleryIndex.load(tmp_path / "I").ids.tolist() == [  # the gallery rows only
        row for row in range(3 * PER_CLASS) if row % PER_CLASS >= 1]
    output = tmp_path / "metrics.json"
    result = run("evaluate.py", f"--saved_model={export_dir}", *data, f"--index={tmp_path}/I",
                 "--calibrate", "--precisions=0.5,0.9", "--recall_ks=1,2",
                 f"--output_json={output}", "--noclustering")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test split, 6 queries searching a gallery of 12" in result.stdout
    record = json.loads(output.read_text())
    exact = {key: record[key] for key in ("recall@1", "recall@2", "map@r")}
    assert record["index"] == pytest.approx(exact, abs=1e-12)  # flat: exact search
    assert "| flat |" in result.stdout and "| exact |" in result.stdout
    matching = record["matching"]
    assert set(matching["thresholds"]) == {"0.5", "0.9"}
    assert matching["calibration"]["queries"] == 4  # 2 queries of each validation class
    # Both copies of the report hold the thresholds.
    for path in (export_dir / "export_report.json",
                 version_dir / layout.ASSETS_EXTRA_DIR / layout.REPORT_FILE):
        assert json.loads(path.read_text())["matching"]["thresholds"] == matching["thresholds"]
    image = tmp_path / "shop" / "img" / "c7_1.png"
    result = index_py("search", f"--index={tmp_path}/I", f"--saved_model={version_dir}",
                      f"--images={image}", "--k=4", "--precision=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    (answer,) = [json.loads(line) for line in result.stdout.splitlines()]
    threshold = matching["thresholds"]["0.5"]
    for hit in answer["results"]:
        assert hit["matched"] == (threshold is not None and hit["score"] >= threshold)
    result = index_py("search", f"--index={tmp_path}/I", f"--saved_model={version_dir}",
                      f"--images={image}", "--precision=0.8")
    assert result.returncode != 0 and "--precision=0.8 has no calibrated threshold" in (
        result.stderr)


def test_the_contract_follows_the_weights_through_retraining_reexport_and_resume(
        catalogue_export, tmp_path):
    """The issue's reproduction: a run trained, exported twice (the same weights as versions 1
    and 2), retrained into the same folder and exported again (version 3); a build with version
    1 killed after its first checkpoint cannot be resumed with version 3, resumes with version 2,
    and the index refuses queries and evaluation by version 3."""
    from dvml_tf.export import exporter
    from dvml_tf.training import cli
    from tests.index.catalogue import tiny_config

    run_dir, export_dir, output = tmp_path / "R", tmp_path / "E", tmp_path / "I"

    def train(steps):
        config = tiny_config(catalogue_export.manifest, steps=steps, model_dir=str(run_dir),
                             checkpoint_every=steps, log_every=steps)
        cli.run(config)  # what train.py runs, in this process

    train(2)
    exports = [exporter.export_run(run_dir, export_dir, litert_models=False) for _ in range(2)]
    train(4)  # more steps into the same run folder: other weights
    exports.append(exporter.export_run(run_dir, export_dir, litert_models=False))
    v1, v2, v3 = (str(result.saved_model_dir) for result in exports)
    fingerprint = {v: builder.load_model(v)[2]["fingerprint"] for v in (v1, v2, v3)}
    assert fingerprint[v1] == fingerprint[v2] != fingerprint[v3]

    def build_with(version_dir):
        return ["build", f"--saved_model={version_dir}", "--dataset=csv",
                f"--data_dir={catalogue_export.manifest}", f"--output={output}",
                "--batch_size=2", "--checkpoint_images=4"]

    flag = tmp_path / "stalled"
    stalling = subprocess.Popen([sys.executable, "-c", STALLING_BUILD, str(flag),
                                 *build_with(v1)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        wait_for(flag, stalling)
    finally:
        stalling.send_signal(signal.SIGKILL)
        stalling.wait(timeout=60)
    staging = builder.staging_path(output)
    checkpoints = sorted(os.listdir(staging))
    # Resuming with the retrained model is refused, naming both models and what to do.
    refused = index_py(*build_with(v3))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"index.py: error: {staging} holds the checkpoints of an interrupted "
                           f"build with another model: fingerprint {fingerprint[v1]} ({v1}), "
                           f"not {fingerprint[v3]} ({v3}); other weights"), line
    assert f"--saved_model={v1}" in line and "--restart" in line
    assert sorted(os.listdir(staging)) == checkpoints and not output.exists()
    # The same weights under another version number resume the build.
    resumed = index_py(*build_with(v2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming: 4 of {3 * PER_CLASS} images are embedded already" in resumed.stderr
    assert GalleryIndex.load(output).contract["fingerprint"] == fingerprint[v1]
    # Searching or evaluating the index with the retrained model is refused.
    image = os.path.join(os.path.dirname(catalogue_export.manifest), "img", "c6_0.png")
    result = index_py("search", f"--index={output}", f"--saved_model={v3}", f"--images={image}")
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("index.py: error: The queries come from another model than the one "
                           f"this index was built with ({v2}): fingerprint {fingerprint[v3]} != "
                           f"the index's {fingerprint[v1]} (other weights"), line
    result = run("evaluate.py", f"--saved_model={v3}", "--dataset=csv",
                        f"--data_dir={catalogue_export.manifest}", f"--index={output}",
                        "--noclustering")
    assert result.returncode != 0
    assert "evaluate.py: error: The queries come from another model" in result.stderr
