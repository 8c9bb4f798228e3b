"""Graph-index engines on synthetic and real embeddings: recall with its interval, latency, memory.

A vector source is either synthetic (`eval_scale.make_embeddings`: SOP-like classes whose
structure lives in a `--latent_dim`-dimensional subspace; "full" = the whole space) or a file of
real embeddings (`--vectors=FILE.npz` with arrays "embeddings" and "labels", or a `.npy`
matrix; `--embed_run=RUN` writes such a file from a train.py run). Vectors are L2-normalised and
searched by inner product (= cosine). `--queries` random rows are held out of the gallery and
their exact `--k` nearest gallery rows computed by `dvml_tf.evaluation.knn` (own process).

For each engine of `ann_engines.ENGINES` (--engines), one process builds and saves the index
and another, fresh, loads it and serves it, so that each measures only its own memory:

* recall@k: mean over queries of the fraction of the exact k neighbours returned, with a 95 %
  confidence interval over the query sample (`recall_with_ci`);
* p50 / p99 latency of single queries on one thread (wall clock and process CPU time, which
  does not count waiting for a core other jobs hold), `--repeats` passes over
  `--latency_queries` queries; queries/s of one batched call on every core;
* the curve: the same for every search-time setting of the engine (HNSW ef_search; IVF nprobe
  x k_factor) on the same build;
* build_s (wall and CPU), disk size, serving RSS (VmRSS of the fresh process after loading and
  searching; also the baseline before the load), delete cost: time to remove 1 % of the rows
  and a check that searches for those rows no longer return them;
* the load average before and after every process, the machine and every package version.

The PCA spectrum of the gallery (explained variance ratio by component) is recorded, and for a
real source the synthetic latent dimension whose spectrum is closest (`match_latent_dim`: the
smallest mean absolute gap between cumulative explained-variance curves).

Results: without --output, a scratch file in the temporary folder named after the source and
its size (never a committed file); with --output, the run is merged into that file under its
key (e.g. "synthetic_200000x512_latent32"); replacing a key already there needs --replace.
A Markdown table is printed (`--tables=FILE` prints those of a results file again, with a
cross-run summary; `--plot=PNG` draws the curves).

The medium-scale results (benchmarks/results/ann_engines_medium.json; one command per run,
19 to 45 minutes each on a 2-core machine at load 11-19; docs/index.md has them all):

    nice -n 5 python benchmarks/ann_real.py --num=20000 --dim=512 --latent_dim=full --sweep \\
        --repeats=2 --engines=faiss_hnsw_f16,usearch_f16,usearch_i8,voyager_f32,hnswlib_f32 \\
        --work_dir=WORK --output=benchmarks/results/ann_engines_medium.json
    python benchmarks/ann_real.py --embed_run=RUN --vectors=omniglot.npz   # TFDS_DATA_DIR set
    python benchmarks/ann_real.py --vectors=omniglot.npz --sweep --repeats=2 --output=...
    python benchmarks/ann_real.py --install_cost --output=...   # wheel sizes, hnswlib compile

The 1M runs of issue 23: --num=1000000 (or the 1M glyph embeddings with --vectors) and
--work_dir, so that an interrupted run reuses its data, exact neighbours and built indexes.

Quick run: python benchmarks/ann_real.py --num=20000 --dim=128 --engines=faiss_hnsw_f16
"""

import argparse
import fcntl
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:  # sibling scripts, not a package
    sys.path.insert(0, HERE)

import ann_engines  # noqa: E402
import ann_scale  # noqa: E402
import eval_scale  # noqa: E402

MARKER = "@@ann_real@@ "
# The goal of issue 23 at 1M rows (J = 128 and 512); medium-scale runs show the trend only.
GOAL = {"recall@10": 0.95, "p99_ms": 5.0, "rss_gb": 2.0, "build_s": 600.0}
# Fraction of the rows removed by the delete measurement (on the built index, after saving).
DELETE_FRACTION = 0.01
# Rows used for the PCA spectra (covariance of a sample; the spectrum of 50k rows is stable).
SPECTRUM_ROWS = 50_000
# Synthetic rows per candidate when matching a real spectrum.
MATCH_ROWS = 20_000
# Packages whose install cost --install_cost measures (the versions benchmarked).
INSTALL_SPECS = ("faiss-cpu==1.15.1", "usearch==2.26.6", "numkong==7.8.6", "voyager==2.2.3",
                 "hnswlib==0.8.0")


# ------------------------------------------------------------------------------ pure functions

