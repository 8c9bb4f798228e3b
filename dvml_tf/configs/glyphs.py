"""Glyphs: characters rendered from fonts (`--dataset=glyphs`), on the default run's network.

    python -m dvml_tf.data.glyph_builder --fonts=/usr/share/fonts --output=GLYPHS   # once
    python train.py --dataset=glyphs --data_dir=GLYPHS

Everything of the `omniglot` preset (DVML `dvml_centre` + N-pair on `convnet_wide`, 28 px
crops of the 32 px images, no flips, 64 x 2 batches, Adam 1e-3, 3,500 steps), on a glyph
folder: the classes are characters, the instances font designs (docs/glyphs.md). With
`--validation_classes` equal to the folder's built validation split, it trains on the
training classes and validates on the held-out ones (`--evaluation_split=validation`).

Expected: not measured for DVML (the study of issue 21 part 3 is not run). Calibration of the
`--nodvml` baseline on validation classes: research/glyphs/README.md.
"""

from dvml_tf.configs import omniglot


def get_config():
    return omniglot.get_config().replace(config="glyphs", dataset="glyphs")
