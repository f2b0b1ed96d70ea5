"""Spellings of transformers' API that changed between the releases in the tested window.

transformers 5.24 renamed a model's `past_key_values=` argument to `cache=` (the old name warns
and goes away in 5.40) and `gradient_checkpointing_enable` to `activation_checkpointing_enable`.
The project calls models in both worlds, so every such call goes through here: the new name where
the installed release has it, the old one otherwise, never a deprecated name that warns.
"""

from __future__ import annotations

import functools
import inspect

import torch


def innermost_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/FSDP (`.module`) and PEFT (`.get_base_model()`) wrappers,
    whose `forward` names the arguments it takes."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
    return model


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_argument(model: torch.nn.Module) -> str:
    """`'cache'` where the model's forward takes that name (transformers >= 5.24), else
    `'past_key_values'`."""
    return "cache" if "cache" in _forward_parameters(type(innermost_model(model))) else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """`{name: cache}` under the name this model's forward takes."""
    return {cache_argument(model): cache}


def layer_cache(kwargs: dict):
    """The cache a decoder layer was called with, under either name (None when there is none)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def enable_activation_checkpointing(module: torch.nn.Module) -> None:
    """Gradient (activation) checkpointing on, by the name the installed release has."""
    enable = getattr(module, "activation_checkpointing_enable", None) or getattr(module, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ValueError(f"gradient_checkpointing: {type(module).__name__} does not support it")
    enable()


def is_activation_checkpointing(module: torch.nn.Module) -> bool:
    """Whether any submodule checkpoints its activations (read from the modules' own flag, which
    both spellings of the API set, rather than from the deprecated property)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())