def recall_with_ci(found, truth, z=1.959964):
    """Recall@k of each query and its mean with a normal 95 % confidence interval.

    The interval is over the sample of queries (the index is fixed): mean +- z * s / sqrt(n),
    with s the sample standard deviation of the per-query recalls, clipped to [0, 1]. Per-query
    recalls are bounded, so the central limit theorem holds well at the >= 1,000 queries used.

    Args:
        found: int [Q, k] keys an engine returned (-1 or any absent key for missing results).
        truth: int [Q, k] exact neighbour keys.
        z: the normal quantile (1.96 for 95 %).

    Returns:
        dict with "recall" (mean), "ci95" [low, high], "std" (per-query), "queries".
    """
    found, truth = np.asarray(found), np.asarray(truth)
    if found.shape[0] != truth.shape[0] or found.ndim != 2 or truth.ndim != 2:
        raise ValueError(f"found {found.shape} and truth {truth.shape} must be [Q, k] with the "
                         "same Q.")
    k = truth.shape[1]
    # Row-wise membership without a Python loop: sort each truth row, then binary-search.
    ordered = np.sort(truth, axis=1)
    offsets = (np.arange(len(truth)) * (int(max(truth.max(), found.max())) + 2))[:, None]
    flat = (ordered + offsets).ravel()
    probes = (found + offsets).ravel()
    where = np.clip(np.searchsorted(flat, probes), 0, flat.size - 1)
    hit = (flat[where] == probes).reshape(found.shape) & (found >= 0)
    # A key returned twice counts once: keep the first occurrence of each key in a row.
    first = np.ones_like(hit)
    if found.shape[1] > 1:
        by_key = np.argsort(found, axis=1, kind="stable")
        keys = np.take_along_axis(found, by_key, axis=1)
        repeat = np.zeros_like(hit)
        repeat[:, 1:] = keys[:, 1:] == keys[:, :-1]
        np.put_along_axis(first, by_key, ~repeat, axis=1)
    per_query = (hit & first).sum(axis=1) / k
    mean = float(per_query.mean())
    std = float(per_query.std(ddof=1)) if len(per_query) > 1 else 0.0
    half = z * std / np.sqrt(len(per_query))
    return {"recall": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)],
            "std": std, "queries": len(per_query)}


def pca_spectrum(x, max_rows=SPECTRUM_ROWS, seed=0):
    """Explained variance ratio of each principal component, largest first.

    Args:
        x: float [N, D] vectors (a sample of `max_rows` rows is used when N is larger).
        max_rows: rows used for the covariance.
        seed: seed of the sample.

    Returns:
        float64 [D] non-negative ratios summing to 1.
    """
    x = np.asarray(x)
    if len(x) > max_rows:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))]
    centred = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    eigenvalues = np.linalg.eigvalsh(centred.T @ centred)[::-1]
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    return eigenvalues / eigenvalues.sum()


def components_for(spectrum, fraction):
    """Fewest leading components whose explained variance reaches `fraction`."""
    cumulative = np.cumsum(spectrum)
    return int(np.searchsorted(cumulative, fraction - 1e-12) + 1)


def spectrum_distance(a, b):
    """Mean absolute gap between the cumulative explained-variance curves of two spectra.

    Curves of different lengths are compared over the longer one (a finished curve stays at
    1). 0 for equal spectra; at most 1.

    Args:
        a, b: explained variance ratios, largest first.

    Returns:
        float.
    """
    n = max(len(a), len(b))
    ca = np.concatenate([np.cumsum(a), np.ones(n - len(a))])
    cb = np.concatenate([np.cumsum(b), np.ones(n - len(b))])
    return float(np.abs(ca - cb).mean())


def match_latent_dim(spectrum, candidates):
    """The candidate whose spectrum is closest to `spectrum` (by `spectrum_distance`).

    Args:
        spectrum: explained variance ratios of the real vectors.
        candidates: dict latent_dim -> spectrum of synthetic vectors with that latent dim.

    Returns:
        (best latent_dim, dict latent_dim -> distance).
    """
    distances = {key: spectrum_distance(spectrum, value) for key, value in candidates.items()}
    return min(distances, key=distances.get), distances


def spectrum_summary(spectrum):
    """Components for 50 / 90 / 99 % of the variance and the first 32 ratios."""
    return {"components_50": components_for(spectrum, 0.5),
            "components_90": components_for(spectrum, 0.9),
            "components_99": components_for(spectrum, 0.99),
            "leading_ratios": [round(float(v), 5) for v in spectrum[:32]]}


def run_key(source, num, dim, latent_dim=None):
    """Key of a run in a results file; it names the source and its size."""
    if source == "synthetic":
        return f"synthetic_{num}x{dim}_latent{latent_dim}"
    return f"{source}_{num}x{dim}"


def default_output(key):
    """Scratch results path of a run: in the temporary folder, named after the run key."""
    return os.path.join(tempfile.gettempdir(), "ann_real", f"ann_real_{key}.json")


