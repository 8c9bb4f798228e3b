"""Evaluation at Stanford Online Products test scale: ours against pytorch-metric-learning.

On synthetic, clustered 60,502 x 512 float32 embeddings with 11,316 classes of 2-12 samples
(the SOP test split's size), one invocation times, each side in its own process (so that the
peak RSS, VmHWM, of one does not hide the other's), alternating the sides over `--repeats`:

* ours: `evaluate_embeddings(..., compute_clustering=False)` for `--ks` and MAP@R (exact
  search, `dvml_tf.evaluation.exact_search`), with the time and GFLOP/s of its candidate pass;
* peer: pytorch-metric-learning 2.9's AccuracyCalculator (precision_at_1 = Recall@1 and
  mean_average_precision_at_r; its kNN is faiss's exact IndexFlatL2), run by `--peer_python`;
* optionally (`--with_reference`) a plain chunked numpy brute force written here, independent
  of dvml_tf, for every K;
* optionally k-means with K = 11,316 (`--kmeans`; its NMI and F1).

It records the CPU's flags, the load average around each run, a measured float32 GEMM peak
(numpy sgemm of 4096^3, best of 3) and each side's achieved GFLOP/s (its matrix-product flops
over its wall time), and checks that the shared metrics are identical (to 1e-12).

The peer's virtual environment (torch's CPU wheel, pytorch-metric-learning, faiss):

    python3 -m venv /path/to/pml-venv
    /path/to/pml-venv/bin/pip install TORCH_2_13_CPU_WHEEL pytorch-metric-learning==2.9.0 \
        faiss-cpu==1.15.1 numpy==2.4.6

(TORCH_2_13_CPU_WHEEL: torch 2.13's CPU-only wheel file, or `torch==2.13.0` from your index.)

Full scale (several minutes on 2 cores; writes benchmarks/results/eval_scale.json):

    python benchmarks/eval_scale.py --peer_python=/path/to/pml-venv/bin/python --repeats=2

A run of another size writes to a temporary file unless `--output` is given, so that quick
runs never overwrite the committed results:

    python benchmarks/eval_scale.py --num=5000 --peer_python=/path/to/pml-venv/bin/python
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SOP_TEST_SIZE = 60_502
SOP_TEST_CLASSES = 11_316
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "eval_scale.json")


def make_embeddings(num, num_classes, dim, seed, latent_dim=32, spread=0.75, noise=0.05):
    """Synthetic clustered embeddings with SOP-like class sizes.

    Class sizes are 2 + Binomial(10, p) (so 2..12), with p set so that the mean is
    num / num_classes, then nudged by one sample at a time so that they sum to `num`. Class
    centres are standard normal in a `latent_dim`-dimensional subspace; samples scatter around
    them with `spread` (so that classes overlap and the metrics are far from 0 and 1) and get
    isotropic `noise` in all `dim` dimensions. Rows are shuffled.

    Args:
        num: number of samples.
        num_classes: number of classes (num / num_classes must lie in [2, 12]).
        dim: embedding dimension.
        seed: seed.
        latent_dim: dimension of the subspace holding the class structure.
        spread: within-class standard deviation in the subspace.
        noise: isotropic noise standard deviation.

    Returns:
        (embeddings float32 [num, dim], labels int64 [num]).
    """
    mean = num / num_classes
    if not 2 <= mean <= 12:
        raise ValueError(f"num / num_classes = {mean:.2f} must lie in [2, 12].")
    rng = np.random.default_rng(seed)
    sizes = 2 + rng.binomial(10, (mean - 2) / 10, size=num_classes)
    diff = int(num - sizes.sum())
    if diff:
        room = np.flatnonzero(sizes < 12) if diff > 0 else np.flatnonzero(sizes > 2)
        sizes[rng.choice(room, size=abs(diff), replace=False)] += np.sign(diff)
    labels = np.repeat(np.arange(num_classes), sizes)
    centres = rng.standard_normal((num_classes, latent_dim))
    latent = centres[labels] + spread * rng.standard_normal((num, latent_dim))
    basis = np.linalg.qr(rng.standard_normal((dim, latent_dim)))[0].T  # Orthonormal rows.
    x = latent @ basis + noise * rng.standard_normal((num, dim))
    perm = rng.permutation(num)
    return x[perm].astype(np.float32), labels[perm].astype(np.int64)


def reference_retrieval(x, labels, ks, metric, chunk=2048):
    """Plain chunked numpy brute force: R@K for each K and MAP@R, both over the queries with
    R >= 1 (the others have no possible positive: `metrics` leaves them out of both).

    Args:
        x: float32 [N, D].
        labels: int [N].
        ks: recall Ks.
        metric: "euclidean" or "cosine".
        chunk: query rows per chunk.

    Returns:
        dict "recall@K" -> float, "map@r" -> float.
    """
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    num = x.shape[0]
    sq = np.einsum("ij,ij->i", x, x)
    counts = np.bincount(labels)
    r_all = counts[labels] - 1
    k = min(max(max(ks), int(r_all.max())), num - 1)
    max_r = int(r_all.max())
    hits = np.zeros(len(ks))
    ap_sum, ap_n = 0.0, 0
    for s in range(0, num, chunk):
        e = min(s + chunk, num)
        d = sq[s:e, None] + sq[None, :] - 2.0 * (x[s:e] @ x.T)
        d[np.arange(e - s), np.arange(s, e)] = np.inf
        idx = np.argpartition(d, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, idx, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, axis=1)
        match = labels[idx] == labels[s:e, None]
        r = r_all[s:e]
        for i, kk in enumerate(ks):
            hits[i] += match[r > 0, :kk].any(axis=1).sum()
        rel = match[:, :max_r] & (np.arange(max_r)[None, :] < r[:, None])
        prec = np.cumsum(rel, axis=1) / np.arange(1, max_r + 1)
        ok = r > 0
        ap_sum += float(((prec * rel).sum(axis=1)[ok] / r[ok]).sum())
        ap_n += int(ok.sum())
    out = {f"recall@{kk}": float(h / ap_n) for kk, h in zip(ks, hits, strict=True)}
    out["map@r"] = ap_sum / ap_n
    return out


def peak_rss_bytes():
    """Peak resident set size of this process (VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB.


def current_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def sgemm_peak_gflops(size=4096, repeats=3):
    """Best float32 GEMM rate of numpy's BLAS on this machine: size^3, best of `repeats`."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


def cpu_flags():
    """CPU model and the flags that decide the product format."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")
    return {"model": model, **{flag: flag in flags for flag in wanted}}


