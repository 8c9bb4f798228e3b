"""Exported models on this CPU: per-image latency, file sizes and (for a real Omniglot run) the
Recall@1 of the LiteRT models on the Omniglot test split.

    # A trained Omniglot run (TFDS_DATA_DIR points at a prepared copy when offline):
    TFDS_DATA_DIR=/path/to/tfds python train.py --steps=1500 --model_dir=RUN
    TFDS_DATA_DIR=/path/to/tfds python benchmarks/export_latency.py --model_dir=RUN
    # Without a run: an untrained convnet_small on generated images (latency and sizes only):
    python benchmarks/export_latency.py

The run is exported with `dvml_tf.export.export_model` (as export.py does) into --export_dir
(default: a temporary folder) and graded with `dvml_tf.export.verify.verify_export` (parity of
every artifact with Keras); then, independently of dvml_tf's own measurements:

* latency: batch 1, the median of --runs runs after 10 warm-up runs, for the Keras model
  (`tf.function`, preprocessed input), the SavedModel's `serving_default` (raw uint8 input,
  preprocessing in the graph) and `embed_bytes` (one PNG), and every LiteRT model through
  `ai_edge_litert` with its default threads and with one thread;
* Recall@1 of each LiteRT embedding model on all 13,180 Omniglot test images, read straight from
  TFDS in their raw form (`tfds.load("omniglot", split="test")`, not through dvml_tf's loader) and
  searched with a plain numpy brute force (not dvml_tf's kNN); the Keras figure is the run's own
  metrics.json.

Results go to benchmarks/results/export.json and a Markdown table is printed.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results", "export.json")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from dvml_tf import models  # noqa: E402
from dvml_tf import task  # noqa: E402
from dvml_tf.export import exporter  # noqa: E402
from dvml_tf.export import verify  # noqa: E402
from dvml_tf.testing import synthetic_data  # noqa: E402
from dvml_tf.training.config import TrainConfig  # noqa: E402

LITERT_FILES = ("model.tflite", "model_dynamic_range.tflite", "model_int8.tflite",
                "retrieval.tflite")


def litert_runner(path, num_threads=None):
    """(invoke(image) -> first output, input shape) of a LiteRT model's serving_default."""
    interpreter = Interpreter(model_path=path, num_threads=num_threads)
    runner = interpreter.get_signature_runner("serving_default")
    first_output = sorted(runner.get_output_details())[0]
    shape = tuple(runner.get_input_details()["images"]["shape"])
    return (lambda image: runner(images=image)[first_output]), shape


def recall_at_1(embeddings, labels, cosine, chunk=2048):
    """Exact leave-one-out Recall@1 by numpy brute force (float64 distances)."""
    x = embeddings.astype(np.float64)
    if cosine:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    squared = np.sum(x * x, axis=1)
    hits = 0
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk]
        distances = squared[start:start + chunk, None] - 2 * block @ x.T + squared[None]
        distances[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
        hits += int(np.sum(labels[np.argmin(distances, axis=1)] == labels[start:start + chunk]))
    return hits / len(x)


def omniglot_test_raw():
    """The raw Omniglot test images (uint8 [N, 105, 105, 3]) and labels, straight from TFDS."""
    import tensorflow_datasets as tfds

    dataset = tfds.load("omniglot", split="test", download=False).batch(2048)
    images, labels = [], []
    for batch in dataset.as_numpy_iterator():
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images), np.concatenate(labels)


