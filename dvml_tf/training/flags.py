"""Command-line flags generated from `TrainConfig`'s field declarations.

Each field of `TrainConfig` becomes one absl flag of the same name, with the field's help text,
type and valid values; a flag left off the command line keeps the preset's value. `--config`
picks the preset (default: the one named after `--dataset`). So adding a field to `TrainConfig`
is a one-place change: `train.py`, `flags_markdown()` (the table of docs/training.md, checked by a
test) and the research scripts that reuse these flags all follow.
"""

import ast
import dataclasses
import os
import types
import typing

from absl import flags

from dvml_tf import configs
from dvml_tf.training.config import TrainConfig

# The preset name is chosen by --config itself, not overridden like the other fields.
_PRESET_FIELD = "config"


def _field_kind(field):
    """The Python type a field's flag parses to: bool, int, float, str, tuple or dict."""
    kind = field.type
    if isinstance(kind, str):  # postponed annotations
        kind = eval(kind, vars(typing), {})
    if isinstance(kind, types.UnionType):  # `str | None`
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    return kind


def _element_kind(field):
    """The element type of a tuple field, from its default."""
    default = field.default if field.default is not dataclasses.MISSING else ()
    return type(default[0]) if default else str


def parse_key_values(text, flag_name="loss_options"):
    """'margin=0.3,normalize=True' -> {'margin': 0.3, 'normalize': True}.

    Values are Python literals where they parse as one (numbers, True/False, None), else strings.

    Args:
        text: the flag's value.
        flag_name: for messages.

    Returns:
        dict.

    Raises:
        ValueError: an item that is not key=value.
    """
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--{flag_name}: expected key=value pairs, got {item!r}.")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def parse_list(values, element, flag_name):
    """A list flag's items converted to `element` (int or float), naming the flag on failure.

    Args:
        values: list of strings (absl's DEFINE_list value).
        element: int or float.
        flag_name: for messages.

    Returns:
        tuple.

    Raises:
        ValueError: an item that is not a number of that type.
    """
    converted = []
    for item in values:
        try:
            converted.append(element(item))
        except ValueError:
            kind = "integers" if element is int else "numbers"
            raise ValueError(
                f"--{flag_name}: expected comma-separated {kind}, got {item!r} in "
                f"{','.join(values)!r}."
            ) from None
    return tuple(converted)


def define_flags(flag_values=flags.FLAGS):
    """Defines `--config` and one flag per `TrainConfig` field in `flag_values`.

    Args:
        flag_values: an absl `FlagValues`.
    """
    flags.DEFINE_enum(
        _PRESET_FIELD, None, configs.PRESETS,
        "Preset to start from; default: the preset named after --dataset.",
        flag_values=flag_values,
    )
    for field in dataclasses.fields(TrainConfig):
        if field.name == _PRESET_FIELD:
            continue
        kind, help_text = _field_kind(field), field.metadata["help"]
        choices = field.metadata.get("choices")
        args = dict(name=field.name, default=None, help=help_text, flag_values=flag_values)
        if choices is not None:
            flags.DEFINE_enum(enum_values=list(choices), **args)
        elif kind is bool:
            flags.DEFINE_boolean(**args)
        elif kind is int:
            flags.DEFINE_integer(**args)
        elif kind is float:
            flags.DEFINE_float(**args)
        elif kind is tuple:
            flags.DEFINE_list(**args)
        else:  # str and dict (key=value pairs)
            flags.DEFINE_string(**args)


def _flag_value(field, value):
    kind = _field_kind(field)
    if kind is tuple:
        return parse_list(value, _element_kind(field), field.name)
    if kind is dict:
        return parse_key_values(value, field.name)
    return value


def config_from_flags(flag_values=flags.FLAGS):
    """The preset named by --config (or --dataset) with every flag given applied on top.

    Args:
        flag_values: parsed absl `FlagValues` on which `define_flags` was called.

    Returns:
        a validated `TrainConfig` (model_dir derived from the flags when not given).

    Raises:
        ValueError: a bad flag value (the message names the flag) or an invalid configuration.
    """
    dataset = flag_values["dataset"].value
    preset_name = flag_values[_PRESET_FIELD].value or (
        dataset if dataset in configs.PRESETS else "omniglot"
    )
    config = configs.get_preset(preset_name)
    changes = {
        field.name: _flag_value(field, flag_values[field.name].value)
        for field in dataclasses.fields(TrainConfig)
        if field.name != _PRESET_FIELD and flag_values[field.name].present
    }
    config = config.replace(config=preset_name, **changes)
    if not config.model_dir:
        kind = "dvml" if config.dvml else "baseline"
        config = config.replace(
            model_dir=os.path.join(
                "runs", f"{config.dataset}_{config.loss}_{kind}_seed{config.seed}"
            )
        )
    return config.validate()


def flags_markdown():
    """The Markdown table of every training flag (docs/training.md), grouped like the fields,
    with the values of the default run (the `omniglot` preset).

    Returns:
        str.
    """
    defaults = configs.get_preset("omniglot")
    lines = ["| flag | default run | meaning |", "| --- | --- | --- |",
             "| `--config` | `omniglot` | preset to start from, default: the one named after "
             "`--dataset`; one of " + ", ".join(f"`{name}`" for name in configs.PRESETS) + " |"]
    group = None
    for field in dataclasses.fields(TrainConfig):
        if field.name == _PRESET_FIELD:
            continue
        if field.metadata["group"] != group:
            group = field.metadata["group"]
            lines.append(f"| **{group}** | | |")
        value = getattr(defaults, field.name)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        default = f"`{value}`" if value not in ("", None) else "—"
        meaning = field.metadata["help"]
        if field.metadata.get("choices"):
            meaning += " One of " + ", ".join(f"`{c}`" for c in field.metadata["choices"]) + "."
        meaning = meaning.replace("|", "\\|")
        lines.append(f"| `--{field.name}` | {default} | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m dvml_tf.training.flags: the table of docs/training.md
    print(flags_markdown())
