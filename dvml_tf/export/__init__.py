"""Export: the SavedModel for TF Serving, LiteRT models, on-device retrieval, serving clients.

    result = export_run("runs/omniglot_npair_dvml_seed0", "exports/omniglot")   # = export.py
    client = RestClient("http://localhost:8501", model_name="dvml")
    embeddings = client.embed(raw_images)          # uint8 [N, H, W, 3] in the dataset's raw form

Modules (one concept each):

* `inference`: the one inference model every export converts, `keras.Sequential([raw-form
  preprocessing, model.embedder])`, and embedding a raw catalog through it.
* `saved_model`: the serving SavedModel (`serving_default`, `embed_bytes`) via ExportArchive.
* `litert`: float32, dynamic-range and full-integer LiteRT embedding models.
* `retrieval`: `retrieval.tflite` (gallery baked in) and its `retrieval_gallery.json`.
* `layout`: the export folder's file names and its SavedModel versions.
* `exporter`: `export_model` / `export_run`: writes the artifacts and their contracts.
* `fingerprint`: `weights_digest`, the digest of a SavedModel's variables that an index's
  contract fingerprint covers.
* `verify`: grades an export (parity with Keras, Recall@1, latency).
* `serving_client`: REST and gRPC clients of TF Serving.

The raw input form itself is the data layer's (`data.RawForm`, `data.RawImagePreprocessor`).
A test double of TF Serving is `dvml_tf.testing.serving`; the LiteRT-only demo is
`examples/litert_retrieval.py` (no TensorFlow import).
"""

from dvml_tf.export.exporter import ExportResult
from dvml_tf.export.exporter import export_model
from dvml_tf.export.exporter import export_run
from dvml_tf.export.fingerprint import weights_digest
from dvml_tf.export.inference import embed_raw
from dvml_tf.export.inference import inference_model
from dvml_tf.export.layout import REPORT_FILE
from dvml_tf.export.layout import SAVED_MODEL_DIR
from dvml_tf.export.layout import resolve_saved_model
from dvml_tf.export.litert import FILE_NAMES as LITERT_FILE_NAMES
from dvml_tf.export.litert import LiteRTModel
from dvml_tf.export.litert import convert_embedding_model
from dvml_tf.export.retrieval import Retriever
from dvml_tf.export.retrieval import convert_retrieval_model
from dvml_tf.export.saved_model import EMBED_BYTES
from dvml_tf.export.saved_model import SERVING_DEFAULT
from dvml_tf.export.saved_model import write_saved_model
from dvml_tf.export.serving_client import GrpcClient
from dvml_tf.export.serving_client import RestClient
from dvml_tf.export.serving_client import ServingError
from dvml_tf.export.verify import verify_export

__all__ = [
    "EMBED_BYTES",
    "LITERT_FILE_NAMES",
    "REPORT_FILE",
    "SAVED_MODEL_DIR",
    "SERVING_DEFAULT",
    "ExportResult",
    "GrpcClient",
    "LiteRTModel",
    "RestClient",
    "Retriever",
    "ServingError",
    "convert_embedding_model",
    "convert_retrieval_model",
    "embed_raw",
    "export_model",
    "export_run",
    "inference_model",
    "resolve_saved_model",
    "verify_export",
    "weights_digest",
    "write_saved_model",
]
