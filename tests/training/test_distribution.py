"""Distributed training is the single-device computation, and survives a killed process.

Every test here starts real processes: TensorFlow's logical devices and TF_CONFIG must be set
before it initializes, and a SIGKILL needs a process to kill.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "PYTHONPATH": str(ROOT),
    "CUDA_VISIBLE_DEVICES": "",
}

pytestmark = pytest.mark.slow


def run_equivalence(*flags):
    result = subprocess.run(
        [sys.executable, "-m", "tests.training.replica_equivalence", *flags],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_steps_in_both_phases_equal_the_single_device_steps():
    """One process checks the three set-ups (one TensorFlow start instead of three)."""
    results = run_equivalence()
    tolerances = {
        "float32": 1e-5,  # 2 replicas vs 1 device
        "jit_compile": 1e-5,  # XLA vs no XLA on one device
        "mixed_precision": 2e-3,  # 2 replicas vs 1 device, both mixed_float16
    }
    assert set(results) == set(tolerances)
    for check, tolerance in tolerances.items():
        # (5 losses + the DVML options on 2 losses in float32, on 1 under XLA; 2 losses + the
        # options on 1 in mixed precision) x 2 phases.
        assert len(results[check]) == {"float32": 14, "jit_compile": 12,
                                       "mixed_precision": 6}[check], check
        for case, diff in results[check].items():
            assert diff["update_scale"] > 0.1, (check, case)  # the step really moved the weights
            assert diff["updates"] <= tolerance, (check, case, diff)
            # The step counter advances once per step, not per replica.
            step = 1 if case.endswith("phase1") else 2
            assert diff["steps"] == [step, step], (check, case)


def write_folder_dataset(root, num_classes=12, per_class=6, size=16):
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        prototype = rng.uniform(0, 255, (size, size, 3))
        os.makedirs(root / f"class_{c:02d}")
        for i in range(per_class):
            image = np.clip(prototype + rng.normal(0, 30, prototype.shape), 0, 255)
            Image.fromarray(image.astype(np.uint8)).save(root / f"class_{c:02d}" / f"{i}.png")
    return root


def train_command(data_dir, model_dir, steps, *extra):
    return [
        sys.executable,
        "train.py",
        "--dataset=folder",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        f"--steps={steps}",
        "--backbone=convnet_small",
        "--nopretrained",
        "--image_size=16",
        "--resize_size=16",
        "--embedding_dim=8",
        "--num_samples=2",
        "--classes_per_batch=4",
        "--images_per_class=2",
        "--learning_rate=0.003",
        "--checkpoint_every=2",
        "--log_every=2",
        "--eval_batch_size=16",
        "--sync_batch_norm",
        *extra,
    ]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(command, model_dir):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        log = open(model_dir.parent / f"worker{index}.log", "w")  # noqa: SIM115
        workers.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env={**ENV, "TF_CONFIG": tf_config},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return workers


def model_weights(checkpoint_dir):
    reader = tf.train.load_checkpoint(str(checkpoint_dir))
    return {
        name: reader.get_tensor(name)
        for name, _ in tf.train.list_variables(str(checkpoint_dir))
        if name.startswith("model/") and "OPTIMIZER_SLOT" not in name
    }


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= atol, worst


# Every train.py run of this module that a comparison needs trains STEPS steps on one folder.
STEPS = 16  # phase 1 = steps 1-4


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("distribution") / "images")


@pytest.fixture(scope="module")
def single_device_run(images, tmp_path_factory):
    """The reference: STEPS uninterrupted steps on one device (one process for the module)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    result = subprocess.run(train_command(images, run_dir, STEPS), cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def assert_trains_like(run_dir, reference_dir):
    """Stated tolerance: two runs differ by under 1% of how far training moved the weights
    (relative L2 over the whole model). Not an element-wise bound: synchronized batch norm
    (E[x^2] - E[x]^2) and the collective's summation order round differently from one device,
    and for a weight whose gradient is ~0, Adam's m / sqrt(v) turns that rounding into an
    O(learning rate) step of either sign (measured after 6 steps at lr 3e-3: 2.6e-4
    element-wise, 8e-5 relative). Gradient scale and aggregation are checked step by step in
    test_steps_in_both_phases_equal_the_single_device_steps."""
    other = model_weights(run_dir / "checkpoints" / f"ckpt-{STEPS}")
    reference = model_weights(reference_dir / "checkpoints" / f"ckpt-{STEPS}")
    # The oldest checkpoint the run keeps (its last 3, every 2 steps).
    earlier = model_weights(reference_dir / "checkpoints" / f"ckpt-{STEPS - 4}")
    assert other.keys() == reference.keys()
    disagreement = np.sqrt(sum(np.sum((other[k] - reference[k]) ** 2) for k in reference))
    movement = np.sqrt(sum(np.sum((reference[k] - earlier[k]) ** 2) for k in reference))
    assert movement > 1e-1, movement  # the weights really trained in the last 4 steps
    assert disagreement < 1e-2 * movement, (disagreement, movement)


def test_sigterm_to_one_worker_stops_every_worker_and_the_rerun_trains_like_one_device(
        images, single_device_run, tmp_path):
    """Two workers on 127.0.0.1; only the non-chief worker gets SIGTERM: the chief must stop
    after the same step (or worker 1 would leave it waiting in the next step's collectives).
    Then the cluster is restarted with the same command, as a scheduler would, resumes, and
    ends where one process ends."""
    run = tmp_path / "multi" / "run"
    os.makedirs(run.parent)
    logs = [run.parent / f"worker{index}.log" for index in range(2)]
    command = train_command(images, run, STEPS, "--strategy=multi_worker")
    workers = start_workers(command, run)
    try:
        deadline = time.time() + 300
        while "step 2/" not in logs[0].read_text():
            assert time.time() < deadline, logs[0].read_text()[-3000:]
            assert all(w.poll() is None for w in workers), "a worker exited before SIGTERM"
            time.sleep(0.05)
        # Frozen, worker 1 holds the chief within a step of it, so that the signal lands
        # before the run's end whatever the machine's speed; it is handled on SIGCONT.
        workers[1].send_signal(signal.SIGSTOP)
        workers[1].send_signal(signal.SIGTERM)
        workers[1].send_signal(signal.SIGCONT)
        codes = [worker.wait(timeout=300) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert codes == [143, 143], logs[0].read_text()[-3000:]
    saved = tf.train.latest_checkpoint(str(run / "checkpoints"))
    step = int(saved.rsplit("-", 1)[-1])
    assert 2 <= step < STEPS
    for log in logs:
        text = log.read_text()
        assert f"train.py: terminated (SIGTERM) at step {step}; checkpoint " in text
        assert "Traceback" not in text

    workers = start_workers(command, run)
    for worker in workers:
        assert worker.wait(timeout=600) == 0, logs[0].read_text()[-3000:]
    assert f"Resumed from {saved} at step {step}" in logs[0].read_text()
    assert json.loads((run / "metrics.json").read_text()).keys() >= {"recall@1", "nmi"}
    assert sorted(os.listdir(run)) == sorted(os.listdir(single_device_run))  # only the chief wrote
    assert_trains_like(run, single_device_run)


# train.py itself on 2 logical CPU devices: they must exist before TensorFlow initializes, so a
# small launcher creates them and then runs train.py as __main__.
TWO_LOCAL_REPLICAS = """
import runpy, sys
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
sys.argv = sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_train_py_mirrored_on_two_local_replicas_equals_one_device(images, single_device_run,
                                                                 tmp_path):
    command = train_command(images, tmp_path / "mirrored", STEPS, "--strategy=mirrored")
    command[1:1] = ["-c", TWO_LOCAL_REPLICAS]  # python -c launcher train.py ...
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # The mirrored run really had two replicas, each fed its half of every global batch by the
    # trainer's round-robin input (whole classes per replica).
    assert "Strategy mirrored: 2 replica(s) in sync, 2 classes x 2 images" in result.stderr
    assert_trains_like(tmp_path / "mirrored", single_device_run)


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(images, single_device_run,
                                                                    tmp_path):
    killed_dir, steps = tmp_path / "killed", STEPS  # the kill lands in phase 2
    victim = subprocess.Popen(
        train_command(images, killed_dir, steps),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (tf.train.latest_checkpoint(str(killed_dir / "checkpoints")) or "").endswith("-6"):
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    interrupted_at = int(tf.train.latest_checkpoint(str(killed_dir / "checkpoints")).split("-")[-1])
    assert 6 <= interrupted_at < steps

    rerun = subprocess.run(
        train_command(images, killed_dir, steps),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {interrupted_at} (phase 2)" in rerun.stderr
    assert_same_weights(
        model_weights(killed_dir / "checkpoints" / f"ckpt-{steps}"),
        model_weights(single_device_run / "checkpoints" / f"ckpt-{steps}"),
    )
    assert (killed_dir / "metrics.json").exists() and (killed_dir / "model.keras").exists()


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(images, tmp_path):
    run_dir, log_path = tmp_path / "run", tmp_path / "train.log"
    # No periodic checkpoint before the interrupt: the one found afterwards is Ctrl-C's.
    command = train_command(images, run_dir, 100000, "--checkpoint_every=100000")
    with open(log_path, "w") as log:
        # A pytest-xdist worker ignores SIGINT, and an ignored signal stays ignored across exec:
        # give the child the default disposition so that Python turns SIGINT into Ctrl-C.
        process = subprocess.Popen(
            command, cwd=ROOT, env=ENV, stdout=log, stderr=log,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    deadline = time.time() + 300
    while "step 4/100000" not in log_path.read_text():
        assert process.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=300) == 1
    finally:
        process.kill()  # never leave a 100,000-step run behind
    log = log_path.read_text()
    assert "interrupted; the last checkpoint is saved. Rerun the same command" in log
    assert "Traceback" not in log
    saved = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    interrupted_at = int(saved.split("-")[-1])
    assert interrupted_at >= 4
    assert f"Interrupted at step {interrupted_at}; checkpoint saved" in log

    # The same command (here with fewer total steps, a resumable field) continues from there.
    rerun = subprocess.run(
        train_command(images, run_dir, interrupted_at + 2, "--checkpoint_every=100000"),
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resumed from {saved} at step {interrupted_at}" in rerun.stderr
    assert (run_dir / "metrics.json").exists()


def test_an_interrupted_checkpoint_write_never_replaces_the_last_good_one(tmp_path):
    from dvml_tf.training import trainer
    from dvml_tf.training.config import TrainConfig
    from tests.training import synthetic

    config = TrainConfig(
        dataset="omniglot",
        image_size=12,
        resize_size=12,
        embedding_dim=8,
        num_samples=2,
        classes_per_batch=4,
        steps=8,
        checkpoint_every=4,
        model_dir=str(tmp_path / "run"),
    )
    splits = synthetic.splits()
    run = trainer.Trainer(config, splits=splits, verbose=False)
    run.train(stop_at=4)
    good = run.manager.latest_checkpoint
    # A crash half-way through writing the next checkpoint: its files exist but are truncated,
    # and the crash came before the state file was updated (TF updates it last, atomically).
    partial = run.checkpoint.write(str(tmp_path / "run" / "checkpoints" / "ckpt-8"))
    for path in tf.io.gfile.glob(partial + "*"):
        with open(path, "r+b") as f:
            f.truncate(max(0, os.path.getsize(path) // 2))
    resumed = trainer.Trainer(config, splits=splits, verbose=False)
    assert resumed.step == 4
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")) == good
    resumed.train()
    assert resumed.step == 8


def test_make_strategy_validates_tf_config(monkeypatch):
    from dvml_tf.training import distribution

    assert distribution.make_strategy("default") is tf.distribute.get_strategy()
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        distribution.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(ValueError, match="TF_CONFIG is not valid"):
        distribution.make_strategy("multi_worker")
    with pytest.raises(ValueError, match="valid: default, mirrored, multi_worker"):
        distribution.make_strategy("tpu")


@pytest.mark.parametrize(
    "cluster, task_type, task_id, chief",
    [
        ({"worker": ["a:1", "b:1"]}, "worker", 0, True),
        ({"worker": ["a:1", "b:1"]}, "worker", 1, False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, "worker", 0, False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, "chief", 0, True),
    ],
)
def test_only_the_chief_writes(tmp_path, cluster, task_type, task_id, chief):
    from dvml_tf.training import distribution

    class Resolver:
        def cluster_spec(self):
            return tf.train.ClusterSpec(cluster)

    resolver = Resolver()
    resolver.task_type, resolver.task_id = task_type, task_id

    class Strategy:
        cluster_resolver = resolver

    assert distribution.is_chief(Strategy()) is chief
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    directory = distribution.worker_directory(run_dir, Strategy())
    assert (directory == run_dir) is chief
    assert distribution.is_chief(tf.distribute.get_strategy())
    # When training ends, a worker's temporary directory goes; the run's folder never does.
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write("x")
    distribution.remove_worker_directory(directory, run_dir)
    assert os.path.exists(directory) is chief
    assert os.path.isdir(run_dir)
