"""Builds a `glyphs` folder (format: `glyphs.py`) from font files.

    python -m dvml_tf.data.glyph_builder --fonts=/usr/share/fonts \\
        --characters=U+4E00-U+9FFF --min_designs=20 --image_size=32 --output=DIR

A module of the data package rather than a top-level script: it prepares data once, like
TFDS's `download_and_prepare`, and is not part of the train / evaluate / export / index flow
(`build` is its library entry point). The steps:

1. *Survey*: every face of every font file (`.ttf`, `.otf`, `.ttc`, `.otc`, folders searched
   recursively), the requested characters each face maps (fontTools `getBestCmap`, entries
   pointing at .notdef dropped). `--max_characters=K` keeps the K requested characters mapped by
   the most faces (ties: lower code point).
2. *Render check* (parallel over faces): a character is rejected for a face when its glyph's
   name says it draws another character (`glyph_render.names_another_character`: symbol fonts
   behind a Unicode cmap), and otherwise rendered (`glyph_render.GlyphRenderer`) and rejected
   when empty, identical to the face's .notdef or unmapped-code-point rendering, too large, or
   identical (at the output size) to the face's rendering of another requested character (a
   placeholder shared by several code points, or two classes one picture: Latin A, Greek Alpha
   and Cyrillic A). Each face also renders a seeded sample of characters for step 3.
3. *Designs*: faces draw one design when, for every two of them, their renderings at the
   output size match (sum |a - b| <= `MATCH_TOLERANCE` x the larger ink sum) on at least
   `MATCH_FRACTION` of the sample characters both draw (at least `MIN_COMMON` of them):
   complete linkage (`group_designs`); each design is rendered from its most typical face.
   Measured on Debian's CJK fonts (docs/glyphs.md):
   faces of different designs match on under 7 % of the sample; exact or near copies (IPA /
   Takao, IPAex / IPA, Droid / WenQuanYi Micro Hei) on 95-100 %; the regional variants of one
   design (Noto CJK JP / KR / SC / TC / HK, Ume's variants, IPAmj / IPA Mincho) on 31-98 %;
   composite fonts on about half (MigMix: M+'s kanji for some characters, IPA Gothic's for
   the others; 46 % with IPA Gothic, 52 % with VL Gothic, itself M+ based). The threshold
   (25 %) sits in the empty gap; requiring it of every pair keeps a composite from chaining
   its two sources into one design. `--max_designs` keeps a seeded random subset of the
   designs that draw at least half as many characters as the most prolific one.
4. *Classes*: a character is a class when at least `--min_designs` designs draw it; within a
   class, an image identical (at the output size, before augmentation) to a lower design's is
   dropped. Classes are split by a seeded hash order: test, validation, pretrain, then train.
5. *Render* (parallel over designs): every kept (character, design) is rendered once and
   augmented `--copies` times, instance j = (design, copy) with the same parameters in every
   class (`glyph_render.AugmentationRange`, seeded), streamed into `images.npy` (a memory map)
   at its final row: memory stays bounded whatever the size.

Everything is written into a temporary sibling folder, renamed to `--output` at the end; an
existing `--output` is never touched. Same fonts and arguments give byte-identical files
(whatever `--processes`).
"""

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from dvml_tf.data import glyph_render
from dvml_tf.data import glyphs

BUILDER_VERSION = "1"
MATCH_TOLERANCE = 0.05
MATCH_FRACTION = 0.25
MIN_COMMON = 20
DESIGN_SAMPLE = 200
DEFAULT_CHARACTERS = "U+4E00-U+9FFF"
# Per-face status codes of the render check (int8 arrays): the renderer's; a glyph whose name
# says it draws another character; a character this face draws exactly like another requested
# character.
STATUS_CODES = {glyph_render.OK: 0, glyph_render.EMPTY: 1, glyph_render.NOTDEF: 2,
                glyph_render.TOO_LARGE: 3, glyph_render.RENDER_ERROR: 4, "misnamed": 5,
                "duplicate_in_face": 6}
_CODE_POINT = re.compile(r"^(?:U\+|0x)?([0-9A-Fa-f]{1,6})$")


