"""Omniglot with the paper's literal DVML recipe (§3-4), on the default run's network.

    TFDS_DATA_DIR=/path/to/tfds python train.py --config=omniglot_paper

Everything of the `omniglot` preset (convnet_wide, F = 512 > J = 128, N-pair 64 x 2, Adam 1e-3,
the same steps) with DVML exactly as published: prior N(0, I), the plain-norm reconstruction
||f - x_hat|| of Eq. 9, heads and decoder trained end to end, no free bits, no warm-up, the
decoder reading z_I(x) + z_V(x).

Expected: below its `--nodvml` baseline (not measured at these 3,500 steps on the test
classes). In the follow-up study (validation classes, seeds 0 and 1, 4,000 steps;
research/dvml_omniglot/README.md, `dvml_paper`) this recipe reached Recall@1 91.2 % (N-pair)
against the baseline's 91.8 %, with 0 active latent units: the variance branch collapses to the
prior and the decoder ignores z_V.
"""

from dvml_tf.configs.omniglot import omniglot_network


def get_config():
    return omniglot_network(config="omniglot_paper")