def peer_retrieval(x, labels):
    """pytorch-metric-learning's AccuracyCalculator: Recall@1 and MAP@R (query = reference)."""
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
        device=torch.device("cpu"))
    result = calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
    return {"recall@1": float(result["precision_at_1"]),
            "map@r": float(result["mean_average_precision_at_r"])}


def _timed_candidate_pass(score_bounds):
    """Wraps score_bounds.candidate_block to add up its time and flops."""
    totals = {"seconds": 0.0, "flops": 0.0, "calls": 0}
    original = score_bounds.candidate_block

    def timed(queries, gallery, query_rows, gallery_rows):
        start = time.perf_counter()
        block = original(queries, gallery, query_rows, gallery_rows)
        totals["seconds"] += time.perf_counter() - start
        totals["flops"] += 2.0 * block.shape[0] * block.shape[1] * queries.product_rows.shape[1]
        totals["calls"] += 1
        return block

    score_bounds.candidate_block = timed
    return totals


def worker(args):
    """Runs one side in this (sub)process and prints its JSON result on the last line."""
    data = np.load(args.data)
    x, labels = data["x"], data["labels"]
    ks = tuple(int(k) for k in args.ks.split(","))
    if args.worker in ("ours", "kmeans"):
        # Imported before the clock starts. Note that importing dvml_tf imports TensorFlow (the
        # package's __init__ exposes the models), which adds to this side's RSS.
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from dvml_tf.evaluation import clustering
        from dvml_tf.evaluation import metrics
        from dvml_tf.evaluation import score_bounds

        product = _timed_candidate_pass(score_bounds)
    if args.worker == "peer":
        import torch  # Imported before the clock starts, like ours.

        torch.set_num_threads(os.cpu_count())
    rss_before = current_rss_bytes()
    out = {"load_before": os.getloadavg()}
    start = time.perf_counter()
    if args.worker == "ours":
        out["metrics"] = metrics.evaluate_embeddings(
            x, labels, recall_ks=ks, metric=args.metric, compute_clustering=False,
            precision=args.precision,
        )
        out["candidate_pass"] = dict(product)
        out["product_flops"] = product["flops"]
    elif args.worker == "peer":
        out["metrics"] = peer_retrieval(x, labels)
        out["product_flops"] = 2.0 * x.shape[0] ** 2 * x.shape[1]  # faiss's full product.
    elif args.worker == "reference":
        out["metrics"] = reference_retrieval(x, labels, ks, args.metric)
    elif args.worker == "kmeans":
        vectors = x / np.linalg.norm(x, axis=1, keepdims=True) if args.metric == "cosine" else x
        start = time.perf_counter()  # Exclude the scikit-learn import.
        num_clusters = int(labels.max()) + 1
        model = clustering.fit_kmeans(vectors, num_clusters, seed=0)
        out["seconds_fit"] = time.perf_counter() - start
        out["n_iter"] = int(model.n_iter_)
        out["settings"] = clustering.kmeans_settings(num_clusters)
        out["metrics"] = {
            "nmi": metrics.nmi(model.labels_, labels),
            "f1": metrics.pairwise_f1(model.labels_, labels),
        }
    out["seconds"] = time.perf_counter() - start
    out["load_after"] = os.getloadavg()
    if "product_flops" in out:
        out["achieved_gflops"] = out["product_flops"] / out["seconds"] / 1e9
    if "candidate_pass" in out and out["candidate_pass"]["seconds"]:
        out["candidate_pass"]["gflops"] = (out["candidate_pass"]["flops"]
                                           / out["candidate_pass"]["seconds"] / 1e9)
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["rss_before_bytes"] = rss_before
    print(json.dumps(out))


