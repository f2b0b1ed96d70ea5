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


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views into a buffer of `capacity` positions."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._keys = key_states.new_empty(batch, heads, self.capacity, dim)
        self._values = value_states.new_empty(batch, value_states.shape[1], self.capacity, value_states.shape[-1])
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
        positions itself (`ppo.rollout.lean_decode`); `length` is then no longer kept up to date."""
        return self._keys, self._values


def rollout_cache(config, capacity: int) -> DynamicCache:
    """A cache for one rollout of at most `capacity` positions. Models whose layers are not all
    plain full-attention layers (sliding windows, linear attention) keep transformers' own."""
    cache = DynamicCache(config=config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache
