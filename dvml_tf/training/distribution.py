"""Distribution strategies and the per-worker write locations they imply.

`default` runs on one device; `mirrored` replicates over all local GPUs (or the logical CPU
devices a test creates); `multi_worker` spans machines described by the standard `TF_CONFIG`
environment variable. Only the chief writes the run's files; the other workers write their
(required, identical) checkpoints to a temporary directory, removed when `Trainer.run` ends.
"""

import json
import os
import shutil
import tempfile

import tensorflow as tf


def make_strategy(name):
    """Creates the `tf.distribute.Strategy` called `name` ("default", "mirrored", "multi_worker").

    Raises:
        ValueError: unknown name, or `multi_worker` without a usable TF_CONFIG.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        raw = os.environ.get("TF_CONFIG")
        if not raw:
            raise ValueError(
                "strategy=multi_worker needs the TF_CONFIG environment variable, e.g. "
                '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}} (see README, "Scaling out").'
            )
        try:
            tf_config = json.loads(raw)
            tf_config["cluster"], tf_config["task"]["type"], tf_config["task"]["index"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"TF_CONFIG is not valid: {error}; got {raw!r}.") from error
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy {name!r}; valid: default, mirrored, multi_worker.")


def is_chief(strategy):
    """True on the worker that writes checkpoints, logs, the model and the metrics."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def num_workers(strategy):
    """The number of processes (chief and workers) training together: 1 without a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    cluster = resolver.cluster_spec().as_dict()
    return max(1, sum(len(cluster.get(kind, ())) for kind in ("chief", "worker")))


def worker_directory(model_dir, strategy):
    """`model_dir` on the chief; a fresh temporary directory on the other workers."""
    if is_chief(strategy):
        return model_dir
    resolver = strategy.cluster_resolver
    return tempfile.mkdtemp(prefix=f"dvml_{resolver.task_type}{resolver.task_id}_")


def remove_worker_directory(write_dir, model_dir):
    """Removes a non-chief worker's temporary directory; never touches the run's `model_dir`."""
    if os.path.abspath(write_dir) != os.path.abspath(model_dir):
        shutil.rmtree(write_dir, ignore_errors=True)
