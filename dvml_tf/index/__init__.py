"""Gallery indexes for retrieval: exact or approximate (faiss) search over stored embeddings,
with ids, labels, metadata, atomic save/load and the contract of the model that produced them.

Only numpy is needed for the exact `flat` backend; `hnsw` and `ivf_pq` import faiss when used.

The modules that use TensorFlow are imported by name, not here (a serving process that only
loads and searches an index needs numpy and faiss):

* `builder`: `build_index` / `merge_shards`, an index of a dataset split embedded through an
  exported SavedModel (`index.py build` / `merge`), resumable, sharded, locked, atomic.
* `query`: `QueryEmbedder`, `search_files`: image files -> labelled, matched results
  (`index.py search`), through the SavedModel or TF Serving.
* `matching`: open-set match thresholds (`evaluate.py --calibrate`).
* `evaluation`: Recall@K and MAP@R through an index (`evaluate.py --index`).
"""

from dvml_tf.index.backends import BACKENDS
from dvml_tf.index.contract import contract_fingerprint
from dvml_tf.index.contract import contract_from_report
from dvml_tf.index.contract import embedding_contract_fields
from dvml_tf.index.gallery_index import FORMAT_VERSION
from dvml_tf.index.gallery_index import PAD_INT_ID
from dvml_tf.index.gallery_index import PAD_STR_ID
from dvml_tf.index.gallery_index import GalleryIndex

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "PAD_INT_ID",
    "PAD_STR_ID",
    "GalleryIndex",
    "contract_fingerprint",
    "contract_from_report",
    "embedding_contract_fields",
]
