"""Gallery search at 1M scale: recall@10, latency, throughput, build time and memory per backend.

On synthetic 512-d embeddings with SOP-like class structure (`eval_scale.make_embeddings`:
classes of 2-12 samples, SOP's 60,502 / 11,316 ratio), --num gallery rows plus --queries
held-out rows of the same classes, this measures each `dvml_tf.index.GalleryIndex` backend:

* recall@10: mean fraction of the exact 10 nearest neighbours (`dvml_tf.evaluation.knn`, run in
  its own process) that the backend returns;
* p50 / p99 single-query latency (ms): each query searched alone, one after the other, on one
  faiss thread (--single_query_threads), as a server answering one request per core would;
  wall-clock, and also the process CPU time per query (p50_cpu_ms / p99_cpu_ms), which does
  not count the time a query waits for a core that other jobs hold;
* queries_per_s: all queries in one `search` call (batch throughput on every core);
* build_s: `GalleryIndex.add` of all rows (faiss training included), in a fresh process;
* rss_gb: resident memory (VmRSS) of a fresh process that loaded the saved index and ran every
  search: the footprint of a process serving that index.

Every backend is built in its own process and served from its saved folder by another, so that
one backend's memory never counts against another's. The worker processes import dvml_tf's
index and knn modules without the package's __init__ (which imports TensorFlow, ~0.9 GB and
5 s): a serving process needs only numpy and faiss. `--sweep` also measures other search-time
settings of the ANN backends on the same build (HNSW ef_search, IVF-PQ nprobe x k_factor);
`--work_dir=DIR --reuse` keeps the data, exact neighbours and indexes of a run and reuses them
in the next one with the same settings (a 1M HNSW graph takes half an hour to build).

Results go to benchmarks/results/ann_scale.json for the full-scale settings (the defaults of
--num, --queries and --dim), to benchmarks/results/ann_scale_<num>x<dim>_<queries>q.json for any
other size (so a quick run never overwrites the committed 1M results), or to --output; a
Markdown table is printed.

Full scale (about an hour on 2 cores shared with other jobs, whose load then sets the wall-clock
p99; HNSW alone on an idle machine took 10 minutes, build included):

    python benchmarks/ann_scale.py
    python benchmarks/ann_scale.py --backends=hnsw --output=benchmarks/results/ann_scale_idle.json

Quick run (its results go to ann_scale_20000x512_200q.json in benchmarks/results/, not to the
committed ann_scale.json):

    python benchmarks/ann_scale.py --num=20000 --queries=200
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:  # eval_scale and step_time are sibling scripts, not a package
    sys.path.insert(0, HERE)

import eval_scale  # noqa: E402
import step_time  # noqa: E402

RESULTS = os.path.join(HERE, "results", "ann_scale.json")
MARKER = "@@ann_scale@@ "
BACKENDS = ("flat", "hnsw", "ivf_pq")
# The target for an ANN backend on 1M x 512 vectors, 2 cores.
GOAL = {"recall@10": 0.95, "p99_ms": 5.0, "rss_gb": 2.0}
# Search-time settings measured by --sweep (one build each).
SWEEPS = {
    "hnsw": [{"ef_search": ef} for ef in (32, 64, 96, 112, 128, 192, 256)],
    "ivf_pq": [{"nprobe": nprobe, "k_factor": k_factor}
               for nprobe in (16, 32, 64, 128, 256) for k_factor in (4, 8)],
}


def import_index_modules():
    """Imports dvml_tf.index and dvml_tf.evaluation.knn without dvml_tf/__init__.py.

    The package's __init__ imports the models and losses, hence TensorFlow, which would add
    about 0.9 GB to every worker's RSS; the index needs only numpy and faiss. Registering a bare
    `dvml_tf` package first makes `import dvml_tf.index` skip that __init__.

    Returns:
        (GalleryIndex class, knn module).
    """
    if "dvml_tf" not in sys.modules:
        package = types.ModuleType("dvml_tf")
        package.__path__ = [os.path.join(ROOT, "dvml_tf")]
        sys.modules["dvml_tf"] = package
    from dvml_tf.evaluation import knn
    from dvml_tf.index import GalleryIndex

    return GalleryIndex, knn


def _atomic():
    """dvml_tf.utils.atomic (it imports no TensorFlow), imported like the index modules."""
    import_index_modules()
    from dvml_tf.utils import atomic

    return atomic


def _status_gb(key):
    kb = step_time._status_kb(key)
    return None if kb is None else round(kb / 1024**2, 3)


# ---------------------------------------------------------------------------------- workers

def worker_truth(args):
    """Exact k nearest neighbours of the queries (knn.py), saved to truth.npy."""
    _, knn = import_index_modules()
    gallery = np.load(os.path.join(args.data, "gallery.npy"), mmap_mode="r")
    queries = np.load(os.path.join(args.data, "queries.npy"))
    start = time.perf_counter()
    truth, _ = knn.nearest_neighbors(queries, args.k, gallery=gallery, metric=args.metric)
    seconds = time.perf_counter() - start
    np.save(os.path.join(args.data, "truth.npy"), truth)
    return {"seconds": seconds, "peak_rss_gb": _status_gb("VmHWM")}


def worker_build(args):
    """Builds one backend's index from the gallery and saves it into --index_dir."""
    gallery_index, _ = import_index_modules()
    gallery = np.load(os.path.join(args.data, "gallery.npy"), mmap_mode="r")
    labels = np.load(os.path.join(args.data, "labels.npy"))
    options = json.loads(args.options)
    rss_before = _status_gb("VmRSS")
    start = time.perf_counter()
    index = gallery_index(gallery.shape[1], args.metric, args.backend, backend_options=options)
    index.add(np.arange(len(gallery)), gallery, labels=labels)
    build_s = time.perf_counter() - start
    rss_built = _status_gb("VmRSS")
    del gallery  # Unmap the gallery before saving: its pages are not the index's.
    start = time.perf_counter()
    index.save(args.index_dir)
    save_s = time.perf_counter() - start
    disk = sum(os.path.getsize(os.path.join(args.index_dir, name))
               for name in os.listdir(args.index_dir))
    return {"build_s": build_s, "save_s": save_s, "disk_gb": round(disk / 1e9, 3),
            "build_rss_before_gb": rss_before, "build_rss_after_gb": rss_built,
            "build_peak_rss_gb": _status_gb("VmHWM"), "options": index.backend_options,
            "state": index._backend.state()}


