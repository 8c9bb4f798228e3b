"""The default run against its baseline, run the same way: `python train.py` and
`python train.py --nodvml`, one after the other, each alone on the machine with all its cores,
timed end to end (process start, data loading, training and the final evaluation on the unseen
test classes) and compared on those classes.

    TFDS_DATA_DIR=/path/to/tfds python benchmarks/default_run.py --work_dir=RUNS

What it checks: the default finishes in under `--limit_seconds` (10 minutes), and whether it
beats the baseline on Recall@1 by the Omniglot study's rule (`compare_over_seeds`: the gain in
the mean over `--seeds` above twice the larger seed std, np.std, and at least 1.5 points;
undecided with one seed). Quick check (a few steps, both variants):

    TFDS_DATA_DIR=/path/to/tfds python benchmarks/default_run.py --work_dir=/tmp/d \\
        --extra='--steps=20' --output=/tmp/default_run.json

Resumes after an interruption: a run recorded in the output file is not run again. A run folder
left by an interrupted run is not reused (its time would not be end to end): the run starts over
in a new folder `<variant>_seed<k>_attempt<n>`; nothing in --work_dir is deleted.

Writes `--output` (default: default_run.json in benchmarks/results/): the machine, every run's
command, wall time, peak memory, load average and test metrics, and the summary derived from
them; prints a Markdown table. `--summary_only` rewrites the summary of an existing `--output`
from its recorded runs (no training), e.g. after the summary's keys changed:

    python benchmarks/default_run.py --summary_only --output=benchmarks/results/default_run.json
"""

import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dvml_tf.evaluation.seed_comparison import compare_over_seeds  # noqa: E402
from dvml_tf.utils import atomic  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", None, "Where the runs' model folders are written (required "
                    "unless --summary_only).")
flags.DEFINE_list("seeds", ["0"], "Seeds; each gives one default run and one baseline run.")
flags.DEFINE_string("extra", "", "train.py flags added to both commands, as on a command line "
                    "(e.g. '--steps=20').")
flags.DEFINE_float("limit_seconds", 600.0, "The default run's time limit.")
flags.DEFINE_string("output", str(ROOT / "benchmarks" / "results" / "default_run.json"),
                    "Results file.")
flags.DEFINE_bool("summary_only", False, "Recompute the summary of --output from the runs it "
                  "records and rewrite it; trains nothing.")

# The two commands compared: the default, and the same with DVML switched off.
VARIANTS = {"default": [], "nodvml": ["--nodvml"]}
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "map@r")
# The Omniglot study's margin (research/dvml_omniglot/synthesis.py, SUCCESS_MIN_GAIN): a gain
# under 1.5 points of Recall@1 is not called a win, whatever the seed spread.
MIN_GAIN = 0.015
BEATS_RULE = ("default_beats_nodvml_by_rule: the gain in mean Recall@1 over the seeds "
              "(recall@1_default_minus_nodvml) is above twice the larger seed std of the two "
              "(recall@1_twice_larger_std; population std, np.std with ddof=0) and at least "
              f"{100 * MIN_GAIN:.1f} points: the success rule of the Omniglot study "
              "(research/dvml_omniglot). null with fewer than two seeds: one seed has no spread.")


def run_dir(variant, seed):
    """A fresh folder for the run: attempt 1, or the next one after an interrupted attempt."""
    attempt = 1
    while True:
        name = f"{variant}_seed{seed}" + (f"_attempt{attempt}" if attempt > 1 else "")
        directory = pathlib.Path(FLAGS.work_dir) / name
        if not directory.exists():
            return directory
        attempt += 1


