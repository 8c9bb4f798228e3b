"""train.py's flags, generated from TrainConfig's field declarations: one flag per field, of the
field's type; the preset plus the flags given; bad values naming the flag; the docs table."""

import dataclasses
import re
import types

import pytest
from absl import flags

from dvml_tf import configs
from dvml_tf.training import flags as flags_lib
from dvml_tf.training.config import TrainConfig

FIELDS = [field for field in dataclasses.fields(TrainConfig) if field.name != "config"]


def _flag_values():
    flag_values = flags.FlagValues()
    flags_lib.define_flags(flag_values)
    return flag_values


def parse(*argv):
    """The TrainConfig of `train.py <argv>` (a fresh set of flags: nothing global is touched)."""
    flag_values = _flag_values()
    flag_values(["train.py", *argv])
    return flags_lib.config_from_flags(flag_values)


def _expected_parser(value, choices):
    """The absl parser a field's flag must have, from the field's default value's type."""
    if choices is not None:
        return flags.EnumParser
    if isinstance(value, bool):
        return flags.BooleanParser
    if isinstance(value, int):
        return flags.IntegerParser
    if isinstance(value, float):
        return flags.FloatParser
    if isinstance(value, tuple):
        return flags.ListParser
    return flags.ArgumentParser  # strings, optional strings, and key=value dicts


def test_every_field_has_a_flag_of_the_same_name_and_type():
    flag_values = _flag_values()
    defaults = TrainConfig()
    assert set(flag_values) == {"config"} | {field.name for field in FIELDS}
    for field in FIELDS:
        flag = flag_values[field.name]
        choices = field.metadata.get("choices")
        expected = _expected_parser(getattr(defaults, field.name), choices)
        assert type(flag.parser) is expected, field.name
        # (absl prefixes an enum's help with its values.)
        assert flag.help.endswith(field.metadata["help"]), field.name
        # Left off the command line, a flag is None: the preset's value stays.
        assert flag.default is None, field.name
        if choices is not None:
            assert flag.parser.enum_values == list(choices), field.name
    assert flag_values["config"].parser.enum_values == list(configs.PRESETS)