def _measure(index, queries, truth, k, latency_queries, single_query_threads):
    """recall@k, single-query latency percentiles and batch throughput of `index`."""
    import faiss

    for i in range(min(10, len(queries))):  # warm-up: page in the index, start the threads
        index.search(queries[i:i + 1], k)
    # One query at a time runs on `single_query_threads` faiss threads, as a server answering
    # one request per core would; idle OpenMP threads would otherwise spin on a shared core.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(single_query_threads)
    times, cpu_times = [], []
    try:
        for i in range(min(latency_queries, len(queries))):
            start, cpu_start = time.perf_counter(), time.process_time()
            index.search(queries[i:i + 1], k)
            times.append((time.perf_counter() - start) * 1e3)
            cpu_times.append((time.process_time() - cpu_start) * 1e3)
    finally:
        faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    found, _ = index.search(queries, k)
    batch_s = time.perf_counter() - start
    hits = [len(np.intersect1d(a, b)) for a, b in zip(found, truth, strict=True)]
    return {
        f"recall@{k}": float(np.mean(hits) / k),
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "mean_ms": float(statistics.fmean(times)),
        # CPU time of the process per query: what the query costs, whatever else runs on the
        # cores (wall-clock percentiles on a loaded machine include waiting for a core).
        "p50_cpu_ms": float(np.percentile(cpu_times, 50)),
        "p99_cpu_ms": float(np.percentile(cpu_times, 99)),
        "queries_per_s": len(queries) / batch_s,
        "latency_queries": len(times),
        "single_query_threads": single_query_threads,
    }


def worker_serve(args):
    """Loads a saved index in this fresh process and measures searches and memory."""
    gallery_index, _ = import_index_modules()
    import faiss  # noqa: F401  (imported before the baseline, as a serving process would)

    queries = np.load(os.path.join(args.data, "queries.npy"))
    truth = np.load(os.path.join(args.data, "truth.npy"))
    rss_before = _status_gb("VmRSS")
    start = time.perf_counter()
    index = gallery_index.load(args.index_dir)
    load_s = time.perf_counter() - start
    out = {"load_s": load_s, "rss_before_load_gb": rss_before,
           "rss_loaded_gb": _status_gb("VmRSS")}
    out.update(_measure(index, queries, truth, args.k, args.latency_queries,
                        args.single_query_threads))
    out["rss_gb"] = _status_gb("VmRSS")
    out["serve_peak_rss_gb"] = _status_gb("VmHWM")
    out["tensorflow_loaded"] = "tensorflow" in sys.modules
    if args.sweep and args.backend in SWEEPS:
        out["sweep"] = []
        for setting in SWEEPS[args.backend]:
            index.set_search_options(**setting)
            out["sweep"].append({"search_options": setting, **_measure(
                index, queries, truth, args.k, args.latency_queries, args.single_query_threads)})
    return out


WORKERS = {"truth": worker_truth, "build": worker_build, "serve": worker_serve}


