"""index.py on bad or odd inputs, as users run it (subprocesses): images above the pixel limit
(peak memory measured), flags checked before anything loads, file names with commas or bytes
that are not UTF-8, backend options out of bounds, and SIGTERM in the middle of a build."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from dvml_tf.index import GalleryIndex
from dvml_tf.index import builder
from tests.data.oversized import png_bomb
from tests.data.oversized import run_measured
from tests.index.catalogue import PER_CLASS
from tests.index.catalogue import write_catalogue
from tests.test_index_cli import ENV
from tests.test_index_cli import ROOT
from tests.test_index_cli import STALLING_BUILD
from tests.test_index_cli import build_flags
from tests.test_index_cli import index_py
from tests.test_index_cli import wait_for

pytestmark = pytest.mark.slow

# What decoding one 20000 x 20000 image costs at least (RGB, 1.2 GB), against the margins below.
BOMB_MB = 1200


def index_py_measured(tmp_path, *args):
    """Runs index.py; returns (exit code, stdout, stderr, its own peak RSS in MB)."""
    result, peak_mb = run_measured([sys.executable, "index.py", *args], tmp_path, cwd=ROOT,
                                   env=ENV, timeout=600)
    return result.returncode, result.stdout, result.stderr, peak_mb


@pytest.fixture(scope="module")
def built_index(catalogue_export, tmp_path_factory):
    output = tmp_path_factory.mktemp("inputs") / "I"
    result = index_py(*build_flags(catalogue_export, output))
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def catalogue_image(export, name="c6_0.png"):
    return os.path.join(os.path.dirname(export.manifest), "img", name)


def test_images_above_the_pixel_limit_are_refused_unread(catalogue_export, built_index,
                                                          tmp_path):
    # The reproduction: a 20000 x 20000 PNG of 49 kB took a search to 2 GB of memory, and two
    # in a catalogue took a build to 3.25 GB.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb())
    query = catalogue_image(catalogue_export)
    code, out, err, baseline = index_py_measured(tmp_path, "search", f"--index={built_index}",
                                                 f"--images={query}")
    assert code == 0, err[-3000:]
    # Refused by index.py before sending (the default limit: the SavedModel's own).
    code, out, err, searched = index_py_measured(tmp_path, "search", f"--index={built_index}",
                                                 f"--images={bomb}", f"--images={query}")
    answers = [json.loads(line) for line in out.splitlines()]
    assert answers[0] == {"query": str(bomb), "error": "20000 x 20000 pixels, above the limit "
                          "of 67108864 pixels (--max_image_pixels)"}
    assert answers[1]["results"] and code != 0
    # With a larger limit here, the SavedModel's own in-graph check refuses it, also unread.
    code, out, err, in_graph = index_py_measured(tmp_path, "search", f"--index={built_index}",
                                                 f"--images={bomb}",
                                                 f"--max_image_pixels={10**9}")
    (answer,) = [json.loads(line) for line in out.splitlines()]
    assert answer["error"] == (
        "embed_bytes: image_bytes at index 0 (20000 x 20000 pixels) is above the limit of this "
        "model, 67108864 pixels (width x height; export.py --max_image_pixels): downscale such "
        "images before sending them.")
    # A catalogue with two of them: skipped at load time, never decoded.
    manifest, _ = write_catalogue(tmp_path / "cat")
    for name in ("bomb_a.png", "bomb_b.png"):
        shutil.copy(bomb, tmp_path / "cat" / "img" / name)
    with open(manifest, "a") as f:
        f.write("img/bomb_a.png,glyph_6,test\nimg/bomb_b.png,glyph_7,test\n")
    code, out, err, built = index_py_measured(
        tmp_path, "build", f"--saved_model={catalogue_export.version_dir}", "--dataset=csv",
        f"--data_dir={manifest}", f"--output={tmp_path / 'J'}")
    assert code == 0, err[-3000:]
    assert (f"{3 * PER_CLASS} images" in out and "2 image(s) skipped, unreadable or above "
            "--max_image_pixels (2 at load time, 0 while embedding)" in out)
    assert "Skipped 2 image file(s) above the limit of 67108864 pixels" in err
    assert GalleryIndex.load(tmp_path / "J").info["unreadable"]["count"] == 2
    # Peak memory: within a few hundred MB of a plain search, far below one decoded bomb.
    assert searched < baseline + 250 and in_graph < baseline + 250, (baseline, searched,
                                                                     in_graph)
    assert built < baseline + 400 < baseline + BOMB_MB, (baseline, built)


@pytest.mark.parametrize(("args", "message"), [
    (("search", "--k=0"), "--k must be >= 1; got 0."),
    (("search", "--batch_size=0"), "--batch_size must be >= 1; got 0."),
    (("search", "--max_image_pixels=0"), "--max_image_pixels must be >= 1; got 0."),
    (("search", "--precision=1.5"), "--precision must be in (0, 1]; got 1.5."),
    (("build", "--saved_model=E", "--output=O", "--checkpoint_images=0"),
     "--checkpoint_images must be >= 1; got 0."),
    (("build", "--saved_model=E", "--output=O", "--num_shards=2", "--shard_index=2"),
     "--shard_index must be in [0, --num_shards=2); got 2."),
    (("build", "--saved_model=E", "--output=O", "--backend_options=M"),
     "--backend_options: expected key=value pairs, got 'M'."),
])
def test_flags_are_checked_before_anything_is_loaded(tmp_path, args, message):
    # The index and the SavedModel do not exist: an error about them would mean they were
    # looked at before the flag.
    args = [arg.replace("=E", f"={tmp_path}/E").replace("=O", f"={tmp_path}/O") for arg in args]
    if args[0] == "search":
        args += [f"--index={tmp_path}/missing", "--images=q.png"]
    result = index_py(*args)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"index.py: error: {message}"


def test_backend_options_out_of_bounds_fail_before_embedding(catalogue_export, tmp_path):
    output = tmp_path / "I"
    result = index_py(*build_flags(catalogue_export, output, "--backend=hnsw",
                                   "--backend_options=M=100000000"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "index.py: error: backend_options['M'] must be an int in [1, 256]; got 100000000 (each "
        "row keeps 2M links: 8M bytes).")
    assert "Embedded" not in result.stderr and not os.path.exists(builder.staging_path(output))


def test_query_files_with_commas_repeated_flags_and_a_list(catalogue_export, built_index,
                                                           tmp_path):
    comma = tmp_path / "a,comma.png"
    shutil.copy(catalogue_image(catalogue_export, "c7_0.png"), comma)
    other = catalogue_image(catalogue_export, "c8_0.png")
    # A value naming an existing file is one path, commas and all; --images repeats.
    result = index_py("search", f"--index={built_index}", "--k=1", f"--images={comma}",
                      f"--images={other}")
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["query"] for a in answers] == [str(comma), other]
    assert [a["results"][0]["class_name"] for a in answers] == ["glyph_7", "glyph_8"]
    # One path per line; the same answers.
    listing = tmp_path / "queries.txt"
    listing.write_text(f"{comma}\n\n{other}\n")
    listed = index_py("search", f"--index={built_index}", "--k=1", f"--image_list={listing}")
    assert listed.returncode == 0 and listed.stdout == result.stdout
    # The older comma-separated form still works for names without commas.
    joined = index_py("search", f"--index={built_index}", "--k=1",
                      f"--images={other},{catalogue_image(catalogue_export, 'c6_1.png')}")
    assert [json.loads(line)["query"] for line in joined.stdout.splitlines()] == [
        other, catalogue_image(catalogue_export, "c6_1.png")]


def test_names_that_are_not_utf8_are_indexed_and_searched(catalogue_export, tmp_path):
    from PIL import Image

    root = os.fsencode(tmp_path / "folder")
    for c, cls in enumerate((b"caf\xe9", b"plain", b"\xff\xfeodd", b"zeta")):
        os.makedirs(os.path.join(root, cls))
        for i in range(2):
            Image.new("RGB", (12, 12), (60 * c, 100 * i, 20)).save(
                os.path.join(root, cls, b"img\xe9%d.png" % i))
    output = tmp_path / "I"
    result = index_py("build", f"--saved_model={catalogue_export.version_dir}",
                      "--dataset=folder", f"--data_dir={tmp_path / 'folder'}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    query = os.path.join(root, b"zeta", b"img\xe90.png")
    search = subprocess.run([sys.executable, "index.py", "search", f"--index={output}", "--k=1",
                             b"--images=" + query], cwd=ROOT, env=ENV, capture_output=True)
    assert search.returncode == 0, search.stderr[-3000:]
    (answer,) = [json.loads(line) for line in search.stdout.splitlines()]
    # JSON escapes the bytes as lone surrogates, which os.fsencode turns back into the name.
    assert os.fsencode(answer["query"]) == query
    assert os.fsencode(answer["results"][0]["path"]) == query
    assert os.fsencode(answer["results"][0]["class_name"]) == b"zeta"


def test_sigterm_during_a_build_says_what_was_kept_and_the_build_resumes(catalogue_export,
                                                                         tmp_path):
    output = tmp_path / "I"
    flag = tmp_path / "stalled"
    flags_ = build_flags(catalogue_export, output, "--batch_size=2", "--checkpoint_images=4")
    stalling = subprocess.Popen([sys.executable, "-c", STALLING_BUILD, str(flag), *flags_],
                                cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        wait_for(flag, stalling)
        stalling.send_signal(signal.SIGTERM)
        _, stderr = stalling.communicate(timeout=120)
    finally:
        if stalling.poll() is None:
            stalling.kill()
    assert stalling.returncode == 143
    staging = builder.staging_path(output)
    assert stderr.strip().splitlines()[-1] == (
        f"index.py: terminated (SIGTERM); 4 embedded images (1 checkpoint(s) of "
        f"--checkpoint_images=4) are kept in {staging}, and {output} was not written; run the "
        "same command again to resume from them.")
    assert "Traceback" not in stderr and not output.exists()
    resumed = index_py(*flags_)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming: 4 of {3 * PER_CLASS} images are embedded already" in resumed.stderr
    assert GalleryIndex.load(output).ids.tolist() == list(range(3 * PER_CLASS))
    assert not pathlib.Path(staging).exists()
