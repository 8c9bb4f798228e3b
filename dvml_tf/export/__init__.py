"""Export: the SavedModel for TF Serving, LiteRT models, serving clients, on-device retrieval.

    result = export_run("runs/omniglot_npair_dvml_seed0", "exports/omniglot")   # = export.py
    client = RestClient("http://localhost:8501", model_name="dvml")
    embeddings = client.embed(raw_images)          # uint8 [N, H, W, 3] in the dataset's raw form

Modules (one concept each):

* `raw_input`: the dataset's raw image form and its conversion to the model input (TF ops for
  the SavedModel, TFLite builtins for LiteRT), equal to `load_dataset` + `preprocess_test_batch`.
* `saved_model`: the serving SavedModel (`serving_default`, `embed_bytes`) via ExportArchive.
* `litert`: float32, dynamic-range and full-integer LiteRT embedding models; int8 calibration.
* `retrieval`: `retrieval.tflite` (gallery baked in) and its `retrieval_gallery.json`.
* `raw_data`: a run's dataset in raw form; embedding it through the serving conversion.
* `measure`: parity, Recall@1, latency and size figures.
* `exporter`: `export_model` / `export_run`, the atomic export folder and its report.
* `serving_client`: REST and gRPC clients of TF Serving.
* `loopback_server`: an in-process PredictionService / REST server for tests and local trials.

The LiteRT-only demo is `examples/litert_retrieval.py` (no TensorFlow import).
"""

from dvml_tf.export.exporter import REPORT_FILE
from dvml_tf.export.exporter import SAVED_MODEL_DIR
from dvml_tf.export.exporter import ExportResult
from dvml_tf.export.exporter import export_model
from dvml_tf.export.exporter import export_run
from dvml_tf.export.litert import FILE_NAMES as LITERT_FILE_NAMES
from dvml_tf.export.litert import LiteRTModel
from dvml_tf.export.litert import calibration_images
from dvml_tf.export.litert import convert_embedding_model
from dvml_tf.export.loopback_server import SavedModelBackend
from dvml_tf.export.loopback_server import serve_grpc
from dvml_tf.export.loopback_server import serve_rest
from dvml_tf.export.raw_data import load_raw_splits
from dvml_tf.export.raw_input import RawInputSpec
from dvml_tf.export.raw_input import litert_model_input
from dvml_tf.export.raw_input import raw_input_spec
from dvml_tf.export.raw_input import to_model_input
from dvml_tf.export.retrieval import Retriever
from dvml_tf.export.retrieval import convert_retrieval_model
from dvml_tf.export.saved_model import EMBED_BYTES
from dvml_tf.export.saved_model import SERVING_DEFAULT
from dvml_tf.export.saved_model import EmbeddingModel
from dvml_tf.export.saved_model import write_saved_model
from dvml_tf.export.serving_client import GrpcClient
from dvml_tf.export.serving_client import RestClient
from dvml_tf.export.serving_client import ServingError

__all__ = [
    "EMBED_BYTES",
    "LITERT_FILE_NAMES",
    "REPORT_FILE",
    "SAVED_MODEL_DIR",
    "SERVING_DEFAULT",
    "EmbeddingModel",
    "ExportResult",
    "GrpcClient",
    "LiteRTModel",
    "RawInputSpec",
    "RestClient",
    "Retriever",
    "SavedModelBackend",
    "ServingError",
    "calibration_images",
    "convert_embedding_model",
    "convert_retrieval_model",
    "export_model",
    "export_run",
    "litert_model_input",
    "load_raw_splits",
    "raw_input_spec",
    "serve_grpc",
    "serve_rest",
    "to_model_input",
    "write_saved_model",
]