def run_worker(phase, args, **extra):
    """Runs one phase in a fresh Python process; returns the dict it printed."""
    flags = {"worker": phase, "data": args.data, "k": args.k, "metric": args.metric,
             "single_query_threads": args.single_query_threads, **extra}
    if args.latency_queries is not None:
        flags["latency_queries"] = args.latency_queries
    cmd = [sys.executable, os.path.abspath(__file__)] + [f"--{key}={value}"
                                                         for key, value in flags.items()]
    if args.sweep:
        cmd.append("--sweep")
    load_before = [round(x, 2) for x in os.getloadavg()]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{phase} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MARKER):])
    result["load_average_1_5_15"] = [load_before, [round(x, 2) for x in os.getloadavg()]]
    return result


# ------------------------------------------------------------------------------------- main

def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def parse_options(text, flag):
    """--<backend>_options: a JSON object."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag} must be a JSON object, e.g. '{{\"M\": 32}}': {error}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{flag} must be a JSON object; got {text!r}.")
    return options


def machine_info():
    import faiss

    info = step_time.machine_info()
    info.update(numpy=np.__version__, faiss=faiss.__version__,
                faiss_omp_threads=faiss.omp_get_max_threads(), niceness=os.nice(0))
    return info


def default_output(args, parser):
    """The results file when --output is not given: the committed one for the full-scale
    settings only; any other size gets a file named after it."""
    size = ("num", "queries", "dim")
    if all(getattr(args, name) == parser.get_default(name) for name in size):
        return RESULTS
    return os.path.join(HERE, "results",
                        f"ann_scale_{args.num}x{args.dim}_{args.queries}q.json")


def make_parser():
    """The command line of the benchmark (and of its worker processes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=1_000_000, help="gallery rows")
    parser.add_argument("--queries", type=int, default=1000, help="held-out query rows")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--metric", default="cosine", choices=("cosine", "euclidean"))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated subset of " + ",".join(BACKENDS))
    for name in BACKENDS:
        parser.add_argument(f"--{name}_options", default="{}",
                            help=f"JSON backend_options of {name} (default: the library's)")
    parser.add_argument("--latency_queries", type=int, default=None,
                        help="queries timed one by one (default: all)")
    parser.add_argument("--single_query_threads", type=int, default=1,
                        help="faiss threads while queries are timed one by one")
    parser.add_argument("--sweep", action="store_true",
                        help="also measure other ef_search / nprobe x k_factor settings")
    parser.add_argument("--work_dir", default=None,
                        help="folder for the data and the saved indexes, kept at the end "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the data, exact neighbours and indexes that an earlier run "
                             "with the same settings left in --work_dir (to tune search options "
                             "without rebuilding)")
    parser.add_argument("--output", default=None,
                        help="results file (default: results/ann_scale.json at full scale, "
                             "results/ann_scale_<num>x<dim>_<queries>q.json otherwise)")
    parser.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--index_dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    args.output = args.output or default_output(args, parser)
    if args.worker:
        if args.latency_queries is None:
            args.latency_queries = 1 << 62  # all queries
        result = WORKERS[args.worker](args)
        print(MARKER + json.dumps(result), flush=True)
        return result

    chosen = [b for b in args.backends.split(",") if b]
    if not chosen or set(chosen) - set(BACKENDS):
        parser.error(f"--backends must be a comma-separated subset of {BACKENDS}.")
    if args.num < 1 or args.queries < 1 or args.k < 1 or args.k > args.num:
        parser.error("--num, --queries and --k must be >= 1, with --k <= --num.")
    try:
        options = {name: parse_options(getattr(args, f"{name}_options"), f"--{name}_options")
                   for name in chosen}
    except ValueError as error:
        parser.error(str(error))

    total = args.num + args.queries
    num_classes = round(total * eval_scale.SOP_TEST_CLASSES / eval_scale.SOP_TEST_SIZE)
    machine = machine_info()
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = args.work_dir or tempfile.mkdtemp(prefix="ann_scale.")
    os.makedirs(work, exist_ok=True)
    args.data = work
    settings = {"num": args.num, "queries": args.queries, "dim": args.dim, "seed": args.seed,
                "metric": args.metric, "k": args.k}
    try:
        data_json = os.path.join(work, "data.json")
        if args.reuse and _read_json(data_json) is not None and \
                _read_json(data_json)["settings"] == settings:
            data_record = _read_json(data_json)
            generate_s, truth = data_record["generate_s"], data_record["truth"]
            print(f"Reusing the data and exact neighbours in {work}.", flush=True)
        else:
            start = time.perf_counter()
            x, labels = eval_scale.make_embeddings(total, num_classes, args.dim, args.seed)
            # The generator shuffles the rows, so the last ones are random held-out queries
            # whose classes (of 2-12 samples) almost always have other samples in the gallery.
            np.save(os.path.join(work, "gallery.npy"), x[:args.num])
            np.save(os.path.join(work, "labels.npy"), labels[:args.num])
            np.save(os.path.join(work, "queries.npy"), x[args.num:])
            generate_s = time.perf_counter() - start
            del x, labels
            print(f"Generated {args.num:,} + {args.queries:,} x {args.dim} rows in "
                  f"{generate_s:.0f} s.", flush=True)
            truth = run_worker("truth", args)
            print(f"Exact neighbours (knn.py): {truth['seconds']:.1f} s.", flush=True)
            _atomic().write_json(data_json, {"settings": settings, "generate_s": generate_s,
                                    "truth": truth})
        results = {}
        for name in chosen:
            index_dir = os.path.join(work, f"index_{name}")
            build_json = os.path.join(work, f"build_{name}.json")
            build = _read_json(build_json) if args.reuse else None
            if build is not None and build.get("requested_options") == options[name] and \
                    os.path.isfile(os.path.join(index_dir, "index.json")):
                print(f"{name}: reusing the index built in {build['build_s']:.1f} s.", flush=True)
            else:
                build = run_worker("build", args, backend=name, index_dir=index_dir,
                                   options=json.dumps(options[name]))
                build["requested_options"] = options[name]
                _atomic().write_json(build_json, build)
                print(f"{name}: built in {build['build_s']:.1f} s.", flush=True)
            serve = run_worker("serve", args, backend=name, index_dir=index_dir)
            if not args.work_dir:
                shutil.rmtree(index_dir, ignore_errors=True)
            results[name] = {
                f"recall@{args.k}": serve[f"recall@{args.k}"],
                "p50_ms": serve["p50_ms"],
                "p99_ms": serve["p99_ms"],
                "p50_cpu_ms": serve["p50_cpu_ms"],
                "p99_cpu_ms": serve["p99_cpu_ms"],
                "queries_per_s": serve["queries_per_s"],
                "build_s": build["build_s"],
                "rss_gb": serve["rss_gb"],
                "options": build["options"],
                "build": build,
                "serve": serve,
            }
            print(f"{name}: recall@{args.k} {serve[f'recall@{args.k}']:.4f}, "
                  f"p50 {serve['p50_ms']:.2f} ms, p99 {serve['p99_ms']:.2f} ms (CPU "
                  f"{serve['p99_cpu_ms']:.2f} ms), RSS {serve['rss_gb']:.2f} GB.", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    recall_key = f"recall@{args.k}"

    def meets(r, p99_key):
        return (r[recall_key] >= GOAL["recall@10"] and r[p99_key] <= GOAL["p99_ms"]
                and r["rss_gb"] <= GOAL["rss_gb"])

    ann = {name: r for name, r in results.items() if name != "flat"}
    met = [name for name, r in ann.items() if meets(r, "p99_ms")]
    met_cpu = [name for name, r in ann.items() if meets(r, "p99_cpu_ms")]
    machine.update(load_average_1_5_15_before=load_before,
                   load_average_1_5_15_after=[round(x, 2) for x in os.getloadavg()])
    summary = {
        "num": args.num,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "metric": args.metric,
        "num_classes": num_classes,
        "machine": machine,
        "command": " ".join(["python", os.path.relpath(os.path.abspath(__file__), ROOT),
                             *(argv if argv is not None else sys.argv[1:])]),
        "generate_s": generate_s,
        "truth": truth,
        "goal": {**GOAL, "note": "an ANN backend (hnsw or ivf_pq) meeting all three at once"},
        "goal_met_by": met,
        "goal_met_by_with_cpu_time_p99": met_cpu,
        "backends": results,
    }
    _atomic().write_json(args.output, summary)

    print(f"\n{args.num:,} x {args.dim} ({num_classes:,} classes), {args.queries:,} queries, "
          f"metric={args.metric}, {machine['usable_cpus']} cores, {platform.machine()}, load "
          f"{load_before[0]:.1f} -> {machine['load_average_1_5_15_after'][0]:.1f}\n")
    print(f"| backend | recall@{args.k} | p50 ms | p99 ms | p99 CPU ms | queries/s | build s "
          "| RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r[recall_key]:.4f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['p99_cpu_ms']:.2f} | {r['queries_per_s']:.0f} | {r['build_s']:.1f} | "
              f"{r['rss_gb']:.2f} |")
    print(f"\nGoal (recall@10 >= {GOAL['recall@10']}, p99 <= {GOAL['p99_ms']} ms, RSS <= "
          f"{GOAL['rss_gb']} GB) met by: {', '.join(met) or 'none'} (wall-clock p99); "
          f"{', '.join(met_cpu) or 'none'} (CPU-time p99)")
    print(f"Written to {args.output}")
    return summary


if __name__ == "__main__":
    main()
