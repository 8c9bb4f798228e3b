"""Searching an index with image files (`index.py search`): embed, search, label, match.

    index = GalleryIndex.load("indexes/omniglot")
    embedder = QueryEmbedder.from_saved_model(index)            # the index's own SavedModel
    # or through TF Serving:  QueryEmbedder.from_serving(index, "http://localhost:8501")
    answers = search_files(index, embedder, ["a.png", "b.jpg"], k=5, precision=0.95)

Each answer is `{"query": path, "results": [{"id", "label", "class_name", "score", "matched",
"path"?}, ...]}`, or `{"query": path, "error": message}` for a file that cannot be read or
decoded, or whose header says it is above the pixel limit (`data.pixel_limit`: such a file is
never decoded nor sent); the other queries are still answered.

The embedding model must be the one the index was built with: a local SavedModel is
fingerprinted (its weights, input preprocessing and output: `builder.load_model`) and compared
with the index's contract (`GalleryIndex.check_contract`), and a different model is refused; the
same weights exported under another version number are accepted. Through TF Serving the request
names the version the index was built with (`/v1/models/<name>/versions/<v>`), and the answer's
dimension must match; TF Serving's answer carries no fingerprint, so a different model served
under the same name and version number cannot be detected there.

`matched` marks the results whose score reaches the threshold of the chosen target precision
(`evaluate.py --calibrate`, `dvml_tf.index.matching`). The thresholds come from the SavedModel's
report (its current calibration) or, through TF Serving, from the copy the index took at build
time. An uncalibrated model gives `matched: null`.
"""

import dataclasses
import urllib.error

import numpy as np
import tensorflow as tf

from dvml_tf.data import pixel_limit
from dvml_tf.evaluation import runner
from dvml_tf.export import layout
from dvml_tf.index import builder
from dvml_tf.index import matching as matching_lib


@dataclasses.dataclass
class QueryEmbedder:
    """Embeds encoded image files for one index.

    Args:
        embed_fn: callable list of bytes -> float32 [n, D].
        errors: exception types meaning "this image was refused".
        matching: the model's "matching" report section (thresholds), or None.
        source: what embeds (for messages).
        max_pixels: the pixel limit of the queries (width x height): the model's own.
    """

    embed_fn: object
    errors: tuple
    matching: dict | None
    source: str
    max_pixels: int = pixel_limit.DEFAULT_MAX_PIXELS

    @classmethod
    def from_saved_model(cls, index, saved_model=None):
        """The SavedModel the index was built with (or `saved_model`, which must be that model,
        e.g. the same export copied elsewhere).

        Raises:
            ValueError: the model is not the index's (contract mismatch), or the index does
                not say which SavedModel built it.
        """
        contract = index.contract or {}
        path = saved_model or contract.get("saved_model")
        if not path:
            raise ValueError("The index does not record the SavedModel it was built with; "
                             "pass --saved_model.")
        try:
            version_dir, report, model_contract, _ = builder.load_model(path)
        except FileNotFoundError as error:
            if saved_model:
                raise
            raise FileNotFoundError(
                f"The index was built with the SavedModel {path}, which is not there any more "
                f"({error}); pass --saved_model=<where that export is now>, or --serving_url."
            ) from None
        index.check_contract(model_contract)
        signature = runner.load_embed_bytes(version_dir)
        return cls(lambda encoded: runner.run_embed_bytes(signature, encoded),
                   (tf.errors.OpError,), report.get("matching"), version_dir,
                   layout.max_image_pixels(report))

    @classmethod
    def from_serving(cls, index, url, model_name="dvml", timeout=60.0):
        """TF Serving's REST API, asked for the version the index was built with."""
        from dvml_tf.export import serving_client

        version = (index.contract or {}).get("version")
        client = serving_client.RestClient(url, model_name=model_name, version=version,
                                           timeout=timeout)

        def embed(encoded):
            try:
                return client.embed_bytes(encoded)
            except urllib.error.URLError as error:
                raise ConnectionError(f"Cannot reach TF Serving at {client.model_url}: "
                                      f"{error.reason}") from None

        return cls(embed, (serving_client.ServingError,), (index.info or {}).get("matching"),
                   client.model_url)


def read_files(paths):
    """The bytes of each file, or an error message.

    Returns:
        (list of bytes or None, {i: message}).
    """
    contents, errors = [], {}
    for i, path in enumerate(paths):
        try:
            with open(path, "rb") as f:
                contents.append(f.read())
        except OSError as error:
            contents.append(None)
            errors[i] = f"cannot read {path}: {error.strerror}"
    return contents, errors


def search_files(index, embedder, paths, k=5, precision=None, max_pixels=None):
    """Searches the index with image files.

    Args:
        index: a `GalleryIndex` built by `builder.build_index` (labels, info).
        embedder: `QueryEmbedder`.
        paths: image file paths.
        k: results per query.
        precision: target precision of the matching threshold (None: 0.95 when calibrated
            for it, else the highest calibrated one).
        max_pixels: the pixel limit (width x height) of the queries; default: the embedder's.

    Returns:
        list of dicts, one per path (see the module docstring).

    Raises:
        ValueError: k < 1, or `precision` is not calibrated.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"--k must be an int >= 1; got {k!r}.")
    _, threshold = matching_lib.choose_threshold(embedder.matching, precision)
    calibrated = bool((embedder.matching or {}).get("thresholds"))
    contents, errors = read_files(paths)
    readable = [i for i, item in enumerate(contents) if item is not None]
    vectors = np.full((len(paths), index.dim), np.nan, np.float32)
    if readable:
        vectors[readable], failed = builder.embed_each(
            embedder.embed_fn, [contents[i] for i in readable], index.dim, embedder.errors,
            max_pixels or embedder.max_pixels)
        errors.update({readable[i]: message for i, message in failed.items()})
    good = [i for i in range(len(paths)) if i not in errors]
    answers = [{"query": str(path), "error": errors[i]} if i in errors else None
               for i, path in enumerate(paths)]
    if not good:
        return answers
    ids, scores = index.search(vectors[good], k)
    info = index.info or {}
    names = info.get("class_names") or {}
    for row, i in enumerate(good):
        found = ids[row] >= 0 if ids.dtype.kind == "i" else ids[row] != ""
        hit_ids, hit_scores = ids[row][found], scores[row][found]
        labels = index.get_labels(hit_ids) if index.has_labels else [None] * len(hit_ids)
        metadata = index.get_metadata(hit_ids)
        results = []
        for id_, label, score, meta in zip(hit_ids.tolist(), labels, hit_scores.tolist(),
                                           metadata, strict=True):
            label = None if label is None else int(label)
            result = {
                "id": id_,
                "label": label,
                "class_name": names.get(str(label), None if label is None else str(label)),
                "score": float(score),
                "matched": (None if not calibrated
                            else threshold is not None and score >= threshold),
            }
            if "path" in meta:
                result["path"] = meta["path"]
            results.append(result)
        answers[i] = {"query": str(paths[i]), "results": results}
    return answers
