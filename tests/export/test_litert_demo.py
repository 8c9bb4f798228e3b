"""examples/litert_retrieval.py: top results with labels, embeddings, and no TensorFlow import."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from dvml_tf import task
from dvml_tf.export import inference as inference_lib
from dvml_tf.export import litert
from dvml_tf.export import retrieval
from dvml_tf.testing import synthetic_data
from dvml_tf.training.config import TrainConfig
from tests import faults

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "examples", "litert_retrieval.py")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """The LiteRT part of an export (the files the demo reads)."""
    folder = tmp_path_factory.mktemp("E")
    config = TrainConfig(embedding_dim=16, loss="triplet")
    keras.utils.set_random_seed(0)
    model = task.build_model(config)
    spec = task.raw_form(config), task.preprocess_config(config)
    splits = synthetic_data.synthetic_raw_splits(*spec, train_classes=2, test_classes=5,
                                                 images_per_class=3)
    test = splits.test
    test.class_names = tuple(f"glyph_{i}" for i in range(int(test.labels.max()) + 1))
    gallery, labels = inference_lib.embed_raw(inference_lib.inference_model(model, *spec), test)
    (folder / "retrieval.tflite").write_bytes(
        retrieval.convert_retrieval_model(model, *spec, gallery, top_k=4, gallery_labels=labels))
    retrieval.write_gallery_json(folder / "retrieval_gallery.json", labels, catalog=test,
                                 dataset="omniglot", top_k=4, normalized=True)
    (folder / "model.tflite").write_bytes(litert.convert_embedding_model(model, *spec))
    (folder / "export_report.json").write_text(json.dumps({"model": {"normalized": True}}))
    return folder, test, gallery


def _run_demo(args):
    """Runs the demo in a fresh interpreter; returns its output and whether TF got imported."""
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['litert_retrieval.py', *{args!r}]\n"
        "try:\n"
        f"    runpy.run_path({DEMO!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('TENSORFLOW_IMPORTED', 'tensorflow' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("TENSORFLOW_IMPORTED False"), done.stdout
    return done.stdout


def test_query_prints_the_top_results_with_labels(export_dir, tmp_path):
    folder, test, _ = export_dir
    # The labels come from retrieval.tflite itself: the sidecar keeps only the class names.
    sidecar = folder / "retrieval_gallery.json"
    content = json.loads(sidecar.read_text())
    del content["labels"]
    sidecar.write_text(json.dumps(content))
    row = 7
    Image.fromarray(test.images[row]).save(tmp_path / "query.png")
    out = _run_demo(["--export_dir", str(folder), "--image", str(tmp_path / "query.png"),
                     "--top", "3"])
    lines = [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s+\d+", line)]
    assert len(lines) == 3
    rank, gallery_row, label, score, name = lines[0]
    assert (int(rank), int(gallery_row), int(label)) == (1, row, test.labels[row])
    assert float(score) == pytest.approx(1.0, abs=1e-3)
    assert name == f"glyph_{test.labels[row]}"
    assert "(cosine)" in out


def test_embed_prints_the_model_tflite_embedding(export_dir, tmp_path):
    folder, test, gallery = export_dir
    np.save(tmp_path / "query.npy", test.images[2])
    out = _run_demo(["--export_dir", str(folder), "--image", str(tmp_path / "query.npy"),
                     "--embed"])
    assert "model.tflite: embedding of size 16, L2 norm 1.0000" in out
    values = re.search(r"first values: \[(.*)\]", out, re.S)[1].split()
    np.testing.assert_allclose([float(v) for v in values], gallery[2, :8], atol=2e-4)


def test_other_sizes_are_resized_with_a_note(export_dir, tmp_path):
    folder, test, _ = export_dir
    Image.fromarray(test.images[0]).resize((210, 210)).save(tmp_path / "big.png")
    out = _run_demo(["--export_dir", str(folder), "--image", str(tmp_path / "big.png")])
    assert "note: resizing 210x210 to 105x105" in out


def test_images_above_the_pixel_limit_are_refused_from_their_header(export_dir, tmp_path):
    from tests.data.oversized import png_bomb
    from tests.data.oversized import run_measured

    folder, test, _ = export_dir
    (tmp_path / "bomb.png").write_bytes(png_bomb())  # 20000 x 20000 in 49 kB
    Image.fromarray(test.images[0]).resize((210, 210)).save(tmp_path / "big.png")
    np.save(tmp_path / "big.npy", np.zeros((210, 210, 3), np.uint8))
    for image, extra, message in (
        ("bomb.png", [], "bomb.png: Image size (400000000 pixels) exceeds limit of 134217728 "
                         "pixels, could be decompression bomb DOS attack. "
                         "(--max_image_pixels=67108864); downscale it first."),
        ("big.png", ["--max_image_pixels=40000"], "big.png: 210 x 210 pixels, above the limit "
                                                  "of 40000 pixels (--max_image_pixels); "
                                                  "downscale it first."),
        ("big.npy", ["--max_image_pixels=40000", "--embed"], "big.npy: 210 x 210 pixels"),
    ):
        result, peak_mb = run_measured(
            [sys.executable, DEMO, "--export_dir", str(folder), "--image", str(tmp_path / image),
             *extra], tmp_path, cwd=ROOT, timeout=120)
        assert result.returncode == 1, result.stderr
        assert message in result.stderr.strip().splitlines()[-1], result.stderr
        assert "Traceback" not in result.stderr
        assert peak_mb < 300, peak_mb  # decoding the bomb alone would take 1.2 GB
    # An export without LiteRT models (--skip_litert) is one line, not a traceback.
    result = subprocess.run([sys.executable, DEMO, "--export_dir", str(tmp_path), "--image",
                             str(tmp_path / "big.png")], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"{tmp_path}/retrieval.tflite does not exist: export without --skip_litert (export.py "
        "writes the LiteRT models next to the SavedModel).")


def test_a_pickled_npy_is_refused_unrun(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("litert_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    marker = tmp_path / "payload_ran"
    np.save(tmp_path / "query.npy", np.array([faults.PickledPayload(marker)], dtype=object),
            allow_pickle=True)
    with pytest.raises(SystemExit, match=r"query\.npy: not a numeric \.npy array \("):
        demo.load_image(str(tmp_path / "query.npy"), 16, 16)
    assert not marker.exists()
