"""Reward functions: the Hugging Face convention, validated, and resolvable by name.

A reward function is called with keyword arguments `prompts`, `completions`, `completion_ids`
and every other dataset column as a list, and returns one float (or None: no opinion) per sample.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from pathlib import Path
from typing import Any, Callable

RewardFunction = Callable[..., list]


def function_name(func: Callable) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def call_reward_function(func: RewardFunction, prompts: list[str], completions: list[str], completion_ids: list[list[int]], extras: dict[str, list[Any]]) -> list[float]:
    """Call `func`, check it returned one finite number (or None) per sample, return floats."""
    name = function_name(func)
    try:
        values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **extras)
    except Exception as err:  # re-raised with the function's name: the user's code, not ours
        raise ValueError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"reward function {name!r} must return a list of floats, got {type(values).__name__}") from None
    if len(values) != len(completions):
        raise ValueError(f"reward function {name!r} returned {len(values)} values for {len(completions)} completions")
    result = []
    missing = 0
    for i, value in enumerate(values):
        if value is None:
            missing += 1
            result.append(0.0)
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"reward function {name!r} returned {value!r} for sample {i}, not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"reward function {name!r} returned {value} for sample {i} (prompt {prompts[i][:80]!r})")
        result.append(value)
    if missing:
        warnings.warn(f"reward function {name!r} returned None for {missing} of {len(values)} samples; counted as 0")
    return result


def resolve_reward_function(spec: str | RewardFunction) -> RewardFunction:
    """A callable from a built-in name, `package.module:function` or `path/to/file.py:function`."""
    if callable(spec):
        return spec
    from ppo.rewards import builtin  # local: only the CLI needs names

    if spec in builtin.BUILTIN_REWARDS:
        return builtin.BUILTIN_REWARDS[spec]
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        known = ", ".join(sorted(builtin.BUILTIN_REWARDS))
        raise ValueError(f"reward function {spec!r} is not a built-in ({known}) nor of the form module:function or file.py:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"reward function file not found: {target}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"cannot import module {target!r} for reward function {spec!r}: {err}") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"{target} has no callable {attr!r} (reward function {spec!r})")
    return func
