"""[4] From scores to advantages: the rewards of the batch and what the update learns from.

    scores -> missing-EOS penalty, clip -> per-token KL penalty -> per-token rewards
           -> (whitened) -> GAE advantages and returns -> (whitened advantages) -> ScoredBatch

Every formula is `ppo.functional`'s; this module only chooses which ones a config asks for, in the
order above, and gathers the statistics of the step. Its input is the global batch (`RolloutScores`,
the same on every rank), so what comes out is the same on every rank and in one process.
"""

from __future__ import annotations

from torch import Tensor

from ppo import functional as F
from ppo.batch import RolloutScores, ScoredBatch
from ppo.config import PPOConfig


def estimate(scored: RolloutScores, config: PPOConfig, kl_coef: float) -> tuple[ScoredBatch, dict[str, float]]:
    """Step 4 of the recipe: the batch the update trains on and the statistics of its rewards.
    `kl_coef` is the KL controller's value for this step."""
    rollout = scored.rollout
    response_mask = rollout.response_mask.float()
    scores = F.adjusted_scores(scored.scores, rollout.ended, config.missing_eos_penalty, config.reward_clip)
    kl = F.kl_penalty(scored.logprobs, scored.ref_logprobs, config.kl_estimator) * response_mask
    rewards = F.token_level_rewards(scores, kl, response_mask, kl_coef)
    if config.whiten_rewards:
        rewards = F.masked_whiten(rewards, response_mask, shift_mean=False) * response_mask
    advantages, returns = F.compute_gae(rewards, scored.values, response_mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = F.masked_whiten(advantages, response_mask) * response_mask
    batch = ScoredBatch(rollout.input_ids, rollout.attention_mask, response_mask, scored.logprobs, scored.ref_logprobs,
                        scored.values, scores, rewards, advantages, returns)
    return batch, statistics(scored, batch, kl)


def statistics(scored: RolloutScores, batch: ScoredBatch, kl: Tensor) -> dict[str, float]:
    """The step's statistics of sampling, rewards and advantages (the update adds its own)."""
    mask = batch.response_mask
    return {
        "kl": kl.sum(dim=1).mean().item(),
        "entropy": F.masked_mean(scored.entropy, mask).item(),
        "response_length": mask.sum(dim=1).mean().item(),
        "eos_fraction": scored.rollout.ended.float().mean().item(),
        "advantages/mean": F.masked_mean(batch.advantages, mask).item(),
        "advantages/std": F.masked_var(batch.advantages, mask).sqrt().item() if mask.sum() > 1 else 0.0,
        "returns/mean": F.masked_mean(batch.returns, mask).item(),
        "values/mean": F.masked_mean(batch.values, mask).item(),
        "explained_variance": float(F.explained_variance(batch.values, batch.returns, mask)),
        "non_score_reward": (batch.rewards.sum(dim=1) - batch.scores).mean().item(),
        **scored.source_means,
    }