def merge_record(path, key, record, replace):
    """Adds `record` under runs[key] of the results file `path`, atomically.

    Args:
        path: results JSON (created if absent).
        key: the run key.
        record: the run's record.
        replace: whether an existing runs[key] may be replaced.

    Returns:
        the whole file's content as written.

    Raises:
        ValueError: runs[key] exists and `replace` is False, or `path` is not a results file.
    """
    # Two runs may finish at once into one file: a lock file next to it serialises the
    # read-modify-write, so that neither loses the other's run.
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f".{name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _merge_locked(path, key, record, replace)


def _merge_locked(path, key, record, replace):
    content = {"runs": {}}
    if os.path.exists(path):
        try:
            with open(path) as f:
                content = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable results file: {error}") from None
        if not isinstance(content, dict) or not isinstance(content.get("runs"), dict):
            raise ValueError(f"{path} is not an ann_real results file (no 'runs' object); "
                             "choose another --output.")
    if key in content["runs"] and not replace:
        raise ValueError(f"{path} already holds the run {key!r}; pass --replace to replace it "
                         "or choose another --output.")
    content["runs"][key] = record
    ann_scale._atomic().write_json(path, content)
    return content


def latency_summary(wall_ms, cpu_ms):
    """p50/p99/mean of per-query wall-clock and CPU milliseconds."""
    return {"p50_ms": float(np.percentile(wall_ms, 50)),
            "p99_ms": float(np.percentile(wall_ms, 99)),
            "mean_ms": float(np.mean(wall_ms)),
            "p50_cpu_ms": float(np.percentile(cpu_ms, 50)),
            "p99_cpu_ms": float(np.percentile(cpu_ms, 99)),
            "timed_queries": len(wall_ms)}


def best_setting(curve, k):
    """The fastest setting (by median-over-repeats wall p99) whose recall lower bound >= goal."""
    ok = [point for point in curve if point[f"recall@{k}"]["ci95"][0] >= GOAL["recall@10"]]
    return min(ok, key=lambda p: p["p99_ms"]) if ok else None


# ----------------------------------------------------------------------------------- workers

def _load_average():
    return [round(x, 2) for x in os.getloadavg()]


def worker_truth(args):
    """Exact k nearest gallery rows of the queries (knn.py), saved to truth.npy."""
    _, knn = ann_scale.import_index_modules()
    gallery = np.load(os.path.join(args.data, "gallery.npy"), mmap_mode="r")
    queries = np.load(os.path.join(args.data, "queries.npy"))
    start = time.perf_counter()
    truth, _ = knn.nearest_neighbors(queries, args.k, gallery=gallery, metric="cosine")
    np.save(os.path.join(args.data, "truth.npy"), truth)
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": ann_scale._status_gb("VmHWM")}


def _engine_class(name):
    if name not in ann_engines.ENGINES:
        raise ValueError(f"Unknown engine {name!r}; valid: {sorted(ann_engines.ENGINES)}.")
    return ann_engines.ENGINES[name]


def worker_build(args):
    """Builds one engine's index, saves it, then measures deleting 1 % of its rows."""
    cls = _engine_class(args.engine)
    cls.library()  # imported before the baseline, as the serving process does
    gallery = np.load(os.path.join(args.data, "gallery.npy"))
    options = json.loads(args.options)
    rss_before = ann_scale._status_gb("VmRSS")
    engine = cls(gallery.shape[1], options)
    start, cpu_start = time.perf_counter(), time.process_time()
    engine.build(gallery, args.threads)
    build_s, build_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    rss_built = ann_scale._status_gb("VmRSS")
    os.makedirs(args.index_dir, exist_ok=True)
    start = time.perf_counter()
    engine.save(args.index_dir)
    save_s = time.perf_counter() - start
    disk = sum(os.path.getsize(os.path.join(args.index_dir, f)) for f in os.listdir(args.index_dir))
    out = {"build_s": build_s, "build_cpu_s": build_cpu_s, "save_s": save_s,
           "disk_gb": round(disk / 1e9, 4), "build_rss_before_gb": rss_before,
           "build_rss_after_gb": rss_built, "threads": args.threads,
           "options": engine.options, "delete": _measure_delete(engine, gallery, args)}
    out["build_peak_rss_gb"] = ann_scale._status_gb("VmHWM")
    return out


def _measure_delete(engine, gallery, args):
    """Removes DELETE_FRACTION of the rows and checks that searching them skips them."""
    rng = np.random.default_rng(args.seed)
    count = max(1, int(len(gallery) * DELETE_FRACTION))
    keys = np.sort(rng.choice(len(gallery), count, replace=False))
    record = {"removed": count, "mechanism": engine.DELETE}
    start = time.perf_counter()
    try:
        engine.remove(keys)
    except (RuntimeError, NotImplementedError, AttributeError) as error:
        return {**record, "supported": False, "error": str(error).splitlines()[0][:200]}
    seconds = time.perf_counter() - start
    probe = keys[:200]
    found = engine.search(np.ascontiguousarray(gallery[probe]), args.k, args.threads)
    return {**record, "supported": True, "seconds": seconds,
            "us_per_row": seconds / count * 1e6,
            # Each probe is a removed row searched for itself: it must not come back.
            "removed_rows_returned": int(np.isin(found, keys).sum()),
            "probes": len(probe)}


