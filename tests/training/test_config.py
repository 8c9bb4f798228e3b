import dataclasses
import json

import pytest

from dvml_tf import configs
from dvml_tf.training.config import TrainConfig


def test_every_preset_is_valid_and_round_trips_through_json():
    for name in configs.PRESETS:
        config = configs.get_preset(name)
        if config.dataset in ("folder", "csv", "glyphs"):  # the user's files: data_dir needed
            with pytest.raises(ValueError, match=f"dataset={config.dataset} needs --data_dir"):
                config.validate()
            config = config.replace(data_dir="/some/catalogue")
        config.validate()
        assert TrainConfig.from_dict(json.loads(config.to_json())) == config


def test_omniglot_paper_is_the_default_network_with_dvml_as_published():
    default, paper = configs.get_preset("omniglot"), configs.get_preset("omniglot_paper")
    for field in dataclasses.fields(TrainConfig):
        if field.metadata["group"] == "dvml":  # the paper's DVML: every option at its default
            assert getattr(paper, field.name) == field.default, field.name
        elif field.name != "config":  # the default run's network, data, batches and steps
            assert getattr(paper, field.name) == getattr(default, field.name), field.name
    assert default.dvml and default.decoder_centre == "class_mean"


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid configs: omniglot, omniglot_paper, cub200"):
        configs.get_preset("imagenet")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"dataset": "mnist"}, "Unknown dataset 'mnist'; valid values: omniglot"),
        ({"loss": "arcface"}, "Unknown loss 'arcface'; valid values: triplet, npair"),
        ({"backbone": "vgg"}, "Unknown backbone"),
        ({"strategy": "tpu"}, "Unknown strategy"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"image_size": 40}, "cannot exceed resize_size"),
        ({"classes_per_batch": 1}, "classes_per_batch must be >= 2"),
        ({"images_per_class": 1}, "images_per_class must be >= 2"),
        ({"loss": "npair", "images_per_class": 4}, "needs images_per_class=2"),
        ({"phase1_fraction": 1.5}, r"phase1_fraction must be in \[0, 1\]"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"phase2_weights": (1, 1)}, "phase2_weights must be 4"),
        ({"recall_ks": (0, 1)}, "recall_ks"),
        ({"dataset": "folder", "data_dir": None}, "needs --data_dir"),
        ({"reconstruction": "l1"}, "Unknown reconstruction 'l1'"),
        ({"decoder_centre": "median"}, "Unknown decoder_centre"),
        ({"synthesis": "mixup"}, "Unknown synthesis 'mixup'; valid values: none, embedding"),
        ({"kl_free_bits": -0.1}, "kl_free_bits must be >= 0"),
        ({"synthesis": "symmetrical", "loss": "triplet", "images_per_class": 3},
         "needs an even images_per_class"),
        ({"loss": "triplet", "loss_options": {"margin": "abc"}},
         r"--loss_options: margin must be a number, got 'abc' \(loss=triplet, default "
         r"margin=0.2\)"),
        # Inherited options (MetricLoss's normalize) and booleans that are not numbers.
        ({"loss": "margin_dws", "images_per_class": 4, "loss_options": {"nu": True}},
         "--loss_options: nu must be a number, got True"),
        ({"loss": "npair", "loss_options": {"normalize": 1}},
         "--loss_options: normalize must be True or False, got 1"),
        # NaN passes every comparison (and would make config.json invalid JSON).
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number; got nan"),
        ({"learning_rate": float("inf")}, "learning_rate must be a finite number; got inf"),
        ({"variance_scale": float("nan")}, "variance_scale must be a finite number; got nan"),
        ({"phase1_weights": (1.0, float("nan"), 1.0, 1.0)},
         r"phase1_weights must be a finite number; got \(1\.0, nan, 1\.0, 1\.0\)"),
        ({"loss": "triplet", "loss_options": {"margin": float("nan")}},
         "--loss_options: margin must be a finite number, got nan"),
        ({"max_image_pixels": 0}, "max_image_pixels must be >= 1; got 0"),
    ],
)
def test_invalid_values_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig().replace(**changes).validate()


def test_phase1_steps_follow_the_fraction():
    assert TrainConfig(steps=1000, phase1_fraction=0.25).phase1_steps == 250
    assert TrainConfig(steps=10, phase1_fraction=0.0).phase1_steps == 0


def test_differences_ignore_where_and_how_often_but_not_what():
    base = TrainConfig()
    assert base.differences(base.replace(model_dir="x", steps=10, eval_every=5)) == {}
    assert base.differences(base.replace(loss="triplet")) == {"loss": ("triplet", "npair")}


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="Unknown configuration fields: colour"):
        TrainConfig.from_dict({"colour": "red"})


def test_from_dict_reads_configs_written_before_the_research_options_left():
    old = TrainConfig().to_dict()
    # config.json of a run trained before the research variants moved to research/: the paper's
    # values load (and are dropped), a research variant is refused with a pointer.
    loaded = TrainConfig.from_dict({**old, "normalize_before_sum": False,
                                    "synthesis_gradient": "full"})
    assert loaded == TrainConfig()
    with pytest.raises(ValueError, match=r"synthesis_gradient='stop'.*research/dvml_omniglot"):
        TrainConfig.from_dict({**old, "synthesis_gradient": "stop"})
    with pytest.raises(ValueError, match="normalize_before_sum=True"):
        TrainConfig.from_dict({**old, "normalize_before_sum": True})
