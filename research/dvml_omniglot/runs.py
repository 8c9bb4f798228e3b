"""Training runs of the research studies, each `train.py` (this folder's) in a subprocess.

Shared by `zero_shot.py` and `synthesis.py` (Omniglot) and `research/glyphs` (whose runs name
their preset and validation split: `config=`, `validation_classes=`). A run is reused when its
metrics file exists, so an interrupted study continues where it stopped; a run that was
interrupted mid-training resumes from its last checkpoint (train.py's own resume). Runs are
single-threaded: two of them train faster side by side than one with two threads on a 2-core
machine.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TRAIN = HERE / "train.py"

# Per base loss: the batch it needs (N-pair: N classes x 2; the others P x K = 32 x 4).
LOSS_FLAGS = {
    "triplet": ["--loss=triplet", "--classes_per_batch=32", "--images_per_class=4"],
    "npair": ["--loss=npair", "--classes_per_batch=64", "--images_per_class=2"],
    "triplet2_dws": ["--loss=triplet2_dws", "--classes_per_batch=32", "--images_per_class=4"],
    "margin_dws": ["--loss=margin_dws", "--classes_per_batch=32", "--images_per_class=4"],
    "contrastive": ["--loss=contrastive", "--classes_per_batch=32", "--images_per_class=4"],
}
# Validation: Omniglot's last 161 background classes = background alphabets 25-29, whole
# alphabets like the test split (never the test classes).
VALIDATION_CLASSES = 161

STEP_LINE = re.compile(r"step (\d+)/(\d+) (.*)$")
VALIDATION_LINE = re.compile(r"step (\d+) validation: (.*)$")


def is_test(stage):
    """Whether a stage trains on every training class and evaluates the test classes (`test`,
    and a study's own `*_test` stages); any other stage evaluates held-out training classes."""
    return stage == "test" or stage.endswith("_test")


def metrics_file(stage):
    return "metrics.json" if is_test(stage) else "metrics_validation.json"


def command(model_dir, stage, flags, config="omniglot_paper",
            validation_classes=VALIDATION_CLASSES):
    """The train.py command of one run.

    Args:
        model_dir: the run folder.
        stage: the study's stage (`is_test` decides the evaluated split).
        flags: train.py flags.
        config: the preset the flags start from.
        validation_classes: held-out training classes of the validation stages.
    """
    # The paper's recipe is the base: each study names every setting it varies (backbone, scale
    # of z_V, the options), so the `omniglot` default can change without changing a study's runs.
    command_ = [sys.executable, str(TRAIN), f"--config={config}", f"--model_dir={model_dir}",
                *flags]
    if not is_test(stage):
        command_ += [f"--validation_classes={validation_classes}", "--evaluation_split=validation"]
    return command_


def _key_values(text):
    return {key: float(value) for key, value in
            (pair.split("=", 1) for pair in text.split() if "=" in pair)}


def final_training_values(log_text):
    """The last `step N/N k=v ...` line of a train.log as floats (the last step's DVML
    diagnostics); {} when the log holds none."""
    values = {}
    for line in log_text.splitlines():
        match = STEP_LINE.search(line)
        if match and match.group(1) == match.group(2):
            values = _key_values(match.group(3))
    return values


def validation_curve(log_text):
    """The `step N validation: k=v ...` lines of a train.log: {step: {metric: value}}."""
    curve = {}
    for line in log_text.splitlines():
        match = VALIDATION_LINE.search(line)
        if match:
            curve[int(match.group(1))] = _key_values(match.group(2))
    return curve


COST_FILE = "run_cost.json"


def train(model_dir, stage, flags, label="", **command_options):
    """Trains one run to completion (resuming it if a checkpoint exists); raises on failure.
    `command_options` go to `command` (config, validation_classes).

    Each attempt's wall and CPU seconds (user + system of the train.py process, which on a
    shared machine measures the run's cost independently of the other jobs' load) are
    appended to `<model_dir>/run_cost.json`.
    """
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
           "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.time()
    os.makedirs(model_dir, exist_ok=True)
    log = pathlib.Path(model_dir) / "train.log"
    with open(log, "a") as out:
        process = subprocess.Popen(command(model_dir, stage, flags, **command_options),
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    cost_path = pathlib.Path(model_dir) / COST_FILE
    costs = json.loads(cost_path.read_text()) if cost_path.exists() else []
    costs.append({"wall_seconds": round(time.time() - started, 1),
                  "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                  "exit": process.returncode, "load_average": os.getloadavg()})
    cost_path.write_text(json.dumps(costs, indent=1))
    if process.returncode:
        raise RuntimeError(f"{label or model_dir} failed (exit {process.returncode}); see {log}")
    print(f"done {label or model_dir} in {time.time() - started:.0f} s", flush=True)


def run(model_dir, stage, flags, label="", **command_options):
    """Trains one run (or reuses its finished metrics); `command_options` go to `command`.

    Returns:
        dict: the metrics file's content, the last training step's values under
        "train/<name>", and the validation curve (if any) under "curve".
    """
    path = pathlib.Path(model_dir) / metrics_file(stage)
    if not path.exists():
        train(model_dir, stage, flags, label, **command_options)
    log = pathlib.Path(model_dir) / "train.log"
    text = log.read_text() if log.exists() else ""
    result = json.loads(path.read_text())
    result.update({f"train/{key}": value for key, value in final_training_values(text).items()})
    curve = validation_curve(text)
    if curve:
        result["curve"] = curve
    return result