def _time_single(engine, queries, k, repeats):
    """Per-repeat latency summaries of one-query-at-a-time searches on one thread."""
    passes = []
    for _ in range(repeats):
        wall, cpu = [], []
        for i in range(len(queries)):
            start, cpu_start = time.perf_counter(), time.process_time()
            engine.search(queries[i:i + 1], k, 1)
            wall.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - cpu_start) * 1e3)
        passes.append(latency_summary(wall, cpu))
    return passes


def _measure_setting(engine, queries, truth, args):
    start = time.perf_counter()
    found = engine.search(queries, args.k, args.threads)
    batch_s = time.perf_counter() - start
    load_before = _load_average()
    passes = _time_single(engine, queries[:args.latency_queries], args.k, args.repeats)
    point = {f"recall@{args.k}": recall_with_ci(found, truth),
             "queries_per_s": len(queries) / batch_s, "batch_threads": args.threads,
             "repeats": passes, "load_average_1_5_15": [load_before, _load_average()]}
    # The headline of a setting: the median over repeats of each percentile.
    for key in ("p50_ms", "p99_ms", "p50_cpu_ms", "p99_cpu_ms"):
        point[key] = float(np.median([p[key] for p in passes]))
    return point


def worker_serve(args):
    """Loads a saved index in this fresh process; measures memory and every search setting."""
    cls = _engine_class(args.engine)
    cls.library()
    queries = np.load(os.path.join(args.data, "queries.npy"))
    truth = np.load(os.path.join(args.data, "truth.npy"))
    rss_before = ann_scale._status_gb("VmRSS")
    start = time.perf_counter()
    engine = cls.load(args.index_dir, queries.shape[1], json.loads(args.options))
    load_s = time.perf_counter() - start
    out = {"load_s": load_s, "rss_before_load_gb": rss_before,
           "rss_loaded_gb": ann_scale._status_gb("VmRSS")}
    for i in range(min(20, len(queries))):  # warm-up: page the index in
        engine.search(queries[i:i + 1], args.k, 1)
    default = engine.setting()
    settings = [default] + [s for s in cls.SWEEP if s != default] if args.sweep else [default]
    out["curve"] = []  # the default setting first, then the sweep's in its order
    for setting in settings:
        engine.set_search(setting)
        out["curve"].append({"setting": setting, **_measure_setting(engine, queries, truth,
                                                                    args)})
    out["rss_gb"] = ann_scale._status_gb("VmRSS")
    out["serve_peak_rss_gb"] = ann_scale._status_gb("VmHWM")
    out["tensorflow_loaded"] = "tensorflow" in sys.modules
    return out


WORKERS = {"truth": worker_truth, "build": worker_build, "serve": worker_serve}


def run_worker(phase, args, **extra):
    """Runs one phase of this script in a fresh Python process; returns the dict it printed."""
    flags = {"worker": phase, "data": args.data, "k": args.k, "seed": args.seed,
             "threads": args.threads, "repeats": args.repeats,
             "latency_queries": args.latency_queries, **extra}
    cmd = [sys.executable, os.path.abspath(__file__)]
    cmd += [f"--{key}={value}" for key, value in flags.items()]
    if args.sweep:
        cmd.append("--sweep")
    load_before = _load_average()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{phase} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MARKER):])
    result["load_average_1_5_15"] = [load_before, _load_average()]
    return result


# ----------------------------------------------------------------------------------- sources

def _normalise(x):
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.isfinite(x).all() or (norms == 0).any():
        raise ValueError("The vectors hold non-finite values or zero rows; they cannot be "
                         "normalised for cosine search.")
    return x / norms


def synthetic_vectors(num, dim, latent_dim, seed):
    """SOP-like synthetic vectors (eval_scale.make_embeddings), L2-normalised."""
    classes = round(num * eval_scale.SOP_TEST_CLASSES / eval_scale.SOP_TEST_SIZE)
    x, labels = eval_scale.make_embeddings(num, classes, dim, seed, latent_dim=latent_dim)
    return _normalise(x), labels


