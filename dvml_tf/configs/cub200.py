"""CUB-200-2011 with the paper's recipe: train on classes 1-100 (5,864 images), test on 101-200.

    python train.py --config=cub200 --loss=npair           # DVML + N-pair
    python train.py --config=cub200 --loss=npair --nodvml  # the N-pair baseline

Expected: paper Table 3 reports R@1 52.5 / NMI 61.1 (DVML + N-pair, GoogLeNet) against 50.6 /
60.1 for N-pair. NOT run here (no GPU, no data host reachable); budget about 1.5 h on one
modern GPU for 6,000 steps of InceptionV3 at 224 px.
"""

from dvml_tf.configs import paper


def get_config():
    return paper.paper_recipe(
        config="cub200", dataset="cub200", steps=6000, eval_every=1000, validation_classes=20
    )
