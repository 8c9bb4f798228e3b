"""glyph_render: finding fonts, faces and cmaps, the rendering rule, the rejections, and the
augmentations against independent references (fontTools outlines, scipy, numpy)."""

import os

import numpy as np
import pytest
from fontTools import ttLib
from fontTools.pens.boundsPen import BoundsPen
from scipy import ndimage

from dvml_tf.data import glyph_render
from tests.data import fonts


@pytest.fixture(scope="module")
def sans():
    return glyph_render.read_faces(fonts.SANS)[0]


def test_find_font_files_searches_folders_and_lists_each_file_once(tmp_path):
    root = fonts.dejavu_folder(str(tmp_path / "fonts"), fonts.DEJAVU[:4])
    (tmp_path / "fonts" / "notes.txt").write_text("not a font")
    os.symlink(os.path.join(root, "DejaVuSans-Bold.ttf"), os.path.join(root, "alias.ttf"))
    found = glyph_render.find_font_files([root, os.path.join(root, "DejaVuSans-Bold.ttf")])
    assert [os.path.basename(p) for p in found] == sorted(
        os.path.basename(p) for p in fonts.DEJAVU[:4])  # the link resolves to its target
    assert all(os.path.isabs(p) for p in found)


@pytest.mark.parametrize("name, error, match", [
    ("absent", FileNotFoundError, "does not exist"),
    ("notes.txt", ValueError, "not a font file"),
    ("", ValueError, "no font file"),
])
def test_find_font_files_names_bad_sources(tmp_path, name, error, match):
    (tmp_path / "notes.txt").write_text("not a font")
    with pytest.raises(error, match=match):
        glyph_render.find_font_files(str(tmp_path / name) if name else str(tmp_path))


def test_read_faces_reads_every_face_of_a_collection(tmp_path):
    path = fonts.collection(str(tmp_path / "pair.ttc"))
    faces = glyph_render.read_faces(path)
    assert [(f.index, f.full_name) for f in faces] == [(0, "DejaVu Sans Book"),
                                                      (1, "DejaVu Serif Book")]
    renderers = [glyph_render.GlyphRenderer(face, 16) for face in faces]
    sans, serif = (r.render(ord("g")).window for r in renderers)
    assert not np.array_equal(sans, serif)  # each face is rendered, not the first twice


def test_a_damaged_font_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.ttf"
    path.write_bytes(b"\x00\x01\x00\x00" + b"garbage" * 10)
    with pytest.raises(ValueError, match=r"broken\.ttf.*cannot be read"):
        glyph_render.read_faces(path)


def test_face_cmap_drops_entries_that_point_at_notdef(tmp_path):
    face = glyph_render.read_faces(fonts.defective(str(tmp_path / "defective.ttf")))[0]
    cmap = glyph_render.face_cmap(face)
    assert ord("A") not in cmap and cmap[ord("E")] == "tofu"
    assert fonts.CJK not in cmap


def test_missing_and_placeholder_glyphs_are_rejected_by_their_pixels(tmp_path):
    face = glyph_render.read_faces(fonts.defective(str(tmp_path / "defective.ttf")))[0]
    renderer = glyph_render.GlyphRenderer(face, 16)
    statuses = {char: renderer.render(ord(char)).status for char in "ABEFG"}
    # A -> .notdef, E -> a copy of the .notdef outline: both the tofu box; B -> empty.
    assert statuses == {"A": "notdef", "B": "empty", "E": "notdef", "F": "ok", "G": "ok"}
    # A character DejaVu lacks renders as its .notdef glyph: rejected even unchecked.
    assert renderer.render(fonts.CJK).status == "notdef"
    assert renderer.render(fonts.CJK).window is None


def test_names_another_character():
    assert glyph_render.names_another_character(ord("!"), "arrowright")  # a symbol font
    assert glyph_render.names_another_character(ord("Q"), "quotedblright")
    for code, name in ((ord("A"), "A"), (0x4E00, "uni4E00"), (0x4E00, "cid01234"),
                       (0xB5, "mu"), (0x4E0D, "uniF967"), (ord("a"), "a.alt"), (0x41, "x1")):
        assert not glyph_render.names_another_character(code, name), (code, name)


def _ink_box(window):
    rows = np.flatnonzero(window.max(axis=1) > 0)
    cols = np.flatnonzero(window.max(axis=0) > 0)
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def test_the_em_square_sets_the_size_and_the_ink_box_is_centred(sans):
    font = ttLib.TTFont(fonts.SANS)
    units = font["head"].unitsPerEm
    glyph_set = font.getGlyphSet()
    for image_size in (16, 32):
        renderer = glyph_render.GlyphRenderer(sans, image_size)
        size = renderer.window_size
        em = glyph_render.EM_FRACTION * size
        for char in "Hg.l":
            pen = BoundsPen(glyph_set)
            glyph_set[font.getBestCmap()[ord(char)]].draw(pen)
            x_min, y_min, x_max, y_max = pen.bounds
            window = renderer.render(ord(char)).window
            top, bottom, left, right = _ink_box(window)
            # The outline's extent at em / unitsPerEm pixels per unit (+- anti-aliasing).
            assert abs((bottom - top) - (y_max - y_min) * em / units) <= 2, char
            assert abs((right - left) - (x_max - x_min) * em / units) <= 2, char
            # Centred (the integer split puts the odd pixel below / to the right).
            assert (size - bottom) - top in (0, 1) and (size - right) - left in (0, 1), char


