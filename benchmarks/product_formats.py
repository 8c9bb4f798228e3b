"""Which library computes the exact search's candidate product fastest on this CPU.

Times one 2048 x 2048 x 512 tile product (the tile of `dvml_tf.evaluation.exact_search`) in
each format the candidate pass could use, interleaved over `--repeats` rounds (best kept):

* numpy float32 (BLAS sgemm: what `precision="float32"` runs);
* TensorFlow float32 and bfloat16 (oneDNN; bfloat16 is what `precision="bfloat16"` runs);
* TensorFlow int8 -> int32 (a quantised pass would need it);
* numpy on ml_dtypes.bfloat16 (no BLAS kernel: a 256 x 256 x 512 tile, scaled).

It records the CPU flags that decide it (AVX512_BF16 / AMX_BF16 make bfloat16 native,
AVX512_VNNI / AVX_VNNI int8) and the load average, and writes
benchmarks/results/product_formats.json:

    python benchmarks/product_formats.py
"""

import argparse
import json
import os
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "product_formats.json")


def _best_seconds(fn, repeats):
    fn()  # warm-up (kernel selection, thread pools)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ml_dtypes
    import tensorflow as tf

    from dvml_tf.evaluation import score_bounds

    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 512), dtype=np.float32)
    b = rng.standard_normal((2048, 512), dtype=np.float32)
    ta, tb = tf.constant(a), tf.constant(b)
    ba, bb = tf.cast(ta, tf.bfloat16), tf.cast(tb, tf.bfloat16)
    ia, ib = tf.cast(ta * 30, tf.int8), tf.cast(tb * 30, tf.int8)
    small_a, small_b = a[:256].astype(ml_dtypes.bfloat16), b[:256].astype(ml_dtypes.bfloat16)
    flops = 2.0 * 2048 * 2048 * 512
    formats = {
        "numpy float32": (lambda: a @ b.T, flops),
        "tensorflow float32": (lambda: tf.matmul(ta, tb, transpose_b=True).numpy(), flops),
        "tensorflow bfloat16": (lambda: tf.matmul(ba, bb, transpose_b=True).numpy(), flops),
        "tensorflow int8->int32": (
            lambda: tf.linalg.matmul(ia, ib, transpose_b=True, output_type=tf.int32).numpy(),
            flops),
        "numpy ml_dtypes.bfloat16 (256 x 256 x 512)": (lambda: small_a @ small_b.T,
                                                       2.0 * 256 * 256 * 512),
    }
    load_before = os.getloadavg()
    seconds = {name: [] for name in formats}
    for _ in range(args.repeats):  # interleaved, so that load drifts hit every format alike
        for name, (fn, _) in formats.items():
            seconds[name].append(_best_seconds(fn, 1))
    rates = {name: formats[name][1] / min(times) / 1e9 for name, times in seconds.items()}
    flags = score_bounds.cpu_flags()
    summary = {
        "cpu_flags": {flag: flag in flags for flag in
                      ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni",
                       "avx_vnni")},
        "native_bfloat16": score_bounds.has_native_bfloat16(flags),
        "auto_precision_k12": score_bounds.resolve_precision("auto", 12),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "gflops": rates,
        "ratio_to_numpy_float32": {name: rate / rates["numpy float32"]
                                   for name, rate in rates.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = f"{args.output}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, args.output)
    print("| format | GFLOP/s | ratio to numpy float32 |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {summary['ratio_to_numpy_float32'][name]:.2f} |")
    print(f"\nnative bfloat16: {summary['native_bfloat16']}; auto picks "
          f"{summary['auto_precision_k12']} for k = 12. Written to {args.output}")
    return summary


if __name__ == "__main__":
    main()
