"""Omniglot on a CPU: DVML + N-pair, the default of `python train.py`.

    TFDS_DATA_DIR=/path/to/tfds python train.py       # offline copy; online, just train.py

Trains on the 964 background classes (19,280 images, 28 px, grayscale tiled to 3 channels) and
evaluates on all 13,180 images of the 659 unseen evaluation classes.

The DVML variant is the one the follow-up study selected on held-out training classes
(research/dvml_omniglot/README.md, "Follow-up"): a bottleneck (`convnet_wide`, F = 512 > J =
128), the paper's prior scale, a Gaussian decoder on standardized stop-gradient features,
variance heads on stop-gradient features, 0.1 free nats per latent unit with a KL warm-up, and
class-centre decoding, so that z_V carries each image's deviation from its class. Each option
is a row of docs/method.md, "Deviations from the paper"; `--config=omniglot_paper` is the
paper's literal recipe on the same network.

Expected: Recall@1 85.1 +- 0.6 % (MAP@R 52.5, NMI 91.4, F1 66.5; seeds 0-2) in about 9 minutes
(8:56-9:17) on an idle 2-core x86_64 CPU, end to end; `--nodvml` run the same way: 85.0 +- 0.5 %
in about 7 minutes, a tie (measured: benchmarks/default_run.py; docs/results.md, "The default
run").
"""

from dvml_tf.training.config import TrainConfig

# Steps of the default run, sized to finish well within 10 minutes on an idle 2-core CPU: at
# the study's 4,000 steps it took 9 min 42 s end to end (benchmarks/default_run.py,
# benchmarks/results/default_run_4000_steps.json), too close to the limit.
DEFAULT_STEPS = 3500


def omniglot_network(**overrides):
    """The network, batches and schedule every Omniglot preset shares (N-pair, 64 x 2)."""
    values = dict(
        dataset="omniglot",
        image_size=28,
        resize_size=32,
        backbone="convnet_wide",
        embedding_dim=128,
        loss="npair",
        dvml=True,
        num_samples=20,
        classes_per_batch=64,
        images_per_class=2,
        steps=DEFAULT_STEPS,
        learning_rate=1e-3,
        log_every=50,
        checkpoint_every=500,
    )
    values.update(overrides)
    return TrainConfig(**values)


def get_config():
    return omniglot_network(
        config="omniglot",
        # Selected on validation classes (research/dvml_omniglot/synthesis.py, `dvml_centre`).
        variance_scale=1.0,
        reconstruction="standardized_squares",
        detach_variance_heads=True,
        kl_free_bits=0.1,
        kl_warmup=True,
        decoder_centre="class_mean",
    )
