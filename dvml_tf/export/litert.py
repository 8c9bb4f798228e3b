"""LiteRT (TFLite) embedding models that take raw uint8 images, preprocessing inside.

Three quantizations of the same inference model (`inference.inference_model` with fixed-size
preprocessing; input uint8 [1, H, W, 3] with (H, W) = `RawForm.fixed_size`; output float32
[1, D]):

| file                         | weights | activations | output                                   |
| ---------------------------- | ------- | ----------- | ---------------------------------------- |
| `model.tflite`               | float32 | float32     | z_I, as the Keras model returns it       |
| `model_dynamic_range.tflite` | int8    | float32     | z_I, as the Keras model returns it       |
| `model_int8.tflite`          | int8    | int8        | dequantized z_I before L2 normalization  |

The full-integer model's graph is linear up to the backbone (`integer_steps=False`) so that every
op after the input cast is an int8 builtin (`supported_ops=[TFLITE_BUILTINS_INT8]`), and it stops
before the L2 normalization (the model's `unnormalized_embedder`): an int8 normalized output
would quantize unit vectors to steps of 1/128, so a model that normalizes is normalized by the
caller after dequantizing (`LiteRTModel` does it). It is calibrated on raw training images drawn
by the training sampler (`data.calibration_images`).

The models are written with `keras.export.ExportArchive` to a scratch SavedModel and converted
with `TFLiteConverter.from_saved_model`.
"""

import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from dvml_tf import data as data_lib
from dvml_tf.export import inference as inference_lib
from dvml_tf.export import saved_model as saved_model_lib

FLOAT32 = "float32"
DYNAMIC_RANGE = "dynamic_range"
INT8 = "int8"
QUANTIZATIONS = (FLOAT32, DYNAMIC_RANGE, INT8)
FILE_NAMES = {
    FLOAT32: "model.tflite",
    DYNAMIC_RANGE: "model_dynamic_range.tflite",
    INT8: "model_int8.tflite",
}
SIGNATURE = saved_model_lib.SERVING_DEFAULT


def convert_endpoint(model, fn, signature, configure=None):
    """Writes one endpoint to a scratch SavedModel and converts it to a TFLite flatbuffer.

    Args:
        model: the Keras model `fn` calls (an inference model).
        fn: the endpoint function, returning a dict of named outputs.
        signature: its input signature (list of named `tf.TensorSpec`).
        configure: optional callable applied to the `TFLiteConverter` (quantization options).

    Returns:
        bytes, the `.tflite` flatbuffer.
    """
    with tempfile.TemporaryDirectory(prefix="dvml_litert_") as scratch:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(SIGNATURE, fn, input_signature=signature)
        path = os.path.join(scratch, "saved_model")
        archive.write_out(path, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=[SIGNATURE])
        if configure is not None:
            configure(converter)
        return converter.convert()


def input_signature(raw_form, preprocess):
    """The LiteRT models' input: one raw uint8 image at the fixed size.

    Args:
        raw_form: `data.RawForm`.
        preprocess: the run's `data.PreprocessConfig`.

    Returns:
        list with one `tf.TensorSpec` named `images`.
    """
    height, width = raw_form.fixed_size(preprocess)
    return [tf.TensorSpec([1, height, width, 3], tf.uint8, name=saved_model_lib.IMAGES_KEY)]


