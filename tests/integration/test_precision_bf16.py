"""bf16 autocast on tiny Qwen3 models (docs/precision.md): the models' matmuls run in bf16, every RL
quantity comes out fp32 - reward-model scores, critic values, log-probs, rewards - and with the
default `rollout_logprobs=auto` the first mini-batch's PPO ratio is 1 and the KL of the untouched
policy to its reference is 0.

bf16 is emulated on AVX2-only CPUs (slow), so the models and batches here are the smallest that
show the effect. "Not on the bf16 grid" checks that a quantity was not rounded to 8 bits of
mantissa somewhere on its way (e.g. by a head run as a bf16 matmul); "close to fp32" bounds what the
bf16 model itself changes.
"""

from __future__ import annotations

import pytest
import torch
from tiny_setups import thirds
from torch.utils._python_dispatch import TorchDispatchMode

from ppo import PPOConfig, PPOTrainer
from ppo import functional as F
from ppo.critic import SeparateCritic, SharedCritic
from ppo.data import collate_prompts
from ppo.forward import policy_logprobs, response_logits, sequence_scores
from ppo.rewards import RewardSources
from ppo.rollout import HFRolloutEngine, SamplingParams

PROMPTS = ["w3 w4", "w5 w6 w7 w8 w9", "w2", "w8 w9 w10"]
FIFTH = 1 / 5
pytestmark = pytest.mark.usefixtures("one_thread", "quiet_bf16_emulation")  # tiny models: threads only contend


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def off_bf16_grid(x: torch.Tensor) -> bool:
    return bool((x.bfloat16().float() != x).any())


def sequences(tokenizer):
    batch = collate_prompts(tokenizer, ["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w10 w11"])
    response = torch.tensor([[5, 6, 7], [8, 9, 1], [10, 1, 0]])
    ids = torch.cat([batch.input_ids, response], dim=1)
    mask = torch.cat([batch.attention_mask, torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]])], dim=1)
    return ids, mask, response.shape[1]


def test_reward_model_scores_are_fp32_and_combine_exactly_under_bf16(tiny_reward_model, tiny_tokenizer):
    ids, mask, _ = sequences(tiny_tokenizer)
    with torch.inference_mode():
        fp32 = sequence_scores(tiny_reward_model, ids, mask)
        with bf16():
            mixed = sequence_scores(tiny_reward_model, ids, mask)
            sources = RewardSources(tiny_reward_model, [thirds], [0.5, 2.0])
            combined, _ = sources.score(ids, mask, ["p"] * 3, ["c"] * 3, [[1]] * 3, {})
    assert mixed.dtype == combined.dtype == torch.float32
    assert off_bf16_grid(mixed)
    torch.testing.assert_close(mixed, fp32, atol=0.05 * fp32.abs().max().item(), rtol=0)
    expected = [0.5 * float(s) + 2.0 * t for s, t in zip(mixed, thirds([None] * 3))]
    assert combined.tolist() == [float(torch.tensor(e, dtype=torch.float32)) for e in expected]


@pytest.mark.parametrize("value_head", ["separate", "shared"])
def test_critic_values_are_fp32_under_bf16(tiny_policy, tiny_reward_model, tiny_tokenizer, value_head):
    ids, mask, width = sequences(tiny_tokenizer)
    if value_head == "separate":
        critic = SeparateCritic(tiny_reward_model)
    else:
        critic = SharedCritic(tiny_policy.config.hidden_size)
        torch.nn.init.normal_(critic.module.weight, std=0.5)  # zero-initialised: every value would be 0

    def values():
        _, hidden = response_logits(tiny_policy, ids, mask, width, output_hidden=critic.uses_policy_hidden)
        return critic.values(ids, mask, width, hidden)

    fp32 = values()
    with bf16():
        mixed = values()
    assert mixed.dtype == torch.float32
    assert off_bf16_grid(mixed)
    torch.testing.assert_close(mixed, fp32, atol=0.05 * fp32.abs().max().item(), rtol=0)
    mixed.sum().backward()  # the fp32 head trains too
    assert all(p.grad is not None for p in critic.module.parameters() if p.requires_grad)


def test_policy_logprobs_are_an_fp32_log_softmax_of_the_bf16_logits(tiny_policy, tiny_tokenizer):
    ids, mask, width = sequences(tiny_tokenizer)
    with torch.inference_mode():
        fp32, fp32_entropy, _ = policy_logprobs(tiny_policy, ids, mask, width, 0.7, with_entropy=True)
        with bf16():
            logits, _ = response_logits(tiny_policy, ids, mask, width)
            mixed, entropy, _ = policy_logprobs(tiny_policy, ids, mask, width, 0.7, with_entropy=True)
    assert logits.dtype == torch.bfloat16  # the LM head's matmul did run in bf16
    assert mixed.dtype == entropy.dtype == torch.float32
    exact = torch.log_softmax(logits.double() / 0.7, dim=-1)
    torch.testing.assert_close(mixed, exact.gather(-1, ids[:, -width:, None])[..., 0].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed, fp32, atol=0.05, rtol=0)
    torch.testing.assert_close(entropy, fp32_entropy, atol=0.05, rtol=0)


def test_sampling_logprobs_are_fp32_under_bf16(tiny_policy, tiny_tokenizer):
    engine = HFRolloutEngine(tiny_policy, tiny_tokenizer, bf16)
    rollout = engine.generate(collate_prompts(tiny_tokenizer, PROMPTS), SamplingParams(max_new_tokens=4))
    assert rollout.logprobs.dtype == rollout.entropy.dtype == torch.float32
    assert off_bf16_grid(rollout.logprobs[rollout.response_mask.bool()])


