"""On-device retrieval with LiteRT only: no TensorFlow, just numpy, Pillow and ai-edge-litert.

    python examples/litert_retrieval.py --export_dir=E --image=query.png            # top-k
    python examples/litert_retrieval.py --export_dir=E --image=query.png --embed    # embedding
    python examples/litert_retrieval.py --export_dir=E --image=q.png --embed \
        --model=model_int8.tflite

`E` is a folder written by export.py. The query image is read with Pillow as RGB in the dataset's
raw form (Omniglot: dark strokes on white, 105 x 105); an image of another size is resized with
Pillow's bilinear filter first (close to, but not exactly, the loader's resize). A `.npy` file
holding a uint8 [H, W, 3] array is used as is. An image above --max_image_pixels (width x
height, default 8192 x 8192) is refused from its header, before it is decoded.

Query mode runs `retrieval.tflite` (gallery embeddings and labels inside) and prints the top
results with their labels and the class names of `retrieval_gallery.json`; embed mode runs an
embedding model and prints the vector's size, norm and first values.

A LiteRT file may be older than `export_report.json` (a re-export with `--skip_litert` keeps the
LiteRT files of the earlier export; the report lists them under `files_from_earlier_exports`):
the demo then says so and reads the report of the export that wrote the file, kept in
`saved_model/<version>/assets.extra/export_report.json`.
"""

import argparse
import json
import os
import sys
import warnings

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

SIGNATURE = "serving_default"
# dvml_tf.data.pixel_limit.DEFAULT_MAX_PIXELS (this demo does not import dvml_tf): the largest
# image (width x height) decoded; a small file can decode to gigabytes.
DEFAULT_MAX_PIXELS = 8192 * 8192


def _too_large(path, width, height, max_pixels):
    return SystemExit(f"{path}: {width} x {height} pixels, above the limit of {max_pixels} "
                      "pixels (--max_image_pixels); downscale it first.")


def load_image(path, height, width, max_pixels=DEFAULT_MAX_PIXELS):
    """A uint8 [1, height, width, 3] RGB array from an image file or a .npy array; an image
    above `max_pixels` (width x height, read from its header) is refused before decoding."""
    if path.endswith(".npy"):
        try:  # the header only: no pixel is read yet; never a pickle (it could run code)
            image = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as error:
            raise SystemExit(f"{path}: not a numeric .npy array ({error}).") from None
        if image.ndim >= 2 and image.shape[0] * image.shape[1] > max_pixels:
            raise _too_large(path, image.shape[1], image.shape[0], max_pixels)
        image = np.asarray(image)
    else:
        # PIL's own guard refuses (at twice its limit) or warns first; ours says which flag.
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                file = Image.open(path)
        except Image.DecompressionBombError as error:  # its message gives the pixel count
            raise SystemExit(f"{path}: {error} (--max_image_pixels={max_pixels}); downscale it "
                             "first.") from None
        with file:
            if file.width * file.height > max_pixels:
                raise _too_large(path, file.width, file.height, max_pixels)
            picture = file.convert("RGB")
            if picture.size != (width, height):
                print(f"note: resizing {picture.size[0]}x{picture.size[1]} to {width}x{height}")
                picture = picture.resize((width, height), Image.BILINEAR)
            image = np.asarray(picture)
    if image.dtype != np.uint8 or image.shape != (height, width, 3):
        raise SystemExit(f"{path}: need a uint8 [{height}, {width}, 3] image; got {image.dtype} "
                         f"{image.shape}.")
    return image[np.newaxis]


