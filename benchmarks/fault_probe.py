"""The faults and bad inputs of issue 22, run for real against the command-line tools, each
outcome classified by explicit rules.

    python benchmarks/fault_probe.py                  # every case; writes results/fault_probe.json
    python benchmarks/fault_probe.py --items=1,7      # the cases of some of the issue's items
    python benchmarks/fault_probe.py --work_dir=PROBE   # keep the generated files
    python benchmarks/fault_probe.py --cases=k_zero --update  # rerun one case into the file

Everything runs in a temporary folder: a tiny generated catalogue (PNGs and a CSV manifest), a
5-step `train.py` run on it, `export.py` exports, `index.py` builds, and the faults themselves:
real SIGKILL and SIGTERM sent to running builds and training runs, a real small tmpfs filled to
its last byte and read-only bind mounts (when this process may mount; else the documented
fallbacks of tests/faults.py: the file size limit RLIMIT_FSIZE for a full disk, and EROFS
injected at os.open for a read-only folder; DVML_TEST_NO_MOUNT=1 forces them), decompression
bombs, odd CSV manifests, names that are not UTF-8, a damaged TFDS dataset, a pickled array
planted in an index. A build that must be
signalled mid-way is slowed (a pause in each SavedModel call) so that the signal lands between
two of its checkpoints.

Each case ends in one outcome:

- hang: the command did not finish within its timeout.
- security: a planted payload ran, or a decompression bomb was decoded (peak RSS of the command
  above BOMB_MB over its baseline).
- corruption: data that had to stay as it was changed (SHA-256 of every file compared before and
  after), or a faulty input was accepted and silently changed what the tool wrote or answered.
- traceback: stderr holds a Python traceback.
- correct: the command was expected to succeed and did, with the right result.
- clear: the command was expected to refuse and did: a non-zero exit and one line
  ``<tool>.py: error: ...`` (or ``<tool>.py: terminated ...``) naming the flag, file or value
  at fault (each case lists the words the line must contain).
- unclear: anything else (a refusal without that line or without those words, an expected
  success that failed or gave the wrong result).

The JSON holds, per case: its id, the issue's item, what it does, the commands run, the outcome,
the reason for it, the tool's one-line message (its ``<tool>.py: ...`` line, else its last stderr
line), each command's peak RSS and the seconds it took; and the counts per outcome, which the
script also prints.
"""

import argparse
import collections
import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from tests import faults  # noqa: E402  (the full disk of the fault tests)
from tests.data.oversized import png_bomb  # noqa: E402

RESULTS = os.path.join(HERE, "results", "fault_probe.json")
OUTCOMES = ("correct", "clear", "unclear", "traceback", "hang", "corruption", "security")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONPATH": ROOT}
TIMEOUT = 900  # seconds per command: 20 times what the slowest takes on a busy 2-core machine
# A decoded 20000 x 20000 bomb is 1.2 GB as RGB: a command that grew by half of that decoded it.
BOMB_MB = 600
# evaluate.py of the tiny run peaks below 1 GB (measured: about 700 MB); with a decoded bomb,
# above 1.9 GB.
EVALUATE_MB = 1600
# The tiny model of every run (the flags of train.py).
TRAIN_FLAGS = ("--dataset=csv", "--backbone=convnet_small", "--nopretrained", "--image_size=16",
               "--resize_size=18", "--embedding_dim=8", "--num_samples=2", "--loss=triplet",
               "--classes_per_batch=2", "--images_per_class=2", "--eval_every=0")
CLASS_SPLITS = ("train",) * 4 + ("validation",) * 2 + ("test",) * 3
PER_CLASS = 5

# Runs argv[4:] (a script and its flags) with each SavedModel call of the index builder slowed
# by argv[1] seconds; at call number argv[2] it first deletes the file argv[3] ("-": none).
_HOOKED = textwrap.dedent("""
    import os, runpy, sys, time
    from dvml_tf.evaluation import runner
    delay, delete_at, victim = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sys.argv = sys.argv[4:]
    original, calls = runner.run_embed_bytes, []

    def hooked(signature, encoded):
        calls.append(1)
        if len(calls) == delete_at and victim != "-":
            os.remove(victim)
        time.sleep(delay)
        return original(signature, encoded)

    runner.run_embed_bytes = hooked
    runpy.run_path(sys.argv[0], run_name="__main__")
""")
# Where mounting is not allowed, a read-only folder is the fallback of tests/faults.py: writes
# into the folder argv[1] fail with EROFS at os.open; argv[2:] is the script and its flags.
_READ_ONLY_FALLBACK = textwrap.dedent("""
    import errno, os, runpy, sys
    folder, original = sys.argv[1], os.open

    def refusing(file, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and os.path.abspath(
                os.fspath(file)).startswith(folder + os.sep):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
        return original(file, flags, *args, **kwargs)

    os.open = refusing
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")
# What the full-disk cases ran on ("tmpfs" or "RLIMIT_FSIZE"), for the results file.
DISK_KINDS = set()
# Unpickling this object writes its marker file: the payload of a planted object array.
_PAYLOAD_MARKER = "payload_ran"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------- running commands

class Result:
    """A finished command: exit code, output, wall seconds, peak RSS in MB, and whether it hung.

    Args:
        argv: the command.
        code: its exit code (negative: killed by that signal).
        stdout, stderr: its output, as text.
        seconds: wall time.
        peak_mb: its own peak resident memory (ru_maxrss; on Linux it starts from the
            probe's own high-water mark, which is why the probe never imports TensorFlow).
        hung: True when it was killed at its timeout.
    """

    def __init__(self, argv, code, stdout, stderr, seconds, peak_mb, hung):
        self.argv, self.code, self.stdout, self.stderr = argv, code, stdout, stderr
        self.seconds, self.peak_mb, self.hung = seconds, peak_mb, hung

    @property
    def tool(self):
        """The script run ("index.py"), even through a wrapper."""
        return next((os.path.basename(a) for a in self.argv if a.endswith(".py")), "")

    def message(self, tool=None):
        """The tool's own one-line message (``tool: error: ...``), else the last stderr line."""
        tool = tool or self.tool
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        own = [line for line in lines if line.startswith(f"{tool}: ")]
        return (own or lines or [""])[-1]


class Running:
    """A started command (stdout and stderr go to files; its rusage is collected on exit)."""

    def __init__(self, argv, cwd=ROOT, env=None):
        self.argv = [os.fsdecode(a) if isinstance(a, bytes) else a for a in argv]
        # Closed by finish(), which every caller reaches.
        self.out = tempfile.TemporaryFile()  # noqa: SIM115
        self.err = tempfile.TemporaryFile()  # noqa: SIM115
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env or ENV, stdout=self.out,
                                     stderr=self.err, start_new_session=True)
        self._waited = {}
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self):
        _, status, usage = os.wait4(self.proc.pid, 0)
        self._waited.update(code=os.waitstatus_to_exitcode(status), peak_kb=usage.ru_maxrss)

    def alive(self):
        return self._waiter.is_alive()

    def signal(self, number):
        if not self.alive():  # reaped: its pid may belong to another process by now
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, number)

    def finish(self, timeout=TIMEOUT):
        """Waits for the command (killing its process group at `timeout`); returns a Result."""
        try:
            self._waiter.join(timeout)
        except BaseException:  # Ctrl-C of the probe: leave no command of it running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        hung = self._waiter.is_alive()
        if hung:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self._waiter.join()
        self.proc.returncode = self._waited["code"]  # reaped by wait4, not by Popen
        texts = []
        for f in (self.out, self.err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", "surrogateescape"))
            f.close()
        return Result(self.argv, self._waited["code"], texts[0], texts[1],
                      time.monotonic() - self.start, self._waited["peak_kb"] / 1024, hung)


def run(*argv, timeout=TIMEOUT, **kwargs):
    return Running([sys.executable, *argv], **kwargs).finish(timeout)


def hooked(script, *args, delay=0.0, delete_at=0, victim="-"):
    """Starts `script` with the builder's SavedModel calls slowed (and a file deleted)."""
    return Running([sys.executable, "-c", _HOOKED, str(delay), str(delete_at), victim, script,
                    *args])


def wait_until(condition, running, timeout=TIMEOUT):
    """Polls `condition` every 20 ms while `running` runs; False if it ended or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not running.alive():
            return condition()
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------- generated data

def write_catalogue(root, class_splits=CLASS_SPLITS, per_class=PER_CLASS, seed=0):
    """Class-structured 20 x 20 PNGs under root/img and root/manifest.csv; returns the path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rows = []
    for c, split in enumerate(class_splits):
        base = rng.uniform(0, 255, (4, 4, 3))
        for i in range(per_class if isinstance(per_class, int) else per_class[c]):
            coarse = np.clip(base + rng.normal(0, 60, base.shape), 0, 255).astype(np.uint8)
            name = f"img/c{c}_{i}.png"
            Image.fromarray(coarse).resize((20, 20), Image.BILINEAR).save(
                os.path.join(root, name))
            rows.append({"path": name, "label": f"glyph_{c}", "split": split})
    manifest = os.path.join(root, "manifest.csv")
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def digests(folder, skip=()):
    """SHA-256 of every file under `folder` (relative path -> digest), `skip`ped prefixes out."""
    found = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, folder)
            if not relative.startswith(tuple(skip)):
                with open(path, "rb") as f:
                    found[relative] = hashlib.sha256(f.read()).hexdigest()
    return found


