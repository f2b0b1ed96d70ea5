"""The advantage estimators on tiny models: critic-free runs hold no critic, GRPO/RLOO advantages
follow the groups, the KL can sit in the loss, and the critic warm-up moves the critic alone."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import ppo.functional as F
from ppo import PPOConfig, PPOTrainer
from ppo.checkpoint import load_trainer_state
from ppo.config import ConfigError, load_config
from ppo.data import collate_prompts

PROMPTS = ["w3 w4", "w5 w6 w7", "w2", "w8 w9 w10"]
CRITIC_FREE = ["grpo", "rloo", "reinforce_pp"]


def words(completions, **kwargs):
    return [len(c.split()) / 4 for c in completions]


def config(tmp_path=None, **overrides):
    values = dict(
        batch_size=4,
        num_generations=2,
        max_new_tokens=4,
        progress_bar=False,
        seed=0,
        precision="fp32",
        fp32_matmul="mkl",
        learning_rate=1e-3,
        ppo_epochs=1,
    )
    if tmp_path is not None:
        values["output_dir"] = str(tmp_path)
    values.update(overrides)
    return PPOConfig(**values)


def numel(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())  # tied weights once


def trained_numel(trainer) -> int:
    return numel(p for opt in trainer.optimizers.values() for group in opt.param_groups for p in group["params"])


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_a_critic_free_run_trains_and_saves_the_policy_only(
    tiny_policy, tiny_tokenizer, tiny_reward_model, tmp_path, estimator
):
    trainer = PPOTrainer(
        config(tmp_path, advantage_estimator=estimator, save_steps=1),
        tiny_policy,
        tiny_tokenizer,
        reward_model=tiny_reward_model,
        reward_funcs=words,
    )
    assert trainer.critic is None and trainer.update_critic is None
    policy_numel = numel(tiny_policy.parameters())
    assert trained_numel(trainer) == policy_numel
    trainer.train(PROMPTS[:2])  # one step, checkpointed
    step = tmp_path / "step_1"
    assert not (step / "critic").exists()
    assert numel(load_file(step / "model.safetensors").values()) == policy_numel
    state = load_trainer_state(step)
    assert set(state["optimizers"]) == {"policy"}
    # The contrast: PPO-GAE trains (and saves) a critic of the reward model's size besides.
    gae = PPOTrainer(
        config(), copy.deepcopy(tiny_policy), tiny_tokenizer, reward_model=tiny_reward_model, reward_funcs=words
    )
    assert trained_numel(gae) == policy_numel + numel(gae.critic.module.parameters()) > policy_numel


def test_groups_are_checked_at_config_load_and_a_value_model_is_refused(tiny_policy, tiny_tokenizer, tiny_reward_model):
    with pytest.raises(
        ConfigError, match="advantage_estimator=rloo .* needs num_generations >= 2, got num_generations=1"
    ):
        load_config(PPOConfig, overrides=["advantage_estimator=rloo"])
    with pytest.raises(ConfigError, match="critic_warmup_steps=2: advantage_estimator=grpo trains no critic"):
        PPOConfig(advantage_estimator="grpo", num_generations=2, critic_warmup_steps=2)
    with pytest.raises(
        ConfigError, match="advantage_estimator must be one of gae, grpo, rloo, reinforce_pp; got 'ppo'"
    ):
        PPOConfig(advantage_estimator="ppo")
    assert PPOConfig(advantage_estimator="reinforce_pp").num_generations == 1  # no groups needed
    with pytest.raises(ValueError, match="value_model= was passed but advantage_estimator=grpo trains no critic"):
        PPOTrainer(
            config(advantage_estimator="grpo"),
            tiny_policy,
            tiny_tokenizer,
            reward_funcs=words,
            value_model=tiny_reward_model,
        )


def scored(trainer):
    prompts = collate_prompts(trainer.tokenizer, PROMPTS).repeat(trainer.config.num_generations)
    rollout = trainer.engine.generate(prompts, trainer.sampling)
    completions = trainer.tokenizer.batch_decode(rollout.completion_ids(), skip_special_tokens=True)
    return trainer.score(rollout, prompts, completions)


@pytest.mark.parametrize("estimator,scale", [("grpo", True), ("grpo", False), ("rloo", None)])
def test_group_estimators_give_each_response_its_groups_advantage(tiny_policy, tiny_tokenizer, estimator, scale):
    overrides = dict(num_generations=3, kl_coef=0.5, adap_kl_ctrl=False, missing_eos_penalty=1.0)
    if scale is not None:
        overrides["grpo_scale_rewards"] = scale
    trainer = PPOTrainer(
        config(advantage_estimator=estimator, **overrides), tiny_policy, tiny_tokenizer, reward_funcs=words
    )
    trainer.step(PROMPTS)  # the policy moves away from the reference: a non-zero KL penalty below
    batch, stats = scored(trainer)
    mask = batch.response_mask.bool()
    outcome = batch.rewards.sum(dim=1)  # the score (after the EOS penalty) minus the summed KL penalty
    assert (batch.rewards.sum(dim=1) - batch.scores).abs().max() > 0
    per_row = batch.advantages.sum(dim=1) / batch.response_mask.sum(dim=1)
    for row in range(len(batch)):
        assert torch.allclose(batch.advantages[row][mask[row]], per_row[row])  # one advantage per response
        group = outcome[row // 3 * 3 : row // 3 * 3 + 3]
        if estimator == "rloo":
            want = outcome[row] - (group.sum() - outcome[row]) / 2
        else:
            want = (outcome[row] - group.mean()) / ((group.std() + 1e-6) if scale else 1.0)
        assert per_row[row].item() == pytest.approx(want.item(), abs=1e-5)
    assert (batch.advantages[~mask] == 0).all()
    assert 0.0 <= stats["group/zero_std_fraction"] <= 1.0 and stats["group/reward_std"] >= 0.0
    assert "values/mean" not in stats and "explained_variance" not in stats


def test_reinforce_pp_normalises_the_discounted_returns_over_the_batch(tiny_policy, tiny_tokenizer):
    trainer = PPOTrainer(
        config(advantage_estimator="reinforce_pp", num_generations=1, gamma=0.9),
        tiny_policy,
        tiny_tokenizer,
        reward_funcs=words,
    )
    batch, stats = scored(trainer)
    returns = F.discounted_returns(batch.rewards, batch.response_mask, 0.9)
    torch.testing.assert_close(batch.returns, returns)
    torch.testing.assert_close(batch.advantages, F.masked_whiten(returns, batch.response_mask) * batch.response_mask)
    assert stats["advantages/mean"] == pytest.approx(0.0, abs=1e-6)


def test_kl_in_the_loss_leaves_the_reward_and_adds_its_term_to_the_policy_loss(tiny_policy, tiny_tokenizer):
    from ppo.update import policy_loss

    trainer = PPOTrainer(
        config(advantage_estimator="grpo", kl_in_loss=True, kl_loss_estimator="k2", kl_coef=0.3),
        tiny_policy,
        tiny_tokenizer,
        reward_funcs=words,
    )
    stats = trainer.step(PROMPTS)
    assert stats["non_score_reward"] == 0.0 and stats["kl_loss"] >= 0.0  # no KL in the reward
    batch, _ = scored(trainer)
    mb = batch.trim_padding()
    with torch.no_grad():
        with_kl, kl_stats, _ = policy_loss(mb, trainer.policy, None, trainer.config, kl_coef=0.3)
        without, _, _ = policy_loss(mb, trainer.policy, None, trainer.config, kl_coef=0.0)
        logprobs = batch.logprobs[:, : mb.response_width]  # the policy has not moved since scoring
        kl = F.kl_loss(logprobs, mb.ref_logprobs, mb.response_mask, "k2")
    assert kl > 0
    assert (with_kl - without).item() == pytest.approx(0.3 * kl.item(), rel=1e-4)
    assert kl_stats["kl_loss"].item() == pytest.approx(kl.item(), rel=1e-4)


@pytest.mark.parametrize("value_head", ["separate", "shared"])
def test_critic_warmup_trains_the_critic_alone(tiny_policy, tiny_tokenizer, tiny_reward_model, value_head):
    trainer = PPOTrainer(
        config(critic_warmup_steps=2, value_head=value_head, adap_kl_ctrl=True, target_kl=1e-6, ppo_epochs=2),
        tiny_policy,
        tiny_tokenizer,
        reward_model=tiny_reward_model,
        reward_funcs=words,
    )
    policy_before = copy.deepcopy(tiny_policy.state_dict())
    for _ in range(2):
        critic_before = copy.deepcopy(trainer.critic.module.state_dict())
        stats = trainer.step(PROMPTS)
        assert stats["critic_warmup"] == 1.0 and stats["kl_coef"] == 0.1
        assert all(torch.equal(policy_before[k], v) for k, v in tiny_policy.state_dict().items())
        assert all(p.grad is None for p in tiny_policy.parameters())
        assert any(not torch.equal(critic_before[k], v) for k, v in trainer.critic.module.state_dict().items())
        assert trainer.kl_controller.value == 0.1  # the controller waits too
        assert not trainer.optimizers["policy"].state  # the policy's AdamW has not stepped
    stats = trainer.step(PROMPTS)  # past the warm-up: the policy trains, the KL coefficient adapts
    assert "critic_warmup" not in stats and stats["policy_loss"] == stats["policy_loss"]
    assert any(not torch.equal(policy_before[k], v) for k, v in tiny_policy.state_dict().items())
    assert trainer.kl_controller.value != 0.1


# ----------------------------------------------------------------------------- end to end: each one learns


@pytest.fixture(scope="module")
def demo_sft(tmp_path_factory, one_thread):
    """A tiny Qwen3 fine-tuned on the demo task's sloppy demonstrations, its tokenizer, the PPO and
    held-out prompts, and its held-out gold score."""
    import transformers

    from ppo.config import SFTConfig
    from ppo.demo.task import DemoTask, make_splits
    from ppo.demo.tiny import TinyModelSpec, build_policy, build_tokenizer
    from ppo.sft_stage import train_sft

    transformers.utils.logging.set_verbosity_error()
    task = DemoTask()
    # 512 held-out prompts: the sampled gold's standard error is ~0.9 points (~1.8 with 128, where
    # SFT starts that differ by float rounding alone moved an estimator's gain from +7 to -2).
    splits = make_splits(task, 0, 1500, 0, 512, 512)
    tokenizer = build_tokenizer(task.vocabulary())
    policy = build_policy(tokenizer, TinyModelSpec(hidden_size=64, num_layers=2), seed=0)
    out = tmp_path_factory.mktemp("sft")
    train_sft(
        SFTConfig(
            output_dir=str(out),
            learning_rate=3e-3,
            batch_size=32,
            num_epochs=3,
            seed=0,
            progress_bar=False,
            max_length=32,
        ),
        model=policy,
        tokenizer=tokenizer,
        rows=splits["sft"],
    )
    return policy, tokenizer, splits, held_out_gold(policy, tokenizer, splits["eval"])


def held_out_gold(policy, tokenizer, rows) -> float:
    from ppo.demo.task import gold_reward
    from ppo.measures import evaluate_policy
    from ppo.rollout import SamplingParams

    sampling = SamplingParams(8, 1.0, stop_token_ids=(tokenizer.eos_token_id,))
    return evaluate_policy(policy, tokenizer, rows, reward_funcs=[gold_reward], sampling=sampling, seed=0)[
        "rewards/gold_reward"
    ]


def gold_fraction(prompts, completions, **kwargs):
    from ppo.demo.task import gold_reward

    return [g / 100 for g in gold_reward(prompts, completions)]


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_pp"])
def test_each_estimator_trains_the_demo_policy_above_its_sft_start(demo_sft, tmp_path, estimator):
    """20 steps of 64 sampled responses from the SFT policy, the task's oracle as the reward (what
    is tested is the estimator, not a reward model); then the held-out gold score, sampled."""
    sft, tokenizer, splits, sft_gold = demo_sft
    gens = 4 if estimator in ("grpo", "rloo") else 1
    cfg = PPOConfig(
        output_dir=str(tmp_path),
        batch_size=64 // gens,
        num_generations=gens,
        mini_batch_size=32,
        ppo_epochs=2,
        learning_rate=3e-3,
        max_new_tokens=8,
        kl_coef=0.05,
        adap_kl_ctrl=False,
        missing_eos_penalty=1.0,
        precision="fp32",
        fp32_matmul="mkl",
        progress_bar=False,
        advantage_estimator=estimator,
        seed=0,
    )
    trainer = PPOTrainer(cfg, copy.deepcopy(sft), tokenizer, reward_funcs=gold_fraction, ref_model=copy.deepcopy(sft))
    prompts = [row["prompt"] for row in splits["ppo"]]
    rewards = []
    for step in range(20):
        b = step % (len(prompts) // cfg.batch_size)
        batch = prompts[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        rewards.append(trainer.step(batch)["mean_reward"])
    assert sum(rewards[-4:]) / 4 > rewards[0] + 0.03, rewards  # the first step's samples are the SFT policy's
    assert held_out_gold(trainer.policy, tokenizer, splits["eval"]) > sft_gold + 2.0  # gold points out of 100


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_critic_free_advantages_are_fp32_under_bf16_autocast(tiny_policy, tiny_tokenizer, estimator):
    trainer = PPOTrainer(
        config(advantage_estimator=estimator, precision="bf16", max_new_tokens=3, kl_in_loss=True),
        tiny_policy,
        tiny_tokenizer,
        reward_funcs=words,
    )
    stats = trainer.step(PROMPTS[:2])
    batch, _ = scored(trainer)
    for name in ("logprobs", "ref_logprobs", "scores", "rewards", "advantages", "returns"):
        tensor = getattr(batch, name)
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
    assert stats["kl_loss"] == stats["kl_loss"] and stats["policy_loss"] == stats["policy_loss"]  # not NaN