def load_vectors(path):
    """Real embeddings: .npz with "embeddings" (and "labels") or a .npy matrix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--vectors={path}: no such file.")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"--vectors={path} is not a .npy/.npz file: {error}") from None
    if isinstance(data, np.ndarray):
        x, labels = data, None
    else:
        if "embeddings" not in data:
            raise ValueError(f"--vectors={path} has no 'embeddings' array; it holds "
                             f"{sorted(data.files)}.")
        x, labels = data["embeddings"], data.get("labels")
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"--vectors={path}: embeddings must be [N >= 2, D]; got {x.shape}.")
    return _normalise(x), labels


def embed_run(model_dir, path, splits=("train", "test")):
    """Embeds the splits of a train.py run (TensorFlow) and writes embeddings + labels to `path`.

    Labels of later splits are offset past the earlier ones', so classes stay distinct.
    """
    from dvml_tf.evaluation import runner

    parts, labels, offset, sizes = [], [], 0, {}
    for split in splits:
        embedded = runner.embed_run(model_dir, split=split)
        parts.append(embedded.embeddings)
        labels.append(np.asarray(embedded.labels, dtype=np.int64) + offset)
        offset = int(labels[-1].max()) + 1
        sizes[split] = len(embedded.embeddings)
    atomic = ann_scale._atomic()
    with atomic.replacing(path, suffix=".npz") as tmp:
        np.savez(tmp, embeddings=np.concatenate(parts), labels=np.concatenate(labels))
    return sizes


def spectrum_record(gallery, source_dim, seed, real):
    """The gallery's spectrum; for a real source also the closest synthetic latent dim."""
    spectrum = pca_spectrum(gallery)
    record = {"explained_variance_ratio": [round(float(v), 6) for v in spectrum],
              **spectrum_summary(spectrum)}
    if real:
        latents = sorted({d for d in (4, 8, 16, 32, 64, 128, 256, 512) if d < source_dim}
                         | {source_dim})
        candidates = {}
        for latent in latents:
            x, _ = synthetic_vectors(MATCH_ROWS, source_dim, latent, seed)
            candidates[latent] = pca_spectrum(x)
        best, distances = match_latent_dim(spectrum, candidates)
        record["match"] = {
            "criterion": "smallest mean absolute gap between cumulative explained-variance "
                         "curves",
            "best_latent_dim": best,
            "distances": {str(d): round(v, 5) for d, v in distances.items()},
            "components_90_by_latent_dim": {str(d): components_for(s, 0.9)
                                            for d, s in candidates.items()},
        }
    return record


# ------------------------------------------------------------------------------------ tables

