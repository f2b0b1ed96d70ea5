"""How configs are declared and loaded: a help string per field, YAML plus `key=value` overrides,
strict keys and types.

Why strict: a misspelt key must fail at load time (naming the file, the key and the closest valid
key) instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names file, key and value."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help string (shown by `ppo-rlhf <stage> --help` and the README)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check_range(cfg: Any, name: str, value: int, low: int) -> None:
    if value is None or value < low:
        raise ConfigError(f"{type(cfg).__name__}.{name} must be >= {low}, got {value!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# ----------------------------------------------------------------------------------------------
# Loading: YAML file + dotted key=value overrides -> dataclass, strictly.
# ----------------------------------------------------------------------------------------------


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build `cls` from an optional YAML file and `key=value` overrides (values parsed as YAML).

    Unknown keys raise ConfigError naming the file, the key, a close match and the valid keys.
    """
    values: dict[str, Any] = {}
    source = "defaults"
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
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        values[key.strip().lstrip("-").replace("-", "_")] = yaml.safe_load(raw) if raw != "" else None
    return build_config(cls, values, source)


def build_config(cls: type[C], values: dict[str, Any], source: str = "arguments") -> C:
    """Instantiate `cls` from a flat dict, checking every key and coercing simple types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(cls, key, source, list(fields)))
        kwargs[key] = _coerce(hints[key], value, key, source)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


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
    raise ConfigError(f"{source}: key {key!r} expects {wanted}, got {value!r}")


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
