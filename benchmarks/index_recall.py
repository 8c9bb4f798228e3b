"""Retrieval quality through a gallery index on real data: what each backend costs against exact.

For an exported SavedModel and a dataset split, this runs the product's own commands, as a user
would, once per backend:

    python index.py build --saved_model=E --dataset=D --split=S --output=WORK/<backend>
        --backend=<backend> [--backend_options=...]
    python evaluate.py --saved_model=E --dataset=D --split=S --index=WORK/<backend>
        --output_json=WORK/<backend>.json --noclustering

and records the exact Recall@K / MAP@R (evaluate.py's brute-force search), the same figures
through each index, their difference, the index build time (wall clock of `index.py build`,
TensorFlow start-up and the embedding of the split included) and the index's size on disk.
Results go to benchmarks/results/index_recall.json and a Markdown table is printed.

    TFDS_DATA_DIR=/path/to/tfds python benchmarks/index_recall.py --saved_model=E
    python benchmarks/index_recall.py --saved_model=E --dataset=csv --data_dir=manifest.csv \\
        --backends=flat,hnsw --work_dir=/tmp/index_recall
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:  # step_time is a sibling script, not a package
    sys.path.insert(0, HERE)

import step_time  # noqa: E402

from dvml_tf.utils import atomic  # noqa: E402

RESULTS = os.path.join(HERE, "results", "index_recall.json")
BACKENDS = ("flat", "hnsw", "ivf_pq")


def run(command, log):
    """Runs one product command from the repository root; its output goes to `log`."""
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{tail}")
    return seconds


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def measure(args, work_dir):
    common = [f"--saved_model={args.saved_model}", f"--split={args.split}"]
    if args.dataset:
        common.append(f"--dataset={args.dataset}")
    if args.data_dir:
        common.append(f"--data_dir={args.data_dir}")
    exact, results = None, {}
    for backend in args.backends:
        output = os.path.join(work_dir, backend)
        build = [sys.executable, "index.py", "build", *common, f"--output={output}",
                 f"--backend={backend}", "--overwrite"]
        options = args.backend_options.get(backend)
        if options:
            build.append(f"--backend_options={options}")
        print(f"building {backend} ...", flush=True)
        build_seconds = run(build, os.path.join(work_dir, f"build_{backend}.log"))
        figures = os.path.join(work_dir, f"{backend}.json")
        evaluate = [sys.executable, "evaluate.py", *common, f"--index={output}",
                    f"--output_json={figures}", "--noclustering"]
        print(f"evaluating through {backend} ...", flush=True)
        run(evaluate, os.path.join(work_dir, f"evaluate_{backend}.log"))
        with open(figures) as f:
            record = json.load(f)
        through = record.pop("index")
        if exact is None:
            exact = record
        with open(os.path.join(output, "index.json")) as f:
            header = json.load(f)
        results[backend] = {
            **through,
            "difference": {key: through[key] - exact[key] for key in through},
            "build_seconds": round(build_seconds, 1),
            "index_bytes": folder_bytes(output),
            "rows": header["count"],
            "backend_options": header["backend_options"],
        }
    return exact, results


def markdown(exact, results):
    keys = [k for k in exact if k.startswith("recall@")] + ["map@r"]
    header = " | ".join(k.replace("recall", "R") for k in keys)
    lines = [f"| search | {header} | build s | index MB |", "|---|" + "---|" * (len(keys) + 2),
             "| exact (evaluate.py) | " + " | ".join(f"{100 * exact[k]:.2f}" for k in keys)
             + " | — | — |"]
    for backend, r in results.items():
        cells = [f"{100 * r[k]:.2f} ({100 * r['difference'][k]:+.2f})" for k in keys]
        lines.append(f"| {backend} | " + " | ".join(cells)
                     + f" | {r['build_seconds']:.1f} | {r['index_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saved_model", required=True, help="export folder or SavedModel")
    parser.add_argument("--dataset", default=None, help="default: the export's")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--backend_options", default="{}",
                        help='JSON object: backend -> index.py --backend_options text, e.g. '
                             '{"hnsw": "ef_search=256"}')
    parser.add_argument("--work_dir", default=None, help="default: a temporary folder")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown or not args.backends:
        parser.error(f"--backends must name some of {', '.join(BACKENDS)}; got {unknown}.")
    try:
        args.backend_options = json.loads(args.backend_options)
    except ValueError as error:
        parser.error(f"--backend_options must be a JSON object: {error}")
    temporary = args.work_dir is None
    work_dir = tempfile.mkdtemp(prefix="index_recall_") if temporary else args.work_dir
    os.makedirs(work_dir, exist_ok=True)
    load_before = os.getloadavg()
    try:
        exact, results = measure(args, work_dir)
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    from dvml_tf.export import layout

    version_dir, version = layout.resolve_saved_model(args.saved_model)
    report = layout.read_version_report(version_dir)
    record = {
        "command": " ".join(["python", os.path.relpath(__file__, ROOT),
                             *(sys.argv[1:] if argv is None else argv)]),
        "saved_model": args.saved_model,
        "version": version,
        "model": report["model"],
        "dataset": args.dataset or report["model"]["dataset"],
        "split": args.split,
        "machine": {**step_time.machine_info(), "load_average_1_5_15_before": load_before,
                    "python": platform.python_version()},
        "exact": exact,
        "backends": results,
    }
    atomic.write_json(args.output, record)
    print(markdown(exact, results))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
