"""glyph_builder on DejaVu fonts: what is kept and rejected, designs, splits, the shared
augmentations (checked on the pixels), determinism, and the command line's errors."""

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest

from dvml_tf.data import glyph_builder
from dvml_tf.data import glyph_render
from dvml_tf.data import glyphs
from tests.data import fonts

SPLITS = glyph_builder.SplitSizes(train=0, validation=10, test=20, pretrain=10)


def spec(font_paths, characters=fonts.LETTERS, **overrides):
    values = dict(fonts=tuple(font_paths),
                  characters=glyph_builder.parse_characters(characters),
                  image_size=16, min_designs=2, splits=SPLITS)
    values.update(overrides)
    return glyph_builder.BuildSpec(**values)


def quiet(_):
    pass


def build(font_paths, output, processes=1, **overrides):
    return glyph_builder.build(spec(font_paths, **overrides), output, processes=processes,
                               log=quiet)


@pytest.fixture(scope="module")
def dejavu(tmp_path_factory):
    """A glyph folder from four DejaVu faces and a collection of two more, plus U+4E00."""
    root = tmp_path_factory.mktemp("dejavu")
    font_dir = fonts.dejavu_folder(str(root / "fonts"), fonts.DEJAVU[:4])
    fonts.collection(str(root / "fonts" / "pair.ttc"), (fonts.DEJAVU[4], fonts.DEJAVU[9]))
    output = str(root / "glyphs")
    manifest = build([font_dir], output, characters=f"{fonts.LETTERS},U+4E00")
    return output, manifest, font_dir


def test_every_face_of_every_file_draws_and_u4e00_is_never_drawn(dejavu):
    _, manifest, _ = dejavu
    assert manifest["counts"]["faces"] == 6 and len(manifest["fonts"]) == 5
    pair = [f for f in manifest["faces"] if manifest["fonts"][f["file"]]["path"].endswith(
        "pair.ttc")]
    assert [f["index"] for f in pair] == [0, 1] and all(f["design"] is not None for f in pair)
    assert manifest["counts"]["designs"] == 6
    characters = {c["character"] for c in manifest["characters"]}
    assert "一" not in characters  # U+4E00: no DejaVu face maps it, so it is no class
    assert manifest["arguments"]["characters_requested"] == len(
        glyph_builder.parse_characters(fonts.LETTERS)) + 1


def test_look_alikes_across_scripts_are_no_classes(dejavu):
    """Latin A, Greek Alpha and Cyrillic A are one picture in DejaVu: two classes with one
    picture would be label noise, so each face rejects them (and each design's images of
    different classes all differ)."""
    output, manifest, _ = dejavu
    characters = {c["character"] for c in manifest["characters"]}
    assert not {"A", "Α", "А", "O", "Ο", "О"} & characters
    arrays = glyphs.read_arrays(output)
    for design in np.unique(arrays["designs"]):
        rows = np.flatnonzero(arrays["designs"] == design)
        digests = [hashlib.sha256(arrays["images"][r].tobytes()).digest() for r in rows]
        assert len(set(digests)) == len(rows)


def test_arrays_agree_with_the_manifest(dejavu):
    output, manifest, _ = dejavu
    arrays = glyphs.read_arrays(output)
    labels, designs = arrays["labels"], arrays["designs"]
    assert np.all(np.diff(labels) >= 0)  # class-major
    for character in manifest["characters"]:
        drawn = designs[labels == character["label"]]
        assert len(drawn) == character["designs"] >= 2
        assert np.all(np.diff(drawn) > 0)  # each design at most once per class
    images = arrays["images"]
    assert images.dtype == np.uint8 and images.shape[1:] == (16, 16)
    assert images.reshape(len(images), -1).max(axis=1).min() > 0  # no empty image
    # Ink bright on 0: the border is background.
    assert images[:, 0, :].mean() < 5 and images[:, :, 0].mean() < 5
    for split, counts in manifest["splits"].items():
        members = [c["label"] for c in manifest["characters"] if c["split"] == split]
        assert counts["classes"] == len(members)
        assert counts["images"] == int(np.isin(labels, members).sum())


