"""What the Debian CJK fonts give as a glyph folder: faces, designs, characters, images, and the
evidence for the design rule (issue 21, the dataset's size in docs/glyphs.md).

Builds the full folder of `--characters` (every CJK unified ideograph of U+4E00-U+9FFF drawn by
at least two designs; 32 px; the study's split sizes with 1,000 training classes, the rest of
the eligible characters counted, not rendered) and writes a summary of its manifest:

    python research/glyphs/census.py --workdir=RUNS       # after setup_fonts.sh

Writes research/glyphs/results/census.json: the counts, every design (its faces, packages and
the characters it draws), the share histogram of face pairs within and between designs, the
rejections per reason, the builder's timing and the folder's bytes. With `--cache_dir` from an
earlier build the render check is read from it (its timing is then not a measurement).
"""

import argparse
import collections
import datetime
import os
import pathlib
import platform
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dvml_tf.data import glyph_builder  # noqa: E402
from dvml_tf.utils import atomic  # noqa: E402

CHARACTERS = "U+4E00-U+9FFF"
SPLITS = glyph_builder.SplitSizes(train=1000, validation=500, test=1000, pretrain=1000)


def summary(manifest, output, seconds):
    fonts = manifest["fonts"]
    faces = manifest["faces"]
    rejected = collections.Counter()
    for face in faces:
        for status, count in face.get("rendered", {}).items():
            if status != "ok":
                rejected[status] += count
    return {
        "arguments": manifest["arguments"],
        "counts": manifest["counts"],
        "splits": manifest["splits"],
        "design_rule": manifest["design_rule"],
        "designs": [{"design": d["design"],
                     "faces": [faces[f]["full_name"] for f in d["faces"]],
                     "representative": faces[d["representative"]]["full_name"],
                     "packages": sorted({fonts[faces[f]["file"]]["package"] or "?"
                                         for f in d["faces"]}),
                     "classes_drawn": d["characters"]} for d in manifest["designs"]],
        "rejected_glyphs": dict(sorted(rejected.items())),
        "faces_without_characters": len(faces) - manifest["counts"]["faces_drawing"],
        "packages": sorted({f["package"] for f in fonts if f["package"]}),
        "bytes": {path.name: path.stat().st_size for path in sorted(output.iterdir())},
        "timing": {key: round(value, 1) for key, value in manifest["timing"].items()},
        "build_seconds": round(seconds, 1),
        "load_average": os.getloadavg(),
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()},
        "date": datetime.date.today().isoformat(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where the glyph folder is built")
    parser.add_argument("--fonts", default="/usr/share/fonts")
    parser.add_argument("--cache_dir", default=None, help="the builder's render-check cache")
    parser.add_argument("--processes", type=int, default=0)
    parser.add_argument("--output", default=str(HERE / "results" / "census.json"))
    args = parser.parse_args(argv)
    output = pathlib.Path(args.workdir) / "census32"
    spec = glyph_builder.BuildSpec(
        fonts=tuple(args.fonts.split(",")),
        characters=glyph_builder.parse_characters(CHARACTERS), characters_text=CHARACTERS,
        image_size=32, min_designs=2, splits=SPLITS)
    started = time.time()
    manifest = glyph_builder.build(spec, output, processes=args.processes,
                                   cache_dir=args.cache_dir)
    record = summary(manifest, output, time.time() - started)
    atomic.write_json(args.output, record)
    print({key: record[key] for key in ("counts", "rejected_glyphs", "timing")})


if __name__ == "__main__":
    main()
