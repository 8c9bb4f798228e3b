"""Evaluation at Stanford Online Products test scale: speed and peak memory.

On synthetic, clustered 60,502 x 512 float32 embeddings with 11,316 classes of 2-12 samples
(the SOP test split's size), this times

* ours: `evaluate_embeddings(..., recall_ks=(1, 10, 100, 1000), compute_clustering=False)`,
  i.e. R@1/10/100/1000 and MAP@R from the chunked exact kNN search;
* a reference: a plain chunked numpy brute force written here, independent of dvml_tf
  (squared distances per 2048-row chunk, query set to +inf, np.argpartition, sort, labels);
* k-means with K = 11,316 clusters with the settings of `dvml_tf.evaluation.clustering`, and
  the NMI and F1 of its clustering.

Each side runs in its own subprocess so that the peak RSS (VmHWM) of one does not hide the
other's. Both sides must report the same metrics (to 1e-9). Results go to
benchmarks/results/eval_scale.json and a Markdown table is printed.

Full scale (several minutes on 2 cores):

    python benchmarks/eval_scale.py

Quick run:

    python benchmarks/eval_scale.py --num=5000
"""

import argparse
import json
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
    rss_before = current_rss_bytes()
    out = {}
    start = time.perf_counter()
    if args.worker == "ours":
        out["metrics"] = metrics.evaluate_embeddings(
            x, labels, recall_ks=ks, metric=args.metric, compute_clustering=False
        )
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
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["rss_before_bytes"] = rss_before
    print(json.dumps(out))


def run_side(name, data_path, args):
    cmd = [
        sys.executable, os.path.abspath(__file__), f"--worker={name}", f"--data={data_path}",
        f"--ks={args.ks}", f"--metric={args.metric}",
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
    parser.add_argument("--ks", default="1,10,100,1000", help="recall Ks, comma-separated")
    parser.add_argument("--metric", default="euclidean", choices=("euclidean", "cosine"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="timing repeats of ours and the reference (the best is kept)")
    parser.add_argument("--skip_kmeans", action="store_true")
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    num_classes = args.num_classes or round(args.num * SOP_TEST_CLASSES / SOP_TEST_SIZE)
    x, labels = make_embeddings(args.num, num_classes, args.dim, args.seed)
    sizes = np.bincount(labels)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.npz")
        np.savez(data_path, x=x, labels=labels)
        sides = {}
        # Alternate the two sides so that slow drifts of the machine hit both alike.
        for _ in range(args.repeats):
            for name in ("reference", "ours"):
                result = run_side(name, data_path, args)
                if name not in sides or result["seconds"] < sides[name]["seconds"]:
                    sides[name] = result
        if not args.skip_kmeans:
            sides["kmeans"] = run_side("kmeans", data_path, args)

    ours, ref = sides["ours"], sides["reference"]
    max_diff = max(abs(ours["metrics"][key] - ref["metrics"][key]) for key in ref["metrics"])
    summary = {
        "num": args.num,
        "dim": args.dim,
        "num_classes": int(num_classes),
        "class_size_min_mean_max": [int(sizes.min()), float(sizes.mean()), int(sizes.max())],
        "metric": args.metric,
        "recall_ks": [int(k) for k in args.ks.split(",")],
        "cpu_count": os.cpu_count(),
        "ours": ours,
        "reference": ref,
        "time_ratio_ours_over_reference": ours["seconds"] / ref["seconds"],
        "max_abs_metric_difference": max_diff,
    }
    if "kmeans" in sides:
        summary["kmeans"] = sides["kmeans"]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp_out = f"{args.output}.tmp-{os.getpid()}"
    with open(tmp_out, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp_out, args.output)

    gb = 1e9
    print(f"\n{args.num} x {args.dim} float32, {num_classes} classes "
          f"(sizes {sizes.min()}-{sizes.max()}, mean {sizes.mean():.2f}), metric={args.metric}\n")
    print("| computation | time (s) | peak RSS (GB) | result |")
    print("|---|---|---|---|")
    fmt = ", ".join
    for name in ("ours", "reference"):
        side = sides[name]
        print(f"| {name}: R@{args.ks.replace(',', '/')} + MAP@R | {side['seconds']:.1f} | "
              f"{side['peak_rss_bytes'] / gb:.2f} | "
              f"{fmt(f'{k}={v:.4f}' for k, v in side['metrics'].items())} |")
    print(f"| ratio ours / reference | {summary['time_ratio_ours_over_reference']:.2f} | | "
          f"max metric difference {max_diff:.1e} |")
    if "kmeans" in sides:
        km = sides["kmeans"]
        print(f"| k-means K={num_classes} ({km['n_iter']} iterations) | {km['seconds_fit']:.1f} | "
              f"{km['peak_rss_bytes'] / gb:.2f} | "
              f"{fmt(f'{k}={v:.4f}' for k, v in km['metrics'].items())} |")
    print(f"\nWritten to {args.output}")
    return summary


if __name__ == "__main__":
    main()
