"""Scoring a rollout in blocks of rows (`forward_batch_size`, by default the update's micro-batch):
the same scored batch as one forward per model, with no forward over more rows than asked."""

from __future__ import annotations

import copy

import pytest
import torch

from ppo import PPOConfig, PPOTrainer
from ppo.data import collate_prompts
from ppo.forward import by_rows
from ppo.rewards.model import reward_model_scores

PROMPTS = ["w3 w4", "w5 w6 w7 w8 w9", "w2", "w8 w9 w10", "w4", "w6 w7"]


def test_by_rows_concatenates_blocks_and_passes_none_through():
    x, y = torch.arange(10.0).view(5, 2), torch.arange(5.0)
    calls = []

    def fn(a, b, c):
        calls.append(a.shape[0])
        assert c is None
        return a.sum(1) + b, None, a * 2

    whole = fn(x, y, None)
    blocks = by_rows(fn, 2, x, y, None)
    assert calls == [5, 2, 2, 1]
    assert blocks[1] is None
    assert torch.equal(blocks[0], whole[0]) and torch.equal(blocks[2], whole[2])
    assert torch.equal(by_rows(lambda a: a + 1, 3, x), x + 1)
    assert by_rows(lambda a: a.shape[0], None, x) == 5  # None: one call


def rows_per_call(model):
    """A list that gets the batch size of every forward of `model`."""
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return seen


def scored(tiny_policy, tiny_tokenizer, tiny_reward_model, **overrides):
    config = PPOConfig(
        batch_size=6,
        max_new_tokens=5,
        progress_bar=False,
        seed=0,
        precision="fp32",
        fp32_matmul="mkl",
        rollout_logprobs=False,
        **overrides,
    )
    trainer = PPOTrainer(
        config, copy.deepcopy(tiny_policy), tiny_tokenizer, reward_model=copy.deepcopy(tiny_reward_model)
    )
    seen = {
        name: rows_per_call(model)
        for name, model in (
            ("policy", trainer.policy),
            ("reference", trainer.ref_model),
            ("critic", trainer.critic.model.model),
            ("reward", trainer.rewards.reward_model.model),
        )
    }
    prompts = collate_prompts(tiny_tokenizer, PROMPTS)
    rollout = trainer.engine.generate(prompts, trainer.sampling)
    for rows in seen.values():
        rows.clear()  # sampling's calls are not scoring's
    completions = tiny_tokenizer.batch_decode(rollout.completion_ids(), skip_special_tokens=True)
    batch, stats = trainer.score(rollout, prompts, completions)
    return batch, stats, seen


@pytest.mark.parametrize(
    ("overrides", "expected_rows"),
    [
        ({"forward_batch_size": 4}, [4, 2]),
        ({"mini_batch_size": 3}, [3, 3]),  # the default: the update's micro-batch
        ({"mini_batch_size": 6, "gradient_accumulation_steps": 3}, [2, 2, 2]),
    ],
)
def test_scoring_in_blocks_matches_one_forward(
    tiny_policy, tiny_tokenizer, tiny_reward_model, overrides, expected_rows
):
    whole, whole_stats, seen_whole = scored(tiny_policy, tiny_tokenizer, tiny_reward_model, forward_batch_size=6)
    assert all(rows == [6] for rows in seen_whole.values())
    blocks, block_stats, seen = scored(tiny_policy, tiny_tokenizer, tiny_reward_model, **overrides)
    assert all(rows == expected_rows for rows in seen.values()), seen
    for name in ("logprobs", "ref_logprobs", "values", "scores", "rewards", "advantages", "returns"):
        torch.testing.assert_close(getattr(blocks, name), getattr(whole, name), rtol=1e-5, atol=1e-6, msg=name)
    assert block_stats["kl"] == pytest.approx(whole_stats["kl"], rel=1e-5, abs=1e-7)


def test_a_reward_model_with_its_own_tokenizer_scores_in_blocks(tiny_tokenizer, tiny_reward_model):
    """Re-tokenized text, each block padded to its own longest: the same scores."""
    prompts, completions = PROMPTS, ["w1 w2", "w3", "w4 w5 w6 w7", "w8", "w9 w10 w11", "w2 w2"]
    ids = torch.zeros(len(prompts), 1, dtype=torch.long)
    seen = rows_per_call(tiny_reward_model.model)
    whole = reward_model_scores(tiny_reward_model, ids, ids, prompts, completions, tiny_tokenizer)
    blocks = reward_model_scores(tiny_reward_model, ids, ids, prompts, completions, tiny_tokenizer, rows_per_forward=4)
    assert seen == [6, 4, 2]
    torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-6)
