"""The PPO learning-rate schedule: the factors, and the rates a trainer sets at each step."""

from __future__ import annotations

import math

import pytest
import torch

from ppo import PPOConfig, PPOTrainer
from ppo.lr_schedule import lr_factor


def test_factors_of_each_schedule():
    assert [lr_factor(s, 4, "constant") for s in range(6)] == [1.0] * 6
    assert [lr_factor(s, None, "constant") for s in range(2)] == [1.0, 1.0]  # no length needed
    assert [lr_factor(s, 4, "linear") for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.25, 0.25]  # holds past the end
    cosine = [lr_factor(s, 4, "cosine") for s in range(4)]
    assert cosine == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    # Warm-up: 1/3, 2/3, then the decay spans the remaining 4 of the 6 steps.
    assert [lr_factor(s, 6, "linear", warmup_steps=2) for s in range(6)] == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]
    )


def test_bad_schedules_say_what_is_missing():
    with pytest.raises(ValueError, match="lr_schedule_steps"):
        lr_factor(0, None, "cosine")
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        lr_factor(0, 4, "step")
    from ppo.config import ConfigError

    with pytest.raises(ConfigError, match="lr_scheduler"):
        PPOConfig(lr_scheduler="exponential")
    from ppo.config import DemoConfig

    with pytest.raises(ConfigError, match="ppo_lr_scheduler"):  # at load time, not after SFT and the reward model
        DemoConfig(ppo_lr_scheduler="exponential")


def count_w1(completions, **kwargs):
    return [float(c.split().count("w1")) for c in completions]


def make_trainer(tiny_policy, tiny_tokenizer, **overrides):
    config = PPOConfig(
        batch_size=2,
        max_new_tokens=3,
        progress_bar=False,
        seed=0,
        precision="fp32",
        fp32_matmul="mkl",
        learning_rate=1e-3,
        value_learning_rate=4e-3,
        **overrides,
    )
    return PPOTrainer(config, tiny_policy, tiny_tokenizer, reward_funcs=count_w1)


def test_step_sets_both_models_rates_from_the_schedule(tiny_policy, tiny_tokenizer):
    trainer = make_trainer(tiny_policy, tiny_tokenizer, lr_scheduler="linear", lr_schedule_steps=4)
    seen = []
    for _ in range(3):
        stats = trainer.step(["w3 w4", "w5"])
        seen.append(
            (
                stats["learning_rate"],
                trainer.optimizers["policy"].param_groups[0]["lr"],
                trainer.optimizers["critic"].param_groups[0]["lr"],
            )
        )
    for (reported, policy_lr, critic_lr), factor in zip(seen, (1.0, 0.75, 0.5)):
        assert reported == policy_lr == pytest.approx(1e-3 * factor)
        assert critic_lr == pytest.approx(4e-3 * factor)


def test_a_schedule_without_length_fails_before_sampling(tiny_policy, tiny_tokenizer, monkeypatch):
    trainer = make_trainer(tiny_policy, tiny_tokenizer, lr_scheduler="cosine")
    monkeypatch.setattr(trainer.engine, "generate", lambda *a, **k: pytest.fail("sampled before checking the schedule"))
    with pytest.raises(ValueError, match="lr_schedule_steps"):
        trainer.step(["w3 w4", "w5"])


def test_train_spans_its_own_steps(tiny_policy, tiny_tokenizer, tmp_path):
    trainer = make_trainer(tiny_policy, tiny_tokenizer, lr_scheduler="linear", output_dir=str(tmp_path))
    history = trainer.train(["w3 w4", "w5", "w6 w7", "w8"], num_epochs=2)  # 2 batches x 2 epochs
    assert [h["learning_rate"] for h in history] == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())
