"""Test-session settings shared by every test module."""

import logging
import os

import pytest

# Quiet TensorFlow's C++ start-up logging; the tests never use a GPU.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One thread per TensorFlow process (the test workers and every process they start, which
# inherit this environment): two workers and their subprocesses share the cores, and TF's
# spinning thread pools, oversubscribed, burn CPU without progress. Measured on 2 cores:
# tests/test_evaluate_cli.py 112 s instead of 162 s. Multi-device tests still run two
# logical devices (their collectives do not need a second thread).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The test files that take longest (whole-suite --durations on 2 cores), run first so that
# the workers finish together (`--dist worksteal` then balances the rest).
LONGEST_FIRST = (
    "tests/training/test_distribution.py",
    "tests/test_index_cli.py",
    "tests/test_index_cli_inputs.py",
    "tests/test_benchmark_scripts.py",
    "tests/research/test_scripts.py",
    "tests/research/test_glyph_study.py",
    "tests/test_evaluate_cli.py",
    "tests/export/test_exporter.py",
    "tests/training/test_trainer.py",
    "tests/test_train_cli.py",
    "tests/index/test_builder.py",
)


@pytest.fixture(scope="session")
def catalogue_export(tmp_path_factory):
    """A tiny generated catalogue (CSV manifest) and an untrained SavedModel export of it
    (tests/index/catalogue.py), built once per session for the index and CLI tests."""
    from tests.index import catalogue

    return catalogue.make_catalogue_export(tmp_path_factory.mktemp("catalogue"))


@pytest.fixture(autouse=True)
def keep_the_absl_log_level():
    """Tests that parse absl flags in-process (flagsaver) restore --verbosity too, which sets
    the absl logger's level to WARNING: keep the level it had for the tests after them. (Tests
    that capture absl's INFO lines also set its level themselves: this alone did not keep them
    green in every order.)"""
    level = logging.getLogger("absl").level
    yield
    logging.getLogger("absl").setLevel(level)


def pytest_collection_modifyitems(config, items):
    """Longest test files first, each file's tests kept together (module fixtures once)."""
    del config
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
