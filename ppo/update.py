"""The PPO update: epochs x shuffled mini-batches x gradient-accumulation micro-batches.

The losses come from `ppo.functional`; this module only schedules them. Per-micro-batch statistics
stay on the device as 0-d tensors and are reduced once at the end (no host sync per step).

With a separate critic each mini-batch is two passes over its micro-batches: the policy's (forward,
backward, clip, optimizer step, gradients freed), then the critic's. The two models share no
parameter, so every gradient and step is the one a joint pass gives; but the policy's gradients are
gone before the critic's activations exist, and no gradient outlives its step (none are held during
the rollout), which lowers the peak memory of the run. A shared value head reads the policy's
hidden states, so there it is one joint pass that steps both.

A critic-free estimator (GRPO, RLOO, REINFORCE++) has no critic: one pass, the policy's. During the
critic warm-up (`critic_warmup_steps`) it is the other way round: the critic's pass alone.

The same code runs on 1 or N ranks. Every rank holds the whole (gathered) batch and draws the same
permutation; each takes its contiguous share of every mini-batch, and DDP / FSDP2 average the
gradients over ranks on the last micro-batch. So a mini-batch's gradient is the one a single
process computes over the same micro-batches, whatever the number of ranks.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import Tensor

from ppo import distributed as dist
from ppo import functional as F
from ppo.batch import ScoredBatch
from ppo.config import BatchPlan, PPOConfig
from ppo.forward import policy_logprobs


# The rollout/training mismatch, measured on the first mini-batch of the first epoch: there the policy
# has the weights that sampled and scored the batch, so the update's forward (pi_train) should equal
# pi_old and the sampling pass's log-probs (pi_rollout) to float rounding. docs/precision.md.
ROLLOUT_DIFF = "rollout_logprob_abs_diff"  # a micro-batch's mean |log pi_train - log pi_rollout|
FIRST_MINIBATCH_STATS = {
    ROLLOUT_DIFF: "mismatch/logprob_abs_diff",
    "ratio_mean": "mismatch/first_ratio_mean",
    "clipfrac": "mismatch/first_clipfrac",
    "approx_kl": "mismatch/first_approx_kl",
}


def policy_loss(mb: ScoredBatch, policy, critic, config: PPOConfig, kl_coef: float = 0.0):
    """The clipped policy loss (minus the entropy bonus, plus `kl_coef` x the KL to the reference
    with `kl_in_loss`) of a micro-batch, its statistics, and the policy's hidden states when a shared
    value head needs them. `critic` is None for a critic-free estimator."""
    want_entropy = config.entropy_coef != 0.0
    logprobs, entropy, hidden = policy_logprobs(
        policy, mb.input_ids, mb.attention_mask, mb.response_width, config.temperature,
        with_entropy=want_entropy, output_hidden=critic is not None and critic.uses_policy_hidden,
    )
    weights = None
    if config.tis_cap is not None and mb.rollout_logprobs is not None:
        weights = F.truncated_importance_weights(mb.logprobs, mb.rollout_logprobs, mb.response_mask, config.tis_cap)
    loss, stats = F.clipped_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.response_mask, config.clip_range, weights)
    stats = {"policy_loss": loss.detach(), **stats}
    if config.kl_in_loss:
        kl = F.kl_loss(logprobs, mb.ref_logprobs, mb.response_mask, config.kl_loss_estimator)
        loss = loss + kl_coef * kl
        stats["kl_loss"] = kl.detach()
    if weights is not None:
        stats["tis_weight_mean"] = F.masked_mean(weights, mb.response_mask)
    if mb.rollout_logprobs is not None:  # kept for the first mini-batch only (ppo_update)
        stats[ROLLOUT_DIFF] = F.mean_abs_diff(logprobs.detach(), mb.rollout_logprobs, mb.response_mask)
    if want_entropy:
        mean_entropy = F.masked_mean(entropy, mb.response_mask)
        loss = loss - config.entropy_coef * mean_entropy
        stats["update_entropy"] = mean_entropy.detach()
    return loss, stats, hidden


def value_loss(mb: ScoredBatch, critic, config: PPOConfig, policy_hidden=None):
    """vf_coef x the clipped value loss of a micro-batch, and its statistics."""
    values = critic.values(mb.input_ids, mb.attention_mask, mb.response_width, policy_hidden)
    loss, stats = F.clipped_value_loss(values, mb.values, mb.returns, mb.response_mask, config.clip_range_value)
    return config.vf_coef * loss, {"value_loss": loss.detach(), **stats}


def micro_batch_loss(mb: ScoredBatch, policy, critic, config: PPOConfig, kl_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The whole PPO loss of one (trimmed) micro-batch and its statistics, as one graph."""
    pg_loss, pg_stats, hidden = policy_loss(mb, policy, critic, config, kl_coef)
    vf_loss, vf_stats = value_loss(mb, critic, config, hidden)
    return pg_loss + vf_loss, {**pg_stats, **vf_stats}


def warmup_value_loss(mb: ScoredBatch, policy, critic, config: PPOConfig):
    """The value loss alone, for the critic warm-up. A shared head reads the policy's hidden states,
    taken without gradient: the policy must not move (nor keep gradients) while the critic warms up."""
    hidden = None
    if critic.uses_policy_hidden:
        with torch.no_grad():
            hidden = policy_logprobs(policy, mb.input_ids, mb.attention_mask, mb.response_width, config.temperature, output_hidden=True)[2]
    return value_loss(mb, critic, config, hidden)


