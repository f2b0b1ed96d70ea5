"""A KV cache that is allocated once per rollout instead of growing by concatenation.

transformers' `DynamicCache` appends each new token with `torch.cat`, which copies the whole cache
of every layer at every step: quadratic in the response length, and a fifth of generation time on
long responses. We know the final length before the first token (prompt + max_new_tokens), so each
layer writes into a buffer of that size and hands attention a view of the filled part: the same
keys and values, in the same layout, without the copies.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ppo.fastpath import fp32_attention
from ppo.fastpath.compat import cache_kwargs
from ppo.fastpath.gate import fast_path_allowed, max_error, tiny_batch


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views into a buffer of `capacity` positions."""

    def __init__(self, capacity: int, upcast: bool = False) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.upcast = upcast

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        # For a model that attends in fp32 under CPU autocast (`fp32_attention`), 16-bit keys and
        # values are stored in fp32 once, rather than the whole cache upcast at every step.
        dtype = (
            torch.float32 if self.upcast and self.device.type == "cpu" and torch.is_autocast_enabled("cpu") else None
        )
        self._keys = key_states.new_empty(batch, heads, self.capacity, dim, dtype=dtype)
        shape = (batch, value_states.shape[1], self.capacity, value_states.shape[-1])
        self._values = value_states.new_empty(shape, dtype=dtype)
        self.keys, self.values = self._keys[:, :, :0], self._values[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions is full (asked for {end})")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def buffers(self) -> tuple[Tensor, Tensor]:
        """The whole key and value buffers, `[B, kv_heads, capacity, D]`, for a decoder that writes
        positions itself (`ppo.fastpath.lean_decode`); `length` is then no longer kept up to date."""
        return self._keys, self._values


def preallocated_cache(config, capacity: int) -> DynamicCache | None:
    """A cache of `PreallocatedLayer`s for `config`'s model, or None when its layers are not all
    plain full-attention layers (sliding windows, linear attention)."""
    cache = DynamicCache(config=config)
    if not cache.layers or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    upcast = fp32_attention.decodes_in_fp32(config)
    cache.layers = [PreallocatedLayer(capacity, upcast) for _ in cache.layers]
    return cache


def architecture_reason(config) -> str | None:
    """Why this architecture keeps transformers' own cache (None when it may take ours)."""
    cache = DynamicCache(config=config)
    if not cache.layers or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return "its cache layers are not all plain full-attention layers"
    return None


def rollout_cache(model, capacity: int) -> DynamicCache:
    """A cache for one rollout of `model` of at most `capacity` positions: preallocated where the
    gate allows it, else transformers' own."""
    config = model.config
    if architecture_reason(config) is None and fast_path_allowed("kv_cache", model):
        return preallocated_cache(config, capacity)
    return DynamicCache(config=config)


def mismatch_with_stock(twin) -> str | None:
    """The last position's logits, prompt then one cached step through a preallocated cache,
    against one forward over the whole sequence without a cache (the gate's self-check)."""
    ids, mask, positions = tiny_batch()
    width = ids.shape[1]
    with torch.no_grad():
        stock = twin(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        cache = preallocated_cache(twin.config, width)
        twin(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            use_cache=True,
            **cache_kwargs(twin, cache),
        )
        fast = twin(
            input_ids=ids[:, -1:],
            attention_mask=mask,
            position_ids=positions[:, -1:],
            use_cache=True,
            **cache_kwargs(twin, cache),
        ).logits[:, -1]
    return max_error(fast, stock)