def test_splits_are_disjoint_sized_and_seeded(tmp_path, dejavu):
    _, manifest, font_dir = dejavu
    by_split = glyphs.split_classes(manifest)
    assert {s: len(v) for s, v in by_split.items() if s != "train"} == {
        "validation": 10, "test": 20, "pretrain": 10}
    everything = np.concatenate(list(by_split.values()))
    assert len(everything) == len(set(everything.tolist())) == len(manifest["characters"])
    # Another seed deals other characters to the test split.
    other = build([font_dir], str(tmp_path / "seed1"), seed=1,
                  characters=f"{fonts.LETTERS},U+4E00")
    test_chars = {c["character"] for c in manifest["characters"] if c["split"] == "test"}
    other_test = {c["character"] for c in other["characters"] if c["split"] == "test"}
    assert test_chars != other_test
    assert {c["character"] for c in other["characters"]} == {
        c["character"] for c in manifest["characters"]}


def test_a_copied_font_is_one_design_and_another_design_is_not_merged(tmp_path):
    copy = str(tmp_path / "renamed.ttf")
    shutil.copy(fonts.SANS, copy)
    manifest = build([fonts.SANS, copy, fonts.SERIF], str(tmp_path / "out"),
                     splits=glyph_builder.SplitSizes(validation=5, test=10, pretrain=0))
    assert manifest["counts"]["faces"] == 3 and manifest["counts"]["designs"] == 2
    merged = [d for d in manifest["designs"] if len(d["faces"]) == 2]
    assert len(merged) == 1
    (face, share), = merged[0]["matches"]
    assert share == 1.0 and face == merged[0]["faces"][1]
    paths = {manifest["fonts"][manifest["faces"][f]["file"]]["path"]
             for f in merged[0]["faces"]}
    assert paths == {os.path.realpath(fonts.SANS), os.path.realpath(copy)}
    # The evidence the manifest keeps: the one pair within a design, two pairs between.
    pairs = manifest["design_rule"]["face_pairs"]
    assert pairs["within"]["pairs"] == 1 and pairs["within"]["min"] == 1.0
    assert pairs["between"]["pairs"] == 2 and pairs["between"]["max"] < 0.07
    assert sum(pairs["between"]["counts"]) == 2 and pairs["within"]["counts"][-1] == 1


def test_a_composite_font_does_not_chain_its_two_sources_into_one_design(tmp_path):
    """Serif with Sans's lowercase letters and digits (like MigMix: M+ and IPA kanji) matches
    both sources on a good share of characters; it joins one design, the two stay apart."""
    composite = fonts.hybrid(str(tmp_path / "composite.ttf"),
                             letters="abcdefghijklmnopqrstuvwxyz0123456789")
    manifest = build([fonts.SANS, fonts.SERIF, composite], str(tmp_path / "out"),
                     characters="U+0021-U+007E",
                     splits=glyph_builder.SplitSizes(validation=5, test=10, pretrain=0))
    design_of = {manifest["fonts"][f["file"]]["path"]: f["design"] for f in manifest["faces"]}
    assert manifest["counts"]["designs"] == 2
    assert design_of[os.path.realpath(fonts.SANS)] != design_of[os.path.realpath(fonts.SERIF)]
    assert design_of[composite] in (design_of[os.path.realpath(fonts.SANS)],
                                    design_of[os.path.realpath(fonts.SERIF)])


def test_faces_sharing_their_outlines_in_a_collection_render_as_apart(tmp_path):
    """A .ttc holding one font twice shares its tables: the render check renders each glyph
    once for both faces, and must find what it finds for the font alone."""
    twice = fonts.collection(str(tmp_path / "twice.ttc"), (fonts.SANS, fonts.SANS))
    sizes = glyph_builder.SplitSizes(validation=5, test=10, pretrain=0)
    both = build([twice, fonts.SERIF], str(tmp_path / "both"), splits=sizes)
    alone = build([fonts.SANS, fonts.SERIF], str(tmp_path / "alone"), splits=sizes)
    rendered = [face["rendered"] for face in both["faces"]]
    assert rendered[0] == rendered[1] == alone["faces"][0]["rendered"]
    assert both["counts"]["designs"] == 2
    for name in (glyphs.IMAGES, glyphs.LABELS):
        np.testing.assert_array_equal(np.load(tmp_path / "both" / name),
                                      np.load(tmp_path / "alone" / name))


