"""Test-session settings shared by every test module."""

import os

# Quiet TensorFlow's C++ start-up logging; the tests never use a GPU.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest


@pytest.fixture(scope="session")
def catalogue_export(tmp_path_factory):
    """A tiny generated catalogue (CSV manifest) and an untrained SavedModel export of it
    (tests/index/catalogue.py), built once per session for the index and CLI tests."""
    from tests.index import catalogue

    return catalogue.make_catalogue_export(tmp_path_factory.mktemp("catalogue"))
