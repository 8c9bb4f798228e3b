"""Stanford Online Products with the paper's recipe: 11,318 training products (59,551 images),
11,316 test products (60,502 images); Recall@1/10/100/1000.

    python train.py --config=sop --loss=npair
    python train.py --config=sop --loss=npair --nodvml

Expected: paper Table 2 reports R@1 70.0 / R@10 85.1 / NMI 90.2 (DVML + N-pair, GoogLeNet)
against 66.4 / 82.9 / 87.9 for N-pair. NOT run here; budget about 8 h on one modern GPU for
30,000 steps, plus 2-3 minutes (measured on 2 CPU cores) for the final k-means over 11,316
clusters.
"""

from dvml_tf.configs import paper


def get_config():
    return paper.paper_recipe(
        config="sop",
        dataset="sop",
        steps=30000,
        eval_every=5000,
        validation_classes=500,
        recall_ks=(1, 10, 100, 1000),
    )
