"""The digest of a SavedModel's weights: what makes two exports the same model or not.

The embedding contract of an index (`dvml_tf.index.contract`) must change when the weights
change (a retrained run exported into the same folder) and must not change when the same
weights are exported again under another version number or path. Its weights part is this
digest:

    weights_digest("E/saved_model/3")   # "sha256:..."

It hashes every variable of the SavedModel, each as (name, dtype, shape, bytes), in a canonical
order: sorted by variable name, ties (two variables of one name) by their content. The order in
which TensorFlow happens to store the variables (``_all_variables/N``, which differs from one
export of the same model to the next) plays no part, nor does anything else of the folder
(paths, time stamps, the report).
"""

import hashlib
import os

import tensorflow as tf
from google.protobuf import message
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.core.protobuf import trackable_object_graph_pb2

_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VALUE_ATTRIBUTE = "VARIABLE_VALUE"


def _variable_names(version_dir):
    """{node id: variable name} of the SavedModel's object graph."""
    path = os.path.join(version_dir, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    if not proto.meta_graphs:
        raise ValueError(f"{path} holds no MetaGraph.")
    nodes = proto.meta_graphs[0].object_graph_def.nodes
    return {i: node.variable.name for i, node in enumerate(nodes)
            if node.WhichOneof("kind") == "variable"}


def weights_digest(version_dir):
    """SHA-256 of a SavedModel's variables, independent of where and when it was exported.

    Args:
        version_dir: a SavedModel folder (saved_model.pb, variables/).

    Returns:
        str ``"sha256:<64 hex digits>"``.

    Raises:
        ValueError: the SavedModel's files cannot be read (the message names the folder).
    """
    version_dir = os.fspath(version_dir)
    try:
        names = _variable_names(version_dir)
        if not names:
            return "sha256:" + hashlib.sha256(b"no variables").hexdigest()
        reader = tf.train.load_checkpoint(os.path.join(version_dir, "variables", "variables"))
        # The checkpoint's object graph numbers its nodes as the SavedModel's does (both are the
        # saved object graph), which maps each variable name to its checkpoint key.
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
        entries = []
        for node_id, name in names.items():
            keys = [a.checkpoint_key for a in graph.nodes[node_id].attributes
                    if a.name == _VALUE_ATTRIBUTE]
            if len(keys) != 1:
                raise ValueError(f"variable {name!r} has {len(keys)} stored values")
            value = reader.get_tensor(keys[0])
            data = (b"\0".join(value.ravel().tolist()) if value.dtype == object
                    else value.tobytes())  # string variables come back as bytes objects
            content = hashlib.sha256(data).hexdigest()
            entries.append(f"{name}\0{value.dtype.str}\0{list(value.shape)}\0{content}")
    except (OSError, ValueError, IndexError, message.DecodeError, tf.errors.OpError) as error:
        text = getattr(error, "message", None) or str(error)
        raise ValueError(f"Cannot read the weights of the SavedModel {version_dir}: "
                         f"{text.splitlines()[0] if text else type(error).__name__}. Export "
                         "the run again.") from None
    digest = hashlib.sha256("\n".join(sorted(entries)).encode("utf-8"))
    return "sha256:" + digest.hexdigest()