def litert_recall(export_dir, images, labels, normalized):
    recall = {}
    for name in LITERT_FILES[:3]:
        invoke, _ = litert_runner(os.path.join(export_dir, name))
        embeddings = np.concatenate([invoke(image[None]) for image in images])
        # The int8 model ends before the L2 normalization; cosine search normalizes anyway.
        recall[name] = recall_at_1(embeddings, labels, cosine=normalized)
    return recall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", help="a trained run (default: an untrained convnet_small)")
    parser.add_argument("--export_dir", help="where to export (default: a temporary folder)")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per figure (>= 50)")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()
    if args.runs < 50:
        parser.error("--runs must be >= 50.")

    scratch = tempfile.mkdtemp(prefix="dvml_export_bench_")
    export_dir = args.export_dir or os.path.join(scratch, "E")
    try:
        if args.model_dir:
            run = task.load_run(args.model_dir)
            model, config, source = run.model, run.config, run.source
            raw_splits = task.load_splits(config, raw=True)
        else:
            config = TrainConfig()  # convnet_small, D = 128 (the defaults), untrained
            keras.utils.set_random_seed(0)
            model, source = task.build_model(config), "untrained convnet_small"
            raw_splits = synthetic_data.synthetic_raw_splits(
                task.raw_form(config), task.preprocess_config(config), train_classes=64,
                test_classes=20)
        raw_form, preprocess = task.raw_form(config, raw_splits), task.preprocess_config(config)
        started = time.time()
        result = exporter.export_model(model, config, export_dir, raw_splits=raw_splits,
                                       overwrite=True, source=source)
        export_seconds = time.time() - started
        report = result.report
        verification = verify.verify_export(export_dir, model, config, raw_splits,
                                            recall_max_images=0)

        image = synthetic_data.synthetic_raw_images(raw_form, preprocess, 1, seed=1)
        model_input = raw_form.to_model_input(tf.constant(image), preprocess)
        keras_fn = models.inference_function(model)
        loaded = tf.saved_model.load(result.saved_model_dir)
        serve = loaded.signatures["serving_default"]
        embed_bytes = loaded.signatures["embed_bytes"]
        png = tf.constant([tf.io.encode_png(image[0]).numpy()])
        latency = {
            "keras (tf.function, preprocessed input)": verify.median_latency_ms(
                lambda: keras_fn(model_input).numpy(), args.runs, warmup=10),
            "SavedModel serving_default (raw uint8)": verify.median_latency_ms(
                lambda: serve(images=tf.constant(image))["embedding"].numpy(), args.runs,
                warmup=10),
            "SavedModel embed_bytes (PNG)": verify.median_latency_ms(
                lambda: embed_bytes(image_bytes=png)["embedding"].numpy(), args.runs, warmup=10),
        }
        for name in LITERT_FILES:
            for threads, label in ((None, "default threads"), (1, "1 thread")):
                invoke, _ = litert_runner(os.path.join(export_dir, name), threads)
                latency[f"{name} ({label})"] = verify.median_latency_ms(
                    lambda invoke=invoke: invoke(image), args.runs, warmup=10)
        sizes = {
            "saved_model/" + str(result.version): report["sizes_bytes"]["saved_model"],
            **{name: os.path.getsize(os.path.join(export_dir, name)) for name in LITERT_FILES},
        }

        recall = None
        if args.model_dir and config.dataset == "omniglot":
            images, labels = omniglot_test_raw()
            recall = litert_recall(export_dir, images, labels, report["model"]["normalized"])
            metrics_path = os.path.join(args.model_dir, "metrics.json")
            if os.path.exists(metrics_path):
                with open(metrics_path) as f:
                    recall["keras (run metrics.json)"] = json.load(f)["recall@1"]
            recall["num_images"] = len(labels)
            recall["int8_minus_float32_points"] = 100 * (recall["model_int8.tflite"]
                                                         - recall["model.tflite"])

        command = " ".join(["python", "benchmarks/export_latency.py", *sys.argv[1:]])
        results = {
            "command": (f"TFDS_DATA_DIR={os.environ['TFDS_DATA_DIR']} " + command
                        if "TFDS_DATA_DIR" in os.environ else command),
            "model": source,
            "export_seconds": export_seconds,
            "environment": {
                "tensorflow": tf.__version__, "keras": keras.__version__,
                "python": platform.python_version(), "cpu_count": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
            },
            "latency_setup": f"batch 1, median of {args.runs} runs after 10 warm-up runs",
            "latency_ms_per_image": latency,
            "sizes_bytes": sizes,
            "parity_vs_keras": verification["parity_vs_keras"],
            "recall_at_1_independent": recall,
        }
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"model: {source}")
    print("| model | latency ms/image | size |\n|---|---|---|")
    for name, value in latency.items():
        file = name.split(" ")[0]
        size = sizes.get(file) or (sizes[f"saved_model/{result.version}"]
                                   if file == "SavedModel" else None)
        print(f"| {name} | {value:.3f} | {f'{size / 1e6:.2f} MB' if size else ''} |")
    parity = verification["parity_vs_keras"]
    print("\nparity vs Keras (min cosine):", {k: round(v["cosine_min"], 7)
                                              for k, v in parity.items() if isinstance(v, dict)})
    if recall:
        print("Recall@1 on the Omniglot test split:", json.dumps(recall, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
