"""The embedding contract: which model produced the vectors of an index.

Vectors of two models live in unrelated spaces: searching an index with another model's query
embeddings returns confident nonsense, not an error. An index therefore stores a *contract*, a
JSON dict describing the model it was built with, e.g.

    {"fingerprint": "sha256:...", "weights": "sha256:...", "dim": 512, "normalized": True,
     "metric": "cosine", "version": 3, "saved_model": "exports/sop/saved_model/3"}

and `GalleryIndex.check_contract` compares it with the contract of the model producing queries.
The fingerprint covers what the model computes (`FINGERPRINT_FIELDS`): the digest of its weights
(`dvml_tf.export.fingerprint.weights_digest`), the preprocessing of the raw input and the output
(dimension, normalisation, metric). It does not cover the version number, the path, the training
metadata or the machine: the same weights exported again as version 2, or copied elsewhere, keep
their fingerprint; retrained weights get another one. `version` and `saved_model` are informative.
"""

import hashlib
import json

# What an embedding depends on, hence what the fingerprint covers.
FINGERPRINT_FIELDS = ("weights", "raw_input", "dim", "normalized", "metric")


def _json_safe(value, name):
    """Canonical JSON of `value`, or a ValueError naming `name` when it is not JSON data."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must hold JSON data (str, number, bool, None, list, dict): "
                         f"{error}") from None


def embedding_contract_fields(report):
    """The fields of an export report (or of a plain dict) that define its embeddings.

    Args:
        report: an export report (``export_report.json`` of ``export.py``, with a "model"
            section holding "weights", "embedding_dim" and "normalized") or a flat dict with
            "weights", "dim" and "normalized". Optional: "metric" (default: "cosine" for
            normalised embeddings, else "euclidean") and "raw_input", at the top level or in
            "model".

    Returns:
        dict with "weights", "dim" (int), "normalized" (bool), "metric" and, when present,
        "raw_input".

    Raises:
        ValueError: if `report` is not a dict, or "weights", "dim"/"embedding_dim" or
            "normalized" is missing or has the wrong type.
    """
    if not isinstance(report, dict):
        raise ValueError(f"report must be a dict; got {type(report).__name__}.")
    model = report.get("model")
    model = model if isinstance(model, dict) else {}

    def pick(*names):
        for source in (report, model):
            for name in names:
                if source.get(name) is not None:
                    return source[name]
        return None

    weights = pick("weights")
    if not isinstance(weights, str) or not weights:
        raise ValueError(
            "report must record the digest of the model's weights in 'weights' or "
            "'model.weights' (export.py writes it; dvml_tf.export.fingerprint.weights_digest "
            f"computes it from a SavedModel); got {weights!r}."
        )
    dim = pick("dim", "embedding_dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(
            "report must give the embedding size as an int >= 1 in 'dim' or "
            f"'model.embedding_dim'; got {dim!r}."
        )
    normalized = pick("normalized")
    if not isinstance(normalized, bool):
        raise ValueError(
            "report must say whether the embeddings are L2-normalised as a bool in 'normalized' "
            f"or 'model.normalized'; got {normalized!r}."
        )
    fields = {"weights": weights, "dim": dim, "normalized": normalized,
              "metric": pick("metric") or ("cosine" if normalized else "euclidean")}
    raw_input = pick("raw_input")
    if raw_input is not None:
        fields["raw_input"] = raw_input
    return fields


def contract_fingerprint(report):
    """SHA-256 of the canonical JSON of a report's embedding contract fields.

    Two reports get the same fingerprint exactly when `embedding_contract_fields` gives equal
    dicts: same weights, input preprocessing, dimension, normalisation and metric. Key order
    and JSON formatting do not matter (keys are sorted, separators fixed), so a report read back
    from its JSON file gives the fingerprint of the in-memory report that was written.

    Args:
        report: see `embedding_contract_fields`.

    Returns:
        str ``"sha256:<64 hex digits>"``.

    Raises:
        ValueError: as `embedding_contract_fields`, or if a field holds non-JSON data.
    """
    canonical = _json_safe(embedding_contract_fields(report), "report")
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def contract_from_report(report, saved_model=None):
    """A contract for `GalleryIndex(contract=...)` built from an export report.

    Args:
        report: see `embedding_contract_fields`; its "version" (top level), when present, is
            kept as information.
        saved_model: optional path of the SavedModel the embeddings came from (informative).

    Returns:
        dict with "fingerprint", "weights", "dim", "normalized", "metric", and "version" and
        "saved_model" when known.
    """
    fields = embedding_contract_fields(report)
    contract = {"fingerprint": contract_fingerprint(report),
                **{key: fields[key] for key in ("weights", "dim", "normalized", "metric")}}
    if isinstance(report, dict) and report.get("version") is not None:
        contract["version"] = report["version"]
    if saved_model is not None:
        contract["saved_model"] = str(saved_model)
    return contract


def validate_contract(contract, dim, metric):
    """Checks a contract given to `GalleryIndex` and returns a private copy.

    Args:
        contract: dict or None.
        dim: the index dimension.
        metric: the index metric.

    Returns:
        a deep copy of `contract` (through JSON, so that it round-trips through index.json
        unchanged), or None.

    Raises:
        ValueError: if `contract` is not a JSON dict, or its "dim" or "metric" contradicts the
            index's.
    """
    if contract is None:
        return None
    if not isinstance(contract, dict):
        raise ValueError(f"contract must be a dict or None; got {type(contract).__name__}.")
    contract = json.loads(_json_safe(contract, "contract"))
    if "dim" in contract and contract["dim"] != dim:
        raise ValueError(f"contract has dim={contract['dim']!r} but the index has dim={dim}.")
    if "metric" in contract and contract["metric"] != metric:
        raise ValueError(
            f"contract has metric={contract['metric']!r} but the index has metric={metric!r}."
        )
    return contract


def predates_weights(stored, given):
    """Whether `stored` is a contract written before the fingerprint covered the weights (it
    cannot be compared with `given`, which does)."""
    return bool(stored and stored.get("fingerprint") and not stored.get("weights")
                and given.get("weights"))


def fingerprint_difference(stored, given):
    """Why two contracts' fingerprints differ, in words: other weights, or the same weights with
    another preprocessing or output."""
    if not stored.get("weights") or not given.get("weights"):
        return ""
    if stored["weights"] != given["weights"]:
        return "other weights: another or a retrained model"
    return "the same weights with another input preprocessing or output"


def contract_mismatches(stored, given, dim, metric):
    """Why `given` does not describe the model of an index built under `stored`.

    Args:
        stored: the index's contract (dict or None).
        given: the contract of the model producing queries.
        dim: the index dimension.
        metric: the index metric.

    Returns:
        list of str, one per problem; empty when the contracts agree.

    Raises:
        ValueError: if `given` is not a dict.
    """
    if not isinstance(given, dict):
        raise ValueError(f"contract must be a dict; got {type(given).__name__}.")
    if stored is None:
        return ["the index was built without a contract, so nothing proves which model its "
                "vectors came from (rebuild it with GalleryIndex(..., contract=...))"]
    problems = []
    if not given.get("fingerprint"):
        problems.append("the given contract has no 'fingerprint'")
    elif not stored.get("fingerprint"):
        problems.append("the index's contract has no 'fingerprint'")
    elif predates_weights(stored, given):
        problems.append(
            "the index was built by an older dvml_tf whose fingerprint did not cover the "
            "model's weights, so nothing proves which weights built it (rebuild it: index.py "
            "build --overwrite)"
        )
    elif given["fingerprint"] != stored["fingerprint"]:
        why = fingerprint_difference(stored, given)
        problems.append(
            f"fingerprint {given['fingerprint']} != the index's {stored['fingerprint']}"
            + (f" ({why})" if why else "")
        )
    if given.get("dim") is not None and given["dim"] != dim:
        problems.append(f"dim {given['dim']!r} != the index's {dim}")
    if given.get("metric") is not None and given["metric"] != metric:
        problems.append(f"metric {given['metric']!r} != the index's {metric!r}")
    # "normalized" describes the model's output, so it is compared with the build contract, not
    # with the index's own `normalize` flag (a Euclidean index may hold unit vectors unchanged).
    if (given.get("normalized") is not None and stored.get("normalized") is not None
            and given["normalized"] != stored["normalized"]):
        problems.append(
            f"normalized {given['normalized']!r} != the index's {stored['normalized']!r}"
        )
    return problems