def test_defective_glyphs_are_rejected_and_counted(tmp_path):
    broken = fonts.defective(str(tmp_path / "defective.ttf"))
    manifest = build([broken, fonts.SERIF, fonts.DEJAVU[1]], str(tmp_path / "out"),
                     characters="U+0021-U+007E",
                     splits=glyph_builder.SplitSizes(validation=5, test=10, pretrain=0))
    face = next(f for f in manifest["faces"] if manifest["fonts"][f["file"]]["path"] == broken)
    # A (-> .notdef) is not even mapped; B empty; C and D one picture; E the tofu; ! misnamed.
    assert face["mapped"] == 94 - 1  # printable ASCII without A
    assert {k: v for k, v in face["rendered"].items() if k != "ok"} == {
        "empty": 1, "notdef": 1, "duplicate_in_face": 2, "misnamed": 1}
    # None of these characters has an image of the broken face's design.
    arrays = glyphs.read_arrays(str(tmp_path / "out"))
    design = face["design"]
    drawn = {manifest["characters"][label]["character"]
             for label in np.unique(arrays["labels"][arrays["designs"] == design])}
    assert not set("ABCDE!") & drawn and {"F", "G"} <= drawn


def test_identical_images_within_a_class_are_dropped(tmp_path):
    """A Serif whose a, b, c are Sans's: another design (not merged), whose a, b, c images
    equal Sans's and are dropped from those classes."""
    mixed = fonts.hybrid(str(tmp_path / "hybrid.ttf"))
    manifest = build([fonts.SANS, mixed], str(tmp_path / "out"), characters="U+0021-U+007E",
                     splits=glyph_builder.SplitSizes(validation=5, test=10, pretrain=0))
    assert manifest["counts"]["designs"] == 2
    assert manifest["counts"]["identical_dropped_within_class"] == 3
    assert manifest["counts"]["identical_within_class"] == 0
    kept = {c["character"] for c in manifest["characters"]}
    assert not set("abc") & kept  # one design left for them: below min_designs=2
    arrays = glyphs.read_arrays(str(tmp_path / "out"))
    for label in np.unique(arrays["labels"]):
        rows = arrays["images"][arrays["labels"] == label]
        assert len({row.tobytes() for row in rows}) == len(rows)


def test_instance_j_gets_the_same_augmentation_in_every_class(tmp_path):
    augmentation = glyph_render.AugmentationRange(rotation=15, shear=10, scale=0.1,
                                                  translation=0.05, stroke=0.4)
    output = str(tmp_path / "out")
    manifest = build(fonts.DEJAVU[:3], output, copies=2, augmentation=augmentation,
                     splits=glyph_builder.SplitSizes(validation=5, test=10, pretrain=5))
    instances = manifest["instances"]
    assert len(instances) == 3 * 2
    assert len({json.dumps(i["augmentation"], sort_keys=True) for i in instances}) == 6
    arrays = glyphs.read_arrays(output)
    faces = {d["design"]: manifest["faces"][d["representative"]] for d in manifest["designs"]}
    renderers = {d: glyph_render.GlyphRenderer(glyph_render.read_faces(
        manifest["fonts"][face["file"]]["path"])[face["index"]], 16) for d, face in faces.items()}

    def expected(label, instance):
        code = ord(manifest["characters"][label]["character"])
        window = renderers[instance["design"]].render(code).window
        params = glyph_render.GlyphAugmentation(**instance["augmentation"])
        return glyph_render.downsample(glyph_render.augment(window, params, 4), 4)

    labels = np.unique(arrays["labels"])[:12]
    for label in labels:
        rows = np.flatnonzero(arrays["labels"] == label)
        for row in rows:
            j = arrays["designs"][row] * 2 + arrays["copies"][row]
            assert instances[j]["instance"] == j
            # The stored image is this class's glyph under instance j's recorded parameters
            # (rounded in the manifest: within one gray level) ...
            assert np.abs(arrays["images"][row].astype(int)
                          - expected(label, instances[j]).astype(int)).max() <= 1
            # ... and not under the other copy's.
            other = instances[j ^ 1]
            assert np.abs(arrays["images"][row].astype(int)
                          - expected(label, other).astype(int)).max() > 8


def test_the_same_arguments_give_byte_identical_files_whatever_the_processes(tmp_path):
    augmentation = glyph_render.AugmentationRange(rotation=5, stroke=0.3)
    outputs = []
    for processes in (1, 2):
        output = str(tmp_path / f"out{processes}")
        build(fonts.DEJAVU[:4], output, processes=processes, copies=2,
              augmentation=augmentation,
              splits=glyph_builder.SplitSizes(validation=5, test=10, pretrain=5))
        outputs.append(output)
    names = sorted(os.listdir(outputs[0]))
    assert names == sorted([glyphs.MANIFEST, *glyphs.ARRAY_FILES]) == sorted(
        os.listdir(outputs[1]))
    for name in names:
        with open(os.path.join(outputs[0], name), "rb") as a, \
                open(os.path.join(outputs[1], name), "rb") as b:
            assert a.read() == b.read(), name