def flip_byte(path, offset=-3):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def truncate_half(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def staging_path(output):
    parent, name = os.path.split(os.path.abspath(output))
    return os.path.join(parent, f".{name}.staging")


def chunk_files(output):
    """The checkpoints of a build that its progress.json lists (a chunk file is written first,
    then listed: a kill in between leaves a file that a resume embeds again)."""
    try:
        with open(os.path.join(staging_path(output), "progress.json")) as f:
            return [chunk["file"] for chunk in json.load(f)["chunks"]]
    except (OSError, ValueError, KeyError, TypeError):  # not yet written, or mid-replace
        return []


def same_index(output, reference):
    """Whether two flat indexes hold the same rows: the same ids, labels and metadata (their
    digests in index.json) and the same vectors up to float rounding (the SavedModel's results
    differ by about 1e-7 between batch sizes; another model's or another image's, by far more).
    """
    files = []
    for folder in (output, reference):
        with open(os.path.join(folder, "index.json")) as f:
            files.append({k: v for k, v in json.load(f)["files"].items()
                          if k != "flat_vectors.npy"})
    vectors = [np.load(os.path.join(folder, "flat_vectors.npy")) for folder in (output,
                                                                                 reference)]
    return files[0] == files[1] and vectors[0].shape == vectors[1].shape and bool(
        np.abs(vectors[0] - vectors[1]).max() < 1e-5)


# --------------------------------------------------------------------------- file systems

def _mount(*args):
    if os.geteuid() != 0 or os.environ.get(faults.NO_MOUNT):  # DVML_TEST_NO_MOUNT=1: fallbacks
        return False
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@contextlib.contextmanager
def read_only(folder):
    """Yields a function making the command line of a script that finds `folder` read-only:
    a read-only bind mount where allowed, else EROFS injected at os.open
    (_READ_ONLY_FALLBACK)."""
    folder = os.path.abspath(folder)
    if _mount("--bind", folder, folder):
        try:
            if _mount("-o", "remount,bind,ro", folder):
                yield lambda script, *args: [sys.executable, script, *args]
                return
        finally:
            subprocess.run(["umount", "-l", folder], capture_output=True, check=False)
    yield lambda script, *args: [sys.executable, "-c", _READ_ONLY_FALLBACK, folder, script,
                                 *args]


# --------------------------------------------------------------------------- the workspace

class Workspace:
    """The shared artifacts of the cases, made on first use: a catalogue, a run R trained for
    5 steps and exported twice (versions 1 and 2: the same weights), then trained to 8 steps in
    the same folder and exported again (version 3: other weights), and an index I built with
    version 1."""

    def __init__(self, root):
        self.root = root
        self._made = {}

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def _once(self, name, make):
        if name not in self._made:
            self._made[name] = make()
        return self._made[name]

    @property
    def manifest(self):
        made = self.path("cat", "manifest.csv")  # kept in a --work_dir from an earlier run
        return self._once("manifest", lambda: made if os.path.exists(made) else
                          write_catalogue(self.path("cat")))

    def image(self, name):
        return os.path.join(os.path.dirname(self.manifest), "img", name)

    def train(self, model_dir, steps, *extra):
        return run("train.py", *TRAIN_FLAGS, f"--data_dir={self.manifest}", f"--steps={steps}",
                   f"--checkpoint_every={steps}", f"--log_every={steps}",
                   f"--model_dir={model_dir}", *extra)

    def _versions(self):
        run_dir, export_dir = self.path("R"), self.path("E")
        if os.path.isdir(os.path.join(export_dir, "saved_model", "3")):  # an earlier run's
            return [self.path("E", "saved_model", str(v)) for v in (1, 2, 3)]
        for step in (5, None, None, 8, None):
            if step:
                result = self.train(run_dir, step)
            else:
                result = run("export.py", f"--model_dir={run_dir}", f"--export_dir={export_dir}",
                             "--skip_litert")
            if result.code != 0:
                raise RuntimeError(f"setup failed: {' '.join(result.argv)}\n{result.stderr}")
        return [self.path("E", "saved_model", str(v)) for v in (1, 2, 3)]

    @property
    def versions(self):
        return self._once("versions", self._versions)

    def weights(self, version_dir):
        with open(os.path.join(version_dir, "assets.extra", "export_report.json")) as f:
            return json.load(f)["model"]["weights"]

    def build_flags(self, output, version=0, manifest=None, *extra):
        return ["build", f"--saved_model={self.versions[version]}", "--dataset=csv",
                f"--data_dir={manifest or self.manifest}", f"--output={output}", *extra]

    def build(self, output, *extra, version=0, manifest=None):
        result = run("index.py", *self.build_flags(output, version, manifest, *extra))
        if result.code != 0:
            raise RuntimeError(f"setup failed: {' '.join(result.argv)}\n{result.stderr}")
        return output

    @property
    def index(self):
        made = self.path("I")
        return self._once("index", lambda: made if os.path.exists(
            os.path.join(made, "index.json")) else self.build(made))

    def killed_build(self, output, version=0, manifest=None, chunks=2):
        """A build of 4-image checkpoints, SIGKILLed once `chunks` of them are on disk."""
        running = hooked("index.py", *self.build_flags(output, version, manifest,
                                                       "--batch_size=2", "--checkpoint_images=4"),
                         delay=0.5)
        reached = wait_until(lambda: len(chunk_files(output)) >= chunks, running)
        running.signal(signal.SIGKILL)
        running.finish()
        if not reached or os.path.exists(output):
            raise RuntimeError(f"setup failed: the build into {output} was not killed after "
                               f"{chunks} checkpoints")
        return staging_path(output)


# --------------------------------------------------------------------------- classification

def outcome_of(result, tool, expect, words=(), accepted="unclear", check=None):
    """The outcome of one command by the rules of the module docstring.

    Args:
        result: the Result.
        tool: the script's name ("index.py").
        expect: "ok" (it must succeed) or "error" (it must refuse).
        words: what the refusal's line must contain.
        accepted: the outcome when a command expected to refuse exits 0 ("corruption" where
            accepting silently damages or mixes data).
        check: None, or a function returning (outcome, reason) or None after the command ran:
            the case's own verification (digests, results); its outcome overrides the rest
            when it is "security" or "corruption", and a failed check of an expected success
            makes it "unclear" unless the check says otherwise.

    Returns:
        (outcome, reason).
    """
    checked = check() if check else None
    if checked and checked[0] in ("security", "corruption"):
        return checked
    if result.hung:
        return "hang", f"still running after {TIMEOUT} s"
    if "Traceback (most recent call last)" in result.stderr:
        return "traceback", "stderr holds a Python traceback"
    if expect == "ok":
        if result.code != 0:
            return "unclear", f"expected success; exit {result.code}"
        return checked or ("correct", "exit 0 and the expected result")
    if result.code == 0:
        return accepted, "expected a refusal; exit 0"
    line = result.message(tool)
    if not line.startswith((f"{tool}: error: ", f"{tool}: terminated")):
        return "unclear", f"exit {result.code} without a '{tool}: error:' line"
    missing = [w for w in words if w.lower() not in line.lower()]
    if missing:
        return "unclear", f"the error line does not name {missing}"
    return checked or ("clear", f"exit {result.code}, one line naming {list(words)}")


CASES = []


def case(item, description):
    """Registers a case: a function(workspace, folder) returning (results, outcome, reason)."""
    def register(function):
        CASES.append((function.__name__, item, description, function))
        return function
    return register


# --------------------------------------------------------------------------- item 1: contract

@case(1, "the same weights exported as versions 1 and 2 get one fingerprint; retrained, another")
def reexport_and_retrain_fingerprints(ws, tmp):
    v1, v2, v3 = ws.versions
    same, other = ws.weights(v1) == ws.weights(v2), ws.weights(v1) != ws.weights(v3)
    outcome = ("correct", "v1 == v2 != v3") if same and other else (
        "corruption", f"v1 == v2: {same}, v1 != v3: {other}")
    return [], *outcome


@case(1, "a build with v1 SIGKILLed after 2 checkpoints, resumed with the retrained v3")
def resume_with_another_model(ws, tmp):
    output = os.path.join(tmp, "I")
    staging = ws.killed_build(output)
    before = digests(staging, skip=(".",))
    result = run("index.py", *ws.build_flags(output, 2, None, "--batch_size=2",
                                             "--checkpoint_images=4"))

    def check():
        if os.path.exists(output):
            return "corruption", "an index of rows of two models was written"
        if digests(staging, skip=(".",)) != before:
            return "corruption", "the checkpoints of the v1 build changed"
        return None
    return [result], *outcome_of(result, "index.py", "error", ("another model", "--restart"),
                                 accepted="corruption", check=check)


@case(1, "a build with v1 SIGKILLed after 2 checkpoints, resumed with v2 (the same weights)")
def resume_with_the_same_weights(ws, tmp):
    output = os.path.join(tmp, "I")
    ws.killed_build(output)
    result = run("index.py", *ws.build_flags(output, 1, None, "--batch_size=2",
                                             "--checkpoint_images=4"))

    def check():
        if result.code == 0 and not same_index(output, ws.index):
            return "corruption", "the resumed index differs from an uninterrupted build"
        resumed = re.search(r"Resuming: (\d+) of 15 images", result.stderr)
        if not resumed or int(resumed.group(1)) < 8:  # 2 or more 4-image checkpoints kept
            said = [line for line in result.stderr.splitlines() if line.startswith(("W", "E"))]
            return "unclear", f"the build did not resume from its checkpoints: {said[:3]}"
        return None
    return [result], *outcome_of(result, "index.py", "ok", check=check)


@case(1, "index.py search of the v1 index with queries of the retrained v3")
def search_with_another_model(ws, tmp):
    result = run("index.py", "search", f"--index={ws.index}", f"--saved_model={ws.versions[2]}",
                 f"--images={ws.image('c6_0.png')}")
    return [result], *outcome_of(result, "index.py", "error", ("another model", "fingerprint"),
                                 accepted="corruption")


@case(1, "evaluate.py --index of the v1 index with the retrained v3")
def evaluate_with_another_model(ws, tmp):
    result = run("evaluate.py", f"--saved_model={ws.versions[2]}", "--dataset=csv",
                 f"--data_dir={ws.manifest}", f"--index={ws.index}", "--noclustering")
    return [result], *outcome_of(result, "evaluate.py", "error", ("another model",),
                                 accepted="corruption")


@case(1, "index.py merge of a shard built with v1 and a shard built with v3")
def merge_shards_of_two_models(ws, tmp):
    shards = [os.path.join(tmp, f"p{i}") for i in range(2)]
    for i, version in enumerate((0, 2)):
        ws.build(shards[i], "--num_shards=2", f"--shard_index={i}", version=version)
    output = os.path.join(tmp, "I")
    result = run("index.py", "merge", f"--inputs={','.join(shards)}", f"--output={output}")
    return [result], *outcome_of(
        result, "index.py", "error", ("fingerprint",), accepted="corruption",
        check=lambda: ("corruption", "a merged index was written") if os.path.exists(output)
        else None)


# --------------------------------------------------------------------------- item 2: checksums

@case(2, "index.py merge after one byte of a shard's embeddings.npy was flipped")
def merge_a_corrupt_shard(ws, tmp):
    shards = [os.path.join(tmp, f"p{i}") for i in range(2)]
    for i in range(2):
        ws.build(shards[i], "--num_shards=2", f"--shard_index={i}")
    flip_byte(os.path.join(shards[1], "embeddings.npy"))
    output = os.path.join(tmp, "I")
    result = run("index.py", "merge", f"--inputs={','.join(shards)}", f"--output={output}")
    return [result], *outcome_of(
        result, "index.py", "error", (shards[1], "embeddings.npy"), accepted="corruption",
        check=lambda: ("corruption", "a merged index was written") if os.path.exists(output)
        else None)


@case(2, "a killed build resumed after one byte of its first checkpoint was flipped")
def resume_after_a_corrupt_checkpoint(ws, tmp):
    output = os.path.join(tmp, "I")
    staging = ws.killed_build(output)
    flip_byte(os.path.join(staging, chunk_files(output)[0]))
    result = run("index.py", *ws.build_flags(output, 0, None, "--batch_size=2",
                                             "--checkpoint_images=4"))
    return [result], *outcome_of(result, "index.py", "ok", check=lambda: (
        "corruption", "the index differs from an uninterrupted build") if result.code == 0 and (
            not same_index(output, ws.index)) else None)


@case(2, "a killed build resumed after an image of its first checkpoint was replaced")
def resume_after_an_image_changed(ws, tmp):
    catalogue = os.path.join(tmp, "cat")
    shutil.copytree(os.path.dirname(ws.manifest), catalogue)
    manifest = os.path.join(catalogue, "manifest.csv")
    output = os.path.join(tmp, "I")
    ws.killed_build(output, manifest=manifest)
    shutil.copy(os.path.join(catalogue, "img", "c0_0.png"),
                os.path.join(catalogue, "img", "c6_0.png"))  # the first test image
    result = run("index.py", *ws.build_flags(output, 0, manifest, "--batch_size=2",
                                             "--checkpoint_images=4"))
    reference = ws.build(os.path.join(tmp, "J"), "--batch_size=2", manifest=manifest)
    return [result], *outcome_of(result, "index.py", "ok", check=lambda: (
        "corruption", "the index holds the old image's embedding") if result.code == 0 and (
            not same_index(output, reference)) else None)


# --------------------------------------------------------------------------- item 3: bombs

def _bomb(tmp, name="bomb.png"):
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
        f.write(png_bomb())
    return path


def _bounded(result, baseline):
    grown = result.peak_mb - baseline.peak_mb
    return ("security", f"peak RSS {result.peak_mb:.0f} MB, {grown:.0f} MB above a plain "
            "search: the bomb was decoded") if grown > BOMB_MB else None


def _search_a_bomb(ws, tmp, *extra, starts):
    """index.py search of a bomb: its answer must be an error line starting with `starts` and
    the search's peak memory that of a plain search."""
    baseline = run("index.py", "search", f"--index={ws.index}",
                   f"--images={ws.image('c6_0.png')}")
    result = run("index.py", "search", f"--index={ws.index}", f"--images={_bomb(tmp)}", *extra)
    if result.hung or "Traceback (most recent call last)" in result.stderr:
        return [baseline, result], *outcome_of(result, "index.py", "ok")
    answer = (result.stdout.strip().splitlines() or ["{}"])[-1]
    error = json.loads(answer).get("error", "")
    if _bounded(result, baseline):
        return [baseline, result], *_bounded(result, baseline)
    if error.startswith(starts) and "above the limit" in error:
        return [baseline, result], "clear", f"exit {result.code}; its answer: {error}"
    return [baseline, result], "unclear", f"exit {result.code}; its answer: {answer}"


@case(3, "index.py search of a 49 kB PNG of 20000 x 20000 pixels (refused by index.py)")
def search_a_bomb(ws, tmp):
    return _search_a_bomb(ws, tmp, starts="20000 x 20000 pixels")


@case(3, "the same bomb sent to the SavedModel's embed_bytes (index.py's limit raised)")
def embed_bytes_of_a_bomb(ws, tmp):
    return _search_a_bomb(ws, tmp, f"--max_image_pixels={10**9}", starts="embed_bytes:")


@case(3, "index.py build of a catalogue holding two bombs")
def build_a_catalogue_with_bombs(ws, tmp):
    catalogue = os.path.join(tmp, "cat")
    shutil.copytree(os.path.dirname(ws.manifest), catalogue)
    manifest = os.path.join(catalogue, "manifest.csv")
    for name, label in (("bomb_a.png", "glyph_6"), ("bomb_b.png", "glyph_7")):
        _bomb(os.path.join(catalogue, "img"), name)
        with open(manifest, "a") as f:
            f.write(f"img/{name},{label},test\n")
    baseline = run("index.py", "search", f"--index={ws.index}",
                   f"--images={ws.image('c6_0.png')}")
    output = os.path.join(tmp, "I")
    result = run("index.py", *ws.build_flags(output, 0, manifest))

    def check():
        if _bounded(result, baseline):
            return _bounded(result, baseline)
        if "Skipped 2 image file(s) above the limit" not in result.stderr:
            return "unclear", "the build does not say that it skipped the two bombs"
        return None
    return [baseline, result], *outcome_of(result, "index.py", "ok", check=check)


@case(3, "evaluate.py of a run on a manifest holding a bomb (the loaders' limit)")
def evaluate_a_catalogue_with_a_bomb(ws, tmp):
    catalogue = os.path.join(tmp, "cat")
    shutil.copytree(os.path.dirname(ws.manifest), catalogue)
    manifest = os.path.join(catalogue, "manifest.csv")
    _bomb(os.path.join(catalogue, "img"), "bomb.png")
    with open(manifest, "a") as f:
        f.write("img/bomb.png,glyph_6,test\n")
    ws.versions  # noqa: B018  (R is trained)
    result = run("evaluate.py", f"--model_dir={ws.path('R')}", f"--data_dir={manifest}",
                 "--noclustering")
    return [result], *outcome_of(result, "evaluate.py", "ok", check=lambda: (
        "security", f"peak RSS {result.peak_mb:.0f} MB") if result.peak_mb > EVALUATE_MB
        else None if "above the limit" in result.stderr else (
            "unclear", "no word of the skipped image"))


# --------------------------------------------------------------------------- item 4

@case(4, "index.py build --overwrite of an index folder holding a README.txt and eval/")
def overwrite_keeps_the_users_files(ws, tmp):
    output = os.path.join(tmp, "I")
    shutil.copytree(ws.index, output)
    with open(os.path.join(output, "README.txt"), "w") as f:
        f.write("my notes")
    os.makedirs(os.path.join(output, "eval"))
    with open(os.path.join(output, "eval", "metrics.json"), "w") as f:
        f.write("{}")
    before = digests(output, skip=("index.json", "ids", "labels", "metadata", "flat"))
    result = run("index.py", *ws.build_flags(output, 0, None, "--overwrite"))
    return [result], *outcome_of(result, "index.py", "ok", check=lambda: (
        "corruption", "the user's files changed") if digests(
            output, skip=("index.json", "ids", "labels", "metadata", "flat")) != before
        else None)


# --------------------------------------------------------------------------- item 5

@case(5, "a second train.py into the run folder of a running one; then SIGTERM to the first")
def two_trainers_and_sigterm(ws, tmp):
    run_dir = os.path.join(tmp, "R")
    first = Running([sys.executable, "train.py", *TRAIN_FLAGS, f"--data_dir={ws.manifest}",
                     "--steps=1000000", "--checkpoint_every=1000000", "--log_every=1000",
                     f"--model_dir={run_dir}"])
    try:
        started = wait_until(lambda: os.path.exists(os.path.join(run_dir, "config.json")), first)
        second = ws.train(run_dir, 5)
        time.sleep(5)  # some steps
        first.signal(signal.SIGTERM)
        terminated = first.finish()
    finally:
        first.signal(signal.SIGKILL)
    if not started:
        return [second], "unclear", "the first run never started"
    outcome = outcome_of(second, "train.py", "error", ("Another training run", str(
        first.proc.pid)), accepted="corruption")
    end = outcome_of(terminated, "train.py", "error", ("terminated (SIGTERM)", "Rerun"))
    if outcome[0] != "clear" or end[0] != "clear":
        return [second, terminated], *(outcome if outcome[0] != "clear" else end)
    return [second, terminated], "clear", f"{outcome[1]}; the first: {end[1]}"


# --------------------------------------------------------------------------- item 6

def _on_full_disk(ws, tmp, copy_from, run_argv, tool, keep_skip=()):
    """Copies `copy_from` onto a small disk, fills it, runs the command made by
    run_argv(disk, copy) and checks that nothing on the disk changed (no file left behind):
    the refusal must name the disk's folder and the reason."""
    with faults.full_disk(os.path.join(tmp, "disk")) as disk:
        DISK_KINDS.add(disk.kind)
        copy = os.path.join(disk.path, os.path.basename(copy_from)) if copy_from else None
        if copy:
            shutil.copytree(copy_from, copy)
        before = digests(disk.path, skip=keep_skip)
        disk.fill(in_process=False)
        result = Running(run_argv(disk, copy)).finish()
        disk.free()
        after = digests(disk.path, skip=keep_skip)

    def check():
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            return "corruption", f"{disk.kind}: left or changed {changed[:4]}"
        return None
    reason = "no space left" if disk.mounted else "file too large"
    return [result], *outcome_of(result, tool, "error", (disk.path, reason), check=check)


@case(6, "train.py resumed into a run folder on a full disk")
def train_on_a_full_disk(ws, tmp):
    ws.versions  # noqa: B018
    return _on_full_disk(ws, tmp, ws.path("R"), lambda disk, copy: disk.command(
        "train.py", *TRAIN_FLAGS, f"--data_dir={ws.manifest}", "--steps=12",
        "--checkpoint_every=12", "--log_every=12", f"--model_dir={copy}"), "train.py",
        keep_skip=("R/logs",))


@case(6, "export.py into an export folder on a full disk")
def export_on_a_full_disk(ws, tmp):
    ws.versions  # noqa: B018
    return _on_full_disk(ws, tmp, ws.path("E"), lambda disk, copy: disk.command(
        "export.py", f"--model_dir={ws.path('R')}", f"--export_dir={copy}", "--skip_litert"),
        "export.py")


@case(6, "index.py build into a folder on a full disk")
def build_on_a_full_disk(ws, tmp):
    return _on_full_disk(ws, tmp, None, lambda disk, copy: disk.command(
        "index.py", *ws.build_flags(os.path.join(disk.path, "I"))), "index.py")


@case(6, "index.py build --overwrite of an index on a full disk")
def overwrite_on_a_full_disk(ws, tmp):
    return _on_full_disk(ws, tmp, ws.index, lambda disk, copy: disk.command(
        "index.py", *ws.build_flags(copy, 0, None, "--overwrite")), "index.py")


@case(6, "evaluate.py --output_json on a full disk")
def output_json_on_a_full_disk(ws, tmp):
    return _on_full_disk(ws, tmp, None, lambda disk, copy: disk.command(
        "evaluate.py", f"--saved_model={ws.versions[0]}", "--dataset=csv",
        f"--data_dir={ws.manifest}", "--noclustering", f"--output_json={disk.path}/metrics.json"),
        "evaluate.py")


@case(6, "evaluate.py --calibrate (writes the export's report) on a full disk")
def calibrate_on_a_full_disk(ws, tmp):
    ws.versions  # noqa: B018
    return _on_full_disk(ws, tmp, ws.path("E"), lambda disk, copy: disk.command(
        "evaluate.py", f"--saved_model={copy}/saved_model/1", "--dataset=csv",
        f"--data_dir={ws.manifest}", "--noclustering", "--calibrate"),
        "evaluate.py")


def _read_only(ws, tmp, folder, make_argv, tool, words):
    before = digests(folder)
    with read_only(folder) as argv:
        result = Running(make_argv(argv)).finish()
    words = (*words, "read-only file system")
    return [result], *outcome_of(result, tool, "error", words, check=lambda: (
        "corruption", "the folder changed") if digests(folder) != before else None)


@case(6, "export.py into a read-only export folder (its lock file)")
def export_into_a_read_only_folder(ws, tmp):
    copy = os.path.join(tmp, "E")
    shutil.copytree(ws.path("E"), copy)
    return _read_only(ws, tmp, copy, lambda argv: argv(
        "export.py", f"--model_dir={ws.path('R')}", f"--export_dir={copy}", "--skip_litert"),
        "export.py", (copy,))


@case(6, "index.py build into a read-only folder")
def build_into_a_read_only_folder(ws, tmp):
    parent = os.path.join(tmp, "ro")
    os.makedirs(parent)
    return _read_only(ws, tmp, parent, lambda argv: argv(
        "index.py", *ws.build_flags(os.path.join(parent, "I"))), "index.py", (parent,))


# --------------------------------------------------------------------------- item 7: inputs

def _manifest_case(tmp, ws, name, text, words, encoding="utf-8"):
    manifest = os.path.join(os.path.dirname(ws.manifest), name)
    with open(manifest, "w", encoding=encoding, newline="") as f:
        f.write(text)
    result = run("index.py", *ws.build_flags(os.path.join(tmp, "I"), 0, manifest))
    return [result], *outcome_of(result, "index.py", "error", (name, *words))


def _rows(classes="bcdefg"):
    return "".join(f"img/c{c}_{i}.png,{c},test\n" for c in range(6, 9) for i in range(2)) + (
        "".join(f"img/c{c}_{i}.png,{c},train\n" for c in range(4) for i in range(2)))


@case(7, "a CSV manifest whose line 2 opens a quote that never closes")
def csv_unmatched_quote(ws, tmp):
    return _manifest_case(tmp, ws, "quote.csv", 'path,label,split\n"img/c0_0.png,0,train\n'
                          + _rows(), ("line 2", "quote"))


@case(7, "a CSV manifest with a path longer than 131,072 characters")
def csv_field_limit(ws, tmp):
    return _manifest_case(tmp, ws, "long.csv", "path,label,split\n" + "a" * 131_073
                          + ".png,0,train\n" + _rows(), ("line 2", "field limit"))


@case(7, "a CSV manifest with the label 99999999999999999999 in an all-numeric column")
def csv_label_overflow(ws, tmp):
    return _manifest_case(tmp, ws, "big.csv", "path,label,split\n" + _rows()
                          + "img/c5_0.png,99999999999999999999,test\n",
                          ("99999999999999999999", "64 bits"))


@case(7, "a Latin-1 CSV manifest")
def csv_latin1(ws, tmp):
    return _manifest_case(tmp, ws, "latin1.csv", "path,label,split\n" + _rows()
                          + "img/c5_0.png,caf\u00e9,test\n", ("UTF-8", "line"),
                          encoding="latin-1")


@case(7, "a folder catalogue whose class and file names are not UTF-8: build, then search")
def names_not_utf8(ws, tmp):
    from PIL import Image

    root = os.fsencode(os.path.join(tmp, "folder"))
    for c, cls in enumerate((b"caf\xe9", b"plain", b"\xff\xfeodd", b"zeta")):
        os.makedirs(os.path.join(root, cls))
        for i in range(2):
            Image.new("RGB", (12, 12), (60 * c, 100 * i, 20)).save(
                os.path.join(root, cls, b"img\xe9%d.png" % i))
    output = os.path.join(tmp, "I")
    built = run("index.py", "build", f"--saved_model={ws.versions[0]}", "--dataset=folder",
                f"--data_dir={os.fsdecode(root)}", f"--output={output}")
    if built.code != 0:
        return [built], *outcome_of(built, "index.py", "ok")
    query = os.path.join(root, b"zeta", b"img\xe90.png")
    result = Running([sys.executable, "index.py", "search", f"--index={output}", "--k=1",
                      b"--images=" + query]).finish()

    def check():
        answers = [json.loads(line) for line in result.stdout.splitlines()]
        if len(answers) != 1 or os.fsencode(answers[0]["results"][0]["path"]) != query:
            return "unclear", "the nearest image is not the query's own file"
        return None
    return [built, result], *outcome_of(result, "index.py", "ok", check=check)


@case(7, "train.py --learning_rate=nan, --learning_rate=inf, --variance_scale=nan")
def non_finite_flags(ws, tmp):
    results, outcomes = [], []
    for flag in ("--learning_rate=nan", "--learning_rate=inf", "--variance_scale=nan"):
        run_dir = os.path.join(tmp, flag.strip("-").replace("=", "_"))
        result = ws.train(run_dir, 5, flag)
        results.append(result)
        name = flag[2:].split("=")[0]
        outcomes.append(outcome_of(result, "train.py", "error", (name, "finite"),
                                   check=lambda d=run_dir: (
                                       "corruption", f"{d}/config.json was written") if
                                   os.path.exists(os.path.join(d, "config.json")) else None))
    worst = [o for o in outcomes if o[0] != "clear"]
    return results, *(worst[0] if worst else ("clear", "each refused naming its flag"))


def _export_a_damaged_run(ws, tmp, damage):
    """export.py of a copy of R after damage(copy)."""
    ws.versions  # noqa: B018  (R is trained)
    run_dir = os.path.join(tmp, "R")
    shutil.copytree(ws.path("R"), run_dir)
    damage(run_dir)
    return run("export.py", f"--model_dir={run_dir}", f"--export_dir={tmp}/E", "--skip_litert")


@case(7, "export.py of a run whose model.keras is truncated")
def truncated_model_keras(ws, tmp):
    result = _export_a_damaged_run(ws, tmp, lambda run_dir: truncate_half(
        os.path.join(run_dir, "model.keras")))
    return [result], *outcome_of(result, "export.py", "error", ("model.keras", "truncated"))


@case(7, "export.py of a run whose config.json says embedding_dim 16 and model.keras has 8")
def model_keras_config_mismatch(ws, tmp):
    def damage(run_dir):
        path = os.path.join(run_dir, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["embedding_dim"] = 16
        with open(path, "w") as f:
            json.dump(config, f)
    result = _export_a_damaged_run(ws, tmp, damage)
    return [result], *outcome_of(result, "export.py", "error", ("embedding_dim", "config.json"),
                                 accepted="corruption")


@case(7, "index.py search --batch_size=0")
def search_batch_size_zero(ws, tmp):
    result = run("index.py", "search", f"--index={tmp}/missing", "--images=q.png",
                 "--batch_size=0")
    return [result], *outcome_of(result, "index.py", "error", ("--batch_size",))


@case(7, "index.py search --images=<folder>/a,comma.png (a file name with a comma)")
def query_with_a_comma(ws, tmp):
    comma = os.path.join(tmp, "a,comma.png")
    shutil.copy(ws.image("c7_0.png"), comma)
    result = run("index.py", "search", f"--index={ws.index}", "--k=1", f"--images={comma}")

    def check():
        answers = [json.loads(line) for line in result.stdout.splitlines()]
        if [a.get("query") for a in answers] != [comma]:
            return "unclear", f"queries {[a.get('query') for a in answers]}"
        return None
    return [result], *outcome_of(result, "index.py", "ok", check=check)


@case(7, "evaluate.py --output_json in a folder that cannot be made (under /proc, as root)")
def output_json_parent_not_creatable(ws, tmp):
    target = "/proc/dvml_probe/metrics.json"
    result = run("evaluate.py", f"--saved_model={ws.versions[0]}", "--dataset=csv",
                 f"--data_dir={ws.manifest}", "--noclustering", f"--output_json={target}")
    return [result], *outcome_of(result, "evaluate.py", "error", ("--output_json", target),
                                 check=lambda: ("unclear", "it evaluated first") if "R@1" in
                                 result.stdout else None)


@case(7, "index.py build --backend=hnsw --backend_options=M=100000000")
def backend_options_out_of_bounds(ws, tmp):
    result = run("index.py", *ws.build_flags(os.path.join(tmp, "I"), 0, None, "--backend=hnsw",
                                             "--backend_options=M=100000000"))
    return [result], *outcome_of(result, "index.py", "error", ("backend_options", "M"),
                                 check=lambda: ("unclear", "it embedded the catalogue first")
                                 if "Embedded" in result.stderr else None)


_TINY_TFDS = textwrap.dedent("""
    import sys
    import numpy as np, tensorflow as tf, tensorflow_datasets as tfds
    builder = tfds.builder("omniglot", data_dir=sys.argv[1])
    tf.io.gfile.makedirs(builder.data_dir)
    infos = []
    for split in ("train", "test", "small1", "small2"):
        template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, template=(
            "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"), dataset_name="omniglot",
            split=split, filetype_suffix="tfrecord")
        path = template.sharded_filepaths(1)[0]
        with tf.io.TFRecordWriter(str(path)) as writer:
            for label in range(6):
                image = np.full((105, 105, 3), 40 * label, np.uint8)
                writer.write(builder.info.features.serialize_example(
                    {"image": image, "alphabet": 0, "alphabet_char_id": 0, "label": label}))
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[6], num_bytes=
                                         tf.io.gfile.stat(str(path)).length,
                                         filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(builder.data_dir)
    print(builder.data_dir)
""")


def _tfds_case(ws, tmp, damage):
    made = run("-c", _TINY_TFDS, os.path.join(tmp, "tfds"))
    if made.code != 0:
        raise RuntimeError(f"setup failed: a tiny TFDS omniglot\n{made.stderr}")
    version = made.stdout.strip().splitlines()[-1]
    damage(version)
    result = run("train.py", "--dataset=omniglot", f"--data_dir={tmp}/tfds",
                 "--backbone=convnet_small", "--steps=2", f"--model_dir={tmp}/R",
                 env={**ENV, "TFDS_DATA_DIR": f"{tmp}/tfds"})
    return [made, result], *outcome_of(result, "train.py", "error", ("omniglot", "Prepare it"))


@case(7, "train.py on a prepared TFDS dataset whose dataset_info.json is truncated")
def tfds_corrupt_dataset_info(ws, tmp):
    def damage(version):
        with open(os.path.join(version, "dataset_info.json"), "w") as f:
            f.write('{"name": "omniglot", "splits": [')
    return _tfds_case(ws, tmp, damage)


@case(7, "train.py on a prepared TFDS dataset whose train tfrecord is truncated")
def tfds_truncated_tfrecord(ws, tmp):
    return _tfds_case(ws, tmp, lambda version: truncate_half(
        os.path.join(version, "omniglot-train.tfrecord-00000-of-00001")))


@case(7, "SIGTERM to index.py build after its first checkpoint; then the same command again")
def sigterm_during_a_build(ws, tmp):
    output = os.path.join(tmp, "I")
    flags_ = ws.build_flags(output, 0, None, "--batch_size=2", "--checkpoint_images=4")
    running = hooked("index.py", *flags_, delay=0.5)
    wait_until(lambda: len(chunk_files(output)) >= 1, running)
    running.signal(signal.SIGTERM)
    terminated = running.finish()
    resumed = run("index.py", *flags_)
    outcome = outcome_of(terminated, "index.py", "error", ("terminated (SIGTERM)", "resume"))
    if outcome[0] != "clear":
        return [terminated, resumed], *outcome
    return [terminated, resumed], *outcome_of(resumed, "index.py", "ok", check=lambda: (
        "unclear", "the rerun did not resume") if "Resuming" not in resumed.stderr else (
            "clear", "one line saying what was kept; the rerun resumed"))


# --------------------------------------------------------------------------- item 8

@case(8, "index.py build --checkpoint_images=0")
def checkpoint_images_zero(ws, tmp):
    result = run("index.py", *ws.build_flags(os.path.join(tmp, "I"), 0, None,
                                             "--checkpoint_images=0"))
    return [result], *outcome_of(result, "index.py", "error", ("--checkpoint_images",))


@case(8, "index.py search --k=0 of an index that does not exist (the flag is named first)")
def k_zero(ws, tmp):
    result = run("index.py", "search", f"--index={tmp}/missing", "--images=q.png", "--k=0")
    return [result], *outcome_of(result, "index.py", "error", ("--k",))


@case(8, "an image deleted while index.py build runs")
def file_deleted_during_a_build(ws, tmp):
    catalogue = os.path.join(tmp, "cat")
    shutil.copytree(os.path.dirname(ws.manifest), catalogue)
    victim = os.path.join(catalogue, "img", "c8_4.png")  # the last test image
    output = os.path.join(tmp, "I")
    result = hooked("index.py", *ws.build_flags(output, 0, os.path.join(catalogue,
                                                                         "manifest.csv"),
                                                "--batch_size=2"),
                    delete_at=2, victim=victim).finish()
    return [result], *outcome_of(result, "index.py", "ok", check=lambda: None if (
        "c8_4.png" in result.stderr and "disappeared" in result.stderr) else (
            "unclear", "the skipped file is not reported as deleted"))


@case(8, "faiss's notice about its missing AVX-512 module: index.py build and search of an "
         "hnsw index (faiss loads)")
def faiss_notice(ws, tmp):
    output = os.path.join(tmp, "I")
    built = run("index.py", *ws.build_flags(output, 0, None, "--backend=hnsw"))
    if built.code != 0:
        return [built], *outcome_of(built, "index.py", "ok")
    result = run("index.py", "search", f"--index={output}", f"--images={ws.image('c6_0.png')}")
    return [built, result], *outcome_of(result, "index.py", "ok", check=lambda: (
        "unclear", "stderr shows faiss's fallback notice") if any(
            "swigfaiss" in r.stderr for r in (built, result)) else None)


@case(8, "lock files left beside an index after a build and a search")
def lock_dotfiles(ws, tmp):
    output = os.path.join(tmp, "I")
    built = run("index.py", *ws.build_flags(output))
    searched = run("index.py", "search", f"--index={output}",
                   f"--images={ws.image('c6_0.png')}")
    left = sorted(n for n in os.listdir(tmp) if n.endswith(".lock"))
    outcome = outcome_of(searched, "index.py", "ok", check=lambda: (
        "unclear", f"left {left}") if left else None)
    return [built, searched], *outcome


# --------------------------------------------------------------------------- item 9

@case(9, "benchmarks/ann_scale.py at a small size (its quick run) leaves the 1M results alone")
def ann_scale_quick_run(ws, tmp):
    committed = os.path.join(HERE, "results", "ann_scale.json")
    before = digests(os.path.dirname(committed))
    result = run(os.path.join(HERE, "ann_scale.py"), "--num=2000", "--queries=20",
                 "--backends=hnsw")
    after = digests(os.path.dirname(committed))
    for name in set(after) - set(before):  # the run's own small results: not committed
        os.remove(os.path.join(os.path.dirname(committed), name))
    return [result], *outcome_of(result, "ann_scale.py", "ok", check=lambda: (
        "corruption", "it overwrote results/ann_scale.json") if before.get(
            "ann_scale.json") != after.get("ann_scale.json") else None)


# --------------------------------------------------------------------------- item 10

def _reference_metrics(vectors, labels):
    """R@1 and MAP@R of the queries with at least one other image of their class (numpy loops:
    the independent oracle)."""
    scores = vectors @ vectors.T
    recalls, precisions = [], []
    for q in range(len(labels)):
        others = [i for i in range(len(labels)) if i != q]
        relevant = sum(labels[i] == labels[q] for i in others)
        if relevant == 0:
            continue
        order = sorted(others, key=lambda i: -scores[q, i])
        hits = [labels[i] == labels[q] for i in order[:relevant]]
        recalls.append(float(hits[0]))
        precisions.append(sum(sum(hits[:k + 1]) / (k + 1) for k in range(relevant) if hits[k])
                          / relevant)
    return {"recall@1": np.mean(recalls), "map@r": np.mean(precisions),
            "excluded": len(labels) - len(recalls)}


@case(10, "R@1 and MAP@R of evaluate.py on a split with a single-image class vs numpy")
def single_image_class(ws, tmp):
    manifest = write_catalogue(os.path.join(tmp, "cat"), ("train",) * 4 + ("test",) * 4,
                               per_class=(3, 3, 3, 3, 4, 4, 1, 4), seed=3)
    output = os.path.join(tmp, "I")
    built = run("index.py", "build", f"--saved_model={ws.versions[0]}", "--dataset=csv",
                f"--data_dir={manifest}", f"--output={output}")
    metrics = os.path.join(tmp, "metrics.json")
    result = run("evaluate.py", f"--saved_model={ws.versions[0]}", "--dataset=csv",
                 f"--data_dir={manifest}", "--noclustering", "--recall_ks=1",
                 f"--output_json={metrics}")
    if built.code != 0 or result.code != 0:
        return [built, result], *outcome_of(built if built.code else result, "evaluate.py", "ok")
    vectors = np.load(os.path.join(output, "flat_vectors.npy"))
    labels = np.load(os.path.join(output, "labels.npy"))
    expected = _reference_metrics(vectors, labels)
    with open(metrics) as f:
        got = json.load(f)

    def check():
        for key in ("recall@1", "map@r"):
            if abs(got[key] - expected[key]) > 1e-5:
                return "corruption", f"{key} {got[key]:.4f}, numpy {expected[key]:.4f}"
        if got.get("excluded_queries") != expected["excluded"]:
            return "unclear", f"excluded_queries {got.get('excluded_queries')}"
        return "correct", (f"R@1 {got['recall@1']:.4f} and MAP@R {got['map@r']:.4f} as numpy, "
                           f"{expected['excluded']} query left out of both")
    return [built, result], *outcome_of(result, "evaluate.py", "ok", check=check)


# --------------------------------------------------------------------------- security

@case("security", "index.py search of an index whose ids.npy is a pickled object array "
                  "(index.json's digests updated to match)")
def pickle_planted_in_an_index(ws, tmp):
    output = os.path.join(tmp, "I")
    shutil.copytree(ws.index, output)
    marker = os.path.join(tmp, _PAYLOAD_MARKER)
    ids = os.path.join(output, "ids.npy")
    count = len(np.load(ids))
    np.save(ids, np.array([_Payload(marker)] * count, dtype=object), allow_pickle=True)
    header_path = os.path.join(output, "index.json")
    with open(header_path) as f:
        header = json.load(f)
    with open(ids, "rb") as f:
        data = f.read()
    header["files"]["ids.npy"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with open(header_path, "w") as f:
        json.dump(header, f)
    result = run("index.py", "search", f"--index={output}", f"--images={ws.image('c6_0.png')}")
    return [result], *outcome_of(result, "index.py", "error", ("ids.npy",), check=lambda: (
        "security", "the pickled payload ran") if os.path.exists(marker) else None)


@case("security", "index.py search of an index whose index.json lists '../secret'")
def path_traversal_in_an_index(ws, tmp):
    output = os.path.join(tmp, "I")
    shutil.copytree(ws.index, output)
    with open(os.path.join(tmp, "secret"), "w") as f:
        f.write("not the index's")
    header_path = os.path.join(output, "index.json")
    with open(header_path) as f:
        header = json.load(f)
    header["files"]["../secret"] = {"sha256": "0" * 64, "bytes": 15}
    with open(header_path, "w") as f:
        json.dump(header, f)
    result = run("index.py", "search", f"--index={output}", f"--images={ws.image('c6_0.png')}")
    return [result], *outcome_of(result, "index.py", "error", ("'../secret'",))


# --------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", default=None,
                        help="comma-separated items of issue 22 (1-10, security); default all")
    parser.add_argument("--cases", default=None, help="comma-separated case names")
    parser.add_argument("--work_dir", default=None,
                        help="where the generated files go (kept); default: a temporary folder")
    parser.add_argument("--output", default=None,
                        help=f"results file (default: {os.path.relpath(RESULTS, ROOT)} for a "
                             "full run, nothing for a partial one)")
    parser.add_argument("--update", action="store_true",
                        help="a partial run replaces its cases in the results file (the counts "
                             "are those of the updated file)")
    args = parser.parse_args()
    items = None if args.items is None else set(args.items.split(","))
    names = None if args.cases is None else set(args.cases.split(","))
    selected = [c for c in CASES if (items is None or str(c[1]) in items)
                and (names is None or c[0] in names)]
    full = items is None and names is None
    output = args.output or (RESULTS if full or args.update else None)
    root = args.work_dir or tempfile.mkdtemp(prefix="fault_probe.")
    os.makedirs(root, exist_ok=True)
    workspace = Workspace(root)
    records, start = [], time.monotonic()
    try:
        for name, item, description, function in selected:
            folder = os.path.join(root, name)
            shutil.rmtree(folder, ignore_errors=True)  # an earlier run's, in a --work_dir
            os.makedirs(folder)
            began = time.monotonic()
            results, outcome, reason = function(workspace, folder)
            record = {"case": name, "item": item, "what": description, "outcome": outcome,
                      "reason": reason,
                      "commands": [" ".join(r.argv[1:]).replace(root, "TMP")
                                   .replace(_HOOKED, "<slowed builder>")
                                   .replace(_READ_ONLY_FALLBACK, "<read-only fallback>")
                                   .replace(faults._LIMITED, "<full-disk fallback>")
                                   for r in results],
                      "message": results[-1].message() if results else "",
                      "peak_rss_mb": [round(r.peak_mb) for r in results],
                      "seconds": round(time.monotonic() - began, 1)}
            record["message"] = record["message"].replace(root, "TMP")
            record["reason"] = record["reason"].replace(root, "TMP")
            records.append(record)
            print(f"{outcome:10s} {name}: {record['reason']}\n{'':10s} {record['message']}",
                  flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    report = {"command": "python benchmarks/fault_probe.py",
              "machine": f"{os.cpu_count()} CPUs, {'root' if os.geteuid() == 0 else 'not root'}",
              "full_disk": sorted(DISK_KINDS),
              "minutes": round((time.monotonic() - start) / 60, 1), "cases": records}
    if args.update and not full and os.path.exists(output):
        with open(output) as f:
            earlier = json.load(f)
        rerun = {r["case"]: r for r in records}
        order = [name for name, *_ in CASES]
        kept = [r for r in earlier["cases"] if r["case"] not in rerun]
        report = {**earlier, "full_disk": sorted(set(earlier["full_disk"]) | DISK_KINDS),
                  "cases": sorted(kept + records, key=lambda r: order.index(r["case"])),
                  "updated": sorted(set(earlier.get("updated", [])) | set(rerun))}
    counts = collections.Counter(r["outcome"] for r in report["cases"])
    report["counts"] = {name: counts.get(name, 0) for name in OUTCOMES}
    print(json.dumps(report["counts"]))
    if output:
        from dvml_tf.utils import atomic

        atomic.write_json(output, report)
    return 0 if not set(counts) - {"correct", "clear"} else 1


if __name__ == "__main__":
    sys.exit(main())
