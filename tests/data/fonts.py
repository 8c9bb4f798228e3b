"""Fonts for the glyph tests: the DejaVu faces matplotlib ships, and fonts derived from them with
fontTools (a collection, defective cmaps, a hybrid design). No apt, no network."""

import copy
import os
import shutil

import matplotlib
from fontTools import subset
from fontTools import ttLib

MPL_FONTS = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
# The DejaVu faces matplotlib ships (Display faces map almost nothing).
DEJAVU = tuple(os.path.join(MPL_FONTS, name) for name in (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf"))
SANS, SERIF = DEJAVU[0], DEJAVU[8]
# Latin, Greek and Cyrillic letters and digits; U+4E00 (一), which no DejaVu face draws.
LETTERS = "U+0030-U+0039,U+0041-U+005A,U+0061-U+007A,U+0391-U+03A9,U+03B1-U+03C9,U+0410-U+044F"
CJK = 0x4E00
# What the derived fonts keep (subsetting them makes them fast to write): Basic Latin.
BASIC_LATIN = [*range(0x20, 0x7F), 0x2192]


def _basic_latin(path):
    """A font reduced to `BASIC_LATIN` (plus the arrow), glyph names kept."""
    font = ttLib.TTFont(path)
    options = subset.Options(notdef_outline=True, layout_features=[], glyph_names=True,
                             name_IDs=["*"], drop_tables=["FFTM"])
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=BASIC_LATIN)
    subsetter.subset(font)
    return font


def dejavu_folder(root, names=None):
    """Copies DejaVu faces into a folder (with a nested sub-folder, to test the search)."""
    os.makedirs(os.path.join(root, "nested"), exist_ok=True)
    for i, path in enumerate(names or DEJAVU):
        target = root if i % 2 else os.path.join(root, "nested")
        shutil.copy(path, os.path.join(target, os.path.basename(path)))
    return root


def collection(path, members=(SANS, SERIF)):
    """A .ttc holding the given fonts as its faces."""
    fonts = ttLib.TTCollection()
    fonts.fonts = [ttLib.TTFont(member) for member in members]
    fonts.save(path)
    return path


def defective(path, source=SANS):
    """DejaVu Sans (Basic Latin) with broken cmap entries, each a case the builder must reject:

    * "A" -> .notdef (a cmap entry that is no drawing: dropped from the cmap);
    * "B" -> "empty", an empty glyph;
    * "C" and "D" -> "twin", one glyph (two classes, one picture: both rejected for this face);
    * "E" -> "tofu", a copy of the .notdef outline under another name (the pixel check);
    * "!" -> "arrowright" (a glyph whose name says it draws another character, U+2192).

    The new glyphs have names that say nothing about a character.
    """
    font = _basic_latin(source)
    cmap = font.getBestCmap()
    order = font.getGlyphOrder()
    glyf, hmtx = font["glyf"], font["hmtx"]
    added = {"tofu": order[0], "empty": cmap[ord(" ")], "twin": cmap[ord("D")]}
    for name, model in added.items():
        glyf.glyphs[name] = copy.deepcopy(glyf[model])
        hmtx.metrics[name] = hmtx.metrics[model]
    font.setGlyphOrder([*order, *added])
    glyf.glyphOrder = font.getGlyphOrder()
    for table in font["cmap"].tables:
        if table.isUnicode():
            table.cmap.update({ord("A"): order[0], ord("B"): "empty", ord("C"): "twin",
                               ord("D"): "twin", ord("E"): "tofu", ord("!"): "arrowright"})
    font.save(path)
    return path


def hybrid(path, base=SERIF, donor=SANS, letters="abc"):
    """DejaVu Serif (Basic Latin) whose glyphs of `letters` are DejaVu Sans's: another design
    that draws a few characters exactly like Sans (the within-class identity rule)."""
    font, other = _basic_latin(base), _basic_latin(donor)
    base_cmap, donor_cmap = font.getBestCmap(), other.getBestCmap()
    for letter in letters:
        name, donor_name = base_cmap[ord(letter)], donor_cmap[ord(letter)]
        font["glyf"].glyphs[name] = copy.deepcopy(other["glyf"][donor_name])
        font["hmtx"].metrics[name] = other["hmtx"].metrics[donor_name]
    font.save(path)
    return path