@dataclasses.dataclass(frozen=True)
class SplitSizes:
    """Classes per split. `train=0` takes every eligible character left after the others.

    Args:
        train: int >= 0.
        validation: int >= 0.
        test: int >= 1.
        pretrain: int >= 0.
    """

    train: int = 0
    validation: int = 500
    test: int = 1000
    pretrain: int = 1000

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if int(value) != value or value < 0:
                raise ValueError(f"--{name}_classes must be an integer >= 0, got {value!r}.")
        if self.test < 1:
            raise ValueError("--test_classes must be >= 1.")


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """Everything a glyph folder depends on (recorded in its manifest).

    Args:
        fonts: font files and folders, as given.
        characters: the requested code points (sorted, unique).
        characters_text: how they were requested (for the record).
        image_size: output side in pixels (>= 16).
        min_designs: a character is a class when at least this many designs draw it (>= 2).
        max_designs: keep at most this many designs (`choose_designs`); 0 = all.
        max_characters: keep the requested characters mapped by the most faces; 0 = all.
        copies: augmented copies per design (instances per class = designs x copies).
        augmentation: `glyph_render.AugmentationRange`.
        splits: `SplitSizes`.
        seed: int, the splits, the design subset, the augmentations and the design sample.
        supersample: rendering resolution relative to the output.
    """

    fonts: tuple
    characters: tuple
    characters_text: str = DEFAULT_CHARACTERS
    image_size: int = 32
    min_designs: int = 2
    max_designs: int = 0
    max_characters: int = 0
    copies: int = 1
    augmentation: glyph_render.AugmentationRange = dataclasses.field(
        default_factory=glyph_render.AugmentationRange)
    splits: SplitSizes = dataclasses.field(default_factory=SplitSizes)
    seed: int = 0
    supersample: int = glyph_render.DEFAULT_SUPERSAMPLE

    def __post_init__(self):
        if not self.fonts:
            raise ValueError("--fonts names no font file or folder.")
        if not self.characters:
            raise ValueError("No characters requested (--characters / --characters_file).")
        checks = {"image_size": 16, "min_designs": 2, "max_designs": 0, "max_characters": 0,
                  "copies": 1, "supersample": 1}
        for name, low in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}.")
        if self.max_designs and self.max_designs < self.min_designs:
            raise ValueError(f"--max_designs={self.max_designs} is below --min_designs="
                             f"{self.min_designs}: no character could be a class.")
        if self.copies > 1 and self.augmentation.is_identity:
            raise ValueError(f"--copies={self.copies} without augmentation would repeat every "
                             "image; set --rotation, --shear, --scale, --translation or --stroke.")

    def record(self):
        """The arguments as the manifest records them."""
        return {"fonts": list(self.fonts), "characters": self.characters_text,
                "characters_requested": len(self.characters), "image_size": self.image_size,
                "min_designs": self.min_designs, "max_designs": self.max_designs,
                "max_characters": self.max_characters, "copies": self.copies,
                "augmentation": self.augmentation.to_dict(),
                "splits": dataclasses.asdict(self.splits), "seed": self.seed,
                "supersample": self.supersample}


# --------------------------------------------------------------------------------- characters

def parse_code_point(text):
    """"U+4E00", "0x4E00" or "4E00" -> 0x4E00.

    Raises:
        ValueError: not a code point, or a surrogate.
    """
    match = _CODE_POINT.match(text.strip())
    if not match:
        raise ValueError(f"--characters: {text!r} is not a code point (write U+4E00).")
    code = int(match.group(1), 16)
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        raise ValueError(f"--characters: {text!r} is not a character code point (above "
                         "U+10FFFF or a surrogate).")
    return code


def parse_characters(ranges=None, path=None):
    """The requested code points.

    Args:
        ranges: comma-separated code points and ranges, e.g. "U+4E00-U+9FFF,U+3007".
        path: a UTF-8 text file: every non-whitespace character, except that a line holding
            only code points (U+XXXX, separated by spaces or commas) lists those.

    Returns:
        tuple of ints, sorted, unique.

    Raises:
        ValueError: bad syntax, a reversed range, or nothing requested.
        FileNotFoundError: a missing file.
    """
    codes = set()
    for item in (ranges or "").split(","):
        item = item.strip()
        if not item:
            continue
        first, sep, last = item.partition("-")
        low = parse_code_point(first)
        high = parse_code_point(last) if sep else low
        if high < low:
            raise ValueError(f"--characters: the range {item!r} ends before it starts.")
        codes.update(c for c in range(low, high + 1) if not 0xD800 <= c <= 0xDFFF)
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--characters_file {path!r} does not exist.")
        with open(path, encoding="utf-8") as f:
            for line in f:
                words = line.replace(",", " ").split()
                if words and all(_CODE_POINT.match(w) and w.upper().startswith("U+")
                                 for w in words):
                    codes.update(parse_code_point(w) for w in words)
                else:
                    codes.update(ord(c) for c in line if not c.isspace())
    if not codes:
        raise ValueError("No characters requested: --characters and --characters_file are "
                         "empty.")
    return tuple(sorted(codes))


# ------------------------------------------------------------------------------- font facts