def markdown(key, record):
    """Markdown tables of one run: engines at their default setting, then the curves."""
    k = record["k"]
    load = (record["machine"]["load_average_1_5_15_before"][0],
            record["machine"]["load_average_1_5_15_after"][0])
    lines = [f"**{key}** ({record['gallery']:,} gallery rows x {record['dim']}, "
             f"{record['queries']:,} queries; load average {load[0]} -> {load[1]})", "",
             f"| engine | recall@{k} [95 % CI] | p50 ms | p99 ms | p99 CPU ms | queries/s "
             "(batch) | build s | RSS GB | delete 1 % s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, result in record["engines"].items():
        point = result["serve"]["curve"][0]
        recall = point[f"recall@{k}"]
        delete = result["build"]["delete"]
        lines.append(
            f"| {name} {_setting_text(point['setting'])} | {recall['recall']:.4f} "
            f"[{recall['ci95'][0]:.4f}, {recall['ci95'][1]:.4f}] | {point['p50_ms']:.2f} | "
            f"{point['p99_ms']:.2f} | {point['p99_cpu_ms']:.2f} | {point['queries_per_s']:.0f} | "
            f"{result['build']['build_s']:.1f} | {result['serve']['rss_gb']:.3f} | "
            + (f"{delete['seconds']:.3f}" if delete.get("supported") else "no") + " |")
    curves = [(name, r["serve"]["curve"]) for name, r in record["engines"].items()
              if len(r["serve"]["curve"]) > 1]
    if curves:
        lines += ["", f"| engine | setting | recall@{k} | p50 ms | p99 ms | p99 CPU ms |",
                  "|---|---|---|---|---|---|"]
        for name, curve in curves:
            for point in sorted(curve, key=lambda p: tuple(p["setting"].values())):
                lines.append(f"| {name} | {_setting_text(point['setting'])} | "
                             f"{point[f'recall@{k}']['recall']:.4f} | {point['p50_ms']:.2f} | "
                             f"{point['p99_ms']:.2f} | {point['p99_cpu_ms']:.2f} |")
    return "\n".join(lines)


def smallest_setting(curve, k, target=GOAL["recall@10"]):
    """The least search effort (smallest setting tuple, e.g. ef_search) whose recall interval
    lies at or above `target`; None when no setting of the curve reaches it."""
    ok = [point for point in curve if point[f"recall@{k}"]["ci95"][0] >= target]
    return min(ok, key=lambda p: tuple(p["setting"].values())) if ok else None


def summary_table(runs):
    """One Markdown row per run and engine: the default setting, then the least effort that
    reaches the goal's recall (its interval's lower bound >= 0.95), in CPU time per query (the
    wall-clock figures are in each run's own table)."""
    lines = ["| vectors | engine | recall@10 default [95 % CI] | p99 CPU ms | least setting with "
             "CI >= 0.95 | its recall | its p99 CPU ms | build CPU s | index MB in RSS |",
             "|---" * 9 + "|"]
    for key, record in runs.items():
        if key == "install":
            continue
        k = record["k"]
        for name, result in record["engines"].items():
            curve, serve = result["serve"]["curve"], result["serve"]
            point, recall = curve[0], curve[0][f"recall@{k}"]
            best = smallest_setting(curve, k)
            middle = ("none | | " if best is None else
                      f"{_setting_text(best['setting'])} | {best[f'recall@{k}']['recall']:.4f} | "
                      f"{best['p99_cpu_ms']:.2f} ")
            # The index's share of the serving process: RSS after minus before the load.
            index_mb = (serve["rss_gb"] - serve["rss_before_load_gb"]) * 1024
            lines.append(
                f"| {key} | {name} {_setting_text(point['setting'])} | {recall['recall']:.4f} "
                f"[{recall['ci95'][0]:.3f}, {recall['ci95'][1]:.3f}] | {point['p99_cpu_ms']:.2f} "
                f"| {middle}| {result['build']['build_cpu_s']:.0f} | {index_mb:.0f} |")
    return "\n".join(lines)


def plot_curves(runs, path):
    """One panel per run: recall@10 against the median CPU time per query, one line per engine
    over its search-time settings; writes a PNG to `path` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib import ticker

    keys = [key for key in runs if key != "install"]
    columns = min(2, len(keys))
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows + 0.5),
                             squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    colours, styles = {}, {False: "-", True: ":"}
    for ax, key in zip(axes, keys, strict=False):
        record = runs[key]
        k = record["k"]
        for name, result in record["engines"].items():
            # One line per value of the settings after the first (IVF: one per k_factor, over
            # nprobe); HNSW has one line over ef_search.
            lines = {}
            for point in result["serve"]["curve"]:
                rest = list(point["setting"].items())[1:]
                lines.setdefault(tuple(rest), []).append(point)
            for rest, points in sorted(lines.items()):
                points.sort(key=lambda p: tuple(p["setting"].values()))
                label = " ".join([name] + [f"{key} {value}" for key, value in rest])
                ax.plot([p["p50_cpu_ms"] for p in points],
                        [p[f"recall@{k}"]["recall"] for p in points], marker="o", ms=3,
                        label=label, color=colours.setdefault(name, f"C{len(colours)}"),
                        ls=styles[len(lines) > 1 and rest != max(lines)])
        ax.axhline(GOAL["recall@10"], color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        # Minor ticks unlabelled: a curve within one decade would print overlapping labels.
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("p50 CPU ms per query (one thread)")
        ax.set_ylabel(f"recall@{k}")
        ax.set_ylim(0.75, 1.005)
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.5 / (3.6 * rows + 0.5) + 0.02, 1, 1))
    with ann_scale._atomic().replacing(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _setting_text(setting):
    return ", ".join(f"{key} {value}" for key, value in setting.items())


# -------------------------------------------------------------------------------- install cost

def install_cost(specs=INSTALL_SPECS):
    """Download size of each package and, for an sdist, the time to compile its wheel."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="ann_real_install.") as tmp:
        for spec in specs:
            folder = os.path.join(tmp, spec.split("==")[0])
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                            folder, spec], check=True, capture_output=True)
            (name,) = os.listdir(folder)
            record = {"file": name, "download_mb": round(
                os.path.getsize(os.path.join(folder, name)) / 1e6, 3),
                "download_s": round(time.perf_counter() - start, 1),
                "kind": "wheel" if name.endswith(".whl") else "sdist"}
            if record["kind"] == "sdist":
                wheels = os.path.join(tmp, "wheels")
                cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                                "--no-build-isolation", "-q", "-w", wheels,
                                os.path.join(folder, name)], check=True, capture_output=True)
                cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                (wheel,) = os.listdir(wheels)
                record.update(
                    compile_s=round(time.perf_counter() - start, 1),
                    compile_cpu_s=round(cpu_after.ru_utime + cpu_after.ru_stime
                                        - cpu_before.ru_utime - cpu_before.ru_stime, 1),
                    wheel_mb=round(os.path.getsize(os.path.join(wheels, wheel)) / 1e6, 3))
            results[spec] = record
    return results


# -------------------------------------------------------------------------------------- main