def run(model_path, image_path, max_pixels=DEFAULT_MAX_PIXELS):
    """Runs a LiteRT model's serving_default signature on one image; returns its outputs."""
    if not os.path.isfile(model_path):
        raise SystemExit(f"{model_path} does not exist: export without --skip_litert (export.py "
                         "writes the LiteRT models next to the SavedModel).")
    interpreter = Interpreter(model_path=model_path)
    runner = interpreter.get_signature_runner(SIGNATURE)
    _, height, width, _ = runner.get_input_details()["images"]["shape"]
    return runner(images=load_image(image_path, int(height), int(width), max_pixels))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def report_for(export_dir, file_name):
    """The export report that describes `file_name` of E, and a note when it is not E's own.

    Args:
        export_dir: the export folder.
        file_name: e.g. "model_int8.tflite".

    Returns:
        (report dict or None, note str or None).
    """
    report = _read_json(os.path.join(export_dir, "export_report.json"))
    if not isinstance(report, dict):
        return None, None
    earlier = (report.get("files_from_earlier_exports") or {}).get(file_name)
    if earlier is None:
        return report, None
    version = earlier.get("version")
    own = _read_json(os.path.join(export_dir, "saved_model", str(version), "assets.extra",
                                  "export_report.json"))
    note = (f"note: {file_name} was written by the export of version {version}; "
            f"export_report.json describes version {report.get('version')}")
    if isinstance(own, dict):
        return own, note + f": using version {version}'s report."
    return None, note + f", and version {version}'s report is gone."


def query(export_dir, image_path, top, max_pixels=DEFAULT_MAX_PIXELS):
    _, note = report_for(export_dir, "retrieval.tflite")
    if note:
        print(note)
    outputs = run(os.path.join(export_dir, "retrieval.tflite"), image_path, max_pixels)
    with open(os.path.join(export_dir, "retrieval_gallery.json")) as f:
        gallery = json.load(f)
    names = gallery.get("class_names", {})
    indices, scores = outputs["indices"][0], outputs["scores"][0]
    # Exports since the labels moved into the model carry them as an output; older ones only
    # in the sidecar JSON.
    labels = (outputs["labels"][0] if "labels" in outputs
              else [gallery["labels"][int(row)] for row in indices])
    print(f"Top {min(top, len(indices))} of {gallery['num_images']} {gallery['dataset']} "
          f"{gallery['split']} images ({gallery['score']}):")
    print(f"{'rank':>4}  {'row':>6}  {'label':>6}  {'score':>10}  class")
    for rank, (row, score, label) in enumerate(
            zip(indices[:top], scores[:top], labels[:top], strict=True), start=1):
        label = int(label)
        print(f"{rank:>4}  {int(row):>6}  {label:>6}  {float(score):>10.4f}  "
              f"{names.get(str(label), label)}")
    return indices, scores


def embed(export_dir, image_path, model_name, max_pixels=DEFAULT_MAX_PIXELS):
    path = os.path.join(export_dir, model_name)
    embedding = run(path, image_path, max_pixels)["embedding"][0].astype(np.float64)
    report, note = report_for(export_dir, model_name)
    if note:
        print(note)
    if report is not None:
        normalized = report["model"]["normalized"]
    else:
        # The gallery sidecar is written with the LiteRT files, by the same export.
        gallery = _read_json(os.path.join(export_dir, "retrieval_gallery.json")) or {}
        normalized = bool(gallery.get("normalized", False))
        if note:
            print(f"note: {'normalizing' if normalized else 'not normalizing'} as "
                  "retrieval_gallery.json says.")
    if normalized and "int8" in model_name:
        # The full-integer model stops before the L2 normalization (see export_report.json).
        embedding = embedding / max(np.linalg.norm(embedding), 1e-12)
    print(f"{model_name}: embedding of size {embedding.size}, L2 norm "
          f"{np.linalg.norm(embedding):.4f}")
    print("first values:", np.array2string(embedding[:8], precision=4))
    return embedding


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export_dir", required=True, help="folder written by export.py")
    parser.add_argument("--image", required=True, help="query image (PNG/JPEG/... or .npy)")
    parser.add_argument("--embed", action="store_true", help="print the embedding instead")
    parser.add_argument("--model", default="model.tflite", help="embedding model (--embed)")
    parser.add_argument("--top", type=int, default=5, help="results to print")
    parser.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="largest image decoded (width x height, read from its header)")
    args = parser.parse_args(argv)
    if args.max_image_pixels < 1:
        parser.error(f"--max_image_pixels must be >= 1; got {args.max_image_pixels}")
    if args.embed:
        embed(args.export_dir, args.image, args.model, args.max_image_pixels)
    else:
        query(args.export_dir, args.image, args.top, args.max_image_pixels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
