"""End to end: a random tiny Qwen3 learns a rule reward; a reward model from disk works."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from ppo import PPOConfig, PPOTrainer
from ppo.demo.tiny import TinyModelSpec, build_policy, build_reward_model

TARGET = {"w1", "w2", "w3"}


def target_fraction(completions, **kwargs):
    """Share of response words in TARGET: about 0.1 for a random policy, 1.0 when learnt."""
    return [sum(w in TARGET for w in c.split()) / max(1, len(c.split())) for c in completions]


def prompts(n=64):
    return [" ".join(f"w{(i * 7 + j) % 29}" for j in range(1 + i % 4)) for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_random_policy_learns_a_rule_reward(tiny_tokenizer, tmp_path, precision):
    policy = build_policy(tiny_tokenizer, TinyModelSpec(hidden_size=64, num_layers=2), seed=0)
    config = PPOConfig(
        batch_size=16,
        mini_batch_size=8,
        max_new_tokens=6,
        learning_rate=3e-3,
        kl_coef=0.01,
        adap_kl_ctrl=False,
        progress_bar=False,
        output_dir=str(tmp_path),
        precision=precision,
    )
    trainer = PPOTrainer(config, policy, tiny_tokenizer, reward_funcs=target_fraction)
    history = trainer.train(prompts(), num_epochs=4)  # 16 steps
    rewards = [h["mean_reward"] for h in history]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert start < 0.3
    assert end > start + 0.35, rewards
    assert end > 0.6, rewards


@pytest.mark.slow
def test_reward_model_from_disk_end_to_end(tiny_tokenizer, tmp_path):
    # A reward model saved and loaded through the public Hugging Face classes, with a dataset.
    from datasets import Dataset

    build_reward_model(tiny_tokenizer, TinyModelSpec(), seed=3).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    build_policy(tiny_tokenizer, TinyModelSpec(), seed=0).save_pretrained(tmp_path / "policy")
    tiny_tokenizer.save_pretrained(tmp_path / "policy")
    reward_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", num_labels=1)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "policy")
    data = Dataset.from_dict({"prompt": prompts(8), "answer": ["w1"] * 8})
    config = PPOConfig(
        batch_size=4,
        max_new_tokens=5,
        save_steps=1,
        save_total_limit=1,
        progress_bar=False,
        output_dir=str(tmp_path / "out"),
    )
    trainer = PPOTrainer(config, policy, tokenizer, reward_model=reward_model)
    history = trainer.train(data, num_epochs=1)
    assert len(history) == 2
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert all("mean_reward" in json.loads(line) for line in lines)
    assert [p.name for p in (tmp_path / "out").glob("step_*")] == ["step_2"]  # save_total_limit
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    AutoTokenizer.from_pretrained(tmp_path / "out" / "final")
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, policy.state_dict()[name])