def machine_info():
    """ann_scale's machine record plus CPU flags and every engine package's version."""
    from importlib import metadata

    info = ann_scale.machine_info()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    info["cpu_flags_simd"] = sorted(f for f in flags if f.startswith(("avx", "sse", "fma",
                                                                        "f16c", "amx")))
    versions = {}
    for package in ann_engines.PACKAGES.values():
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info["packages"] = versions
    return info


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_argument_group("vector source")
    source.add_argument("--vectors", default=None,
                        help=".npz (embeddings, labels) or .npy of real embeddings; default: "
                             "synthetic")
    source.add_argument("--embed_run", default=None,
                        help="embed the train and test splits of this train.py run into "
                             "--vectors and exit")
    source.add_argument("--num", type=int, default=200_000, help="synthetic gallery rows")
    source.add_argument("--dim", type=int, default=512, help="synthetic dimension")
    source.add_argument("--latent_dim", default="32",
                        help="synthetic intrinsic dimension: an int <= --dim, or 'full'")
    parser.add_argument("--queries", type=int, default=1000, help="held-out query rows")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default="faiss_hnsw_f16,usearch_f32,usearch_f16,usearch_i8,"
                        "voyager_f32,hnswlib_f32",
                        help="comma-separated subset of " + ",".join(ann_engines.ENGINES))
    parser.add_argument("--engine_options", default="{}",
                        help='JSON {"engine": {option: value}} overriding the defaults')
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for builds and batched searches (default: usable cores)")
    parser.add_argument("--latency_queries", type=int, default=1000,
                        help="queries timed one at a time per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="passes of the timed queries")
    parser.add_argument("--sweep", action="store_true",
                        help="measure every search-time setting of ann_engines' SWEEP lists")
    parser.add_argument("--work_dir", default=None,
                        help="keep data, exact neighbours and indexes here and reuse them in a "
                             "rerun with the same settings (default: a removed temp folder)")
    parser.add_argument("--output", default=None,
                        help="results file to merge this run into (default: a scratch file in "
                             "the temporary folder named after the run)")
    parser.add_argument("--replace", action="store_true",
                        help="replace this run's key if --output holds it already")
    parser.add_argument("--tables", default=None, help="print the tables of a results file")
    parser.add_argument("--plot", default=None,
                        help="with --tables: also draw the recall / CPU-time curves to this PNG")
    parser.add_argument("--install_cost", action="store_true",
                        help="measure download sizes and the sdist compile time; merged into "
                             "--output under 'install'")
    parser.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--index_dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return parser, args
    args.engine_list = [e for e in args.engines.split(",") if e]
    bad = sorted(set(args.engine_list) - set(ann_engines.ENGINES))
    if not args.engine_list or bad:
        parser.error(f"--engines: unknown {bad}; valid: {','.join(ann_engines.ENGINES)}.")
    try:
        args.options_by_engine = json.loads(args.engine_options)
    except json.JSONDecodeError as error:
        parser.error(f"--engine_options must be JSON: {error}")
    if not isinstance(args.options_by_engine, dict) or set(args.options_by_engine) - set(
            ann_engines.ENGINES):
        parser.error("--engine_options must be a JSON object keyed by engine names.")
    if args.latent_dim != "full":
        try:
            args.latent_dim = int(args.latent_dim)
        except ValueError:
            parser.error(f"--latent_dim must be an int or 'full'; got {args.latent_dim!r}.")
        if not 1 <= args.latent_dim <= args.dim:
            parser.error(f"--latent_dim={args.latent_dim} must lie in [1, --dim={args.dim}].")
    for name in ("num", "queries", "k", "threads", "latency_queries", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1.")
    return parser, args


def _prepare_data(args, work, real):
    """Writes gallery/queries/labels/truth into `work` (or reuses them); returns the record."""
    settings = {"vectors": os.path.abspath(args.vectors) if real else None, "num": args.num,
                "dim": args.dim, "latent_dim": args.latent_dim, "queries": args.queries,
                "seed": args.seed, "k": args.k}
    data_json = os.path.join(work, "data.json")
    previous = ann_scale._read_json(data_json)
    if previous is not None and previous["settings"] == settings:
        print(f"Reusing the data and exact neighbours in {work}.", flush=True)
        return previous
    start = time.perf_counter()
    if real:
        x, labels = load_vectors(args.vectors)
        if args.queries >= len(x) - args.k:
            raise ValueError(f"--queries={args.queries} leaves fewer than --k={args.k} gallery "
                             f"rows of the {len(x)} vectors.")
        order = np.random.default_rng(args.seed).permutation(len(x))
        held_out, kept = np.sort(order[:args.queries]), np.sort(order[args.queries:])
        gallery, queries = x[kept], x[held_out]
        gallery_labels = labels[kept] if labels is not None else np.full(len(kept), -1)
    else:
        latent = args.dim if args.latent_dim == "full" else args.latent_dim
        x, labels = synthetic_vectors(args.num + args.queries, args.dim, latent, args.seed)
        # The generator shuffles its rows: the last ones are random held-out queries.
        gallery, queries = x[:args.num], x[args.num:]
        gallery_labels = labels[:args.num]
    np.save(os.path.join(work, "gallery.npy"), gallery)
    np.save(os.path.join(work, "queries.npy"), queries)
    np.save(os.path.join(work, "labels.npy"), gallery_labels)
    generate_s = time.perf_counter() - start
    spectrum = spectrum_record(gallery, gallery.shape[1], args.seed, real)
    del x, gallery
    args.data = work
    truth = run_worker("truth", args)
    record = {"settings": settings, "generate_s": generate_s, "truth": truth,
              "spectrum": spectrum, "gallery": int(np.load(os.path.join(work, "gallery.npy"),
                                                           mmap_mode="r").shape[0]),
              "dim": int(queries.shape[1])}
    ann_scale._atomic().write_json(data_json, record)
    print(f"Data ready ({record['gallery']:,} x {record['dim']}); exact neighbours in "
          f"{truth['seconds']:.1f} s.", flush=True)
    return record


def main(argv=None):
    parser, args = _parse_args(argv)
    if args.worker:
        print(MARKER + json.dumps(WORKERS[args.worker](args)), flush=True)
        return None
    command = " ".join(["python", os.path.relpath(os.path.abspath(__file__), ROOT),
                        *(argv if argv is not None else sys.argv[1:])])
    if args.tables:
        with open(args.tables) as f:
            runs = json.load(f)["runs"]
        for key, record in runs.items():
            if key != "install":
                print(markdown(key, record) + "\n")
        print(summary_table(runs))
        if args.plot:
            plot_curves(runs, args.plot)
            print(f"Curves written to {args.plot}")
        return None
    if args.embed_run:
        if not args.vectors:
            parser.error("--embed_run needs --vectors=FILE.npz to write.")
        sizes = embed_run(args.embed_run, args.vectors)
        print(f"Embedded {sizes} into {args.vectors}.")
        return sizes
    if args.install_cost:
        record = {"command": command, "machine": machine_info(), "packages": install_cost()}
        path = args.output or default_output("install")
        merge_record(path, "install", record, replace=args.replace or not args.output)
        print(json.dumps(record["packages"], indent=1) + f"\nWritten to {path}")
        return record

    real = args.vectors is not None
    machine = machine_info()
    load_before = _load_average()
    work = args.work_dir or tempfile.mkdtemp(prefix="ann_real.")
    os.makedirs(work, exist_ok=True)
    args.data = work
    try:
        data = _prepare_data(args, work, real)
        source = os.path.splitext(os.path.basename(args.vectors))[0] if real else "synthetic"
        key = run_key(source, data["gallery"], data["dim"], args.latent_dim)
        output = args.output or default_output(key)
        if args.output and not args.replace and key in (
                (ann_scale._read_json(output) or {}).get("runs") or {}):
            parser.error(f"{output} already holds the run {key!r}; pass --replace.")
        engines = {}
        for name in args.engine_list:
            options = args.options_by_engine.get(name, {})
            index_dir = os.path.join(work, f"index_{name}")
            build_json = os.path.join(work, f"build_{name}.json")
            build = ann_scale._read_json(build_json)
            # A build is reused only over the same vectors with the same options.
            if build is not None and build.get("requested_options") == options and \
                    build.get("data_settings") == data["settings"] and os.path.isdir(index_dir):
                print(f"{name}: reusing the index built in {build['build_s']:.1f} s.", flush=True)
            else:
                shutil.rmtree(index_dir, ignore_errors=True)
                build = run_worker("build", args, engine=name, index_dir=index_dir,
                                   options=json.dumps(options))
                build["requested_options"] = options
                build["data_settings"] = data["settings"]
                ann_scale._atomic().write_json(build_json, build)
                print(f"{name}: built in {build['build_s']:.1f} s.", flush=True)
            serve = run_worker("serve", args, engine=name, index_dir=index_dir,
                               options=json.dumps(options))
            if not args.work_dir:
                shutil.rmtree(index_dir, ignore_errors=True)
            engines[name] = {"build": build, "serve": serve,
                             "best_setting_for_goal": best_setting(serve["curve"], args.k)}
            point = serve["curve"][0]
            print(f"{name}: recall@{args.k} {point[f'recall@{args.k}']['recall']:.4f}, p99 "
                  f"{point['p99_ms']:.2f} ms (CPU {point['p99_cpu_ms']:.2f}), RSS "
                  f"{serve['rss_gb']:.3f} GB.", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    machine.update(load_average_1_5_15_before=load_before,
                   load_average_1_5_15_after=_load_average())
    record = {"command": command, "machine": machine, "source": source,
              "latent_dim": None if real else args.latent_dim, "gallery": data["gallery"],
              "dim": data["dim"], "queries": args.queries, "k": args.k, "seed": args.seed,
              "metric": "cosine (inner product of L2-normalised vectors)",
              "threads": args.threads, "repeats": args.repeats,
              "latency_queries": min(args.latency_queries, args.queries),
              "generate_s": data["generate_s"], "truth": data["truth"],
              "spectrum": data["spectrum"], "goal_at_1m": GOAL, "engines": engines}
    merge_record(output, key, record, replace=args.replace or not args.output)
    print("\n" + markdown(key, record))
    print(f"\nWritten to {output} (run {key!r})")
    return record


if __name__ == "__main__":
    main()
