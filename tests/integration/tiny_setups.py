"""Small things several integration tests build: a tiny Llama, a reward function whose values
bf16 would round (1/9 and 1/3 have no short binary form), and one PPO step with a switch set."""

from __future__ import annotations

import copy

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


FOUR_PROMPTS = ["w3 w4", "w5 w6 w7 w8 w9", "w2", "w8 w9 w10"]


def ppo_step_with(policy, tokenizer, reward_model, precision: str, **switches):
    """(trainer, statistics without timings) of one PPO step on copies of the models: GAE with a
    separate critic, 2 epochs x 2 mini-batches of 2 micro-batches, rewards from a reward model and `thirds`."""
    from ppo import PPOConfig, PPOTrainer

    config = PPOConfig(
        batch_size=4,
        mini_batch_size=2,
        gradient_accumulation_steps=2,
        ppo_epochs=2,
        max_new_tokens=5,
        progress_bar=False,
        seed=0,
        precision=precision,
        fp32_matmul="mkl",
        **switches,
    )
    trainer = PPOTrainer(
        config, copy.deepcopy(policy), tokenizer, reward_model=copy.deepcopy(reward_model), reward_funcs=thirds
    )
    stats = trainer.step(FOUR_PROMPTS)
    return trainer, {k: v for k, v in stats.items() if not k.startswith("time/")}
