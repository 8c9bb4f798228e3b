"""Training-step time of DVML against its baseline at equal batch, images/s and peak memory.

Cases (both with N-pair, T = 20 draws, Adam, no pretrained weights):

  convnet_small  28 px, embedding 128, P x K = 64 x 2, on one real Omniglot training batch from
                 the training pipeline (sampler + augmentation) when TFDS_DATA_DIR (or
                 --omniglot_data_dir) points at a prepared copy, else on synthetic 28 px images.
  resnet50       224 px synthetic images, embedding 512, P x K = 16 x 2 (CPU-feasible).

For each case the baseline (`dvml=False`) and DVML are built with `task.build_model`, compiled
with `task.build_optimizer` (Adam) and stepped with `trainer.make_distributed_step` (the
default strategy), i.e. exactly the step `train.py` runs, on an iterator that repeats one
prepared batch, so data loading is excluded. Each configuration lives in its own subprocess
(separate peak memory, VmHWM from /proc/self/status after the timed steps); after building and
`--warmup` untimed steps, the parent alternates them: `--repeats` times baseline then DVML, each
repetition `--steps` steps (`--resnet_steps` for resnet50), every step synchronized by reading
its logs to Python floats, as the training loop does. Reported: the median step time of each,
their ratio DVML / baseline (the median of the per-repetition ratios too, a check against load
drifting between repetitions), images/s = batch / median step time, and the peak RSS.

When a case's ratio exceeds `--goal` (1.10; the resnet50 target) and `--profile=auto`, the DVML
subprocess also times the parts of its step separately (forward + backward of each on fixed
inputs): the backbone, the z_I head and L_m(z_I) (shared with the baseline), and DVML's extras:
the mu / log sigma^2 heads with the KL, the T x B noise draws and reparameterization, the decoder
and reconstruction on T x B rows, L_syn on [T, B, D], and Adam's update of the extra variables.

Full scale (about 15 min on 2 idle cores; other processes make the figures noisy, so the load
average before and after is recorded):

    TFDS_DATA_DIR=/path/to/tfds python benchmarks/step_time.py

Quick check:

    python benchmarks/step_time.py --cases=convnet_small --steps=3 --repeats=2 --warmup=1 \\
        --convnet_batch=8x2 --output=/tmp/step_time.json

Writes benchmarks/results/step_time.json (machine, settings, every step time) and prints a
Markdown table.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the timed children and the results writer import dvml_tf
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results", "step_time.json")
MARKER = "@@step_time@@ "
VARIANTS = ("baseline", "dvml")

# name -> fixed settings; batch, steps and image size come from the flags.
CASES = {
    "convnet_small": {"backbone": "convnet_small", "embedding_dim": 128, "data": "omniglot"},
    "resnet50": {"backbone": "resnet50", "embedding_dim": 512, "data": "synthetic"},
}


def parse_batch(text):
    """'64x2' -> (64, 2)."""
    try:
        classes, per_class = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"A batch is PxK, e.g. 64x2; got {text!r}.") from None
    if classes < 2 or per_class != 2:
        raise ValueError(f"N-pair needs P >= 2 classes x K = 2 images; got {text!r}.")
    return classes, per_class


def case_settings(name, args):
    settings = dict(CASES[name], case=name)
    if name == "convnet_small":
        settings.update(image_size=28, batch=parse_batch(args.convnet_batch), steps=args.steps)
    else:
        settings.update(image_size=args.resnet_image_size, batch=parse_batch(args.resnet_batch),
                        steps=args.resnet_steps)
    return settings


# ------------------------------------------------------------------------------ measurements

def _status_kb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb():
    """Peak resident set size of this process (VmHWM), in MB (ru_maxrss off Linux)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024, 1)


def current_rss_mb():
    kb = _status_kb("VmRSS")
    return None if kb is None else round(kb / 1024, 1)


