"""How configs are declared and loaded: a help string per field, YAML plus `key=value` overrides,
strict keys and types.

Why strict: a misspelt key must fail at load time (naming the file, the key and the closest valid
key) instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names file, key and value.
    `key` is the offending key when there is one (so the loader can name the file or override it
    came from)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help string (shown by `ppo-rlhf <stage> --help` and the README)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check_range(cfg: Any, name: str, value: int, low: int) -> None:
    if not _is_number(value) or value < low:
        raise ConfigError(f"{type(cfg).__name__}.{name} must be >= {low}, got {value!r}", key=name)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}", key=name)


# ----------------------------------------------------------------------------------------------
# Validation: every field's type from its annotation, then each key's rule from its config's
# table in `ppo.config_rules` (`PPO_RULES`, `SFT_RULES`, ...). One pass, at construction, so the
# Python API and YAML get the same checks and messages.
# ----------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a key's value must be: a number in [low, high] (either end open, either missing), or
    one of `choices`. None passes wherever the field's type allows None (it means "off"/"default")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    text: bool = False  # a non-empty string instead of a number (an empty output_dir means ".")

    def allows(self, value: Any) -> bool:
        if self.text:
            return isinstance(value, str) and value.strip() != ""
        if self.choices:
            return value in self.choices
        if not _is_number(value) or not math.isfinite(value):  # NaN passes every `<` test
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.text:
            return "a non-empty string"
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else "a finite number"


def at_least(low: float) -> Rule:
    return Rule(low=low)


def above(low: float) -> Rule:
    return Rule(low=low, low_open=True)


def between(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    return Rule(low, high, low_open, high_open)


def one_of(*choices: Any) -> Rule:
    return Rule(choices=tuple(choices))


FINITE = Rule()  # any finite number
TEXT = Rule(text=True)  # a non-empty string


def validate(cfg: Any, rules: dict[str, Rule]) -> None:
    """Check every field's type against its annotation, then every key in `rules`; raise a
    ConfigError naming the key, the value and the rule at the first problem."""
    name = type(cfg).__name__
    for key, hint in _field_types(type(cfg)).items():
        value = getattr(cfg, key)
        if not _type_ok(hint, value):
            wanted = " or ".join(_type_name(o) for o in _options(hint))
            raise ConfigError(f"{name}.{key} expects {wanted}, got {value!r} ({type(value).__name__})", key=key)
    for key, rule in rules.items():
        value = getattr(cfg, key)
        if value is not None and not rule.allows(value):
            raise ConfigError(f"{name}.{key} must be {rule}, got {value!r}", key=key)


def check_list_items(cfg: Any, key: str, ok: Callable[[Any], bool], what: str) -> None:
    """Every item of the list field `key` passes `ok`; else name the item and what it must be."""
    for i, item in enumerate(getattr(cfg, key) or []):
        if not ok(item):
            raise ConfigError(f"{type(cfg).__name__}.{key}[{i}] must be {what}, got {item!r}", key=key)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _options(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return list(typing.get_args(hint))
    return [hint]


def _type_name(option: Any) -> str:
    return "None" if option is type(None) else getattr(typing.get_origin(option) or option, "__name__", str(option))


def _type_ok(hint: Any, value: Any) -> bool:
    # The Python API gets no coercion: PPOConfig(batch_size="4") is refused as YAML's `batch_size: many` is.
    for option in _options(hint):
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return True
        if base is bool and isinstance(value, bool):
            return True
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if base is float and _is_number(value):  # an int is a fine float (lr=1)
            return True
        if base is str and isinstance(value, str):
            return True
        if base is list and isinstance(value, (list, tuple)):
            return True
        if base is dict and isinstance(value, dict):
            return True
    return False


# ----------------------------------------------------------------------------------------------
# Loading: YAML file + dotted key=value overrides -> dataclass, strictly.
# ----------------------------------------------------------------------------------------------


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build `cls` from an optional YAML file and `key=value` overrides (values parsed as YAML).

    Unknown keys raise ConfigError naming the file, the key, a close match and the valid keys.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}  # key -> where its value came from, for error messages
    source = "command line" if overrides else "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text: {err}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(loaded).__name__}")
        values.update(_flatten(loaded))
        origins.update(dict.fromkeys(values, source))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = key.strip().lstrip("-").replace("-", "_")
        try:
            values[key] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})", key=key) from None
        origins[key] = f"override {item!r}"
    return build_config(cls, values, source, origins)


def build_config(
    cls: type[C], values: dict[str, Any], source: str = "arguments", origins: dict[str, str] | None = None
) -> C:
    """Instantiate `cls` from a flat dict, checking every key and coercing simple types.
    Errors name the key's origin (`origins[key]`: a file or an override), else `source`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    origins = origins or {}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(cls, key, origins.get(key, source), list(fields)), key=key)
        kwargs[key] = _coerce(hints[key], value, key, origins.get(key, source))
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{origins.get(err.key, source)}: {err}", key=err.key) from None


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    # Sections in YAML are only for readability (`sampling: {temperature: 0.7}`): keys are flat.
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not key.endswith("_kwargs"):
            flat.update(_flatten(value, prefix))
        else:
            flat[prefix + str(key)] = value
    return flat


def _unknown_key_message(cls: type, key: str, source: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{source}: unknown key {key!r} for {cls.__name__}.{hint} Valid keys: {', '.join(sorted(valid))}"


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    if value is None:
        return None
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    options = [o for o in options if o is not type(None)]
    for target in options:
        base = typing.get_origin(target) or target
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):
            # YAML 1.1 reads `1e-5` (no dot) as a string; users mean the number.
            try:
                return float(value)
            except ValueError:
                pass
        if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if base is list:
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if base is dict and isinstance(value, dict):
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{source}: key {key!r} expects {wanted}, got {value!r} ({type(value).__name__})", key=key)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the effective config as YAML next to a run's outputs (what actually ran)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


def config_help(cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) rows for docs and `--help`."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f.name, json.dumps(default), f.metadata.get("help", "")))
    return rows
