"""Rendering one character of one font face into a small grayscale image, and the shared
augmentations of the `glyphs` dataset (the builder is `glyphs.py`).

    faces = read_faces("/usr/share/fonts/truetype/arphic/ukai.ttc")    # every face of a .ttc
    renderer = GlyphRenderer(faces[0], image_size=32)
    glyph = renderer.render(0x6C38)               # RenderedGlyph: status, high-res window
    image = downsample(augment(glyph.window, GlyphAugmentation(rotation=5.0), 4), 4)

The rule, the same for every font (`GlyphRenderer`):

* Size: the font's em square is drawn `EM_FRACTION` (7/8) of the image side wide. Scaling by the
  em keeps what the em carries: the relative size of a character (口 "mouth" and 囗 "enclosure"
  differ mainly in size, so scaling each glyph's ink box to the image would merge the two
  classes) and how large a design draws within its em (a trait of its style). The ink box of
  a glyph is not scaled.
* Position: the ink bounding box is centred in the image. Fonts place their ideographs at
  different heights relative to the baseline (metrics, not design): centring removes that.
* Rendering: FreeType (freetype-py) at `supersample` times the image size, anti-aliased, without
  hinting and without embedded bitmaps, then box-averaged down to the image size: the same
  rasterization for every font. (Pillow always hints, and the bytecode of three Ume faces fails
  in FreeType's TrueType interpreter with "invalid opcode".) Ink is bright (255) on a 0
  background, like the stored Omniglot images.

A glyph is rejected (its `status`) when it is empty, when it is pixel-identical (in the window
or at the output size) to the face's rendering of its .notdef glyph (glyph 0) or of a code point
the face does not map (what a renderer without font fallback draws instead: the tofu box),
when its ink box does not fit in the image at this scale, or when FreeType cannot load it.
Whether the face maps the character at all is the caller's check (`face_cmap`).

Augmentations (`augment`, `GlyphAugmentation`) act on the high-resolution window: first the
stroke (a signed offset of the outline, dilation or erosion, in output pixels), then one affine
map about the image centre (rotation, horizontal shear, scale, translation). The builder draws
one set of parameters per instance and applies it to that instance in every class.
"""

import dataclasses
import hashlib
import math
import os
import unicodedata

import freetype
import numpy as np
from fontTools import agl
from fontTools import ttLib
from PIL import Image
from scipy import ndimage

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
COLLECTION_SUFFIXES = (".ttc", ".otc")
# The em square spans this fraction of the image side (28 of 32 px, 42 of 48 px).
EM_FRACTION = 7 / 8
DEFAULT_SUPERSAMPLE = 4
# A rendered pixel counts as ink above this level (of 255) when finding the ink box.
INK_LEVEL = 0
# Outlines only (no embedded bitmap strikes), no hinting: one rasterization for every font.
_LOAD_FLAGS = freetype.FT_LOAD_RENDER | freetype.FT_LOAD_NO_HINTING | freetype.FT_LOAD_NO_BITMAP
_FROM_CMAP = object()
# Code points tried, in order, to render a face's .notdef glyph: the first one its cmap lacks.
_UNMAPPED_CANDIDATES = (0x10FFFD, 0x10FFFC, 0xFFFFD, 0xFFFF, 0xFFFE, *range(0xE000, 0xE100))

OK = "ok"
EMPTY = "empty"
NOTDEF = "notdef"
TOO_LARGE = "too_large"
RENDER_ERROR = "render_error"
RENDER_STATUSES = (OK, EMPTY, NOTDEF, TOO_LARGE, RENDER_ERROR)


@dataclasses.dataclass(frozen=True)
class FontFace:
    """One face of a font file (a .ttc/.otc collection holds several).

    Args:
        path: the font file (absolute, symbolic links resolved).
        index: the face's index in the file (0 for a single-face file).
        family: the family name (name table, best available).
        style: the subfamily (style) name.
        full_name: the full name.
        postscript_name: the PostScript name (name ID 6), or "".
        num_glyphs: glyphs in the face (maxp).
    """

    path: str
    index: int
    family: str
    style: str
    full_name: str
    postscript_name: str
    num_glyphs: int

    @property
    def label(self):
        """str: "file.ttc#2 (Family Style)", for messages."""
        return f"{os.path.basename(self.path)}#{self.index} ({self.full_name})"

    def to_dict(self):
        return dataclasses.asdict(self)


