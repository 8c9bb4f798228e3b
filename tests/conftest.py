"""Test-session settings shared by every test module."""

import os

# Quiet TensorFlow's C++ start-up logging; the tests never use a GPU.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
