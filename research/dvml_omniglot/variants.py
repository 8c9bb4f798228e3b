"""Research variants of DVML that did not help and so left the product: overrides of
`DVMLModel.synthesize`, built by `train.py`'s flags plus `--research_variant` (`train.py` here).

* `unit`: synthesize normalize(z_I) + z_V instead of z_I + z_V (the ratio of variance to centre
  then does not depend on ||z_I||); measured: the embedding collapses in phase 2.
* `stop`: L_syn does not reach the variance heads: q(z_V|x) is shaped by KL and reconstruction
  only.
* `reverse`: L_syn's gradient is reversed at the variance heads: they make the synthesized
  samples harder (adversarial); the backbone and z_I learn from L_syn as before.
* `decoded`: L_syn on z_I(x) + W (f_hat(c + z_V) - f_hat(c)), the decoder's feature-space
  deviation for z_V mapped by the embedding head's kernel W (c: the decoder's centre, see
  `DVMLModel(decoder_centre=...)`; with `variance_transfer`, z_V of an image of another class).
  `synthesis_geometry.py` found the offsets of the paper's z_I + z_V no better aligned with the
  real intra-class variation than isotropic noise (z_V is a code in the decoder's basis), and
  the same trained decoders' deviations, embedded by W, aligned with the real intra-class
  variation (mostly through W: feature noise mapped by W aligns about as well). The decoded
  deviation is stop-gradient: the decoder and the variance heads learn from KL and
  reconstruction only; L_syn trains z_I and W.

Results: README.md of this folder (validation screen, `dvml_unit`, `dvml_stop`, `dvml_reverse`;
the exploratory stage of `synthesis.py` for `decoded`).
"""

import keras
import tensorflow as tf

from dvml_tf import models
from dvml_tf.models import dvml_model

VARIANTS = ("unit", "stop", "reverse", "decoded")


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
        if self.research_variant == "decoded":
            return decoded_synthesis(self, z_inv, z_var, centre, batch)
        # These variants predate the product's decoder-centre and transfer options: they
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


def decoded_synthesis(model, z_inv, z_var, centre=None, batch=None):
    """The `decoded` synthesis (module docstring) with a `DVMLModel`'s decoder, heads and
    options: `DVMLModel.synthesize`'s arguments and results. Also applied by
    `synthesis_geometry.py --rule=decoded` to runs trained with another rule."""
    centre = z_inv if centre is None else centre
    decoder_input = centre + z_var
    code = model.partner_variance(z_var, batch) if model.variance_transfer else z_var
    deviation = model._decode(centre[tf.newaxis] + code) - model._decode(centre[tf.newaxis])
    if model.reconstruction != "norm":  # the decoder rebuilds standardized features
        deviation *= tf.sqrt(dvml_model.floored_variance(model.feature_variance))
    offset = tf.einsum("tbf,fj->tbj", tf.stop_gradient(deviation), model.embedding_head.kernel)
    return decoder_input, z_inv + offset


def model_builder(variant):
    """A `Trainer` model builder for one research variant (None: the product model)."""
    if variant is None:
        return None
    from dvml_tf import task

    return lambda config: task.build_model(config, ResearchDVMLModel, research_variant=variant)