def find_font_files(sources):
    """The font files named by `sources`: files, and folders searched recursively.

    Args:
        sources: a path or a sequence of paths (files or folders).

    Returns:
        list of absolute paths, symbolic links resolved, sorted, each once.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file that is not a font file by its suffix, or no font file at all.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    found = set()
    for source in sources:
        source = os.fspath(source)
        if not os.path.exists(source):
            raise FileNotFoundError(f"--fonts: {source!r} does not exist.")
        if os.path.isdir(source):
            for root, _, names in os.walk(source, followlinks=True):
                for name in names:
                    path = os.path.join(root, name)
                    if name.lower().endswith(FONT_SUFFIXES) and os.path.isfile(path):
                        found.add(os.path.realpath(path))
        elif source.lower().endswith(FONT_SUFFIXES):
            found.add(os.path.realpath(source))
        else:
            raise ValueError(f"--fonts: {source!r} is not a font file (suffixes "
                             f"{', '.join(FONT_SUFFIXES)}) nor a folder.")
    if not found:
        raise ValueError(f"--fonts: no font file ({', '.join(FONT_SUFFIXES)}) in "
                         f"{', '.join(map(os.fspath, sources))}.")
    return sorted(found)


def _open_fonts(path):
    """The fontTools fonts of a file: one per face."""
    try:
        if path.lower().endswith(COLLECTION_SUFFIXES):
            return list(ttLib.TTCollection(path, lazy=True).fonts)
        return [ttLib.TTFont(path, lazy=True)]
    except Exception as error:  # fontTools raises many kinds for a damaged file
        raise ValueError(f"Font file {path!r} cannot be read by fontTools: {error}") from error


def read_faces(path):
    """Every face of a font file.

    Args:
        path: a .ttf/.otf/.ttc/.otc file.

    Returns:
        list of `FontFace`, in the file's order.

    Raises:
        ValueError: a file fontTools cannot read.
    """
    path = os.path.realpath(os.fspath(path))
    faces = []
    for index, font in enumerate(_open_fonts(path)):
        try:
            names = font["name"]
            faces.append(FontFace(
                path=path, index=index, family=names.getBestFamilyName() or "",
                style=names.getBestSubFamilyName() or "",
                full_name=names.getBestFullName() or "",
                postscript_name=names.getDebugName(6) or "",
                num_glyphs=int(font["maxp"].numGlyphs)))
        except Exception as error:
            raise ValueError(f"Face {index} of {path!r} has no readable name/maxp table: "
                             f"{error}") from error
    return faces


def face_cmap(face):
    """The code points a face maps to a glyph other than .notdef.

    Args:
        face: `FontFace`.

    Returns:
        dict code point -> glyph name (fontTools `getBestCmap`, minus entries pointing at the
        face's glyph 0).
    """
    font = _open_fonts(face.path)[face.index]
    cmap = font.getBestCmap() or {}
    notdef = font.getGlyphOrder()[0]
    return {code: glyph for code, glyph in cmap.items() if glyph != notdef}


def outline_tables(face):
    """What a face's renderings of a glyph depend on, as a comparable key: the file, the
    offsets of its outline tables and its units per em. The faces of a collection that share
    their outlines (a .ttc's regional variants) draw a given glyph index identically.

    Args:
        face: `FontFace`.

    Returns:
        tuple.
    """
    font = _open_fonts(face.path)[face.index]
    tables = font.reader.tables
    offsets = tuple(tables[tag].offset if tag in tables else None
                    for tag in ("glyf", "loca", "CFF ", "CFF2"))
    return (face.path, offsets, int(font["head"].unitsPerEm))


def names_another_character(code_point, glyph_name):
    """Whether a glyph's own name says it draws another character than the one mapped to it.

    Symbol fonts with a Unicode cmap map ASCII code points to other symbols (TeX's cmsy10 draws
    an arrow for "!"); their glyph names tell. A name read by the Adobe Glyph List rules
    (fontTools `agl.toUnicode`: "uni6C38", "Omega", "quotedblright") that gives one character
    not equivalent (NFKC) to the mapped one marks such a glyph; names that give nothing
    ("cid01234", "glyph42") or several characters say nothing.

    Args:
        code_point: int, the mapped code point.
        glyph_name: str, the glyph's name.

    Returns:
        bool.
    """
    named = agl.toUnicode(glyph_name.split(".")[0])
    if len(named) != 1:
        return False
    return (unicodedata.normalize("NFKC", named)
            != unicodedata.normalize("NFKC", chr(code_point)))


def face_glyph_ids(face):
    """The glyph index each code point of `face_cmap` maps to (what `outline_tables` keys).

    Args:
        face: `FontFace`.

    Returns:
        dict code point -> int glyph index.
    """
    font = _open_fonts(face.path)[face.index]
    ids = font.getReverseGlyphMap()
    return {code: ids[name] for code, name in face_cmap(face).items()}


def unmapped_code_point(cmap):
    """A code point the face does not map: FreeType renders its .notdef glyph for it.

    Args:
        cmap: the face's cmap (code points).

    Returns:
        int, or None when the face maps every candidate (a "last resort" font such as
        LastResortHE, which maps every code point to a placeholder).
    """
    return next((code for code in _UNMAPPED_CANDIDATES if code not in cmap), None)


@dataclasses.dataclass(frozen=True)
class RenderedGlyph:
    """A character rendered by `GlyphRenderer`.

    Args:
        status: one of `RENDER_STATUSES` ("ok" or why the glyph is rejected).
        window: uint8 [H, H] high-resolution image (H = image_size x supersample), ink bright,
            ink box centred; None unless the glyph fits.
    """

    status: str
    window: np.ndarray | None = None

    def digest(self):
        """An 8-byte digest of the high-resolution pixels (None without a window): equal
        digests mean identical renderings."""
        return None if self.window is None else pixel_digest(self.window)


def pixel_digest(pixels):
    """A 64-bit digest of an image's bytes (and shape).

    Args:
        pixels: uint8 array.

    Returns:
        int in [1, 2^64) (0 is free to mean "no image").
    """
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=8,
                             person=str(pixels.shape).encode()[:16]).digest()
    return int.from_bytes(digest, "little") or 1


class GlyphRenderer:
    """Renders characters of one face by the dataset's single rule (module docstring).

    Args:
        face: `FontFace`.
        image_size: int, the side of the output images (>= 8).
        supersample: int, the rendering resolution relative to the output (>= 1).
        unmapped: a code point the face does not map, whose rendering is compared too;
            default: `unmapped_code_point` of the face's cmap (None: only glyph 0 is).
    """

    def __init__(self, face, image_size, supersample=DEFAULT_SUPERSAMPLE,
                 unmapped=_FROM_CMAP):
        if int(image_size) != image_size or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}.")
        if int(supersample) != supersample or supersample < 1:
            raise ValueError(f"supersample must be an integer >= 1, got {supersample!r}.")
        self.face = face
        self.image_size = int(image_size)
        self.supersample = int(supersample)
        self.window_size = self.image_size * self.supersample
        self.em_pixels = round(EM_FRACTION * self.window_size)
        try:
            self._face = freetype.Face(face.path, face.index)
            self._face.set_pixel_sizes(self.em_pixels, self.em_pixels)
        except freetype.FT_Exception as error:
            raise ValueError(f"FreeType cannot open {face.label}: {error}") from error
        if unmapped is _FROM_CMAP:
            unmapped = unmapped_code_point(face_cmap(face))
        self.unmapped = unmapped
        # What the face draws when it lacks a glyph: its glyph 0 and an unmapped code point
        # (the same glyph in FreeType; both are compared, as a renderer may differ).
        loads = [lambda: self._face.load_glyph(0, _LOAD_FLAGS)]
        if unmapped is not None:
            loads.append(lambda: self._face.load_char(int(unmapped), _LOAD_FLAGS))
        drawn = [self._draw(load) for load in loads]
        self.notdef_digests = {glyph.digest() for glyph in drawn if glyph.window is not None}
        self.notdef_digests |= {pixel_digest(downsample(glyph.window, self.supersample))
                                for glyph in drawn if glyph.window is not None}
        # What the .notdef comparison of `render` depends on, beyond the glyph itself.
        self.notdef_key = tuple(sorted(self.notdef_digests))

    def _draw(self, load):
        """The glyph that `load()` puts in the face's slot, centred, before the .notdef check."""
        try:
            load()
        except freetype.FT_Exception:
            return RenderedGlyph(RENDER_ERROR)  # a damaged outline: rejected, counted
        bitmap = self._face.glyph.bitmap._FT_Bitmap
        if bitmap.rows == 0 or bitmap.width == 0:
            return RenderedGlyph(EMPTY)
        pixels = np.ctypeslib.as_array(bitmap.buffer, shape=(bitmap.rows, abs(bitmap.pitch)))
        pixels = pixels[:, :bitmap.width]
        rows = np.flatnonzero(pixels.max(axis=1) > INK_LEVEL)
        if rows.size == 0:
            return RenderedGlyph(EMPTY)
        cols = np.flatnonzero(pixels.max(axis=0) > INK_LEVEL)
        ink = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        size = self.window_size
        if ink.shape[0] > size or ink.shape[1] > size:
            return RenderedGlyph(TOO_LARGE)
        window = np.zeros((size, size), np.uint8)
        top, left = (size - ink.shape[0]) // 2, (size - ink.shape[1]) // 2
        window[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
        return RenderedGlyph(OK, window)

    def render(self, code_point):
        """Renders one character (the caller has checked that the face maps it).

        Args:
            code_point: int.

        Returns:
            `RenderedGlyph` (status "ok", "empty", "notdef", "too_large" or "render_error":
            FreeType could not load the outline).
        """
        glyph = self._draw(lambda: self._face.load_char(int(code_point), _LOAD_FLAGS))
        # Identical to a .notdef rendering in the window, or once reduced to the output size.
        if glyph.window is not None and (
                glyph.digest() in self.notdef_digests
                or pixel_digest(downsample(glyph.window, self.supersample))
                in self.notdef_digests):
            return RenderedGlyph(NOTDEF)
        return glyph


@dataclasses.dataclass(frozen=True)
class GlyphAugmentation:
    """One instance's augmentation, applied identically to that instance in every class.

    Args:
        rotation: degrees, counter-clockwise.
        shear: degrees of horizontal shear (positive leans the top to the right, like italics).
        scale: size factor (1 = unchanged).
        translate_x: shift to the right, as a fraction of the image side.
        translate_y: shift downwards, as a fraction of the image side.
        stroke: outline offset in output pixels (positive thickens the strokes by that much on
            every side, negative thins them).
    """

    rotation: float = 0.0
    shear: float = 0.0
    scale: float = 1.0
    translate_x: float = 0.0
    translate_y: float = 0.0
    stroke: float = 0.0

    def __post_init__(self):
        values = dataclasses.astuple(self)
        if not all(math.isfinite(v) for v in values) or self.scale <= 0:
            raise ValueError(f"Invalid augmentation {self}: values must be finite, scale > 0.")

    @property
    def is_identity(self):
        """bool: whether it changes nothing."""
        return self == GlyphAugmentation()

    @property
    def has_affine(self):
        """bool: whether the affine part is not the identity."""
        return (self.rotation, self.shear, self.scale, self.translate_x,
                self.translate_y) != (0.0, 0.0, 1.0, 0.0, 0.0)

    def to_dict(self):
        return {key: round(float(value), 6) for key, value in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class AugmentationRange:
    """The ranges the builder draws each instance's `GlyphAugmentation` from (uniform, seeded).

    Args:
        rotation: maximum |rotation| in degrees.
        shear: maximum |shear| in degrees.
        scale: maximum |scale - 1| (0.1: scale in [0.9, 1.1]).
        translation: maximum |shift| along each axis, as a fraction of the image side.
        stroke: maximum |stroke offset| in output pixels.
    """

    rotation: float = 0.0
    shear: float = 0.0
    scale: float = 0.0
    translation: float = 0.0
    stroke: float = 0.0

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name} must be a finite number >= 0, got {value!r}.")
        if self.rotation >= 90 or self.shear >= 60:
            raise ValueError(f"--rotation must be < 90 and --shear < 60 degrees (a glyph "
                             f"rotated or sheared further is another shape); got {self.rotation} "
                             f"and {self.shear}.")
        if self.scale >= 1:
            raise ValueError(f"--scale must be < 1 (scale factors in (0, 2)); got {self.scale}.")
        if self.translation >= 0.5:
            raise ValueError(f"--translation must be < 0.5 of the image side; got "
                             f"{self.translation}.")

    @property
    def is_identity(self):
        """bool: whether every range is 0 (no augmentation)."""
        return self == AugmentationRange()

    def sample(self, rng):
        """One instance's augmentation.

        Args:
            rng: `numpy.random.Generator`.

        Returns:
            `GlyphAugmentation` (every parameter drawn, in a fixed order, even when its range is
            0, so that changing one range leaves the others' draws unchanged).
        """
        u = rng.uniform(-1.0, 1.0, size=6)
        return GlyphAugmentation(
            rotation=float(u[0] * self.rotation), shear=float(u[1] * self.shear),
            scale=float(1.0 + u[2] * self.scale), translate_x=float(u[3] * self.translation),
            translate_y=float(u[4] * self.translation), stroke=float(u[5] * self.stroke))

    def to_dict(self):
        return dataclasses.asdict(self)


def affine_matrix(augmentation, size):
    """The affine map of an augmentation in (row, column) pixel coordinates.

    Args:
        augmentation: `GlyphAugmentation`.
        size: the image side in pixels (the map turns about the image centre).

    Returns:
        (matrix [2, 2], offset [2]): output pixel p' = matrix @ p + offset, p = (row, column).
    """
    theta, phi = math.radians(augmentation.rotation), math.radians(augmentation.shear)
    # In (x right, y up): scale, then shear x += tan(phi) y, then rotate counter-clockwise.
    rotate = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    shear = np.array([[1.0, math.tan(phi)], [0.0, 1.0]])
    xy = rotate @ shear * augmentation.scale
    # (row, col) = (-y, x): conjugate by that change of coordinates.
    to_rc = np.array([[0.0, -1.0], [1.0, 0.0]])
    matrix = to_rc @ xy @ np.linalg.inv(to_rc)
    centre = np.full(2, (size - 1) / 2.0)
    shift = np.array([augmentation.translate_y, augmentation.translate_x]) * size
    return matrix, centre + shift - matrix @ centre


def augment(window, augmentation, supersample):
    """Applies an augmentation to a high-resolution glyph window.

    Args:
        window: uint8 [H, H], ink bright (`RenderedGlyph.window`).
        augmentation: `GlyphAugmentation`.
        supersample: the window's resolution relative to the output (stroke offsets are in
            output pixels).

    Returns:
        float32 [H, H] in [0, 1].
    """
    window = np.asarray(window)
    image = window.astype(np.float32) / 255.0
    if augmentation.stroke:
        offset = abs(augmentation.stroke) * supersample
        ink = window >= 128
        # A pixel whose centre lies d pixels (centre to centre) from the nearest pixel across
        # the outline is d - 1/2 from the outline itself; its coverage after moving the outline
        # by `offset` is that of a one-pixel linear ramp.
        if augmentation.stroke > 0:
            # Dilation; the rendering's own anti-aliasing is kept where it is darker.
            distance = ndimage.distance_transform_edt(~ink)
            grown = np.clip(offset + 1.0 - distance, 0.0, 1.0).astype(np.float32)
            image = np.maximum(image, grown)
        else:
            # Erosion.
            distance = ndimage.distance_transform_edt(ink)
            image = np.clip(distance - offset, 0.0, 1.0).astype(np.float32)
    if augmentation.has_affine:
        matrix, offset = affine_matrix(augmentation, window.shape[0])
        inverse = np.linalg.inv(matrix)
        source = -inverse @ offset  # input (row, col) = inverse @ output + source
        # Pillow samples output pixel (x, y) = (col, row) at input (a (x + 1/2) + b (y + 1/2)
        # + c, d (x + 1/2) + e (y + 1/2) + f), bilinear with pixel centres at half-integers;
        # these coefficients give input index = inverse @ output index + source.
        (rr, rc), (cr, cc) = inverse
        coefficients = (cc, cr, source[1] + 0.5 * (1 - cc - cr),
                        rc, rr, source[0] + 0.5 * (1 - rc - rr))
        picture = Image.fromarray(image, mode="F").transform(
            image.shape[::-1], Image.Transform.AFFINE, coefficients,
            resample=Image.Resampling.BILINEAR, fillcolor=0.0)
        image = np.asarray(picture, np.float32)
    return np.clip(image, 0.0, 1.0)


def downsample(image, supersample):
    """Box-averages a high-resolution image to the output size and quantizes it.

    Args:
        image: uint8 [H, H] (0-255) or float [H, H] in [0, 1], H a multiple of `supersample`.
        supersample: int.

    Returns:
        uint8 [H / supersample, H / supersample].
    """
    image = np.asarray(image)
    scale = 1.0 if image.dtype != np.uint8 else 1.0 / 255.0
    size = image.shape[0] // supersample
    if image.shape != (size * supersample, size * supersample):
        raise ValueError(f"A square image whose side is a multiple of {supersample} is needed; "
                         f"got {image.shape}.")
    blocks = image.astype(np.float64).reshape(size, supersample, size, supersample)
    mean = blocks.mean(axis=(1, 3)) * scale
    return np.clip(np.rint(mean * 255.0), 0, 255).astype(np.uint8)