def convert_embedding_model(model, raw_form, preprocess, quantization=FLOAT32,
                            calibration_images=None):
    """Converts a trained model's inference model to a LiteRT embedding model.

    Args:
        model: a `DVMLModel`.
        raw_form: `data.RawForm` of its dataset.
        preprocess: the run's `data.PreprocessConfig`.
        quantization: one of `QUANTIZATIONS`.
        calibration_images: for INT8: uint8 array [N, H, W, 3] of raw training images at the
            fixed input size (see `int8_calibration_images`).

    Returns:
        bytes, the `.tflite` flatbuffer.

    Raises:
        ValueError: unknown quantization, or INT8 without calibration images.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"Unknown quantization {quantization!r}; valid: {', '.join(QUANTIZATIONS)}."
        )
    full_integer = quantization == INT8
    inference = inference_lib.inference_model(
        model, raw_form, preprocess, fixed_size=True, integer_steps=not full_integer,
        normalize=not full_integer,
    )

    def embed(images):
        return {saved_model_lib.EMBEDDING_KEY: inference(images)}

    configure = None
    if quantization == DYNAMIC_RANGE:

        def configure(converter):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]

    elif full_integer:
        if calibration_images is None or len(calibration_images) == 0:
            raise ValueError("quantization='int8' needs calibration_images (raw training images).")
        expected = (*raw_form.fixed_size(preprocess), 3)
        calibration_images = np.asarray(calibration_images)
        if calibration_images.dtype != np.uint8 or calibration_images.shape[1:] != expected:
            raise ValueError(
                f"calibration_images must be uint8 [N, {expected[0]}, {expected[1]}, 3]; got "
                f"{calibration_images.dtype} {calibration_images.shape}."
            )

        def representative_dataset():
            for image in calibration_images:
                yield [image[np.newaxis]]

        def configure(converter):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative_dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

    return convert_endpoint(inference, embed, input_signature(raw_form, preprocess), configure)


def int8_calibration_images(catalog, raw_form, preprocess, num_images=200, classes_per_batch=64,
                            images_per_class=2, seed=0):
    """Raw training images calibrating the full-integer model, at the LiteRT input size: the
    first draws of the run's training sampler (`data.calibration_images`).

    Args:
        catalog: the raw training `ImageCatalog`.
        raw_form: `data.RawForm`.
        preprocess: the run's `data.PreprocessConfig`.
        num_images: int >= 1.
        classes_per_batch: P of the run (capped at the number of classes with 2+ images).
        images_per_class: K of the run.
        seed: the run's seed.

    Returns:
        np.uint8 [num_images, H, W, 3].
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1; got {num_images}.")
    _, counts = np.unique(catalog.labels, return_counts=True)
    usable = int(np.sum(counts >= 2))
    sampler = data_lib.ClassBalancedSampler(
        catalog.labels, min(classes_per_batch, usable), images_per_class, seed=seed
    )
    return data_lib.calibration_images(catalog, sampler, num_images,
                                       size=raw_form.fixed_size(preprocess))


class LiteRTModel:
    """A LiteRT embedding model run with `ai_edge_litert` (batch 1 per invoke).

    Args:
        path_or_content: `.tflite` path or its bytes.
        normalize: L2-normalize the outputs (for `model_int8.tflite` of a model that normalizes).
        num_threads: interpreter threads (None: LiteRT's default).
    """

    def __init__(self, path_or_content, normalize=False, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        if isinstance(path_or_content, bytes):
            self.interpreter = Interpreter(model_content=path_or_content, num_threads=num_threads)
        else:
            self.interpreter = Interpreter(
                model_path=os.fspath(path_or_content), num_threads=num_threads
            )
        self.interpreter.allocate_tensors()
        self.normalize = bool(normalize)
        runner = self.interpreter.get_signature_runner(SIGNATURE)
        inputs, outputs = runner.get_input_details(), runner.get_output_details()
        self.input = inputs[saved_model_lib.IMAGES_KEY]
        self.outputs = outputs
        self.input_shape = tuple(int(d) for d in self.input["shape"])

    def _output(self, name):
        return self.interpreter.get_tensor(self.outputs[name]["index"])

    def invoke(self, image):
        """Runs one uint8 image [1, H, W, 3]; returns nothing (read with `_output`)."""
        self.interpreter.set_tensor(self.input["index"], image)
        self.interpreter.invoke()

    def __call__(self, images):
        """Embeds raw images.

        Args:
            images: uint8 array [N, H, W, 3].

        Returns:
            float32 array [N, D].
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.input_shape[1:]:
            raise ValueError(
                f"images must be uint8 [N, {', '.join(map(str, self.input_shape[1:]))}]; got "
                f"{images.dtype} {images.shape}."
            )
        out = []
        for image in images:
            self.invoke(image[np.newaxis])
            out.append(self._output(saved_model_lib.EMBEDDING_KEY)[0].copy())
        embeddings = np.stack(out).astype(np.float32) if out else np.zeros([0, 0], np.float32)
        if self.normalize and len(embeddings):
            norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
            embeddings = embeddings / np.maximum(norms, 1e-12)
        return embeddings

    def latency_ms(self, image, runs=50, warmup=5):
        """Median wall time of one invoke in milliseconds.

        Args:
            image: uint8 array [1, H, W, 3].
            runs: timed runs.
            warmup: untimed runs first.

        Returns:
            float.
        """
        for _ in range(warmup):
            self.invoke(image)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.invoke(image)
            times.append(time.perf_counter() - start)
        return 1000.0 * float(np.median(times))


def op_types(path_or_content):
    """The op names and the tensor dtypes of a LiteRT model (to check a full-integer graph).

    Args:
        path_or_content: `.tflite` path or bytes.

    Returns:
        `(ops, tensors)`: sorted op names; list of (tensor name, numpy dtype) pairs.
    """
    model = LiteRTModel(path_or_content)
    interpreter = model.interpreter
    ops = sorted({op["op_name"] for op in interpreter._get_ops_details()})
    tensors = [(t["name"], t["dtype"]) for t in interpreter.get_tensor_details()]
    return ops, tensors