def _passes(policy, critic, config: PPOConfig, kl_coef: float, train_policy: bool):
    """[(modules, optimizer names, loss of a micro-batch)]: the passes of one mini-batch, in order."""
    if critic is None:  # a critic-free estimator
        return [((policy,), ("policy",), lambda mb: policy_loss(mb, policy, None, config, kl_coef)[:2])]
    if not train_policy:  # the critic warm-up
        return [((critic.module,), ("critic",), lambda mb: warmup_value_loss(mb, policy, critic, config))]
    if critic.uses_policy_hidden:
        return [((policy, critic.module), ("policy", "critic"), lambda mb: micro_batch_loss(mb, policy, critic, config, kl_coef))]
    return [
        ((policy,), ("policy",), lambda mb: policy_loss(mb, policy, critic, config, kl_coef)[:2]),
        ((critic.module,), ("critic",), lambda mb: value_loss(mb, critic, config)),
    ]


def ppo_update(
    batch: ScoredBatch,
    policy: torch.nn.Module,
    critic,
    optimizers: dict[str, torch.optim.Optimizer],
    plan: BatchPlan,
    config: PPOConfig,
    generator: torch.Generator,
    autocast=contextlib.nullcontext,
    after_pass=lambda: None,
    kl_coef: float = 0.0,
    train_policy: bool = True,
) -> dict[str, float]:
    """Run `config.ppo_epochs` passes over `batch`; return the mean statistics.

    Each mini-batch of `plan.mini_batch` samples (global) is one optimizer step per model; each
    rank takes its share, split into micro-batches of `plan.micro_batch`; each micro-batch's loss is
    weighted by its share of the mini-batch, so the gradient does not depend on how the mini-batch
    was split (the factor world_size undoes the averaging over ranks). `autocast` makes a fresh
    mixed-precision context per forward pass. `policy` and `critic.module` may be DDP / FSDP2
    wrapped (`ppo.distributed.wrap`); the statistics returned are means over ranks. `after_pass` is
    called after each model's pass (the trainer's `release_memory`). `kl_coef` weighs the KL term
    of the policy loss with `kl_in_loss`; `train_policy=False` trains the critic alone (its warm-up),
    `critic=None` the policy alone (a critic-free estimator).
    """
    # Clipped per model: a critic with large early gradients must not shrink the policy's step.
    param_sets = {name: [p for g in opt.param_groups for p in g["params"]] for name, opt in optimizers.items()}
    passes = _passes(policy, critic, config, kl_coef, train_policy)
    history: dict[str, list[Tensor]] = defaultdict(list)
    epochs_run = 0
    for epoch in range(config.ppo_epochs):
        order = torch.randperm(len(batch), generator=generator)
        epoch_kl = []
        for start in range(0, len(batch), plan.mini_batch):
            mini = order[start : start + plan.mini_batch]
            micros = mini[dist.shard_slice(len(mini))].split(plan.micro_batch)
            weights = [len(micro) * dist.world_size() / len(mini) for micro in micros]
            micros = [batch.select(micro).trim_padding() for micro in micros]
            total_loss = [0.0] * len(micros)
            for modules, names, loss_of in passes:
                for i, mb in enumerate(micros):
                    # Gradients cross ranks once per mini-batch: on its last micro-batch.
                    with dist.gradient_sync(modules, enabled=i == len(micros) - 1):
                        with autocast():
                            loss, stats = loss_of(mb)
                        (loss * weights[i]).backward()
                    total_loss[i] = total_loss[i] + loss.detach()
                    first = epoch == 0 and start == 0
                    for key, value in stats.items():
                        if key in FIRST_MINIBATCH_STATS and first:
                            history[FIRST_MINIBATCH_STATS[key]].append(value)
                        if key != ROLLOUT_DIFF:
                            history[key].append(value)
                for name in names:
                    if config.max_grad_norm is not None:
                        history[f"grad_norm/{name}"].append(dist.clip_grad_norm(param_sets[name], config.max_grad_norm))
                    optimizers[name].step()
                    optimizers[name].zero_grad(set_to_none=True)  # no gradient outlives its step
                after_pass()
            history["loss"].extend(total_loss)
            epoch_kl.extend(history["approx_kl"][-len(micros):] if train_policy else [])
        epochs_run += 1
        # cleanrl's early stop: once the policy moved too far from the rollout policy, more
        # epochs on the same data only overfit it. Decided on the mean over ranks: all stop together.
        stop = config.approx_kl_stop
        if stop is not None and epoch_kl and dist.all_reduce_mean({"approx_kl": torch.stack(epoch_kl).mean()})["approx_kl"] > stop:
            break
    means = dist.all_reduce_mean({key: torch.stack([v.float() for v in values]).mean() for key, values in history.items()})
    means["ppo_epochs_run"] = epochs_run
    if not train_policy:  # the policy did not move: no policy statistics to report
        means.update(policy_loss=float("nan"), clipfrac=float("nan"), critic_warmup=1.0)
    return means