# One override per field (a valid value other than the omniglot preset's), with the flags that
# keep the configuration valid where fields depend on each other.
OVERRIDES = {
    "dataset": (["--dataset=cub200"], {"dataset": "cub200"}),
    "data_dir": (["--data_dir=/data/tfds"], {"data_dir": "/data/tfds"}),
    "image_size": (["--image_size=24"], {"image_size": 24}),
    "resize_size": (["--resize_size=40"], {"resize_size": 40}),
    "validation_classes": (["--validation_classes=7"], {"validation_classes": 7}),
    "max_image_pixels": (["--max_image_pixels=1000000"], {"max_image_pixels": 1000000}),
    "backbone": (["--backbone=googlenet"], {"backbone": "googlenet"}),
    "pretrained": (["--pretrained"], {"pretrained": True}),
    "backbone_weights": (["--backbone_weights=/w.weights.h5"],
                         {"backbone_weights": "/w.weights.h5"}),
    "embedding_dim": (["--embedding_dim=64"], {"embedding_dim": 64}),
    "loss": (["--loss=triplet"], {"loss": "triplet"}),
    "loss_options": (["--loss_options=l2_reg=0.01"], {"loss_options": {"l2_reg": 0.01}}),
    "dvml": (["--nodvml"], {"dvml": False}),
    "num_samples": (["--num_samples=5"], {"num_samples": 5}),
    "phase1_fraction": (["--phase1_fraction=0.5"], {"phase1_fraction": 0.5}),
    "phase1_weights": (["--phase1_weights=1,0.5,0,2"], {"phase1_weights": (1.0, 0.5, 0.0, 2.0)}),
    "phase2_weights": (["--phase2_weights=0,1,1,1"], {"phase2_weights": (0.0, 1.0, 1.0, 1.0)}),
    "variance_scale": (["--variance_scale=0.3"], {"variance_scale": 0.3}),
    "synthesis": (["--synthesis=symmetrical"], {"synthesis": "symmetrical"}),
    "reconstruction": (["--reconstruction=norm"], {"reconstruction": "norm"}),
    "detach_variance_heads": (["--nodetach_variance_heads"], {"detach_variance_heads": False}),
    "kl_free_bits": (["--kl_free_bits=0.2"], {"kl_free_bits": 0.2}),
    "kl_warmup": (["--nokl_warmup"], {"kl_warmup": False}),
    "decoder_centre": (["--decoder_centre=own"], {"decoder_centre": "own"}),
    "variance_transfer": (["--variance_transfer"], {"variance_transfer": True}),
    "scale_to_intra_class": (["--scale_to_intra_class"], {"scale_to_intra_class": True}),
    "classes_per_batch": (["--classes_per_batch=8"], {"classes_per_batch": 8}),
    "images_per_class": (["--images_per_class=4", "--loss=triplet"],
                         {"images_per_class": 4, "loss": "triplet"}),
    "steps": (["--steps=10"], {"steps": 10}),
    "learning_rate": (["--learning_rate=0.5"], {"learning_rate": 0.5}),
    "weight_decay": (["--weight_decay=0.01"], {"weight_decay": 0.01}),
    "seed": (["--seed=3"], {"seed": 3}),
    "model_dir": (["--model_dir=/tmp/run"], {"model_dir": "/tmp/run"}),
    "eval_every": (["--eval_every=100"], {"eval_every": 100}),
    "log_every": (["--log_every=7"], {"log_every": 7}),
    "checkpoint_every": (["--checkpoint_every=9"], {"checkpoint_every": 9}),
    "eval_batch_size": (["--eval_batch_size=32"], {"eval_batch_size": 32}),
    "recall_ks": (["--recall_ks=1,10"], {"recall_ks": (1, 10)}),
    "evaluation_split": (["--evaluation_split=validation", "--validation_classes=5"],
                         {"evaluation_split": "validation", "validation_classes": 5}),
    "strategy": (["--strategy=mirrored"], {"strategy": "mirrored"}),
    "sync_batch_norm": (["--sync_batch_norm"], {"sync_batch_norm": True}),
    "mixed_precision": (["--mixed_precision"], {"mixed_precision": True}),
    "jit_compile": (["--jit_compile"], {"jit_compile": True}),
}


def test_the_overrides_cover_every_field():
    assert set(OVERRIDES) == {field.name for field in FIELDS}


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_a_flag_given_overrides_the_preset_and_the_others_keep_it(name):
    argv, changes = OVERRIDES[name]
    preset = configs.get_preset("omniglot")
    for field, value in changes.items():
        assert getattr(preset, field) != value, f"{field}: pick a value that differs"
    config = parse("--config=omniglot", *argv)
    expected = preset.replace(**changes)
    if "model_dir" not in changes:  # derived from the flags when not given
        kind = "dvml" if expected.dvml else "baseline"
        expected = expected.replace(
            model_dir=f"runs/{expected.dataset}_{expected.loss}_{kind}_seed{expected.seed}")
    assert config == expected


def test_the_preset_follows_the_dataset_unless_named():
    config = parse("--dataset=sop")
    assert config.config == "sop" and config == configs.get_preset("sop").replace(
        model_dir="runs/sop_npair_dvml_seed0")
    config = parse("--dataset=sop", "--config=omniglot")
    assert config.config == "omniglot" and config.dataset == "sop"
    assert config.backbone == configs.get_preset("omniglot").backbone
    assert parse().config == "omniglot"


