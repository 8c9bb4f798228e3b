"""Test doubles for users' integration tests (like `tfds.testing`): not part of a deployment.

`serving.serve_grpc(base_path)` and `serving.serve_rest(base_path)` start an in-process stand-in
of TF Serving's PredictionService / REST predict API on 127.0.0.1, backed by
`tf.saved_model.load`, to exercise clients without a `tensorflow_model_server`.
"""
