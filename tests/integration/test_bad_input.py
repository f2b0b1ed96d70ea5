"""Bad input gets a clear error that names the problem, and nothing already done is lost."""

from __future__ import annotations

import math

import pytest
import torch

from ppo import PPOConfig, PPOTrainer
from ppo.checkpoint import save_checkpoint
from ppo.demo.tiny import build_tokenizer

WORDS = [f"w{i}" for i in range(29)] + ["user", "assistant", ":"]


def zeros(completions, **kwargs):
    return [0.0] * len(completions)


def config(**kw):
    return PPOConfig(batch_size=2, max_new_tokens=3, progress_bar=False, ppo_epochs=1, **kw)


def test_no_reward_source(tiny_policy, tiny_tokenizer):
    with pytest.raises(ValueError, match="reward_model and/or reward_funcs"):
        PPOTrainer(config(), tiny_policy, tiny_tokenizer)


def test_empty_prompt_list(tiny_policy, tiny_tokenizer, tmp_path):
    trainer = PPOTrainer(config(), tiny_policy, tiny_tokenizer, reward_funcs=zeros)
    with pytest.raises(ValueError, match="empty"):
        trainer.step([])
    with pytest.raises(ValueError, match="empty"):
        trainer.train([])


def test_reward_function_that_raises_is_named(tiny_policy, tiny_tokenizer):
    def broken_reward(completions, **kwargs):
        raise KeyError("answer")

    trainer = PPOTrainer(config(), tiny_policy, tiny_tokenizer, reward_funcs=broken_reward)
    with pytest.raises(ValueError, match="broken_reward.*KeyError"):
        trainer.step(["w3", "w4"])


def test_reward_function_with_wrong_count_is_named(tiny_policy, tiny_tokenizer):
    def short_reward(completions, **kwargs):
        return [1.0]

    trainer = PPOTrainer(config(), tiny_policy, tiny_tokenizer, reward_funcs=short_reward)
    with pytest.raises(ValueError, match="short_reward.*1 values for 2"):
        trainer.step(["w3", "w4"])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_reward_names_the_sample_and_leaves_weights_alone(tiny_policy, tiny_tokenizer, bad):
    def nan_reward(completions, **kwargs):
        return [0.0, bad]

    before = {k: v.clone() for k, v in tiny_policy.state_dict().items()}
    trainer = PPOTrainer(config(), tiny_policy, tiny_tokenizer, reward_funcs=nan_reward)
    with pytest.raises(ValueError, match="nan_reward.*sample 1"):
        trainer.step(["w3", "w4"])
    assert all(torch.equal(before[k], v) for k, v in tiny_policy.state_dict().items())


def test_none_reward_counts_as_zero_with_warning(tiny_policy, tiny_tokenizer):
    def partial(completions, **kwargs):
        return [None, 2.0]

    trainer = PPOTrainer(config(), tiny_policy, tiny_tokenizer, reward_funcs=partial)
    with pytest.warns(UserWarning, match="None for 1 of 2"):
        stats = trainer.step(["w3", "w4"])
    assert stats["rewards"] == [0.0, 2.0]


def test_reward_weights_must_match_sources(tiny_policy, tiny_tokenizer, tiny_reward_model):
    with pytest.raises(ValueError, match="2 reward sources"):
        PPOTrainer(
            config(),
            tiny_policy,
            tiny_tokenizer,
            reward_model=tiny_reward_model,
            reward_funcs=zeros,
            reward_weights=[1.0],
        )


def test_tokenizer_without_pad_token_uses_eos(tiny_policy):
    tokenizer = build_tokenizer(WORDS)
    tokenizer.pad_token = None
    with pytest.warns(UserWarning, match="no pad token"):
        trainer = PPOTrainer(config(), tiny_policy, tokenizer, reward_funcs=zeros)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert len(trainer.step(["w3", "w4 w5"])["generated_texts"]) == 2


def test_long_prompts_are_cut_from_the_left_with_a_warning(tiny_policy, tiny_tokenizer):
    seen = {}

    def record(prompts, completions, **kwargs):
        seen["prompts"] = prompts
        return [0.0] * len(completions)

    trainer = PPOTrainer(config(max_length=8), tiny_policy, tiny_tokenizer, reward_funcs=record)
    long_prompt = " ".join(f"w{i}" for i in range(20))
    with pytest.warns(UserWarning, match=r"cut from the left \(indices \[1\]\)"):
        stats = trainer.step(["w3", long_prompt])
    assert stats["response_length"] <= 3
    with pytest.raises(ValueError, match="exceed max_new_tokens"):
        PPOTrainer(config(max_length=3), tiny_policy, tiny_tokenizer, reward_funcs=zeros)


def test_prompt_of_wrong_type(tiny_policy, tiny_tokenizer):
    trainer = PPOTrainer(config(), tiny_policy, tiny_tokenizer, reward_funcs=zeros)
    with pytest.raises(ValueError, match="prompt 1 must be a string"):
        trainer.step(["w3", 42])


def test_nan_weights_are_never_checkpointed(tiny_policy, tiny_tokenizer, tmp_path):
    trainer = PPOTrainer(config(), tiny_policy, tiny_tokenizer, reward_funcs=zeros)
    with torch.no_grad():
        tiny_policy.model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="model.norm.weight"):
        save_checkpoint(tmp_path, "step_1", tiny_policy, tiny_tokenizer, trainer.critic.module, {})
    assert not (tmp_path / "step_1").exists()
    with pytest.raises(FloatingPointError):
        trainer.save_pretrained(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()
