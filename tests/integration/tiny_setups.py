"""Small things several integration tests build: a tiny Llama and a reward function whose values
bf16 would round (1/9 and 1/3 have no short binary form)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def thirds(completions, **kwargs):
    """1/9 and 1/3 alternating: a bf16 rounding anywhere on their way shows."""
    return [1 / 3 if i % 2 else 1 / 9 for i in range(len(completions))]


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A freshly initialised 2-layer Llama (grouped-query attention, tied embeddings by default)."""
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(LlamaConfig(**{**shape, **overrides}))