def test_the_render_check_cache_changes_nothing(tmp_path):
    cache = str(tmp_path / "cache")
    outputs = [str(tmp_path / name) for name in ("a", "b", "c")]
    sizes = glyph_builder.SplitSizes(validation=5, test=10, pretrain=5)
    glyph_builder.build(spec(fonts.DEJAVU[:3], splits=sizes), outputs[0], processes=1, log=quiet)
    for output in outputs[1:]:  # the first fills the cache, the second reads it
        glyph_builder.build(spec(fonts.DEJAVU[:3], splits=sizes), output, processes=1,
                            log=quiet, cache_dir=cache)
    assert len(os.listdir(cache)) == 3
    for name in (glyphs.MANIFEST, glyphs.IMAGES):
        contents = set()
        for output in outputs:
            with open(os.path.join(output, name), "rb") as f:
                contents.add(f.read())
        assert len(contents) == 1, name


def test_an_existing_output_is_never_touched(tmp_path):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="never overwrites"):
        build(fonts.DEJAVU[:2], str(output))
    assert os.listdir(output) == ["notes.txt"] and (output / "notes.txt").read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".taken")]


def test_too_few_characters_name_the_counts(tmp_path):
    with pytest.raises(ValueError, match=r"Only \d+ characters are drawn by at least "
                                         r"--min_designs=2 designs .* need 5002"):
        build(fonts.DEJAVU[:2], str(tmp_path / "out"),
              splits=glyph_builder.SplitSizes(validation=1000, test=3000, pretrain=1000))
    assert not os.listdir(tmp_path)  # nothing left behind


def test_parse_characters(tmp_path):
    assert glyph_builder.parse_characters("U+0041-U+0043,0x61,U+0041") == (0x41, 0x42, 0x43, 0x61)
    listing = tmp_path / "list.txt"
    listing.write_text("永 一\nU+4E8C U+4E09\n", encoding="utf-8")
    assert glyph_builder.parse_characters("", str(listing)) == (0x4E00, 0x4E09, 0x4E8C, 0x6C38)
    for bad, match in (("U+ZZ", "not a code point"), ("U+0043-U+0041", "ends before"),
                       ("U+D800", "surrogate"), ("", "No characters requested")):
        with pytest.raises(ValueError, match=match):
            glyph_builder.parse_characters(bad)
    with pytest.raises(FileNotFoundError, match="--characters_file"):
        glyph_builder.parse_characters("", str(tmp_path / "absent.txt"))


@pytest.mark.parametrize("flags, match", [
    (["--image_size=8"], "--image_size must be an integer >= 16"),
    (["--min_designs=1"], "--min_designs must be an integer >= 2"),
    (["--copies=3"], "--copies=3 without augmentation"),
    (["--rotation=120"], "--rotation must be < 90"),
    (["--characters=U+XYZ"], "U\\+XYZ.*is not a code point"),
    (["--test_classes=0"], "--test_classes must be >= 1"),
    (["--max_designs=1"], "--max_designs=1 is below --min_designs=2"),
])
def test_command_line_errors_exit_with_a_message(tmp_path, capsys, flags, match):
    with pytest.raises(SystemExit) as exit_:
        glyph_builder.main([f"--fonts={fonts.SANS}", f"--output={tmp_path / 'out'}", *flags])
    assert exit_.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_command_line_builds(tmp_path):
    manifest = glyph_builder.main([
        f"--fonts={fonts.SANS},{fonts.SERIF}", "--characters=U+0041-U+007A",
        "--image_size=16", "--validation_classes=2", "--test_classes=4",
        "--pretrain_classes=0", "--processes=1", f"--output={tmp_path / 'out'}"])
    assert manifest["counts"]["designs"] == 2 and (tmp_path / "out" / glyphs.MANIFEST).exists()
    assert manifest["arguments"]["characters"] == "U+0041-U+007A"
    assert manifest["fonts"][0]["package"] is None  # not installed by a Debian package