def run_side(name, data_path, args, ks):
    python = args.peer_python if name == "peer" else sys.executable
    cmd = [
        python, os.path.abspath(__file__), f"--worker={name}", f"--data={data_path}",
        f"--ks={ks}", f"--metric={args.metric}", f"--precision={args.precision}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=SOP_TEST_SIZE, help="number of embeddings")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="classes (default: num * 11316 / 60502, SOP's ratio)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ks", default="1,10,100,1000",
                        help="recall Ks of our second run (the first is R@1 + MAP@R, the "
                             "peer's metrics); empty: no second run")
    parser.add_argument("--metric", default="euclidean", choices=("euclidean", "cosine"))
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="product format of our candidate pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternating timing repeats of ours and the peer (the best is kept)")
    parser.add_argument("--peer_python", default=None,
                        help="python of a virtual environment with pytorch-metric-learning "
                             "(see the module docstring); without it the peer is skipped")
    parser.add_argument("--with_reference", action="store_true",
                        help="also run the plain numpy brute force for every K")
    parser.add_argument("--kmeans", action="store_true", help="also time k-means for NMI/F1")
    parser.add_argument("--output", default=None,
                        help="results file (default: benchmarks/results/eval_scale.json at "
                             "full scale, a temporary file otherwise)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.output is None:
        full = args.num == SOP_TEST_SIZE and args.dim == 512 and args.metric == "euclidean"
        args.output = RESULTS if full else os.path.join(tempfile.gettempdir(),
                                                        f"eval_scale_{os.getpid()}.json")

    num_classes = args.num_classes or round(args.num * SOP_TEST_CLASSES / SOP_TEST_SIZE)
    x, labels = make_embeddings(args.num, num_classes, args.dim, args.seed)
    sizes = np.bincount(labels)
    summary = {
        "num": args.num, "dim": args.dim, "num_classes": int(num_classes),
        "class_size_min_mean_max": [int(sizes.min()), float(sizes.mean()), int(sizes.max())],
        "metric": args.metric, "precision": args.precision, "cpu_count": os.cpu_count(),
        "cpu": cpu_flags(), "load_at_start": os.getloadavg(),
        "sgemm_peak_gflops": sgemm_peak_gflops(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.npz")
        np.savez(data_path, x=x, labels=labels)
        names = ["ours", "peer"] if args.peer_python else ["ours"]
        sides = {}
        for repeat in range(args.repeats):
            # Alternate the order so that slow drifts of a shared machine hit both alike.
            for name in names if repeat % 2 == 0 else names[::-1]:
                result = run_side(name, data_path, args, "1")
                sides.setdefault(name, []).append(result)
        if args.ks:
            sides["ours_all_ks"] = [run_side("ours", data_path, args, args.ks)]
        if args.with_reference:
            sides["reference"] = [run_side("reference", data_path, args, args.ks or "1")]
        if args.kmeans:
            sides["kmeans"] = [run_side("kmeans", data_path, args, "1")]

    for name, runs in sides.items():
        summary[name] = min(runs, key=lambda r: r["seconds"])
        summary[name]["all_seconds"] = [r["seconds"] for r in runs]
    peak = summary["sgemm_peak_gflops"]
    for name in ("ours", "peer", "ours_all_ks"):
        if name in summary:
            summary[name]["fraction_of_sgemm_peak"] = summary[name]["achieved_gflops"] / peak
            if "candidate_pass" in summary[name]:
                summary[name]["candidate_pass"]["fraction_of_sgemm_peak"] = (
                    summary[name]["candidate_pass"]["gflops"] / peak)
    checks = {}
    if "peer" in summary:
        ours, peer = summary["ours"]["metrics"], summary["peer"]["metrics"]
        checks["max_abs_difference_ours_peer"] = max(abs(ours[k] - peer[k]) for k in peer)
        summary["time_ratio_ours_over_peer"] = (summary["ours"]["seconds"]
                                                / summary["peer"]["seconds"])
    if "reference" in summary and "ours_all_ks" in summary:
        ours, ref = summary["ours_all_ks"]["metrics"], summary["reference"]["metrics"]
        checks["max_abs_difference_ours_reference"] = max(abs(ours[k] - ref[k]) for k in ref)
    summary["checks"] = checks
    summary["metrics_identical"] = all(value <= 1e-12 for value in checks.values())
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp_out = f"{args.output}.tmp-{os.getpid()}"
    with open(tmp_out, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp_out, args.output)

    gb = 1e9
    print(f"\n{args.num} x {args.dim} float32, {num_classes} classes "
          f"(sizes {sizes.min()}-{sizes.max()}, mean {sizes.mean():.2f}), metric={args.metric}; "
          f"sgemm peak {peak:.0f} GFLOP/s\n")
    print("| computation | time (s) | GFLOP/s (share of sgemm peak) | peak RSS (GB) | result |")
    print("|---|---|---|---|---|")
    for name in sides:
        side = summary[name]
        rate = (f"{side['achieved_gflops']:.0f} ({side['fraction_of_sgemm_peak']:.2f})"
                if "achieved_gflops" in side else "")
        result = ", ".join(f"{k}={v:.4f}" for k, v in side["metrics"].items())
        print(f"| {name} | {side['seconds']:.1f} | {rate} | {side['peak_rss_bytes'] / gb:.2f} | "
              f"{result} |")
    if "time_ratio_ours_over_peer" in summary:
        print(f"\nours / peer time: {summary['time_ratio_ours_over_peer']:.2f}; metrics "
              f"identical: {summary['metrics_identical']} ({checks})")
    print(f"\nWritten to {args.output}")
    return summary


if __name__ == "__main__":
    main()
