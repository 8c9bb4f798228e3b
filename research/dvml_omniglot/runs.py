"""Training runs of the research studies, each `train.py` (this folder's) in a subprocess.

Shared by `zero_shot.py` and `synthesis.py` (Omniglot) and `research/glyphs` (whose runs name
their preset and validation split: `config=`, `validation_classes=`), with the bookkeeping of a
pre-registered study (a locked results file, claimed runs, per-seed summaries: `execute`).
A run is reused when its metrics file exists, so an interrupted study continues where it
stopped; a run that was interrupted mid-training resumes from its last checkpoint (train.py's
own resume). Runs are single-threaded: two of them train faster side by side than one with
two threads on a 2-core machine.
"""

import concurrent.futures
import fcntl
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


def single_threaded_env():
    """The environment of a single-threaded TensorFlow subprocess (two side by side on 2 cores)."""
    return {**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
            "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def train(model_dir, stage, flags, label="", **command_options):
    """Trains one run to completion (resuming it if a checkpoint exists); raises on failure.
    `command_options` go to `command` (config, validation_classes).

    Each attempt's wall and CPU seconds (user + system of the train.py process, which on a
    shared machine measures the run's cost independently of the other jobs' load) are
    appended to `<model_dir>/run_cost.json`.
    """
    env = single_threaded_env()
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


# ------------------------------------------------------------------- a study's bookkeeping
# The pieces of a pre-registered study around its runs (Omniglot's synthesis.py, the glyph
# study): a results file under a lock, runs claimed by one process, each run's record kept
# there, and per-seed summaries. The results file, committed, is what a study resumes from.

def claim(directory):
    """Whether this process may train a run (another process of the study may hold it): an
    open, exclusively locked handle to keep until the run ends, or None."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / ".claim", "a+")  # noqa: SIM115 (held until the run ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def run_record(metrics):
    """What a study's results file keeps of a run: its metrics, its DVML diagnostics (without
    the per-dimension KL, of which the largest is kept), the last training step's values and
    the validation curve's Recall@1."""
    keep = {key: value for key, value in metrics.items()
            if not key.startswith("train/") and key not in ("curve", "dvml_diagnostics")}
    diagnostics = metrics.get("dvml_diagnostics")
    if diagnostics:
        keep["diagnostics"] = {k: v for k, v in diagnostics.items() if k != "kl_per_dim"}
        keep["diagnostics"]["kl_per_dim_max"] = max(diagnostics["kl_per_dim"])
    keep["last_step"] = {k.removeprefix("train/"): v for k, v in metrics.items()
                         if k.startswith("train/")}
    if "curve" in metrics:
        keep["curve"] = {str(step): values["recall@1"]
                         for step, values in sorted(metrics["curve"].items())}
    return keep


SUMMARY_METRICS = ("recall@1", "map@r", "nmi", "f1")
SUMMARY_DIAGNOSTICS = ("active_units", "kl", "recon", "recon_shuffled", "syn_to_inv")


def summarize(runs_of_stage):
    """{loss: {variant: {"seeds": [...], "recall@1": [...], ..., "active_units": [...]}}}: the
    per-seed records of a stage ({loss: {variant: {seed: run_record}}}) as lists, one value
    per seed."""
    summary = {}
    for loss, by_variant in runs_of_stage.items():
        for variant, by_seed in by_variant.items():
            seeds = sorted(by_seed, key=int)
            row = {"seeds": [int(seed) for seed in seeds]}
            for key in SUMMARY_METRICS:
                row[key] = [by_seed[seed].get(key) for seed in seeds]
            if all("diagnostics" in by_seed[seed] for seed in seeds):
                for key in SUMMARY_DIAGNOSTICS:
                    row[key] = [by_seed[seed]["diagnostics"][key] for seed in seeds]
            summary.setdefault(loss, {})[variant] = row
    return summary


def locked_update(path, load, save, change):
    """Read-modify-write of a results file under a lock file next to it (several processes of
    a study write it): `save(change(load()))`-like; returns the results."""
    with open(pathlib.Path(path).with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load()
        change(results)
        save(results)
        return results


def execute(stage, jobs, directory_of, recorded, record, parallel=2, only=(),
            **command_options):
    """Runs (or reuses) a stage's jobs, two (`parallel`) at a time.

    Args:
        stage: the stage's name (`is_test` decides the evaluated split).
        jobs: [(loss, variant, seed, flags)].
        directory_of: (stage, loss, variant, seed) -> the run's folder.
        recorded: {loss: {variant: {str(seed): ...}}}, the stage's runs the results file
            already holds: they are done, even when their folder is gone.
        record: (loss, variant, seed, metrics) -> None, writes a finished run's record.
        parallel: runs at a time (each single-threaded).
        only: "LOSS/VARIANT/SEED" keys to restrict the stage to.
        **command_options: to `command` (config, validation_classes).
    """
    if only:
        jobs = [job for job in jobs if "/".join(map(str, job[:3])) in only]
    jobs = [job for job in jobs
            if str(job[2]) not in recorded.get(job[0], {}).get(job[1], {})]

    def one(job):
        loss, variant, seed, flags_ = job
        directory = directory_of(stage, loss, variant, seed)
        handle = claim(directory)
        if handle is None:
            print(f"skip {stage} {loss}/{variant}/{seed}: another process trains it", flush=True)
            return
        try:
            metrics = run(directory, stage, flags_, label=f"{stage} {loss}/{variant}/{seed}",
                          **command_options)
        finally:
            handle.close()
        record(loss, variant, seed, metrics)

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, jobs))


def success_check(summary, method, losses, seeds, min_gain, min_losses):
    """A study's success rule for `method` against "baseline" in a test summary ({loss:
    {variant: row}}, as `summarize` writes it); None until every loss has every seed.

    Per loss: `compare_over_seeds` on R@1 (the gain in the mean, twice the larger seed std of
    the two, np.std with ddof=0, whether the gain clears both bars, and the same with the
    sample std, ddof=1, which decides nothing); for a DVML method (its name starts with "dvml")
    also its fewest active units and whether its decoder uses z_V on every seed (error with
    shuffled z_V above the error with its own). `success` needs `min_losses` losses that clear
    the bars with active units > 0 and a decoder that uses z_V.
    """
    from dvml_tf.evaluation.seed_comparison import compare_over_seeds

    per_loss = {}
    for loss in losses:
        rows = summary.get(loss, {})
        if any(len(rows.get(name, {}).get("recall@1", [])) < len(seeds)
               for name in ("baseline", method)):
            return None
        check = compare_over_seeds(rows[method]["recall@1"], rows["baseline"]["recall@1"],
                                   min_gain=min_gain)
        if method.startswith("dvml"):  # a DVML run without diagnostics meets neither condition
            row = rows[method]
            check["active_units_min"] = min(row.get("active_units") or [0])
            check["decoder_uses_z_v"] = bool(row.get("recon")) and all(
                shuffled > own
                for own, shuffled in zip(row["recon"], row["recon_shuffled"], strict=True))
        per_loss[loss] = check
    met = [loss for loss, check in per_loss.items()
           if check["clears_bars"] and check.get("active_units_min", 1) > 0
           and check.get("decoder_uses_z_v", True)]
    return {"per_loss": per_loss, "losses_met": met, "success": len(met) >= min_losses}

