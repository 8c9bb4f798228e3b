"""TrainConfig: everything a training run depends on, validated, serializable, comparable.

A run is fully described by its `TrainConfig`; `train.py` resolves it from a preset
(`dvml_tf/configs/<name>.py`) plus the flags given on the command line, writes it to
`<model_dir>/config.json`, and refuses to resume a model_dir written with a configuration that
would change the result.

Every field is declared once, with its type, default, help text and (where it has them) its
valid values: `train.py`'s flags and the flag table of docs/training.md are generated from these
declarations (`dvml_tf.training.flags`).
"""

import dataclasses
import inspect
import json
import math
import numbers

from dvml_tf.data import DATASETS
from dvml_tf.data import DEFAULT_MAX_PIXELS
from dvml_tf.losses import METRIC_LOSSES
from dvml_tf.losses import SYNTHESIS_METHODS
from dvml_tf.models import BACKBONES
from dvml_tf.models import PAPER_PHASE1_WEIGHTS
from dvml_tf.models import PAPER_PHASE2_WEIGHTS
from dvml_tf.models.dvml_model import DECODER_CENTRES
from dvml_tf.models.dvml_model import RECONSTRUCTIONS
from dvml_tf.models.dvml_model import drop_retired_options

STRATEGIES = ("default", "mirrored", "multi_worker")
EVALUATION_SPLITS = ("test", "validation")

# Fields that may change between an interrupted run and its resumption without changing what is
# trained (where things are written, how often we look, how long we go on).
RESUMABLE_FIELDS = frozenset(
    {
        "model_dir",
        "data_dir",
        "steps",
        "eval_every",
        "log_every",
        "checkpoint_every",
        "eval_batch_size",
        "strategy",
        "jit_compile",
        "config",
        "evaluation_split",
        # A limit that admits or skips images changes the dataset's identity, which a resumed
        # run checks on its own (dataset.json).
        "max_image_pixels",
    }
)


def loss_option_defaults(loss):
    """The keyword arguments a base loss accepts and their defaults, along its class hierarchy.

    Args:
        loss: a name in `METRIC_LOSSES`.

    Returns:
        dict name -> default (the most derived class's default wins).
    """
    defaults = {}
    for cls in METRIC_LOSSES[loss].__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        for name, parameter in inspect.signature(init).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                defaults.setdefault(name, parameter.default)
    return defaults


def check_loss_option_types(loss, options):
    """Refuses a loss option whose value has not the type of its default (a number for a
    margin, True/False for a switch), naming the option, before the loss compares it.

    Args:
        loss: a name in `METRIC_LOSSES`.
        options: dict of keyword arguments (`--loss_options`).

    Raises:
        ValueError: e.g. "--loss_options: margin must be a number, got 'abc' (loss=triplet)."
    """
    defaults = loss_option_defaults(loss)
    for name, value in options.items():
        if name not in defaults:
            continue  # unknown keywords are refused by the constructor, with its own message
        default = defaults[name]
        if isinstance(default, bool):
            expected, ok = "True or False", isinstance(value, bool)
        elif isinstance(default, numbers.Real):
            expected = "a number" if isinstance(value, bool) or not isinstance(
                value, numbers.Real) else "a finite number"
            ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
                  and math.isfinite(value))
        elif isinstance(default, str):
            expected, ok = "a string", isinstance(value, str)
        else:
            continue
        if not ok:
            raise ValueError(f"--loss_options: {name} must be {expected}, got {value!r} "
                             f"(loss={loss}, default {name}={default!r}).")