def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def debian_packages(paths):
    """The Debian package that installed each file (`dpkg -S`), or None.

    Args:
        paths: file paths.

    Returns:
        dict path -> package name or None (not installed by a package, or no dpkg).
    """
    found = dict.fromkeys(paths)
    if not paths:
        return found
    try:
        result = subprocess.run(["dpkg", "-S", *paths], capture_output=True, text=True,
                                check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return found
    for line in result.stdout.splitlines():
        package, sep, path = line.partition(": ")
        if sep and path in found:
            found[path] = package.split(":")[0]  # drop an architecture qualifier
    return found


# ---------------------------------------------------------------------------- parallel work

def _survey_face(face, requested):
    """The requested code points a face maps, those whose glyph name says they draw another
    character, and a code point it does not map (worker)."""
    cmap = glyph_render.face_cmap(face)
    mapped = np.fromiter((c for c in requested if c in cmap), np.int64)
    misnamed = np.fromiter((c for c in mapped.tolist()
                            if glyph_render.names_another_character(c, cmap[c])), np.int64)
    return mapped, misnamed, glyph_render.unmapped_code_point(cmap)


def _check_key(job, file_digest):
    """The cache key of one face's render check: everything its result depends on."""
    face, codes, misnamed, sample, image_size, supersample, unmapped = job
    text = json.dumps([BUILDER_VERSION, file_digest, face.index, image_size, supersample,
                       unmapped, hashlib.sha256(np.asarray(codes, np.int64).tobytes()).hexdigest(),
                       hashlib.sha256(np.asarray(misnamed, np.int64).tobytes()).hexdigest(),
                       list(map(int, sample))])
    return hashlib.sha256(text.encode()).hexdigest()


_CHECK_FIELDS = ("status", "digests", "images", "valid")


def _check_file(jobs_and_caches):
    """Step 2 for the faces of one font file (worker), each read from / written to its cache
    file when there is one. The faces of a collection that share their outlines (a .ttc's
    regional variants) render each shared glyph once (`glyph_render.outline_tables`)."""
    shared = {}
    results = []
    for job, path in jobs_and_caches:
        if path and os.path.exists(path):
            with np.load(path) as cached:
                results.append(tuple(cached[name] for name in _CHECK_FIELDS))
            continue
        result = _check_face(job, shared)
        if path:
            handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
            with os.fdopen(handle, "wb") as f:
                np.savez(f, **dict(zip(_CHECK_FIELDS, result, strict=True)))
            os.replace(temporary, path)
        results.append(result)
    return results


def _check_face(job, shared=None):
    """Step 2 for one face: status and output-size digest of every code point, and the
    output-size images of the design sample.

    Args:
        job: (face, codes, misnamed codes, sample codes, image_size, supersample, unmapped).
        shared: optional dict, renderings by (outline tables, glyph index, .notdef), filled
            and reused across the faces of one file.
    """
    face, codes, misnamed, sample, image_size, supersample, unmapped = job
    renderer = glyph_render.GlyphRenderer(face, image_size, supersample, unmapped=unmapped)
    outlines = glyph_render.outline_tables(face)
    glyph_ids = glyph_render.face_glyph_ids(face)
    shared = {} if shared is None else shared
    status = np.zeros(len(codes), np.int8)
    digests = np.zeros(len(codes), np.uint64)
    slot = {int(code): j for j, code in enumerate(sample)}
    images = np.zeros((len(sample), image_size, image_size), np.uint8)
    misnamed = set(misnamed.tolist())
    for i, code in enumerate(codes):
        if int(code) in misnamed:
            status[i] = STATUS_CODES["misnamed"]
            continue
        key = (outlines, glyph_ids[int(code)], renderer.notdef_key)
        if key not in shared:
            glyph = renderer.render(int(code))
            image = (None if glyph.window is None
                     else glyph_render.downsample(glyph.window, supersample))
            shared[key] = (glyph.status, image)
        glyph_status, image = shared[key]
        status[i] = STATUS_CODES[glyph_status]
        if image is not None:
            digests[i] = glyph_render.pixel_digest(image)
            if int(code) in slot:
                images[slot[int(code)]] = image
    # Two requested characters drawn identically by this face: neither is kept for it.
    values, counts = np.unique(digests[status == 0], return_counts=True)
    status[np.isin(digests, values[counts > 1]) & (status == 0)] = (
        STATUS_CODES["duplicate_in_face"])
    valid = np.zeros(len(sample), bool)
    for i, code in enumerate(codes):
        if int(code) in slot and status[i] == 0:
            valid[slot[int(code)]] = True
    return status, digests, images, valid


def _render_design(job):
    """Step 5 for one design (worker): renders, augments and writes its images in place."""
    face, codes, rows, augmentations, image_size, supersample, unmapped, path = job
    renderer = glyph_render.GlyphRenderer(face, image_size, supersample, unmapped=unmapped)
    images = np.load(path, mmap_mode="r+")
    for code, first_row in zip(codes, rows, strict=True):
        glyph = renderer.render(int(code))
        if glyph.status != glyph_render.OK:
            raise RuntimeError(f"{face.label} rendered U+{int(code):04X} as {glyph.status} "
                               "in the second pass (ok in the first).")
        for copy, augmentation in enumerate(augmentations):
            high = (glyph.window if augmentation.is_identity
                    else glyph_render.augment(glyph.window, augmentation, supersample))
            images[first_row + copy] = glyph_render.downsample(high, supersample)
    images.flush()
    del images
    return len(codes) * len(augmentations)


def _map(function, jobs, processes):
    """`function` over `jobs`, in order; in this process when `processes` is 1."""
    if processes <= 1 or len(jobs) <= 1:
        return [function(job) for job in jobs]
    # Fork: the workers need only numpy, fontTools and FreeType, never TensorFlow, so
    # inheriting the parent's imports is safe and saves importing the package again.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(min(processes, len(jobs))) as pool:
        return pool.map(function, jobs, chunksize=1)


def _survey_job(job):
    return _survey_face(*job)


# ---------------------------------------------------------------------------------- designs

def match_shares(sample_images, sample_valid):
    """How alike every two faces draw: the share of their common sample characters whose
    renderings match (sum |a - b| <= `MATCH_TOLERANCE` x the larger ink sum).

    Args:
        sample_images: uint8 [F, M, S, S], each face's rendering of the M sample characters.
        sample_valid: bool [F, M], where a face drew a sample character.

    Returns:
        (share float [F, F], common int [F, F]): the share, and the number of common sample
        characters it is computed on (diagonal: 1 and M).
    """
    count = len(sample_images)
    flat = sample_images.reshape(count, sample_images.shape[1], -1).astype(np.int32)
    ink = flat.sum(axis=2)
    share = np.zeros((count, count))
    common = np.zeros((count, count), np.int64)
    for a in range(count):
        both = sample_valid[a][None, :] & sample_valid
        difference = np.abs(flat[a][None] - flat).sum(axis=2)
        same = (difference <= MATCH_TOLERANCE * np.maximum(ink[a][None], ink)) & both
        common[a] = both.sum(axis=1)
        share[a] = same.sum(axis=1) / np.maximum(common[a], 1)
    return share, common


def group_designs(sample_images, sample_valid, valid_counts):
    """Step 3: which faces draw the same design (module docstring).

    Complete-linkage clustering: two groups of faces merge, the most alike first, only while
    every face of one matches every face of the other on at least `MATCH_FRACTION` of their
    common sample characters (at least `MIN_COMMON` of them). So a composite font (MigMix:
    the kanji of M+ for some characters, of IPA Gothic for the others) joins one of its
    sources but never chains the two into one design. Each design is rendered from its most
    typical face: the one with the highest mean share with the others (then the one drawing
    the most characters).

    Args:
        sample_images: uint8 [F, M, S, S], each face's rendering of the M sample characters.
        sample_valid: bool [F, M], where a face drew a sample character.
        valid_counts: int [F], the characters each face draws.

    Returns:
        (groups, matches, pairs): groups = list of lists of face indices, the representative
        first, ordered by representative; matches = dict (representative, face) -> share, for
        every other face of a design; pairs = `pair_statistics` of the face pairs.
    """
    share, common = match_shares(sample_images, sample_valid)
    alike = np.where(common >= MIN_COMMON, share, 0.0)
    np.fill_diagonal(alike, 1.0)
    clusters = [[face] for face in range(len(alike))]
    linkage = alike.copy()  # the least alike pair between two clusters
    np.fill_diagonal(linkage, -1.0)
    while len(clusters) > 1:
        first, second = np.unravel_index(np.argmax(linkage), linkage.shape)
        if linkage[first, second] < MATCH_FRACTION:
            break
        first, second = min(first, second), max(first, second)
        clusters[first] += clusters.pop(second)
        merged = np.minimum(linkage[first], linkage[second])
        linkage[first], linkage[:, first] = merged, merged
        linkage[first, first] = -1.0
        linkage = np.delete(np.delete(linkage, second, axis=0), second, axis=1)
    groups, matches = [], {}
    for cluster in clusters:
        typical = {f: np.mean([alike[f, g] for g in cluster if g != f]) if len(cluster) > 1
                   else 1.0 for f in cluster}
        representative = max(cluster, key=lambda f: (typical[f], valid_counts[f], -f))
        others = sorted(f for f in cluster if f != representative)
        groups.append([representative, *others])
        matches.update({(representative, f): float(share[representative, f]) for f in others})
    groups.sort(key=lambda g: g[0])
    return groups, matches, pair_statistics(share, common, groups)


# Bins of the share histogram the manifest records (the evidence for `MATCH_FRACTION`).
SHARE_BINS = (0.0, 0.01, 0.07, 0.25, 0.5, 0.75, 0.9, 1.0)


def pair_statistics(share, common, groups):
    """How alike the face pairs draw, within and between the designs found.

    Args:
        share, common: `match_shares` of the faces.
        groups: the designs (lists of face indices).

    Returns:
        dict: for "within" and "between" designs, the number of face pairs (with at least
        `MIN_COMMON` common sample characters) per share bin (`SHARE_BINS`, the last bin
        closed), their count, and the smallest ("within") or largest ("between") share.
    """
    design = np.empty(len(share), np.int64)
    for index, group in enumerate(groups):
        design[group] = index
    upper = np.triu(np.ones_like(share, dtype=bool), k=1) & (common >= MIN_COMMON)
    same = design[:, None] == design[None, :]
    result = {"bins": list(SHARE_BINS)}
    for name, mask in (("within", upper & same), ("between", upper & ~same)):
        values = share[mask]
        counts, _ = np.histogram(values, bins=SHARE_BINS)
        extreme = (values.min() if name == "within" else values.max()) if values.size else None
        result[name] = {"pairs": int(values.size), "counts": counts.tolist(),
                        "min" if name == "within" else "max":
                        None if extreme is None else round(float(extreme), 4)}
    return result


def choose_designs(groups, drawn_counts, count, seed):
    """`--max_designs`: a seeded random choice of `count` designs among those that draw at
    least half as many characters as the most prolific one (a design drawing a small part
    of the characters would leave few characters drawn by all the chosen ones).

    Args:
        groups: the designs (lists of faces, representative first).
        drawn_counts: int per design, the characters its representative draws.
        count: how many to keep.
        seed: int.

    Returns:
        the chosen groups, in their order.

    Raises:
        ValueError: fewer than `count` designs draw that many characters.
    """
    floor = max(drawn_counts) / 2
    candidates = [i for i, n in enumerate(drawn_counts) if n >= floor]
    if len(candidates) < count:
        raise ValueError(f"--max_designs={count}: only {len(candidates)} of the {len(groups)} "
                         f"designs draw at least half as many characters ({floor:.0f}) as the "
                         "most prolific one.")
    keep = np.sort(np.random.default_rng([seed, 0xDE]).choice(candidates, count,
                                                               replace=False))
    return [groups[i] for i in keep]


def split_order(codes, seed):
    """The seeded order in which characters are dealt to the splits: a keyed hash, so that a
    character's place does not depend on which other characters are eligible."""
    def key(code):
        return hashlib.sha256(f"glyph-split:{seed}:{code}".encode()).digest()
    return sorted(codes, key=key)


def instance_augmentations(spec, num_designs):
    """Step 5's parameters: [design][copy] -> `GlyphAugmentation`, the same in every class."""
    if spec.augmentation.is_identity:
        return [[glyph_render.GlyphAugmentation()] * spec.copies for _ in range(num_designs)]
    return [[spec.augmentation.sample(np.random.default_rng([spec.seed, 0x6A0, design, copy]))
             for copy in range(spec.copies)] for design in range(num_designs)]


# ------------------------------------------------------------------------------------ build

def _log(message):
    print(message, file=sys.stderr, flush=True)


def build(spec, output, processes=0, log=_log, cache_dir=None):
    """Builds a glyph folder (module docstring).

    Args:
        spec: `BuildSpec`.
        output: the folder to create (must not exist).
        processes: worker processes; 0 = one per CPU.
        log: callable taking a progress line.
        cache_dir: optional folder keeping each face's render check (step 2), keyed by the
            font file's SHA-256 and everything else the check depends on: later builds with
            the same characters and image size (other splits, designs or augmentations) skip
            it. The output does not depend on it.

    Returns:
        dict: the manifest, plus "timing" (seconds per step and images per second; not part of
        the manifest file).

    Raises:
        FileExistsError: `output` exists.
        ValueError, FileNotFoundError: bad fonts or arguments, or too few characters for the
            splits (the message gives the counts).
    """
    output = os.path.abspath(os.fspath(output))
    if os.path.lexists(output):
        raise FileExistsError(f"--output {output!r} exists; the builder never overwrites: "
                              "choose a new folder (or remove that one yourself).")
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--output: the parent folder {parent!r} does not exist.")
    processes = int(processes) or os.cpu_count() or 1
    timing, started = {}, time.time()

    # 1. Survey.
    files = glyph_render.find_font_files(spec.fonts)
    faces = [face for path in files for face in glyph_render.read_faces(path)]
    requested = frozenset(spec.characters)
    surveyed = _map(_survey_job, [(face, sorted(requested)) for face in faces], processes)
    mapped = [codes for codes, _, _ in surveyed]
    misnamed = [codes for _, codes, _ in surveyed]
    unmapped = [code for _, _, code in surveyed]
    coverage = {}
    for codes in mapped:
        for code in codes.tolist():
            coverage[code] = coverage.get(code, 0) + 1
    characters = sorted(coverage)
    if spec.max_characters and len(characters) > spec.max_characters:
        characters = sorted(sorted(characters, key=lambda c: (-coverage[c], c))
                            [:spec.max_characters])
    selected = np.asarray(characters, np.int64)
    codes_of = [codes[np.isin(codes, selected)] for codes in mapped]
    log(f"survey: {len(files)} font files, {len(faces)} faces; {len(characters)} of the "
        f"{len(requested)} requested characters are mapped by at least one face.")
    timing["survey"] = time.time() - started

    # 2. Render check.
    step = time.time()
    rng = np.random.default_rng([spec.seed, 0xD5])
    candidates = [c for c in characters if coverage[c] >= 2]
    sample = sorted(rng.choice(candidates, size=min(DESIGN_SAMPLE, len(candidates)),
                               replace=False).tolist()) if candidates else []
    jobs = [(face, codes, misnamed[i], sample, spec.image_size, spec.supersample, unmapped[i])
            for i, (face, codes) in enumerate(zip(faces, codes_of, strict=True)) if len(codes)]
    active = [i for i, codes in enumerate(codes_of) if len(codes)]
    if not active:
        raise ValueError(f"No face maps any of the requested characters "
                         f"({spec.characters_text}).")
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    file_digests = {path: file_sha256(path) for path in files}
    cached = [(job, cache_dir and os.path.join(
        cache_dir, _check_key(job, file_digests[job[0].path]) + ".npz")) for job in jobs]
    by_file = {}
    for face_number, job_and_cache in zip(active, cached, strict=True):
        by_file.setdefault(job_and_cache[0][0].path, []).append((face_number, job_and_cache))
    results = _map(_check_file, [[jc for _, jc in group] for group in by_file.values()],
                   processes)
    checked = {face_number: result for group, file_results in zip(by_file.values(), results,
                                                                  strict=True)
               for (face_number, _), result in zip(group, file_results, strict=True)}
    rendered = sum(len(codes_of[i]) for i in active)
    timing["check"] = time.time() - step
    log(f"render check: {rendered} glyphs of {len(active)} faces in {timing['check']:.0f} s.")

    # 3. Designs, among the faces that draw at least one character.
    drawing = [i for i in active if np.any(checked[i][0] == 0)]
    if not drawing:
        raise ValueError("No face draws any requested character (every glyph was rejected).")
    groups, matches, pairs = group_designs(np.stack([checked[i][2] for i in drawing]),
                                           np.stack([checked[i][3] for i in drawing]),
                                           [int(np.sum(checked[i][0] == 0)) for i in drawing])
    groups = [[drawing[f] for f in group] for group in groups]
    matches = {(drawing[a], drawing[b]): share for (a, b), share in matches.items()}
    all_designs = len(groups)
    if spec.max_designs and len(groups) > spec.max_designs:
        groups = choose_designs(groups, [int(np.sum(checked[g[0]][0] == 0)) for g in groups],
                                spec.max_designs, spec.seed)
    log(f"designs: {all_designs} among the {len(drawing)} faces that draw; {len(groups)} "
        "kept.")

    # 4. Classes.
    position = {i: {int(c): k for k, c in enumerate(codes_of[i])} for i in active}
    drawn = {}  # code -> [designs] (within-class identical images dropped)
    removed_identical = 0
    for design, group in enumerate(groups):
        face = group[0]
        status, digests = checked[face][0], checked[face][1]
        for code, k in position[face].items():
            if status[k] != 0:
                continue
            seen = drawn.setdefault(code, [])
            if any(checked[groups[other][0]][1][position[groups[other][0]][code]] == digests[k]
                   for other in seen):
                removed_identical += 1
                continue
            seen.append(design)
    eligible = sorted(code for code, designs in drawn.items() if len(designs) >= spec.min_designs)
    sizes = spec.splits
    needed = sizes.test + sizes.validation + sizes.pretrain + max(sizes.train, 2)
    if len(eligible) < needed:
        raise ValueError(
            f"Only {len(eligible)} characters are drawn by at least --min_designs="
            f"{spec.min_designs} designs ({len(groups)} designs); the splits need "
            f"{needed} (test {sizes.test} + validation {sizes.validation} + pretrain "
            f"{sizes.pretrain} + train {sizes.train or 'at least 2'}). Lower the split sizes "
            "or --min_designs, or add fonts or characters.")
    order = split_order(eligible, spec.seed)
    split_of, start = {}, 0
    for split, size in (("test", sizes.test), ("validation", sizes.validation),
                        ("pretrain", sizes.pretrain),
                        ("train", sizes.train or len(order) - sizes.test - sizes.validation
                         - sizes.pretrain)):
        for code in order[start:start + size]:
            split_of[code] = split
        start += size
    classes = sorted(split_of)
    augmentations = instance_augmentations(spec, len(groups))

    # Rows: class-major (label, design, copy).
    rows_of = {design: ([], []) for design in range(len(groups))}
    labels, designs, copies = [], [], []
    for label, code in enumerate(classes):
        for design in drawn[code]:
            rows_of[design][0].append(code)
            rows_of[design][1].append(len(labels))
            labels.extend([label] * spec.copies)
            designs.extend([design] * spec.copies)
            copies.extend(range(spec.copies))
    total = len(labels)
    per_split = {split: sum(s == split for s in split_of.values()) for split in glyphs.SPLITS}
    log(f"classes: {len(classes)} characters ({per_split}); {total} images.")

    # 5. Render into a temporary sibling, renamed at the end.
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    try:
        step = time.time()
        images_path = os.path.join(staging, glyphs.IMAGES)
        images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8,
                                           shape=(total, spec.image_size, spec.image_size))
        del images
        jobs = [(faces[group[0]], rows_of[design][0], rows_of[design][1], augmentations[design],
                 spec.image_size, spec.supersample, unmapped[group[0]], images_path)
                for design, group in enumerate(groups) if rows_of[design][0]]
        written = sum(_map(_render_design, jobs, processes))
        timing["render"] = time.time() - step
        if written != total:
            raise RuntimeError(f"{written} images written, {total} expected.")
        for name, values, dtype in ((glyphs.LABELS, labels, np.int64),
                                    (glyphs.DESIGNS, designs, np.int32),
                                    (glyphs.COPIES, copies, np.int32)):
            np.save(os.path.join(staging, name), np.asarray(values, dtype), allow_pickle=False)
        identical = identical_within_class(np.load(images_path, mmap_mode="r"),
                                           np.asarray(labels))
        manifest = _manifest(spec, files, file_digests, faces, mapped, checked, groups, matches,
                             pairs, classes, split_of, drawn, augmentations, labels,
                             all_designs, removed_identical, identical, characters, eligible)
        with open(os.path.join(staging, glyphs.MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)
            f.write("\n")
        if os.path.lexists(output):  # rename(2) would replace an empty folder
            raise FileExistsError(f"--output {output!r} appeared while building; nothing of it "
                                  "was touched.")
        os.rename(staging, output)
    except BaseException:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
        raise
    timing["total"] = time.time() - started
    timing["images_per_second"] = total / max(timing["render"], 1e-9)
    timing["glyphs_checked_per_second"] = rendered / max(timing["check"], 1e-9)
    log(f"wrote {output}: {total} images in {timing['total']:.0f} s (render check "
        f"{timing['glyphs_checked_per_second']:.0f} glyphs/s, rendering "
        f"{timing['images_per_second']:.0f} images/s, {processes} processes).")
    return {**manifest, "timing": timing}


def identical_within_class(images, labels):
    """The number of images equal, pixel for pixel, to an earlier image of their class.

    Args:
        images: uint8 [N, S, S], class-major.
        labels: int [N].

    Returns:
        int.
    """
    seen, repeats = set(), 0
    for label, image in zip(labels.tolist(), images, strict=True):
        key = (label, glyph_render.pixel_digest(image))
        repeats += key in seen
        seen.add(key)
    return repeats


def _manifest(spec, files, file_digests, faces, mapped, checked, groups, matches, pairs,
              classes, split_of, drawn, augmentations, labels, all_designs, removed_identical,
              identical, characters, eligible):
    packages = debian_packages(files)
    file_index = {path: i for i, path in enumerate(files)}
    design_of = {face: design for design, group in enumerate(groups) for face in group}
    names = {code: name for name, code in STATUS_CODES.items()}
    face_records = []
    for i, face in enumerate(faces):
        record = {"face": i, "file": file_index[face.path], "index": face.index,
                  "family": face.family, "style": face.style, "full_name": face.full_name,
                  "postscript_name": face.postscript_name, "num_glyphs": face.num_glyphs,
                  "mapped": len(mapped[i]), "design": design_of.get(i)}
        if i in checked:
            values, counts = np.unique(checked[i][0], return_counts=True)
            record["rendered"] = {names[int(v)]: int(n) for v, n in zip(values, counts,
                                                                         strict=True)}
        face_records.append(record)
    labels = np.asarray(labels)
    splits = {}
    for split in glyphs.SPLITS:
        members = [label for label, code in enumerate(classes) if split_of[code] == split]
        splits[split] = {"classes": len(members),
                         "images": int(np.isin(labels, members).sum())}
    return {
        "format": glyphs.FORMAT,
        "format_version": glyphs.FORMAT_VERSION,
        "builder_version": BUILDER_VERSION,
        "arguments": spec.record(),
        "image_size": spec.image_size,
        "rendering": {
            "renderer": "FreeType (freetype-py), no hinting, no embedded bitmaps",
            "supersample": spec.supersample,
            "em_fraction": glyph_render.EM_FRACTION,
            "placement": "em square scaled to em_fraction of the image side; ink box centred",
            "ink": "bright (255) on 0",
        },
        "design_rule": {"match_tolerance": MATCH_TOLERANCE, "match_fraction": MATCH_FRACTION,
                        "min_common": MIN_COMMON, "sample": DESIGN_SAMPLE,
                        "face_pairs": pairs},
        "fonts": [{"file": i, "path": path, "sha256": file_digests[path],
                   "package": packages.get(path)} for i, path in enumerate(files)],
        "faces": face_records,
        "designs": [{"design": d, "representative": group[0], "faces": group,
                     # Each merged face: [face, share of matching sample characters with the
                     # representative].
                     "matches": [[b, round(matches[(group[0], b)], 4)] for b in group[1:]],
                     "characters": sum(d in drawn[code] for code in classes)}
                    for d, group in enumerate(groups)],
        "instances": [{"instance": d * spec.copies + k, "design": d, "copy": k,
                       "augmentation": augmentation.to_dict()}
                      for d, per_copy in enumerate(augmentations)
                      for k, augmentation in enumerate(per_copy)],
        "characters": [{"label": label, "code_point": f"U+{code:04X}", "character": chr(code),
                        "split": split_of[code], "designs": len(drawn[code])}
                       for label, code in enumerate(classes)],
        "splits": splits,
        "counts": {"font_files": len(files), "faces": len(faces),
                   "faces_drawing": len(checked), "designs_found": all_designs,
                   "designs": len(groups), "characters_mapped": len(characters),
                   # Every character drawn by --min_designs designs, and their images: the
                   # largest folder these fonts and arguments give (--train_classes=0).
                   "characters_eligible": len(eligible),
                   "images_eligible": spec.copies * sum(len(drawn[c]) for c in eligible),
                   "characters": len(classes), "images": len(labels),
                   "instances_per_class_max": len(groups) * spec.copies,
                   "identical_dropped_within_class": removed_identical,
                   "identical_within_class": identical},
    }


# -------------------------------------------------------------------------------------- CLI

def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m dvml_tf.data.glyph_builder",
        description="Renders characters from font files into a glyphs folder "
                    "(train.py --dataset=glyphs --data_dir=OUTPUT).")
    parser.add_argument("--fonts", required=True,
                        help="comma-separated font files and folders (searched recursively)")
    parser.add_argument("--output", required=True, help="the folder to create")
    parser.add_argument("--characters", default=DEFAULT_CHARACTERS,
                        help="comma-separated code points and ranges, e.g. U+4E00-U+9FFF")
    parser.add_argument("--characters_file", default=None,
                        help="a UTF-8 file of characters (or of U+XXXX lines), added to "
                             "--characters (pass --characters= to use the file alone)")
    parser.add_argument("--max_characters", type=int, default=0,
                        help="keep the requested characters mapped by the most faces (0: all)")
    parser.add_argument("--min_designs", type=int, default=2,
                        help="a character is a class when at least this many designs draw it")
    parser.add_argument("--max_designs", type=int, default=0,
                        help="keep a seeded random subset of this many designs among those "
                             "drawing at least half as many characters as the most prolific one "
                             "(0: all)")
    parser.add_argument("--image_size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--copies", type=int, default=1,
                        help="augmented copies per design (instances per class = designs x "
                             "copies); needs an augmentation")
    for name, text in (("rotation", "max |rotation|, degrees"), ("shear", "max |shear|, degrees"),
                       ("scale", "max |scale - 1|"),
                       ("translation", "max |shift| per axis, fraction of the image side"),
                       ("stroke", "max |stroke offset|, output pixels")):
        parser.add_argument(f"--{name}", type=float, default=0.0,
                            help=f"augmentation: {text}, drawn per instance (0: none)")
    for split, default in dataclasses.asdict(SplitSizes()).items():
        parser.add_argument(f"--{split}_classes", type=int, default=default,
                            help=f"classes of the {split} split"
                                 + (" (0: every character left)" if split == "train" else ""))
    parser.add_argument("--seed", type=int, default=0,
                        help="splits, design subset, augmentations, design sample")
    parser.add_argument("--cache_dir", default=None,
                        help="keep each face's render check here for later builds with the "
                             "same characters and image size (the output does not depend on it)")
    parser.add_argument("--processes", type=int, default=0,
                        help="worker processes (0: one per CPU); the output does not depend "
                             "on it")
    return parser


def spec_from_args(args):
    """The `BuildSpec` of parsed command-line arguments (ValueError names a bad one)."""
    fonts = tuple(p.strip() for p in args.fonts.split(",") if p.strip())
    characters = parse_characters(args.characters, args.characters_file)
    text = ",".join(filter(None, [args.characters,
                                  args.characters_file and f"file:{args.characters_file}"]))
    return BuildSpec(
        fonts=fonts, characters=characters, characters_text=text, image_size=args.image_size,
        min_designs=args.min_designs, max_designs=args.max_designs,
        max_characters=args.max_characters, copies=args.copies,
        augmentation=glyph_render.AugmentationRange(
            rotation=args.rotation, shear=args.shear, scale=args.scale,
            translation=args.translation, stroke=args.stroke),
        splits=SplitSizes(train=args.train_classes, validation=args.validation_classes,
                          test=args.test_classes, pretrain=args.pretrain_classes),
        seed=args.seed)


def main(argv=None):
    """The command line; returns the manifest (exit status 2 with a message on bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.processes < 0:
        parser.error(f"--processes must be >= 0, got {args.processes}.")
    try:
        spec = spec_from_args(args)
        return build(spec, args.output, processes=args.processes, cache_dir=args.cache_dir)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
