"""Research variants of DVML that did not help and so left the product: overrides of
`DVMLModel.synthesize`, built by `train.py`'s flags plus `--research_variant` (`train.py` here).

* `unit`: synthesize normalize(z_I) + z_V instead of z_I + z_V (the ratio of variance to centre
  then does not depend on ||z_I||); measured: the embedding collapses in phase 2.
* `stop`: L_syn does not reach the variance heads: q(z_V|x) is shaped by KL and reconstruction
  only.
* `reverse`: L_syn's gradient is reversed at the variance heads: they make the synthesized
  samples harder (adversarial); the backbone and z_I learn from L_syn as before.

Results: README.md of this folder (validation screen, `dvml_unit`, `dvml_stop`, `dvml_reverse`).
"""

import keras
import tensorflow as tf

from dvml_tf import models

VARIANTS = ("unit", "stop", "reverse")


@keras.saving.register_keras_serializable(package="dvml_research")
class ResearchDVMLModel(models.DVMLModel):
    """`DVMLModel` with one research variant of the synthesis.

    Args:
        *args: forwarded to `DVMLModel`.
        research_variant: one of `VARIANTS`.
        **kwargs: forwarded to `DVMLModel`.
    """

    def __init__(self, *args, research_variant="stop", **kwargs):
        if research_variant not in VARIANTS:
            raise ValueError(f"Unknown research_variant {research_variant!r}; valid: "
                             f"{', '.join(VARIANTS)}.")
        super().__init__(*args, **kwargs)
        self.research_variant = research_variant

    def synthesize(self, z_inv, z_var, features, noise, centre=None, batch=None):
        # The variants predate the product's decoder-centre and transfer options: they
        # synthesize around the image's own z_I.
        del centre, batch
        if self.research_variant == "unit":
            z_syn = tf.math.l2_normalize(z_inv, axis=-1) + z_var
            return z_syn, z_syn
        z_syn = z_inv + z_var
        if self.research_variant == "stop":
            return z_syn, z_inv + tf.stop_gradient(z_var)
        # "reverse": only the two heads play the adversary: recompute them on a frozen feature
        # (same value), then pass z_V forward unchanged and its gradient backward negated.
        frozen = tf.stop_gradient(features)
        adversary = self.variance_scale * (
            self.mean_head(frozen) + tf.exp(0.5 * self.log_variance_head(frozen)) * noise
        )
        return z_syn, z_inv + tf.stop_gradient(2.0 * adversary) - adversary

    def get_config(self):
        config = super().get_config()
        config["research_variant"] = self.research_variant
        return config


def model_builder(variant):
    """A `Trainer` model builder for one research variant (None: the product model)."""
    if variant is None:
        return None
    from dvml_tf import task

    return lambda config: task.build_model(config, ResearchDVMLModel, research_variant=variant)
