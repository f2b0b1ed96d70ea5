"""[4] From scores to advantages: the rewards of the batch and what the update learns from.

    scores -> missing-EOS penalty, clip -> per-token KL penalty (unless kl_in_loss) -> per-token
    rewards -> (whitened) -> advantages by `advantage_estimator` -> ScoredBatch

    gae           GAE over the critic's values (whitened advantages when configured)
    grpo          each response's reward minus its group's mean, over the group's std (Dr. GRPO: not)
    rloo          each response's reward minus the mean of the other responses to its prompt
    reinforce_pp  discounted per-token returns, normalised over the batch (REINFORCE++)

Every formula is `ppo.functional`'s; this module only chooses which ones a config asks for, in the
order above, and gathers the statistics of the step. Its input is the global batch (`RolloutScores`,
the same on every rank), so what comes out is the same on every rank and in one process. A group
is the num_generations consecutive rows of one prompt (`PromptBatch.repeat`), also after the
all-gather (rank order is row order). docs/estimators.md says when to use which.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppo import functional as F
from ppo.batch import RolloutScores, ScoredBatch
from ppo.config import PPOConfig


def estimate(scored: RolloutScores, config: PPOConfig, kl_coef: float) -> tuple[ScoredBatch, dict[str, float]]:
    """Step 3 of the recipe: the batch the update trains on and the statistics of its rewards.
    `kl_coef` is the KL controller's value for this step (the loss's with `kl_in_loss`)."""
    rollout = scored.rollout
    response_mask = rollout.response_mask.float()
    scores = F.adjusted_scores(scored.scores, rollout.ended, config.missing_eos_penalty, config.reward_clip)
    kl = F.kl_penalty(scored.logprobs, scored.ref_logprobs, config.kl_estimator) * response_mask
    rewards = F.token_level_rewards(scores, kl, response_mask, 0.0 if config.kl_in_loss else kl_coef)
    if config.whiten_rewards:
        rewards = F.masked_whiten(rewards, response_mask, shift_mean=False) * response_mask
    values = scored.values if scored.values is not None else torch.zeros_like(response_mask)
    advantages, returns = ESTIMATORS[config.advantage_estimator](rewards, values, response_mask, config)
    batch = ScoredBatch(rollout.input_ids, rollout.attention_mask, response_mask, scored.logprobs, scored.ref_logprobs,
                        values, scores, rewards, advantages, returns, scored.rollout_logprobs)
    return batch, statistics(scored, batch, kl, config)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, config: PPOConfig) -> tuple[Tensor, Tensor]:
    advantages, returns = F.compute_gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = F.masked_whiten(advantages, mask) * mask
    return advantages, returns


def grpo(rewards: Tensor, values: Tensor, mask: Tensor, config: PPOConfig) -> tuple[Tensor, Tensor]:
    # The outcome reward of a response: its score (minus its summed KL penalty when in the reward).
    outcome = F.group_advantages(rewards.sum(dim=1), config.num_generations, scale=config.grpo_scale_rewards)
    return F.sequence_to_tokens(outcome, mask), F.discounted_returns(rewards, mask, config.gamma)


def rloo(rewards: Tensor, values: Tensor, mask: Tensor, config: PPOConfig) -> tuple[Tensor, Tensor]:
    outcome = F.leave_one_out_advantages(rewards.sum(dim=1), config.num_generations)
    return F.sequence_to_tokens(outcome, mask), F.discounted_returns(rewards, mask, config.gamma)


def reinforce_pp(rewards: Tensor, values: Tensor, mask: Tensor, config: PPOConfig) -> tuple[Tensor, Tensor]:
    returns = F.discounted_returns(rewards, mask, config.gamma)
    return F.masked_whiten(returns, mask) * mask, returns


ESTIMATORS = {"gae": gae, "grpo": grpo, "rloo": rloo, "reinforce_pp": reinforce_pp}


def statistics(scored: RolloutScores, batch: ScoredBatch, kl: Tensor, config: PPOConfig) -> dict[str, float]:
    """The step's statistics of sampling, rewards and advantages (the update adds its own)."""
    mask = batch.response_mask
    stats = {
        "kl": kl.sum(dim=1).mean().item(),
        "entropy": F.masked_mean(scored.entropy, mask).item(),
        "response_length": mask.sum(dim=1).mean().item(),
        "eos_fraction": scored.rollout.ended.float().mean().item(),
        "advantages/mean": F.masked_mean(batch.advantages, mask).item(),
        "advantages/std": F.masked_var(batch.advantages, mask).sqrt().item() if mask.sum() > 1 else 0.0,
        "returns/mean": F.masked_mean(batch.returns, mask).item(),
    }
    if scored.values is not None:  # the critic's statistics
        stats["values/mean"] = F.masked_mean(batch.values, mask).item()
        stats["explained_variance"] = float(F.explained_variance(batch.values, batch.returns, mask))
    stats["non_score_reward"] = (batch.rewards.sum(dim=1) - batch.scores).mean().item()
    if config.num_generations > 1:  # how much the samples of one prompt disagree: the group baselines' signal
        groups = F.group_reward_stats(batch.scores, config.num_generations)
        stats.update({f"group/{k}": v.item() for k, v in groups.items()})
    return {**stats, **scored.source_means}