def test_relative_size_is_kept_across_characters(sans):
    renderer = glyph_render.GlyphRenderer(sans, 32)
    heights = {char: np.ptp(np.flatnonzero(renderer.render(ord(char)).window.max(axis=1) > 0))
               for char in "Hx."}
    assert heights["H"] > 1.3 * heights["x"] > 3 * heights["."]  # not scaled to the image


def test_bad_renderer_arguments(sans):
    with pytest.raises(ValueError, match="image_size must be an integer >= 8"):
        glyph_render.GlyphRenderer(sans, 4)
    with pytest.raises(ValueError, match="supersample must be an integer >= 1"):
        glyph_render.GlyphRenderer(sans, 16, supersample=0)


def _smooth_image(size=64, border=16, seed=0):
    """A smooth random picture with an empty border (so that border rules do not matter)."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random((size, size)), 3)
    image = (image - image.min()) / (image.max() - image.min())
    image[:border], image[-border:], image[:, :border], image[:, -border:] = 0, 0, 0, 0
    return np.round(image * 255).astype(np.uint8)


@pytest.mark.parametrize("augmentation", [
    glyph_render.GlyphAugmentation(rotation=12.0),
    glyph_render.GlyphAugmentation(shear=-15.0, scale=0.85),
    glyph_render.GlyphAugmentation(rotation=-7.0, shear=20.0, scale=1.1, translate_x=0.06,
                                   translate_y=-0.04),
])
def test_affine_augmentation_matches_scipy(augmentation):
    window = _smooth_image()
    ours = glyph_render.augment(window, augmentation, 4)
    # The reference: the documented map (rotation counter-clockwise, shear leaning right,
    # about the centre) built here by hand, applied by scipy's own interpolation.
    theta, phi = np.radians(augmentation.rotation), np.radians(augmentation.shear)
    s = augmentation.scale
    # (x, y up) -> (row, col): row = -y, col = x.
    xy = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) @ np.array(
        [[1, np.tan(phi)], [0, 1]]) * s
    flip = np.array([[0, -1], [1, 0]])
    forward = flip @ xy @ flip.T
    centre = np.full(2, 31.5)
    shift = np.array([augmentation.translate_y, augmentation.translate_x]) * 64
    inverse = np.linalg.inv(forward)
    reference = ndimage.affine_transform(window / 255.0, inverse,
                                         offset=centre - inverse @ (centre + shift), order=1)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_rotation_turns_counter_clockwise_and_shear_leans_right():
    window = np.zeros((64, 64), np.uint8)
    window[10:14, 30:34] = 255  # a dot above the centre
    turned = glyph_render.augment(window, glyph_render.GlyphAugmentation(rotation=90.0), 4)
    np.testing.assert_allclose(turned, np.rot90(window / 255.0), atol=1e-6)  # a permutation
    sheared = glyph_render.augment(window, glyph_render.GlyphAugmentation(shear=30.0), 4)
    _, _, left, _ = _ink_box(sheared > 0.5)
    assert left > 30 + 10  # above the centre, the dot moved right


@pytest.mark.parametrize("stroke", [0.5, 1.0, -0.5])
def test_stroke_offset_moves_each_outline_by_that_many_output_pixels(stroke):
    supersample = 4
    window = np.zeros((64, 64), np.uint8)
    window[8:56, 24:40] = 255  # a vertical bar 16 window pixels wide
    result = glyph_render.augment(window, glyph_render.GlyphAugmentation(stroke=stroke),
                                  supersample)
    width = result[32].sum()  # ink along the middle row, in window pixels
    assert width == pytest.approx(16 + 2 * stroke * supersample, abs=0.5)


def test_downsample_is_the_block_mean():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (12, 12)).astype(np.uint8)
    expected = np.array([[np.round(image[3 * i:3 * i + 3, 3 * j:3 * j + 3].mean())
                          for j in range(4)] for i in range(4)])
    np.testing.assert_array_equal(glyph_render.downsample(image, 3), expected)
    with pytest.raises(ValueError, match="multiple of 5"):
        glyph_render.downsample(image, 5)


def test_augmentation_ranges_are_validated_and_sampled_within_bounds():
    for bad, match in (({"rotation": -1}, "--rotation must be a finite number >= 0"),
                       ({"rotation": 95}, "--rotation must be < 90"),
                       ({"scale": 1.5}, "--scale must be < 1"),
                       ({"translation": 0.6}, "--translation must be < 0.5"),
                       ({"stroke": float("nan")}, "--stroke must be a finite number")):
        with pytest.raises(ValueError, match=match):
            glyph_render.AugmentationRange(**bad)
    ranges = glyph_render.AugmentationRange(rotation=10, shear=5, scale=0.1, translation=0.05,
                                            stroke=0.4)
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = ranges.sample(rng)
        assert abs(a.rotation) <= 10 and abs(a.shear) <= 5 and 0.9 <= a.scale <= 1.1
        assert max(abs(a.translate_x), abs(a.translate_y)) <= 0.05 and abs(a.stroke) <= 0.4
    assert glyph_render.AugmentationRange().sample(rng).is_identity