def run_once(variant, seed):
    """Runs train.py once in a new folder; returns its record."""
    directory = run_dir(variant, seed)
    flags_ = [f"--seed={seed}", *VARIANTS[variant], *shlex.split(FLAGS.extra)]
    command = [sys.executable, str(ROOT / "train.py"), f"--model_dir={directory}", *flags_]
    directory.mkdir(parents=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.monotonic()
    with open(directory / "train.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
    seconds = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{' '.join(command)} failed (exit {code}); see {directory}/train.log")
    metrics = json.loads((directory / "metrics.json").read_text())
    return {
        # Recorded without this machine's folders: WORK_DIR stands for --work_dir.
        "command": " ".join(["python", "train.py", f"--model_dir=WORK_DIR/{directory.name}",
                             *flags_]),
        "model_dir": directory.name,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2),  # Linux: KiB
        "load_average_before": load_before,
        **{key: metrics[key] for key in METRICS if key in metrics},
    }


def summarize(records, limit_seconds):
    """The summary of the recorded runs: per variant the mean and std of Recall@1 over the seeds
    and the longest wall time; with both variants, the gain and the verdicts."""
    summary, recall = {}, {}
    for variant in VARIANTS:
        done = [records[variant][seed] for seed in sorted(records.get(variant, {}), key=int)]
        if done:
            recall[variant] = [r["recall@1"] for r in done]
            summary[variant] = {
                "seeds": len(done), "recall@1_mean": float(np.mean(recall[variant])),
                "recall@1_std": float(np.std(recall[variant])),
                "seconds_max": max(r["seconds"] for r in done)}
    if len(summary) == len(VARIANTS):
        comparison = compare_over_seeds(recall["default"], recall["nodvml"], min_gain=MIN_GAIN)
        summary["recall@1_default_minus_nodvml"] = comparison["gain"]
        summary["recall@1_twice_larger_std"] = comparison["twice_larger_std"]
        summary["default_within_limit"] = summary["default"]["seconds_max"] < limit_seconds
        summary["default_beats_nodvml_by_rule"] = comparison["clears_bars"]
        summary["beats_rule"] = BEATS_RULE
    return summary


def save(output, results):
    """Writes the results file with its summary derived from the runs recorded so far."""
    results["summary"] = summarize(results["runs"], results["limit_seconds"])
    atomic.write_json(output, results)


def table(records):
    lines = ["| run | seed | wall time | peak RSS | " + " | ".join(METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for variant in VARIANTS:
        for seed, r in sorted(records.get(variant, {}).items(), key=lambda item: int(item[0])):
            minutes, seconds = divmod(round(r["seconds"]), 60)
            command = " ".join(["train.py", *VARIANTS[variant]])
            values = " | ".join(f"{100 * r[k]:.1f}" if k in r else "—" for k in METRICS)
            lines.append(f"| `{command}` | {seed} | {minutes} min {seconds:02d} s | "
                         f"{r['peak_rss_gb']} GB | {values} |")
    return "\n".join(lines)


def verdict(summary):
    """One line: the gain against the rule's bars, and what the rule says."""
    if "beats_rule" not in summary:
        return "only one variant recorded: no comparison yet"
    by_rule = summary["default_beats_nodvml_by_rule"]
    said = {True: "yes", False: "no", None: "undecided (one seed)"}[by_rule]
    return (f"Recall@1 default - nodvml: {100 * summary['recall@1_default_minus_nodvml']:+.2f} "
            f"points; 2 x larger seed std {100 * summary['recall@1_twice_larger_std']:.2f}, "
            f"margin {100 * MIN_GAIN:.1f}: the default beats --nodvml by the rule: {said}")


def summary_only(output):
    """Rewrites the summary of `output` from the runs it records, under the time limit it
    records: nothing is trained and no recorded number changes."""
    if not output.is_file():
        raise SystemExit(f"--summary_only needs an existing results file; {output} is not one.")
    results = json.loads(output.read_text())
    if not results.get("runs") or "limit_seconds" not in results:
        raise SystemExit(f"{output} records no runs (keys 'runs' and 'limit_seconds'): not a "
                         "results file of this script.")
    save(output, results)
    print(table(results["runs"]))
    print(json.dumps(results["summary"], indent=1))
    print(verdict(results["summary"]))


def main(argv):
    del argv
    output = pathlib.Path(FLAGS.output)
    atomic.check_writable(output)
    if FLAGS.summary_only:
        summary_only(output)
        return
    if not FLAGS.work_dir:
        raise app.UsageError("--work_dir is required to train (or pass --summary_only).")
    results = json.loads(output.read_text()) if output.exists() else {}
    if results.get("extra", FLAGS.extra) != FLAGS.extra:
        raise SystemExit(f"{output} holds runs made with --extra={results['extra']}; write the "
                         "runs with other flags to another --output.")
    results.update({"extra": FLAGS.extra, "limit_seconds": FLAGS.limit_seconds})
    results.setdefault("machine", {
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "tensorflow": importlib.metadata.version("tensorflow")})
    records = results.setdefault("runs", {})
    for seed in FLAGS.seeds:
        for variant in VARIANTS:  # alternated, so that a drift in load hits both alike
            if seed in records.get(variant, {}):
                continue
            record = run_once(variant, seed)
            print(f"{variant} seed {seed}: {record['seconds']:.0f} s, "
                  f"R@1 {100 * record['recall@1']:.1f}", flush=True)
            records.setdefault(variant, {})[seed] = record
            save(output, results)
    save(output, results)
    print(table(records))
    print(json.dumps(results["summary"], indent=1))
    print(verdict(results["summary"]))


if __name__ == "__main__":
    app.run(main)
