"""Throughput of the input pipeline alone (decode + augment + batch), without any model.

Cases:
  omniglot      real Omniglot from TFDS (TFDS_DATA_DIR or --omniglot_data_dir), held decoded at
                32 px, P=64 x K=2, random 28 crops.
  sop_synthetic SOP-scale synthetic data: 11,318 classes x 2-12 images (59,551 in expectation,
                like SOP's training split), 256 x 256 JPEGs held as encoded bytes (~1.2 GB),
                P=64 x K=2, paper recipe (resize 256, random 224 crop, flip).
  folder_check  the folder loader's one-off check: files decoded per second.
  large_store   (not run by default; ~6 GB of RAM) the encoded-bytes store beyond the 2 GB
                GraphDef limit: 60,000 strings of --large_store_kb kB, a few training batches
                eagerly and inside a tf.function.

Run from the repository root:

    TFDS_DATA_DIR=/path/to/tfds python benchmarks/input_pipeline.py

It prints a Markdown table and writes benchmarks/results/input_pipeline.json.

Next to each pipeline figure it reports the images/s of the DVML training step that consumes it
(`dvml_train_step_images_per_second`: the preset's network on a prepared batch, no pipeline), so
the table shows whether the pipeline could starve training; --train_step=module:function swaps
in another measurement, --train_step=none skips it.
"""

import importlib
import io
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

# Runnable as `python benchmarks/input_pipeline.py` from a checkout (no installation needed).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from PIL import Image  # noqa: E402

from dvml_tf import configs  # noqa: E402
from dvml_tf import task  # noqa: E402
from dvml_tf import training  # noqa: E402
from dvml_tf.data import ClassBalancedSampler  # noqa: E402
from dvml_tf.data import ImageCatalog  # noqa: E402
from dvml_tf.data import PreprocessConfig  # noqa: E402
from dvml_tf.data import load_dataset  # noqa: E402
from dvml_tf.data import make_eval_dataset  # noqa: E402
from dvml_tf.data import make_train_dataset  # noqa: E402
from dvml_tf.data.folder import check_image_files  # noqa: E402
from dvml_tf.utils import atomic  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["omniglot", "sop_synthetic", "folder_check"], "Cases to run.")
flags.DEFINE_integer("steps", 60, "Timed training batches per case (after the warm-up).")
flags.DEFINE_integer("warmup", 5, "Untimed batches first (tf.data autotuning, tracing).")
flags.DEFINE_integer("classes_per_batch", 64, "P.")
flags.DEFINE_integer("images_per_class", 2, "K.")
flags.DEFINE_integer("eval_images", 4096, "Images timed through the evaluation pipeline.")
flags.DEFINE_string("omniglot_data_dir", None, "TFDS data dir (default: TFDS_DATA_DIR).")
flags.DEFINE_integer("jpeg_pool", 1024, "Distinct synthetic JPEGs, reused round-robin.")
flags.DEFINE_integer("jpeg_size", 256, "Side of the synthetic SOP JPEGs (256: the resize is an "
                     "identity; larger sizes add the antialiased downscale real photos need).")
flags.DEFINE_integer("folder_files", 2000, "Files written for the folder_check case.")
flags.DEFINE_integer("large_store_kb", 42, "Size of each string of the large_store case.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(__file__), "results",
                                           "input_pipeline.json"), "JSON results file.")
flags.DEFINE_string("train_step", "builtin",
                    "'builtin' (a DVML + N-pair step of the run's preset network, measured here), "
                    "'none', or module:function, a `train_step_images_per_second` callable for "
                    "compare_with_train_step (see its docstring).")
flags.DEFINE_integer("train_step_steps", 10, "Timed training steps for the built-in measurement.")

SOP_TRAIN_CLASSES = 11_318