def _field(default, help, choices=None, group="run"):
    """A TrainConfig field with its help text (and valid values) for flags and docs."""
    metadata = {"help": help, "choices": choices, "group": group}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """The configuration of one training run (see each field's help, or docs/training.md)."""

    config: str = _field("omniglot", "Preset this configuration started from (the record).")
    # ------------------------------------------------------------------------------- data
    dataset: str = _field("omniglot", "Dataset.", choices=DATASETS, group="data")
    data_dir: str | None = _field(
        None, "TFDS data directory, the image folder for --dataset=folder, the CSV manifest "
        "for --dataset=csv, or the glyph folder for --dataset=glyphs.", group="data"
    )
    image_size: int = _field(28, "Side of the (cropped) training and test images.", group="data")
    resize_size: int = _field(
        32,
        "Images are first resized to this square side; training takes a random image_size "
        "crop, testing the centre crop (paper: 256 then 224).",
        group="data",
    )
    validation_classes: int = _field(
        0,
        "Training classes held out for model selection and periodic evaluation (never test "
        "classes); 0 = none.",
        group="data",
    )
    max_image_pixels: int = _field(
        DEFAULT_MAX_PIXELS,
        "Largest image (width x height, read from the file's header) decoded; larger files are "
        "skipped unread (a 400 kB PNG can decode to gigabytes). Also the exports' default.",
        group="data",
    )
    # ------------------------------------------------------------------------------ model
    backbone: str = _field("convnet_small", "Backbone network.", choices=BACKBONES, group="model")
    pretrained: bool = _field(
        False, "Start a keras.applications backbone from ImageNet weights.", group="model"
    )
    backbone_weights: str | None = _field(
        None, "A .weights.h5 file for the backbone (e.g. GoogLeNet weights you ported).",
        group="model",
    )
    embedding_dim: int = _field(128, "Size of z_I, mu and log sigma^2 (paper: 512).",
                                group="model")
    # ----------------------------------------------------------------------------- losses
    loss: str = _field("npair", "Base metric loss.", choices=tuple(METRIC_LOSSES), group="loss")
    loss_options: dict = _field(
        {}, "Keyword arguments of the loss as key=value pairs, e.g. margin=0.3,mining=semihard.",
        group="loss",
    )
    synthesis: str = _field(
        "none",
        "Reference synthesis without a VAE, augmenting the base loss (with or without DVML): "
        "embedding_expansion (Ko & Gu 2020), symmetrical (Gu & Ko 2020), deviation_transfer.",
        choices=("none", *SYNTHESIS_METHODS), group="loss",
    )
    dvml: bool = _field(
        True, "Train DVML (--dvml) or the plain base-loss baseline (--nodvml).", group="dvml"
    )
    num_samples: int = _field(20, "T: z_V draws per image (paper: 20).", group="dvml")
    phase1_fraction: float = _field(0.25, "Fraction of the steps spent in phase 1.",
                                    group="dvml")
    phase1_weights: tuple = _field(
        PAPER_PHASE1_WEIGHTS, "Phase-1 weights: KL,recon,synthesized,invariant.", group="dvml"
    )
    phase2_weights: tuple = _field(
        PAPER_PHASE2_WEIGHTS, "Phase-2 weights: KL,recon,synthesized,invariant.", group="dvml"
    )
    variance_scale: float = _field(
        1.0, "s in z_V = s * (mu + sigma * eps), i.e. a N(0, s^2 I) prior (paper: 1).",
        group="dvml",
    )
    reconstruction: str = _field(
        "norm",
        "norm: ||f - x_hat|| (paper Eq. 9); standardized_squares: 0.5 ||f~ - x_hat||^2 on "
        "per-dimension standardized stop-gradient features (a Gaussian decoder).",
        choices=RECONSTRUCTIONS, group="dvml",
    )
    detach_variance_heads: bool = _field(
        False, "mu and log sigma^2 read stop-gradient f(x): KL and reconstruction train the "
        "variance heads, not the backbone.", group="dvml",
    )
    kl_free_bits: float = _field(
        0.0, "Nats per latent dimension below which the KL exerts no pressure (free bits).",
        group="dvml",
    )
    kl_warmup: bool = _field(
        False, "The KL weight rises linearly from 0 over phase 1.", group="dvml"
    )
    decoder_centre: str = _field(
        "own",
        "own: the decoder reads z_I(x) + z_V(x) (paper); class_mean: stop-gradient mean z_I of "
        "the other images of x's class + z_V(x), so only z_V can carry x's deviation.",
        choices=DECODER_CENTRES, group="dvml",
    )
    variance_transfer: bool = _field(
        False, "L_syn on z_I(x) + z_V(x') with x' of another class (gradient stopped at the "
        "variance heads).", group="dvml",
    )
    scale_to_intra_class: bool = _field(
        False, "Scale z_V by the RMS distance of z_I to its class mean in the batch.",
        group="dvml",
    )
    # ------------------------------------------------------------------------ optimization
    classes_per_batch: int = _field(64, "P: distinct classes per batch.", group="optimization")
    images_per_class: int = _field(2, "K: images per class (N-pair: 2).", group="optimization")
    steps: int = _field(3000, "Training steps.", group="optimization")
    learning_rate: float = _field(1e-3, "Adam learning rate (paper: 1e-4).",
                                  group="optimization")
    weight_decay: float = _field(
        0.0, "Decoupled weight decay (AdamW) if > 0; the paper states none.",
        group="optimization",
    )
    seed: int = _field(
        0, "Seeds weights, batches, augmentation and noise; a run is reproducible from it.",
        group="optimization",
    )
    # ------------------------------------------------------------------------------- run
    model_dir: str = _field(
        "", "Output folder; default: runs/{dataset}_{loss}_{dvml or baseline}_seed{seed}."
    )
    eval_every: int = _field(0, "Evaluate on the validation split every N steps (0 = never).")
    log_every: int = _field(50, "TensorBoard logging interval in steps.")
    checkpoint_every: int = _field(500, "Checkpoint interval in steps (and on interruption).")
    eval_batch_size: int = _field(256, "Batch size for computing embeddings.")
    recall_ks: tuple = _field((1, 2, 4, 8), "K of Recall@K reported at the end, e.g. 1,10,100.")
    evaluation_split: str = _field(
        "test",
        "Split evaluated at the end: test (metrics.json) or validation (metrics_validation.json,"
        " for model selection, which must never look at the test classes).",
        choices=EVALUATION_SPLITS,
    )
    # ------------------------------------------------------------------------ distribution
    strategy: str = _field(
        "default",
        "default: one device; mirrored: all local GPUs; multi_worker: the TF_CONFIG cluster.",
        choices=STRATEGIES, group="distribution",
    )
    sync_batch_norm: bool = _field(
        False, "All-reduce batch-norm statistics across replicas (GPUs/workers).",
        group="distribution",
    )
    mixed_precision: bool = _field(
        False, "float16 compute (GPU), float32 variables and losses.", group="distribution"
    )
    jit_compile: bool = _field(False, "Compile the training step with XLA.",
                               group="distribution")

    @property
    def batch_size(self):
        return self.classes_per_batch * self.images_per_class

    @property
    def phase1_steps(self):
        return round(self.phase1_fraction * self.steps)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def validate(self):
        """Raises ValueError naming the first invalid field; returns self."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # NaN passes every comparison below (and would make config.json invalid JSON).
            if any(isinstance(v, float) and not math.isfinite(v)
                   for v in (value if isinstance(value, tuple) else (value,))):
                raise ValueError(f"{field.name} must be a finite number; got {value!r}.")
        for field in dataclasses.fields(self):
            valid = field.metadata.get("choices")
            value = getattr(self, field.name)
            if valid is not None and value not in valid:
                raise ValueError(
                    f"Unknown {field.name} {value!r}; valid values: {', '.join(valid)}."
                )
        if self.evaluation_split == "validation" and self.validation_classes == 0:
            raise ValueError("evaluation_split=validation needs validation_classes > 0.")
        if self.variance_scale <= 0:
            raise ValueError(f"variance_scale must be > 0; got {self.variance_scale}.")
        if self.kl_free_bits < 0:
            raise ValueError(f"kl_free_bits must be >= 0; got {self.kl_free_bits}.")
        if self.synthesis in ("embedding_expansion", "symmetrical") and self.images_per_class % 2:
            raise ValueError(
                f"synthesis={self.synthesis} pairs adjacent images of a class: it needs an even "
                f"images_per_class; got {self.images_per_class}."
            )
        for field in (
            "image_size",
            "resize_size",
            "embedding_dim",
            "num_samples",
            "steps",
            "log_every",
            "checkpoint_every",
            "eval_batch_size",
            "max_image_pixels",
        ):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1; got {getattr(self, field)}.")
        for field in ("validation_classes", "eval_every"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0; got {getattr(self, field)}.")
        if self.image_size > self.resize_size:
            raise ValueError(
                f"image_size ({self.image_size}) is a crop of the resized image and cannot "
                f"exceed resize_size ({self.resize_size})."
            )
        if self.classes_per_batch < 2:
            raise ValueError(
                f"classes_per_batch must be >= 2 (negatives come from other classes); "
                f"got {self.classes_per_batch}."
            )
        if self.images_per_class < 2:
            raise ValueError(
                f"images_per_class must be >= 2 (positives come from the same class); "
                f"got {self.images_per_class}."
            )
        check_loss_option_types(self.loss, self.loss_options)
        try:  # build the loss once so that a bad option fails now, not after loading data
            METRIC_LOSSES[self.loss](**self.loss_options)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Invalid loss_options {self.loss_options} for loss={self.loss}: {error}"
            ) from None
        required = METRIC_LOSSES[self.loss].images_per_class
        if required is not None and self.images_per_class != required:
            raise ValueError(
                f"loss={self.loss} needs images_per_class={required} (N classes x {required} "
                f"images); got {self.images_per_class}."
            )
        if not 0.0 <= self.phase1_fraction <= 1.0:
            raise ValueError(f"phase1_fraction must be in [0, 1]; got {self.phase1_fraction}.")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"learning_rate must be > 0 and weight_decay >= 0; got {self.learning_rate}, "
                f"{self.weight_decay}."
            )
        for field in ("phase1_weights", "phase2_weights"):
            weights = getattr(self, field)
            if len(weights) != 4 or min(weights) < 0:
                raise ValueError(f"{field} must be 4 non-negative numbers; got {weights}.")
        if not self.recall_ks or min(self.recall_ks) < 1:
            raise ValueError(f"recall_ks must be positive integers; got {self.recall_ks}.")
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("dataset=folder needs --data_dir=<a folder of class sub-folders>.")
        if self.dataset == "csv" and not self.data_dir:
            raise ValueError("dataset=csv needs --data_dir=<a CSV manifest with the columns "
                             "path,label[,split,is_query,is_gallery]>.")
        if self.dataset == "glyphs" and not self.data_dir:
            raise ValueError("dataset=glyphs needs --data_dir=<a glyph folder> (built with "
                             "python -m dvml_tf.data.glyph_builder).")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        values = drop_retired_options(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"Unknown configuration fields: {', '.join(sorted(unknown))}.")
        for field in ("phase1_weights", "phase2_weights", "recall_ks"):
            if field in values:
                values[field] = tuple(values[field])
        return cls(**values)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    def differences(self, other):
        """Fields (outside `RESUMABLE_FIELDS`) whose values differ from `other`'s."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {
            key: (theirs.get(key), value)
            for key, value in mine.items()
            if key not in RESUMABLE_FIELDS and theirs.get(key) != value
        }