def bf16_step(policy, tokenizer, fp32_sampler: bool = False, **overrides):
    with torch.no_grad():
        policy.model.norm.weight.mul_(5.0)  # logits of a trained model's size: rounding shows
    config = PPOConfig(
        batch_size=4,
        max_new_tokens=6,
        gradient_accumulation_steps=2,
        progress_bar=False,
        seed=0,
        precision="bf16",
        **overrides,
    )
    # A sampler in fp32 next to a bf16 trainer: a rollout/training mismatch of bf16's size on any
    # CPU (with native bf16 kernels the tiny model's decode and forward can agree to 1e-7).
    engine = HFRolloutEngine(policy, tokenizer) if fp32_sampler else None
    trainer = PPOTrainer(config, policy, tokenizer, reward_funcs=thirds, rollout_engine=engine)
    return trainer, trainer.step(PROMPTS)


@pytest.mark.parametrize("value_head", ["separate", "shared"])
def test_bf16_step_by_default_ratio_one_kl_zero_rewards_exact(tiny_policy, tiny_tokenizer, value_head):
    trainer, stats = bf16_step(tiny_policy, tiny_tokenizer, value_head=value_head)
    assert trainer.precision == "bf16" and not trainer.wants_rollout_logprobs()
    assert stats["rewards"] == [float(torch.tensor(v)) for v in thirds([None] * 4)]
    # pi_old, pi_ref and the update's first forward are the same bf16 computation on the same
    # weights: the ratio is 1 and the KL to the (identical) reference is 0, not bf16 noise.
    assert stats["kl"] == 0.0
    assert abs(stats["mismatch/first_ratio_mean"] - 1.0) < 1e-4
    assert stats["mismatch/first_approx_kl"] < 1e-6
    assert stats["mismatch/first_clipfrac"] == 0.0
    # The sampling pass (KV-cache decode) is another computation; the metric reports it.
    assert 0.0 <= stats["mismatch/logprob_abs_diff"] < 0.05


def test_bf16_with_sampling_pass_logprobs_the_mismatch_reaches_the_kl(tiny_policy, tiny_tokenizer):
    """What the default avoids: pi_old from the sampling pass makes the untouched policy's KL to
    its own reference non-zero, and the first ratio move by the same rounding."""
    trainer, stats = bf16_step(tiny_policy, tiny_tokenizer, fp32_sampler=True, rollout_logprobs=True)
    assert trainer.wants_rollout_logprobs()
    assert stats["kl"] != 0.0
    assert stats["mismatch/first_approx_kl"] > 1e-8


def test_tis_weights_the_mismatch_under_bf16(tiny_policy, tiny_tokenizer):
    _, stats = bf16_step(tiny_policy, tiny_tokenizer, fp32_sampler=True, tis_cap=2.0)
    assert stats["tis_weight_mean"] != 1.0 and abs(stats["tis_weight_mean"] - 1.0) < 0.05
    assert stats["kl"] == 0.0


def test_fp32_reuses_the_sampling_pass_and_reports_the_mismatch(tiny_policy, tiny_tokenizer):
    config = PPOConfig(batch_size=4, max_new_tokens=6, progress_bar=False, seed=0, precision="fp32", fp32_matmul="mkl")
    trainer = PPOTrainer(config, tiny_policy, tiny_tokenizer, reward_funcs=thirds)
    stats = trainer.step(PROMPTS)
    assert trainer.wants_rollout_logprobs()
    assert stats["mismatch/logprob_abs_diff"] < 1e-5
    assert abs(stats["mismatch/first_ratio_mean"] - 1.0) < 1e-5
    assert stats["mismatch/first_clipfrac"] == 0.0


def test_mismatch_measure_is_f_mean_abs_diff():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert (
        F.mean_abs_diff(torch.tensor([[0.0, -1.0, 5.0]]), torch.tensor([[0.5, -1.0, -5.0]]), mask).item()
        == FIFTH * 1.25
    )


class WeightCasts(TorchDispatchMode):
    """Counts autocast's casts of `weights` to bf16."""

    def __init__(self, weights):
        super().__init__()
        self.pointers, self.count = {w.data_ptr() for w in weights}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # in inference mode the cast arrives undecomposed, as aten.to.dtype
        to_bf16 = (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16) or (
            func is torch.ops.aten.to.dtype and args[1] == torch.bfloat16
        )
        if to_bf16:
            self.count += args[0].data_ptr() in self.pointers
        return func(*args, **kwargs)


@pytest.mark.parametrize("lean_decode", [True, False])
def test_sampling_casts_each_policy_weight_once_not_per_token(tiny_policy, tiny_tokenizer, lean_decode):
    """In inference mode autocast keeps no cast copies, so each decode step would cast every weight
    again; sampling runs under no_grad when autocasting, so each is cast once per rollout."""
    weights = [m.weight for m in tiny_policy.modules() if isinstance(m, torch.nn.Linear)]
    engine = HFRolloutEngine(tiny_policy, tiny_tokenizer, bf16, lean_decode=lean_decode)
    prompts, params = collate_prompts(tiny_tokenizer, PROMPTS), SamplingParams(max_new_tokens=6, temperature=0.0)
    with WeightCasts(weights) as once:
        rollout = engine.generate(prompts, params)
    with WeightCasts(weights) as per_token, torch.inference_mode(), bf16():  # the old way
        response_ids, *_ = engine._sample(prompts.input_ids, prompts.attention_mask, params, [0] * len(PROMPTS))
    assert 0 < once.count <= len(weights)
    assert per_token.count >= 5 * once.count  # 6 tokens: a forward per token
    assert torch.equal(rollout.response_ids, response_ids)  # the same numbers