def timed_images_per_second(dataset, steps, warmup):
    """Images per second over `steps` batches after `warmup` untimed ones."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    images, started = 0, time.perf_counter()
    for _ in range(steps):
        batch, _ = next(iterator)
        images += int(batch.shape[0])
    return images / (time.perf_counter() - started)


def measure(catalog, config, num_classes_note=None):
    """Training and evaluation throughput of one catalog."""
    sampler = ClassBalancedSampler(catalog.labels, FLAGS.classes_per_batch,
                                   FLAGS.images_per_class, seed=0)
    train = make_train_dataset(catalog, sampler, config)
    train_ips = timed_images_per_second(train, FLAGS.steps, FLAGS.warmup)
    eval_count = min(FLAGS.eval_images, catalog.num_images)
    evaluation = make_eval_dataset(catalog.subset(np.arange(eval_count)), config, 128)
    started = time.perf_counter()
    for _ in evaluation:
        pass
    eval_ips = eval_count / (time.perf_counter() - started)
    return {
        "images": catalog.num_images, "classes": catalog.num_classes,
        "storage": catalog.storage, "batch": f"{sampler.classes_per_batch}x"
        f"{sampler.images_per_class}", "image_size": config.crop_size,
        "batch_size": sampler.batch_size, "train_images_per_second": round(train_ips, 1),
        "eval_images_per_second": round(eval_ips, 1)}


def case_omniglot():
    started = time.perf_counter()
    splits = load_dataset("omniglot", data_dir=FLAGS.omniglot_data_dir)
    load_seconds = time.perf_counter() - started
    result = measure(splits.train, PreprocessConfig.omniglot())
    result.update(case="omniglot (real, TFDS)", load_seconds=round(load_seconds, 1),
                  notes="decoded 32x32x1 in memory; random 28 crop, no flip")
    return result


def synthetic_jpeg(rng, size=256):
    """A smooth photo-like square JPEG (gradients, blobs, mild noise): ~17 kB at 256 px."""
    y, x = np.mgrid[0:size, 0:size] / size
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        channels.append(128 + 90 * np.sin(6 * a * x + 5 * b * y + 3 * c))
    image = np.stack(channels, -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r ** 2
        image[mask] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sop_like_labels(rng):
    # 2 + Binomial(10, 0.326): 2-12 images per class, mean 5.26 (SOP train: 59,551 / 11,318).
    counts = 2 + rng.binomial(10, 0.326, size=SOP_TRAIN_CLASSES)
    return np.repeat(np.arange(SOP_TRAIN_CLASSES), counts)


def case_sop_synthetic():
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    pool = [synthetic_jpeg(rng, FLAGS.jpeg_size) for _ in range(FLAGS.jpeg_pool)]
    labels = sop_like_labels(np.random.default_rng(1))
    generate_seconds = time.perf_counter() - started
    started = time.perf_counter()
    catalog = ImageCatalog(labels, sources=[pool[i % len(pool)] for i in range(len(labels))])
    store_seconds = time.perf_counter() - started
    store_gb = sum(len(pool[i % len(pool)]) for i in range(len(labels))) / 1e9
    result = measure(catalog, PreprocessConfig.paper())
    result.update(case=f"SOP-scale synthetic {FLAGS.jpeg_size}px JPEGs",
                  load_seconds=round(store_seconds, 1),
                  notes=f"{store_gb:.2f} GB encoded bytes in one host tensor (built in "
                        f"{store_seconds:.1f} s; JPEGs generated in {generate_seconds:.0f} s); "
                        f"{FLAGS.jpeg_size}x{FLAGS.jpeg_size} JPEG decode, resize 256, random 224 "
                        "crop + flip")
    return result


def case_folder_check():
    rng = np.random.default_rng(1)
    pool = [synthetic_jpeg(rng) for _ in range(64)]
    root = tempfile.mkdtemp(prefix="dvml_folder_check_")
    try:
        paths = []
        for i in range(FLAGS.folder_files):
            directory = os.path.join(root, f"class{i % 20:02d}")
            os.makedirs(directory, exist_ok=True)
            paths.append(os.path.join(directory, f"{i:05d}.jpg"))
            with open(paths[-1], "wb") as f:
                f.write(pool[i % len(pool)])
        started = time.perf_counter()
        ok, _ = check_image_files(paths)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(root)
    rate = len(paths) / seconds
    return {"case": "folder load-time check", "images": len(paths), "classes": 20,
            "storage": "files", "check_images_per_second": round(rate, 1),
            "load_seconds": round(seconds, 1),
            "notes": f"256x256 JPEGs, TF decode in parallel; {int(ok.sum())} ok; SOP-size "
                     f"(120,053 files) would take ~{120_053 / rate:.0f} s"}


def case_large_store():
    # Tiny PNGs padded after IEND (decoders ignore the tail) to the requested size.
    pool = [synthetic_png(v) for v in range(250)]
    pad = FLAGS.large_store_kb * 1000
    labels = np.repeat(np.arange(10_000), 6)
    started = time.perf_counter()
    catalog = ImageCatalog(labels, sources=[pool[i % 250] + b"\0" * (pad - len(pool[i % 250]))
                                            for i in range(len(labels))])
    build_seconds = time.perf_counter() - started
    sampler = ClassBalancedSampler(labels, 32, 2)
    config = PreprocessConfig(resize_size=20, crop_size=16)
    dataset = make_train_dataset(catalog, sampler, config, num_steps=3)
    eager = [x for x, _ in dataset]

    @tf.function
    def first_batch_sum():
        return tf.reduce_sum(next(iter(dataset))[0])

    in_function = float(first_batch_sum())
    ok = len(eager) == 3 and abs(in_function - float(tf.reduce_sum(eager[0]))) < 1e-3
    return {"case": "large encoded store", "images": len(labels), "classes": 10_000,
            "storage": "encoded", "load_seconds": round(build_seconds, 1),
            "notes": f"{len(labels) * pad / 1e9:.2f} GB of strings in one host tensor: eager "
                     f"and tf.function iteration {'OK' if ok else 'FAILED'}"}


def synthetic_png(value):
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------
# HOOK for the model owner: put the training step's throughput next to the input pipeline's.
# ------------------------------------------------------------------------------------------
def compare_with_train_step(results, train_step_images_per_second):
    """Adds a DVML training step's throughput to each input-pipeline result.

    Args:
        results: list of result dicts from this script (those with "train_images_per_second").
        train_step_images_per_second: callable `(image_size, batch_size) -> float`, the images/s
            of one training step on synthetic float32 input [batch_size, image_size,
            image_size, 3] (no input pipeline), measured by the model's owner.

    Returns:
        The results, each with "train_step_images_per_second" and "input_bound" (True when the
        input pipeline is slower than the step, i.e. it would starve training).
    """
    for result in results:
        if "train_images_per_second" not in result:
            continue
        step = float(train_step_images_per_second(result["image_size"], result["batch_size"]))
        result["train_step_images_per_second"] = round(step, 1)
        result["input_bound"] = result["train_images_per_second"] < step
    return results


def dvml_train_step_images_per_second(image_size, batch_size):
    """Images/s of the DVML + N-pair training step of the preset that uses this image size.

    28 px: the paper's DVML on convnet_small (D = 128, T = 20), the network of the recorded
    figures (the smallest Omniglot step, the hardest for the pipeline to feed); larger: the paper
    recipe (InceptionV3 without its ImageNet weights, D = 512, T = 20). The step is the trainer's
    own (`make_distributed_step`), fed one prepared batch repeatedly, so no input pipeline is
    timed.
    """
    if image_size <= 64:
        preset = configs.get_preset("omniglot_paper").replace(backbone="convnet_small")
    else:
        preset = configs.get_preset("sop")
    config = preset.replace(image_size=image_size, resize_size=max(image_size, preset.resize_size),
                            pretrained=False, classes_per_batch=batch_size // 2,
                            images_per_class=2)
    keras.utils.set_random_seed(0)
    model = task.build_model(config)
    model.compile(optimizer=task.build_optimizer(config))
    images = tf.random.uniform([batch_size, image_size, image_size, 3], 0, 255)
    labels = tf.repeat(tf.range(batch_size // 2), 2)
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    step = training.make_distributed_step(tf.distribute.get_strategy(), model)
    for _ in range(2):  # tracing and the first step
        float(step(iterator)["loss"])
    start = time.perf_counter()
    for _ in range(FLAGS.train_step_steps):
        float(step(iterator)["loss"])
    return FLAGS.train_step_steps * batch_size / (time.perf_counter() - start)


def markdown(results):
    columns = [("case", "case"), ("images", "images"), ("classes", "classes"),
               ("storage", "storage"), ("batch", "P x K"), ("image_size", "crop"),
               ("load_seconds", "load s"), ("train_images_per_second", "train img/s"),
               ("eval_images_per_second", "eval img/s"),
               ("check_images_per_second", "check img/s"),
               ("train_step_images_per_second", "train step img/s"), ("notes", "notes")]
    columns = [c for c in columns if any(c[0] in r for r in results)]
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    for result in results:
        lines.append("| " + " | ".join(str(result.get(key, "")) for key, _ in columns) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    cases = {"omniglot": case_omniglot, "sop_synthetic": case_sop_synthetic,
             "folder_check": case_folder_check, "large_store": case_large_store}
    unknown = set(FLAGS.cases) - set(cases)
    if unknown:
        raise app.UsageError(f"Unknown cases {sorted(unknown)}; valid: {sorted(cases)}.")
    # Other processes on the machine skew the figures: record the load around the run.
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = []
    for name in FLAGS.cases:
        logging.info("Running %s.", name)
        try:
            results.append(cases[name]())
        except FileNotFoundError as error:  # e.g. no prepared Omniglot: report, keep going.
            results.append({"case": name, "notes": f"skipped: {error}"})
    if FLAGS.train_step == "builtin":
        compare_with_train_step(results, dvml_train_step_images_per_second)
    elif FLAGS.train_step != "none":
        module, function = FLAGS.train_step.split(":")
        compare_with_train_step(results, getattr(importlib.import_module(module), function))
    table = markdown(results)
    print(table)
    record = {
        "results": results,
        "environment": {
            "tensorflow": tf.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "date": time.strftime("%Y-%m-%d"),
            "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
            "flags": {"steps": FLAGS.steps, "warmup": FLAGS.warmup,
                      "classes_per_batch": FLAGS.classes_per_batch,
                      "images_per_class": FLAGS.images_per_class},
        },
        "markdown": table,
    }
    atomic.write_json(FLAGS.output, record)


if __name__ == "__main__":
    app.run(main)
