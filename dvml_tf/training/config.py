"""TrainConfig: everything a training run depends on, validated, serializable, comparable.

A run is fully described by its `TrainConfig`; `train.py` resolves it from a preset
(`dvml_tf/configs/<name>.py`) plus the flags given on the command line, writes it to
`<model_dir>/config.json`, and refuses to resume a model_dir written with a configuration that
would change the result.
"""

import dataclasses
import json

from dvml_tf.losses import METRIC_LOSSES
from dvml_tf.models import BACKBONES
from dvml_tf.models import PAPER_PHASE1_WEIGHTS
from dvml_tf.models import PAPER_PHASE2_WEIGHTS
from dvml_tf.models.dvml_model import SYNTHESIS_GRADIENTS

DATASETS = ("omniglot", "cub200", "cars196", "sop", "folder")
STRATEGIES = ("default", "mirrored", "multi_worker")

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
    }
)
EVALUATION_SPLITS = ("test", "validation")


@dataclasses.dataclass
class TrainConfig:
    """The configuration of one training run.

    Args:
        config: name of the preset this configuration started from (for the record).
        dataset: one of `DATASETS`.
        data_dir: TFDS data directory, or the image folder for `dataset="folder"`.
        image_size: side of the (cropped) training and test images.
        resize_size: images are first resized to this square side; training takes a random
            `image_size` crop, testing the centre crop (paper §4.1: 256 then 224).
        validation_classes: number of training classes held out for model selection and
            periodic evaluation (never the test classes). 0 = none.
        backbone: one of `BACKBONES`.
        pretrained: load ImageNet weights for a keras.applications backbone.
        backbone_weights: optional `.weights.h5` for the backbone (e.g. ported GoogLeNet).
        embedding_dim: size of z_I (512 in the paper).
        loss: base metric loss, one of `METRIC_LOSSES`.
        loss_options: keyword arguments of the loss (margin, l2_reg, normalize, temperature...).
        dvml: train DVML (True) or the plain base-loss baseline (False).
        num_samples: T, z_V draws per image.
        phase1_fraction: fraction of `steps` spent in phase 1.
        phase1_weights, phase2_weights: (KL, recon, synthesized metric, invariant metric).
        variance_scale: s in z_V = s * (mu + sigma * eps) (paper: 1).
        normalize_before_sum: synthesize normalize(z_I) + z_V (paper: z_I + z_V).
        synthesis_gradient: "full" (paper), "stop" or "reverse": what L_syn does to the
            variance heads (see `models.dvml_model.SYNTHESIS_GRADIENTS`).
        classes_per_batch: P, distinct classes per batch.
        images_per_class: K, images per class (N-pair: 2).
        steps: total training steps.
        learning_rate: Adam learning rate (paper: 1e-4).
        weight_decay: decoupled weight decay (AdamW) if > 0; the paper states none.
        seed: seeds weights, sampling and augmentation; a run is reproducible from it.
        model_dir: where checkpoints, logs, the final model and metrics go.
        eval_every: evaluate on the validation split every this many steps (0 = never).
        log_every: write TensorBoard scalars every this many steps.
        checkpoint_every: save a checkpoint every this many steps (and on interruption).
        eval_batch_size: batch size for computing embeddings.
        recall_ks: the K of Recall@K reported at the end (SOP: 1, 10, 100, 1000).
        evaluation_split: the split evaluated at the end: "test" (metrics.json) or
            "validation" (metrics_validation.json; for model selection, which must never look
            at the test classes).
        strategy: one of `STRATEGIES`.
        sync_batch_norm: all-reduce batch-norm statistics across replicas (the update then
            equals one device's on the global batch).
        mixed_precision: float16 compute with float32 variables and losses.
        jit_compile: compile the training step with XLA.
    """

    config: str = "omniglot"
    dataset: str = "omniglot"
    data_dir: str | None = None
    image_size: int = 28
    resize_size: int = 32
    validation_classes: int = 0
    backbone: str = "convnet_small"
    pretrained: bool = False
    backbone_weights: str | None = None
    embedding_dim: int = 128
    loss: str = "npair"
    loss_options: dict = dataclasses.field(default_factory=dict)
    dvml: bool = True
    num_samples: int = 20
    phase1_fraction: float = 0.25
    phase1_weights: tuple = PAPER_PHASE1_WEIGHTS
    phase2_weights: tuple = PAPER_PHASE2_WEIGHTS
    variance_scale: float = 1.0
    normalize_before_sum: bool = False
    synthesis_gradient: str = "full"
    classes_per_batch: int = 64
    images_per_class: int = 2
    steps: int = 3000
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    model_dir: str = ""
    eval_every: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    eval_batch_size: int = 256
    recall_ks: tuple = (1, 2, 4, 8)
    evaluation_split: str = "test"
    strategy: str = "default"
    sync_batch_norm: bool = False
    mixed_precision: bool = False
    jit_compile: bool = False

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

        def choice(field, valid):
            value = getattr(self, field)
            if value not in valid:
                raise ValueError(f"Unknown {field} {value!r}; valid values: {', '.join(valid)}.")

        choice("dataset", DATASETS)
        choice("backbone", BACKBONES)
        choice("loss", tuple(METRIC_LOSSES))
        choice("strategy", STRATEGIES)
        choice("synthesis_gradient", SYNTHESIS_GRADIENTS)
        choice("evaluation_split", EVALUATION_SPLITS)
        if self.evaluation_split == "validation" and self.validation_classes == 0:
            raise ValueError("evaluation_split=validation needs validation_classes > 0.")
        if self.variance_scale <= 0:
            raise ValueError(f"variance_scale must be > 0; got {self.variance_scale}.")
        for field in (
            "image_size",
            "resize_size",
            "embedding_dim",
            "num_samples",
            "steps",
            "log_every",
            "checkpoint_every",
            "eval_batch_size",
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
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"Unknown configuration fields: {', '.join(sorted(unknown))}.")
        values = dict(values)
        for field in ("phase1_weights", "phase2_weights", "recall_ks"):
            if field in values:
                values[field] = tuple(values[field])
        return cls(**values)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def differences(self, other):
        """Fields (outside `RESUMABLE_FIELDS`) whose values differ from `other`'s."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {
            key: (theirs.get(key), value)
            for key, value in mine.items()
            if key not in RESUMABLE_FIELDS and theirs.get(key) != value
        }
