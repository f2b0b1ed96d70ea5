"""[3] Scoring a rollout: one no-grad pass of every model, then the global batch on every rank.

    policy log-probs and entropy (or the sampling pass's own), reference log-probs, critic values,
    reward sources -> cloned to fp32 -> all-gathered across ranks -> `RolloutScores`

Nothing here is a formula: the forwards are `ppo.forward`'s, the rewards `ppo.rewards`'. What comes
out is the input of `ppo.advantages`. Under torchrun each rank scores its own rows, and the gather
makes every rank hold the global batch in rank order - exactly the layout one process gives.
"""

from __future__ import annotations

from ppo import distributed as dist
from ppo.batch import PromptBatch, Rollout, RolloutScores
from ppo.config import PPOConfig, plan_batches
from ppo.forward import by_rows, policy_logprobs
from ppo.precision import grad_free
from ppo.rewards import RewardSources
from ppo.roles import reference_context


class Scorer:
    """The no-grad forwards of step 3. `critic` is the update's critic call (`values(...)`,
    `uses_policy_hidden`), or None for a critic-free advantage estimator."""

    def __init__(
        self,
        policy,
        ref_model,
        critic,
        rewards: RewardSources,
        config: PPOConfig,
        autocast,
        pad_id: int,
        precision: str = "fp32",
    ):
        self.policy, self.ref_model, self.critic, self.rewards = policy, ref_model, critic, rewards
        self.config, self.autocast, self.pad_id, self.precision = config, autocast, pad_id, precision

    def wants_rollout_logprobs(self) -> bool:
        """`rollout_logprobs`, with auto resolved: the sampling pass's in fp32 (it agrees with a full
        forward to ~1e-6), a scoring forward under bf16 or with tis_cap (docs/precision.md)."""
        choice = self.config.rollout_logprobs
        return choice is True or (choice == "auto" and self.precision == "fp32" and self.config.tis_cap is None)

    def reuses_rollout_logprobs(self, rollout: Rollout) -> bool:
        """pi_old from the sampling pass instead of a second policy forward: when wanted, when the
        engine gave them, and when no shared value head needs the policy's hidden states anyway."""
        return (
            self.wants_rollout_logprobs()
            and rollout.logprobs is not None
            and rollout.entropy is not None
            and not self.needs_policy_hidden
        )

    @property
    def needs_policy_hidden(self) -> bool:
        return self.critic is not None and self.critic.uses_policy_hidden

    def rows_per_forward(self, rows_on_rank: int) -> int:
        """`forward_batch_size`, or by default the update's micro-batch: a no-grad forward of as
        many rows as a forward that also keeps activations for backward cannot need more memory."""
        cfg = self.config
        if cfg.forward_batch_size is not None:
            return cfg.forward_batch_size
        world = dist.world_size()
        return plan_batches(
            cfg, n_prompts=max(1, rows_on_rank * world // cfg.num_generations), world_size=world
        ).micro_batch

    def __call__(self, rollout: Rollout, prompts: PromptBatch, completions: list[str]) -> RolloutScores:
        """Score this rank's rollout; return the scores of the global batch."""
        cfg = self.config
        ids, mask, width = rollout.input_ids, rollout.attention_mask, rollout.response_ids.shape[1]
        rows = self.rows_per_forward(len(ids))
        with self.autocast(), grad_free():
            if self.reuses_rollout_logprobs(rollout):
                logprobs, entropy, hidden = rollout.logprobs, rollout.entropy, None
            else:
                logprobs, entropy, hidden = by_rows(
                    lambda i, m: policy_logprobs(
                        self.policy,
                        i,
                        m,
                        width,
                        cfg.temperature,
                        with_entropy=True,
                        output_hidden=self.needs_policy_hidden,
                    ),
                    rows,
                    ids,
                    mask,
                )
            ref_model, ref_context = reference_context(self.policy, self.ref_model)
            with ref_context:
                ref_logprobs, _, _ = by_rows(
                    lambda i, m: policy_logprobs(ref_model, i, m, width, cfg.temperature), rows, ids, mask
                )
            values = None
            if self.critic is not None:
                values = by_rows(lambda i, m, h: self.critic.values(i, m, width, h), rows, ids, mask, hidden)
            scores, source_means = self.rewards.score(
                ids, mask, prompts.texts, completions, rollout.completion_ids(), prompts.extras, rows
            )
        # Inference tensors cannot be saved for backward: clone what enters the losses.
        logprobs, ref_logprobs, scores, entropy = (t.clone().float() for t in (logprobs, ref_logprobs, scores, entropy))
        values = None if values is None else values.clone().float()
        sampled = None if rollout.logprobs is None else rollout.logprobs.clone().float()  # pi_rollout, for the mismatch
        # The global batch on every rank (rank order is row order; padding widened to the widest rank).
        logprobs, ref_logprobs, entropy, scores = (
            dist.all_gather_rows(t) for t in (logprobs, ref_logprobs, entropy, scores)
        )
        return RolloutScores(
            rollout=gather_rollout(rollout, self.pad_id),
            completions=[text for share in dist.all_gather_objects(completions) for text in share],
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            entropy=entropy,
            values=None if values is None else dist.all_gather_rows(values),
            scores=scores,
            source_means=dist.all_reduce_mean(source_means),
            rollout_logprobs=None if sampled is None else dist.all_gather_rows(sampled),
        )


def gather_rollout(rollout: Rollout, pad_id: int) -> Rollout:
    """Every rank's rollout rows, in rank order: prompts left-padded and responses right-padded to
    the widest rank, exactly the layout one process gives the same global batch."""
    return Rollout(
        prompt_ids=dist.all_gather_rows(rollout.prompt_ids, pad_id, left=True),
        prompt_mask=dist.all_gather_rows(rollout.prompt_mask, 0, left=True),
        response_ids=dist.all_gather_rows(rollout.response_ids, pad_id),
        response_mask=dist.all_gather_rows(rollout.response_mask, 0),
        ended=dist.all_gather_rows(rollout.ended),
    )
