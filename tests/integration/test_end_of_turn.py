"""Every end-of-turn token ends a response: the tokenizer's EOS and every id the model's
generation_config lists (chat models list several, e.g. Qwen3's <|im_end|> and <|endoftext|>).
Sampling stops on any of them, and the EOS fraction, `missing_eos_penalty` and the response mask
(truncation after EOS) count any of them."""

from __future__ import annotations

import pytest
import torch

from ppo import PPOConfig, PPOTrainer
from ppo.demo.tiny import TinyModelSpec, build_policy, build_tokenizer
from ppo.measures import evaluate_policy
from ppo.models import end_of_turn_ids

WORDS = [f"w{i}" for i in range(29)] + ["user", "assistant", ":", "<end_of_turn>"]


@pytest.fixture
def tokenizer():
    return build_tokenizer(WORDS)


def always_says(tokenizer, token: str, eos_listed: list[int]):
    """A tiny policy whose first sampled token is `token` with probability ~1 (an LM head with zero
    weights and a one-hot bias), and whose generation_config lists `eos_listed`."""
    model = build_policy(tokenizer, TinyModelSpec(hidden_size=32, num_layers=1))
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[tokenizer.convert_tokens_to_ids(token)] = 30.0
    model.lm_head = head
    model.generation_config.eos_token_id = eos_listed
    return model


def test_end_of_turn_ids_unites_tokenizer_and_generation_config(tokenizer):
    second = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    model = always_says(tokenizer, "w1", [second, tokenizer.eos_token_id])
    assert end_of_turn_ids(tokenizer, model) == tuple(sorted({tokenizer.eos_token_id, second}))
    model.generation_config.eos_token_id = second  # an int, not a list
    assert end_of_turn_ids(tokenizer, model) == tuple(sorted({tokenizer.eos_token_id, second}))
    assert end_of_turn_ids(tokenizer, None) == (tokenizer.eos_token_id,)


@pytest.mark.parametrize("listed", [True, False])
def test_ppo_step_stops_on_a_second_eos(tokenizer, listed):
    second = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    eos_listed = [tokenizer.eos_token_id, second] if listed else [tokenizer.eos_token_id]
    model = always_says(tokenizer, "<end_of_turn>", eos_listed)
    seen = []

    def zeros(completions, completion_ids, **kwargs):
        seen.extend(completion_ids)
        return [0.0] * len(completions)

    config = PPOConfig(batch_size=2, max_new_tokens=4, ppo_epochs=1, progress_bar=False, missing_eos_penalty=1.0)
    trainer = PPOTrainer(config, model, tokenizer, reward_funcs=zeros)
    stats = trainer.step(["w3 w4", "w5"])
    if listed:  # one token, then stop: counted as an ended response, no penalty
        assert second in trainer.sampling.stop_token_ids
        assert stats["response_length"] == 1.0 and stats["eos_fraction"] == 1.0
        assert stats["rewards"] == [0.0, 0.0]
        assert seen == [[second], [second]]
    else:  # the same model without the second id listed runs to max_new_tokens and is penalised
        assert stats["response_length"] == 4.0 and stats["eos_fraction"] == 0.0
        assert stats["rewards"] == [-1.0, -1.0]
        assert seen == [[second] * 4, [second] * 4]


def test_evaluation_counts_a_second_eos(tokenizer):
    second = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    model = always_says(tokenizer, "<end_of_turn>", [tokenizer.eos_token_id, second])
    result = evaluate_policy(model, tokenizer, ["w1", "w2 w3"])
    assert result["eos_fraction"] == 1.0 and result["response_length"] == 1.0
