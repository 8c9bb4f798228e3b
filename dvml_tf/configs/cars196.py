"""Cars196 with the paper's recipe: train on classes 1-98 (8,054 images), test on 99-196.

    python train.py --config=cars196 --data_dir=/path/to/prepared/tfds --loss=npair
    python train.py --config=cars196 --data_dir=/path/to/prepared/tfds --loss=npair --nodvml

TFDS's download URL for cars196 is broken upstream: pass a prepared TFDS copy, or use
`--dataset=folder --data_dir=<one sub-folder per model>` with this preset.

Expected: paper Table 1 reports R@1 80.4 / NMI 66.0 (DVML + N-pair, GoogLeNet) against 72.3 /
62.9 for N-pair. NOT run here; budget about 2 h on one modern GPU for 8,000 steps.
"""

from dvml_tf.configs import paper


def get_config():
    return paper.paper_recipe(
        config="cars196", dataset="cars196", steps=8000, eval_every=1000, validation_classes=20
    )
