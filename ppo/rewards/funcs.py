"""Reward functions: the Hugging Face convention, validated, and resolvable by name.

A reward function is called with keyword arguments `prompts`, `completions`, `completion_ids`
and every other dataset column as a list, and returns one float (or None: no opinion) per sample.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RewardFunction = Callable[..., list]


def function_name(func: Callable) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


class RewardFunctionError(ValueError):
    """A reward function raised, exited, hung or returned something that is not one score per
    sample; the message names the function (and the sample, where one is to blame)."""


def call_reward_function(
    func: RewardFunction,
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
    extras: dict[str, list[Any]],
    timeout_s: float | None = None,
    max_abs: float | None = None,
) -> list[float]:
    """Call `func` and check it returned one number (or None) per sample; return floats.

    `timeout_s` (None or 0: no limit) bounds the call; `max_abs` (None: no bound) bounds |value|.
    Refused, naming the function: an exception or sys.exit() inside it, no return within
    `timeout_s`, a count that is not one per sample, strings (even "0.5": a str where a number
    belongs is a bug upstream), NaN/inf, |value| > `max_abs`, and None for every sample. None for
    some samples counts as 0 with a warning (the Hugging Face convention of "no opinion").
    """
    name = function_name(func)
    arguments = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **extras)
    missing_columns = _unmet_parameters(func, arguments)
    if missing_columns:  # before the call: Python's own TypeError would not say where they come from
        raise RewardFunctionError(
            f"reward function {name!r} needs the data column(s) {', '.join(map(repr, missing_columns))}, which "
            f"the prompts do not have (they give: {', '.join(sorted(extras)) or 'no column besides the prompt'}). "
            "Load the prompts from a file or dataset that has them (JSONL, CSV or a datasets.Dataset, one field "
            "per column), or use a reward function that does not need them"
        )
    values = _call(func, name, timeout_s, arguments)
    try:
        if isinstance(values, (str, bytes, dict)):
            raise TypeError
        values = list(values)
    except TypeError:
        raise RewardFunctionError(
            f"reward function {name!r} must return a list of floats, got {type(values).__name__}"
        ) from None
    if len(values) != len(completions):
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(values)} values for {len(completions)} completions"
        )
    result = [_score(value, name, i, prompts, max_abs) for i, value in enumerate(values)]
    missing = sum(value is None for value in values)
    if missing and missing == len(values):
        raise RewardFunctionError(
            f"reward function {name!r} returned None for all {missing} samples: no reward to train on "
            "(return 0.0 where it has no opinion, or check the columns it needs)"
        )
    if missing:
        warnings.warn(
            f"reward function {name!r} returned None for {missing} of {len(values)} samples; counted as 0", stacklevel=2
        )
    return result


def _score(value: Any, name: str, i: int, prompts: list[str], max_abs: float | None) -> float:
    """One returned value as a float (None: 0.0), or the error naming the function and sample."""
    if value is None:
        return 0.0
    where = f"for sample {i} (prompt {prompts[i][:80]!r})"
    if isinstance(value, (str, bytes)):
        raise RewardFunctionError(
            f"reward function {name!r} returned the string {value!r} {where}: return numbers, not text"
        )
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RewardFunctionError(f"reward function {name!r} returned {value!r} {where}, not a number") from None
    if not math.isfinite(number):
        raise RewardFunctionError(f"reward function {name!r} returned {number} {where}")
    if max_abs is not None and abs(number) > max_abs:
        raise RewardFunctionError(
            f"reward function {name!r} returned {number:g} {where}, beyond reward_max_abs={max_abs:g}: a score "
            "this large swamps the KL penalty and the critic (raise reward_max_abs if it is meant)"
        )
    return number


def _unmet_parameters(func: RewardFunction, arguments: dict[str, Any]) -> list[str]:
    """`func`'s parameters without a default that `arguments` does not name (none where Python
    cannot read its signature: a builtin, some C extensions)."""
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return []
    named_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in named_kinds and p.default is p.empty and p.name not in arguments]


def _call(func: RewardFunction, name: str, timeout_s: float | None, kwargs: dict[str, Any]) -> Any:
    """`func(**kwargs)`, in a worker thread when there is a timeout (the only portable way to stop
    waiting: signals work only in the main thread, processes would have to pickle the function).

    A thread cannot be killed: after a timeout it keeps running in the background (a daemon, so it
    does not keep the process alive at exit) and the run stops with the error.
    """
    if not timeout_s:
        return _guarded(func, name, kwargs)
    box: dict[str, Any] = {}
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()  # thread-local in torch

    def work() -> None:
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                box["values"] = _guarded(func, name, kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread, whatever it is
            box["error"] = err

    worker = threading.Thread(target=work, name=f"reward function {name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardFunctionError(
            f"reward function {name!r} did not return within reward_timeout_s={timeout_s:g} s; stopping "
            "(its thread cannot be killed and runs on in the background until the process ends). "
            "Raise reward_timeout_s, or set it to 0 for no limit, if the function is just slow"
        )
    if "error" in box:
        raise box["error"]
    return box["values"]


def _guarded(func: RewardFunction, name: str, kwargs: dict[str, Any]) -> Any:
    try:
        return func(**kwargs)
    except KeyboardInterrupt:
        raise  # the user's Ctrl-C, not the function's fault
    except SystemExit as err:  # sys.exit() would otherwise end the whole run with no message
        raise RewardFunctionError(
            f"reward function {name!r} called sys.exit({err.code!r}); a reward function must return its scores"
        ) from None
    except Exception as err:  # re-raised with the function's name: the user's code, not ours
        raise RewardFunctionError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err


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
        raise ValueError(
            f"reward function {spec!r} is not a built-in ({known}) nor of the form module:function or file.py:function"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"reward function file not found: {target}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit) as err:  # the user's file: say which, not a traceback into importlib
            raise ValueError(f"reward function file {target} failed to load: {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"cannot import module {target!r} for reward function {spec!r}: {err}") from None
        except (Exception, SystemExit) as err:
            raise ValueError(
                f"module {target!r} of reward function {spec!r} failed to load: {type(err).__name__}: {err}"
            ) from err
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"{target} has no callable {attr!r} (reward function {spec!r})")
    return func