def test_the_folder_presets_gpu_by_default_and_cpu_on_request():
    gpu = parse("--dataset=folder", "--data_dir=/catalogue")
    assert gpu.config == "folder" and gpu.backbone == "inception_v3" and gpu.image_size == 224
    cpu = parse("--dataset=folder", "--config=folder_cpu", "--data_dir=/catalogue")
    assert cpu.config == "folder_cpu" and cpu.dataset == "folder"
    assert (cpu.backbone, cpu.pretrained, cpu.image_size, cpu.resize_size) == (
        "mobilenet_v2", True, 128, 146)
    assert (cpu.classes_per_batch, cpu.images_per_class, cpu.steps) == (32, 2, 1000)
    assert cpu.checkpoint_every == 100 and cpu.model_dir == "runs/folder_npair_dvml_seed0"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--phase1_weights=a,b,c,d",
         "--phase1_weights: expected comma-separated numbers, got 'a' in 'a,b,c,d'."),
        ("--recall_ks=1,x", "--recall_ks: expected comma-separated integers, got 'x' in '1,x'."),
        ("--recall_ks=1,2.5", "--recall_ks: expected comma-separated integers, got '2.5'"),
        ("--loss_options=margin", "--loss_options: expected key=value pairs, got 'margin'."),
        ("--loss_options=margin=0.1,=3", "--loss_options: expected key=value pairs, got '=3'."),
        # absl parses these as floats; the configuration refuses them before anything runs.
        ("--learning_rate=nan", "learning_rate must be a finite number; got nan."),
        ("--learning_rate=inf", "learning_rate must be a finite number; got inf."),
        ("--variance_scale=nan", "variance_scale must be a finite number; got nan."),
        ("--phase1_weights=1,nan,1,1",
         "phase1_weights must be a finite number; got (1.0, nan, 1.0, 1.0)."),
    ],
)
def test_bad_values_name_the_flag(flag, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(flag)


def test_bad_enum_and_number_values_are_refused_by_the_parser():
    for argv in (["--dataset=mnist"], ["--steps=many"], ["--learning_rate=fast"]):
        with pytest.raises(flags.IllegalFlagValueError):
            parse(*argv)


def test_key_values_are_python_literals_or_strings():
    assert flags_lib.parse_key_values("margin=0.3, mining=semihard,normalize=False,x=None") == {
        "margin": 0.3, "mining": "semihard", "normalize": False, "x": None}
    assert flags_lib.parse_key_values("") == {}
    assert flags_lib.parse_list(["1", "2"], int, "recall_ks") == (1, 2)


def _cells(row):
    """The cells of a Markdown table row, split on the pipes that are not escaped."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]


def test_flags_markdown_has_one_row_per_field():
    table = flags_lib.flags_markdown()
    rows = table.splitlines()
    flag_rows = [row for row in rows if row.startswith("| `--")]
    names = [re.match(r"\| `--(\w+)`", row)[1] for row in flag_rows]
    assert names == ["config"] + [field.name for field in FIELDS]
    assert all(len(_cells(row)) == 3 for row in rows)
    by_name = dict(zip(names, flag_rows, strict=True))
    # The default run's values (the omniglot preset), and the valid values of enums.
    assert _cells(by_name["steps"])[1] == f"`{configs.get_preset('omniglot').steps}`"
    assert _cells(by_name["phase1_weights"])[1] == "`1.0,1.0,0.1,1.0`"
    assert _cells(by_name["data_dir"])[1] == "—"
    assert "One of `triplet`, `npair`" in _cells(by_name["loss"])[2]


def test_flags_markdown_escapes_pipes(monkeypatch):
    fields = [types.SimpleNamespace(name=field.name, metadata=dict(field.metadata))
              for field in dataclasses.fields(TrainConfig)]
    steps = next(field for field in fields if field.name == "steps")
    steps.metadata["help"] = "Training steps | or epochs | never both."
    monkeypatch.setattr(flags_lib, "dataclasses", types.SimpleNamespace(fields=lambda _: fields))
    (row,) = [row for row in flags_lib.flags_markdown().splitlines() if "`--steps`" in row]
    assert "Training steps \\| or epochs \\| never both." in row
    default_steps = f"`{configs.get_preset('omniglot').steps}`"
    assert _cells(row) == ["`--steps`", default_steps,
                           "Training steps \\| or epochs \\| never both."]