def machine_info():
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    memory_gb = None
    try:
        with open("/proc/meminfo") as f:
            memory_gb = round(int(f.readline().split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu_model": model or platform.processor(), "cpu_count": os.cpu_count(),
            "usable_cpus": usable, "memory_gb": memory_gb, "python": platform.python_version(),
            "platform": platform.platform()}


def prepare_batch(settings, args, path):
    """Writes the case's one batch (float32 images in [0, 255], int64 labels) to `path`."""
    classes, per_class = settings["batch"]
    size = settings["image_size"]
    source = "synthetic"
    note = ""
    data_dir = args.omniglot_data_dir or os.environ.get("TFDS_DATA_DIR")
    if settings["data"] == "omniglot" and data_dir:
        from dvml_tf import data as data_lib
        from dvml_tf import task
        from dvml_tf.training.config import TrainConfig

        try:
            config = TrainConfig(classes_per_batch=classes, images_per_class=per_class,
                                 seed=args.seed)
            splits = task.load_splits(config, data_dir=args.omniglot_data_dir)
            sampler = data_lib.ClassBalancedSampler(splits.train.labels, classes, per_class,
                                                    seed=config.seed)
            dataset = data_lib.make_train_dataset(
                splits.train, sampler, task.preprocess_config(config), num_steps=1)
            images, labels = next(iter(dataset))
            images, labels = images.numpy(), labels.numpy()
            source = "omniglot"
            note = "first training batch of the Omniglot pipeline (32 px, random 28 crop)"
        except FileNotFoundError as error:
            note = f"Omniglot not available ({error}); synthetic images instead"
    if source == "synthetic":
        rng = np.random.default_rng(args.seed)
        images = rng.uniform(0, 255, (classes * per_class, size, size, 3)).astype(np.float32)
        labels = np.repeat(np.arange(classes), per_class).astype(np.int64)  # class-major P x K
        note = note or "uniform random pixels"
    np.savez(path, images=images.astype(np.float32), labels=labels.astype(np.int64))
    return source, note


# ------------------------------------------------------------------------------------ worker

def _reply(kind, payload):
    sys.stdout.write(f"{MARKER}{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def _timed(fn, calls):
    """Median seconds of `calls` calls of `fn` (each synchronized by `fn` itself)."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def profile_parts(model, images, labels, calls):
    """Times the parts of a DVML step separately (forward + backward of each, fixed inputs).

    Args:
        model: a compiled DVML `DVMLModel`.
        images: float32 `[B, S, S, 3]`.
        labels: int `[B]`.
        calls: timed calls per part (after two untimed ones).

    Returns:
        list of `{"part", "ms", "extra"}`; `extra` marks what the baseline does not run.
    """
    import keras
    import tensorflow as tf

    from dvml_tf import losses as losses_lib

    images = tf.constant(images)
    labels = tf.constant(np.asarray(labels, np.int32))
    features = tf.constant(model.backbone(images, training=False))
    batch, num_samples, dim = features.shape[0], model.num_samples, model.embedding_dim
    seed = tf.constant([0, 1], tf.int64)
    rng = np.random.default_rng(0)
    mean = tf.constant(rng.normal(size=(batch, dim)).astype(np.float32))
    log_variance = tf.constant(rng.normal(-1, 0.1, (batch, dim)).astype(np.float32))
    z_syn = tf.constant(rng.normal(size=(num_samples, batch, dim)).astype(np.float32))

    def gradient_of(loss_fn, variables):
        @tf.function
        def run(*inputs):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                loss = loss_fn(*inputs)
            gradients = tape.gradient(loss, [*variables, *inputs])
            return loss, [g for g in gradients if g is not None]

        return run

    def backbone_loss(x):
        return tf.reduce_sum(tf.cast(model.backbone(x, training=True), "float32"))

    def invariant_loss(f):
        return model.metric_loss(model.embedding_head(f), labels, seed=seed)

    def variance_heads_loss(f):
        return tf.reduce_mean(
            losses_lib.kl_divergence(model.mean_head(f), model.log_variance_head(f)))

    def draws_loss(mu, log_var):
        noise = tf.random.stateless_normal([num_samples, batch, dim], seed=seed, alg="philox")
        return tf.reduce_sum(model.variance_scale * (mu + tf.exp(0.5 * log_var) * noise))

    def decoder_loss(z):
        reconstruction = tf.reshape(model.decoder(tf.reshape(z, [-1, dim])),
                                    [num_samples, batch, model.feature_dim])
        return tf.reduce_mean(losses_lib.reconstruction_distance(features, reconstruction))

    def synthesized_loss(z):
        return model.metric_loss(z, labels, seed=seed)

    extra_variables = [
        *model.mean_head.trainable_variables,
        *model.log_variance_head.trainable_variables,
        *model.decoder.trainable_variables,
    ]
    optimizer = keras.optimizers.Adam(1e-9)
    optimizer.build(extra_variables)
    fake_gradients = [tf.constant(rng.normal(size=v.shape).astype(np.float32) * 1e-3)
                      for v in extra_variables]

    @tf.function
    def adam_update():
        optimizer.apply(fake_gradients, extra_variables)
        return optimizer.iterations

    parts = [
        ("backbone forward + backward", False,
         gradient_of(backbone_loss, model.backbone.trainable_variables), (images,)),
        ("z_I head + L_m(z_I)", False,
         gradient_of(invariant_loss, model.embedding_head.trainable_variables), (features,)),
        ("mu, log sigma^2 heads + KL", True,
         gradient_of(variance_heads_loss, [*model.mean_head.trainable_variables,
                                           *model.log_variance_head.trainable_variables]),
         (features,)),
        (f"T={num_samples} noise draws + reparameterization", True,
         gradient_of(draws_loss, []), (mean, log_variance)),
        (f"decoder + reconstruction on T x B = {num_samples * batch} rows", True,
         gradient_of(decoder_loss, model.decoder.trainable_variables), (z_syn,)),
        (f"L_syn: L_m on [T, B, D] = [{num_samples}, {batch}, {dim}]", True,
         gradient_of(synthesized_loss, []), (z_syn,)),
        ("Adam update of the extra variables", True, adam_update, ()),
    ]
    results = []
    for name, extra, fn, inputs in parts:
        def call(fn=fn, inputs=inputs):
            out = fn(*inputs)
            tf.nest.map_structure(lambda t: t.numpy(), out)

        call()
        call()
        results.append({"part": name, "extra": extra, "ms": round(1000 * _timed(call, calls), 3)})
    return results


def worker(args):
    """One configuration in this process: build, warm up, then answer the parent's commands.

    Commands on stdin: `time N` (N timed steps), `profile N`, `quit`. Each answer is one stdout
    line starting with `MARKER`.
    """
    rss_start = current_rss_mb()
    import keras
    import tensorflow as tf

    from dvml_tf import task
    from dvml_tf.training import distribution
    from dvml_tf.training import trainer as trainer_lib
    from dvml_tf.training.config import TrainConfig

    rss_import = current_rss_mb()
    batch = np.load(args.batch_file)
    images, labels = batch["images"], batch["labels"]
    settings = json.loads(args.settings)
    classes, per_class = settings["batch"]
    config = TrainConfig(
        config="step_time",
        backbone=settings["backbone"],
        image_size=settings["image_size"],
        resize_size=settings["image_size"],
        embedding_dim=settings["embedding_dim"],
        loss="npair",
        dvml=args.worker == "dvml",
        num_samples=args.num_samples,
        classes_per_batch=classes,
        images_per_class=per_class,
        # The phase only changes loss weights (a gate, not a branch): the graph is the same.
        steps=100_000,
        seed=args.seed,
        jit_compile=args.jit_compile,
        model_dir="unused",
    ).validate()
    started = time.perf_counter()
    strategy = distribution.make_strategy("default")
    with strategy.scope():
        keras.utils.set_random_seed(config.seed)
        model = task.build_model(config)
        model.compile(optimizer=task.build_optimizer(config))
        model.optimizer.build(model.trainable_variables)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    iterator = iter(strategy.distribute_datasets_from_function(lambda _: dataset))
    step_fn = trainer_lib.make_distributed_step(strategy, model, config.jit_compile)

    def step():
        # The training loop reads every log to Python after every step: so do we.
        return {k: float(v) for k, v in step_fn(iterator).items()}

    first = time.perf_counter()
    step()
    first_step = time.perf_counter() - first
    for _ in range(max(args.warmup - 1, 0)):
        step()
    _reply("ready", {
        "build_seconds": round(first - started, 2),
        "first_step_seconds": round(first_step, 2),
        "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "rss_start_mb": rss_start, "rss_after_import_mb": rss_import,
        "rss_ready_mb": current_rss_mb(),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                    "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
    })
    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if command == "time":
            times = []
            for _ in range(int(value)):
                begin = time.perf_counter()
                logs = step()
                times.append(time.perf_counter() - begin)
            _reply("time", {"step_seconds": times, "peak_rss_mb": peak_rss_mb(),
                            "loss": logs.get("loss")})
        elif command == "profile":
            _reply("profile", {"parts": profile_parts(model, images, labels, int(value))})
        elif command == "quit":
            _reply("bye", {"peak_rss_mb": peak_rss_mb()})
            return
        else:
            raise ValueError(f"Unknown command {line!r}.")


class Worker:
    """The parent's handle on one configuration's subprocess."""

    def __init__(self, variant, settings, batch_file, args, log_dir):
        self.variant = variant
        self.log_path = os.path.join(log_dir, f"{settings['case']}_{variant}.log")
        self.log = open(self.log_path, "w")  # noqa: SIM115 (lives as long as the process)
        cmd = [sys.executable, os.path.abspath(__file__), f"--worker={variant}",
               f"--batch_file={batch_file}", f"--settings={json.dumps(settings)}",
               f"--num_samples={args.num_samples}", f"--warmup={args.warmup}",
               f"--seed={args.seed}"]
        if args.jit_compile:
            cmd.append("--jit_compile")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, env=env)

    def receive(self, expected):
        for line in self.process.stdout:
            if line.startswith(MARKER):
                kind, _, payload = line[len(MARKER):].partition(" ")
                if kind != expected:
                    raise RuntimeError(f"{self.variant}: expected {expected!r}, got {kind!r}.")
                return json.loads(payload)
        self.process.wait()
        self.log.flush()
        with open(self.log_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"The {self.variant} worker exited (code {self.process.returncode}) "
                           f"before answering {expected!r}:\n{tail}")

    def send(self, command, expected):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive(expected)

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def run_case(settings, args, workdir):
    batch_file = os.path.join(workdir, f"{settings['case']}_batch.npz")
    source, note = prepare_batch(settings, args, batch_file)
    batch_size = settings["batch"][0] * settings["batch"][1]
    workers = {}
    try:
        # Built one after the other: two simultaneous builds would only fight for the cores.
        ready = {}
        for variant in VARIANTS:
            workers[variant] = Worker(variant, settings, batch_file, args, workdir)
            ready[variant] = workers[variant].receive("ready")
        steps = {v: [] for v in VARIANTS}
        repetitions = {v: [] for v in VARIANTS}
        peaks = {}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                answer = workers[variant].send(f"time {settings['steps']}", "time")
                steps[variant].extend(answer["step_seconds"])
                repetitions[variant].append(statistics.median(answer["step_seconds"]))
                peaks[variant] = answer["peak_rss_mb"]
        medians = {v: statistics.median(steps[v]) for v in VARIANTS}
        ratio = medians["dvml"] / medians["baseline"]
        paired = [d / b for b, d in zip(repetitions["baseline"], repetitions["dvml"],
                                        strict=True)]
        profile = None
        if args.profile == "always" or (args.profile == "auto" and ratio > args.goal):
            profile = workers["dvml"].send(f"profile {args.profile_calls}", "profile")["parts"]
        for worker_handle in workers.values():
            worker_handle.send("quit", "bye")
    finally:
        for worker_handle in workers.values():
            worker_handle.close()
    result = {
        "case": settings["case"], "backbone": settings["backbone"],
        "image_size": settings["image_size"], "embedding_dim": settings["embedding_dim"],
        "batch": f"{settings['batch'][0]}x{settings['batch'][1]}", "batch_size": batch_size,
        "data": source, "data_note": note, "steps_per_repetition": settings["steps"],
        "jit_compile": bool(args.jit_compile),
        "ratio": round(ratio, 4),
        "paired_ratio_median": round(statistics.median(paired), 4),
        "paired_ratio_min_max": [round(min(paired), 4), round(max(paired), 4)],
    }
    for variant in VARIANTS:
        result[variant] = {
            "median_step_ms": round(1000 * medians[variant], 2),
            "images_per_second": round(batch_size / medians[variant], 1),
            "peak_rss_mb": peaks[variant],
            "repetition_median_ms": [round(1000 * t, 2) for t in repetitions[variant]],
            "step_ms": [round(1000 * t, 2) for t in steps[variant]],
            **ready[variant],
        }
    if settings["case"] == "resnet50":
        result["goal"] = args.goal
        result["meets_goal"] = bool(ratio <= args.goal)
    if profile is not None:
        extra = sum(p["ms"] for p in profile if p["extra"])
        difference = 1000 * (medians["dvml"] - medians["baseline"])
        result["profile"] = {
            "parts": profile,
            "extra_parts_ms": round(extra, 2),
            "measured_difference_ms": round(difference, 2),
            "unexplained_ms": round(difference - extra, 2),
            # Less sensitive to load than the ratio of two noisy step times when the extras are
            # a small fraction of the step.
            "ratio_estimated_from_parts": round(1 + extra / (1000 * medians["baseline"]), 4),
        }
    return result


# ----------------------------------------------------------------------------------- report

def markdown(results):
    lines = [
        "| case | data | batch | baseline ms/step | DVML ms/step | DVML / baseline "
        "| goal | baseline img/s | DVML img/s | baseline peak RSS (MB) | DVML peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        goal = (f"<= {r['goal']:.2f}: {'met' if r['meets_goal'] else 'MISSED'}"
                if "goal" in r else "(measured)")
        lines.append(
            f"| {r['backbone']} {r['image_size']} px{' XLA' if r['jit_compile'] else ''} "
            f"| {r['data']} | {r['batch']} "
            f"| {r['baseline']['median_step_ms']:.1f} | {r['dvml']['median_step_ms']:.1f} "
            f"| {r['ratio']:.3f} (paired {r['paired_ratio_median']:.3f}) | {goal} "
            f"| {r['baseline']['images_per_second']:.1f} | {r['dvml']['images_per_second']:.1f} "
            f"| {r['baseline']['peak_rss_mb']:.0f} | {r['dvml']['peak_rss_mb']:.0f} |")
    for r in results:
        if "profile" not in r:
            continue
        p = r["profile"]
        lines += ["", f"Where DVML's extra time goes ({r['backbone']}, batch {r['batch']}; each "
                      "part forward + backward on fixed inputs):", "",
                  "| part | ms | in baseline too |", "|---|---|---|"]
        lines += [f"| {part['part']} | {part['ms']:.2f} | {'no' if part['extra'] else 'yes'} |"
                  for part in p["parts"]]
        lines.append(f"| sum of DVML-only parts | {p['extra_parts_ms']:.2f} | |")
        lines.append(f"| measured DVML - baseline step | {p['measured_difference_ms']:.2f} | |")
        lines.append(f"| ratio estimated as 1 + DVML-only parts / baseline step "
                     f"| {p['ratio_estimated_from_parts']:.3f} | |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="convnet_small,resnet50",
                        help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per repetition (convnet_small)")
    parser.add_argument("--resnet_steps", type=int, default=3,
                        help="timed steps per repetition (resnet50)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="repetitions of (baseline, DVML), interleaved")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps after building (the first one traces)")
    parser.add_argument("--convnet_batch", default="64x2", help="P x K for convnet_small")
    parser.add_argument("--resnet_batch", default="16x2", help="P x K for resnet50")
    parser.add_argument("--resnet_image_size", type=int, default=224)
    parser.add_argument("--num_samples", type=int, default=20, help="T, z_V draws per image")
    parser.add_argument("--jit_compile", action="store_true", help="XLA-compile the step")
    parser.add_argument("--goal", type=float, default=1.10, help="resnet50 ratio target")
    parser.add_argument("--profile", default="auto", choices=("auto", "always", "never"),
                        help="time DVML's parts (auto: when the ratio exceeds --goal)")
    parser.add_argument("--profile_calls", type=int, default=10)
    parser.add_argument("--omniglot_data_dir", default=None,
                        help="TFDS data dir with Omniglot (default: TFDS_DATA_DIR)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch_file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown or not names:
        parser.error(f"Unknown --cases {unknown}; valid: {', '.join(CASES)}.")
    for flag in ("steps", "resnet_steps", "repeats", "warmup", "num_samples", "profile_calls"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1; got {getattr(args, flag)}.")
    try:
        settings = [case_settings(name, args) for name in names]
    except ValueError as error:
        parser.error(str(error))

    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="dvml_step_time_") as workdir:
        for case in settings:
            print(f"Timing {case['case']} ...", file=sys.stderr, flush=True)
            results.append(run_case(case, args, workdir))
    table = markdown(results)
    record = {
        "results": results,
        "machine": {**machine_info(), "load_average_1_5_15_before": load_before,
                    "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {key: getattr(args, key) for key in (
            "cases", "steps", "resnet_steps", "repeats", "warmup", "convnet_batch",
            "resnet_batch", "resnet_image_size", "num_samples", "jit_compile", "goal",
            "profile", "profile_calls", "seed")},
        "loss": "npair",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_seconds": round(time.time() - started, 1),
        "markdown": table,
    }
    # Imported here: the parent process stays free of TensorFlow (only the timed children load it).
    from dvml_tf.utils import atomic

    atomic.write_json(args.output, record)
    print(table)
    print(f"\nWritten to {args.output}")
    return record


if __name__ == "__main__":
    main()
