"""The PPO update: epochs x shuffled mini-batches x gradient-accumulation micro-batches.

The losses come from `ppo.functional`; this module only schedules them. Per-micro-batch statistics
stay on the device as 0-d tensors and are reduced once at the end (no host sync per step).

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


def _policy_part(mb: ScoredBatch, policy, critic, config: PPOConfig):
    """The clipped policy loss (minus the entropy bonus) of a micro-batch, its statistics, and the
    policy's hidden states when a shared value head needs them."""
    want_entropy = config.entropy_coef != 0.0
    logprobs, entropy, hidden = policy_logprobs(
        policy, mb.input_ids, mb.attention_mask, mb.response_width, config.temperature,
        with_entropy=want_entropy, output_hidden=critic.uses_policy_hidden,
    )
    loss, stats = F.clipped_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.response_mask, config.clip_range)
    stats = {"policy_loss": loss.detach(), **stats}
    if want_entropy:
        mean_entropy = F.masked_mean(entropy, mb.response_mask)
        loss = loss - config.entropy_coef * mean_entropy
        stats["update_entropy"] = mean_entropy.detach()
    return loss, stats, hidden


def _value_part(mb: ScoredBatch, critic, config: PPOConfig, policy_hidden):
    """vf_coef x the clipped value loss of a micro-batch, and its statistics."""
    values = critic.values(mb.input_ids, mb.attention_mask, mb.response_width, policy_hidden)
    loss, stats = F.clipped_value_loss(values, mb.values, mb.returns, mb.response_mask, config.clip_range_value)
    return config.vf_coef * loss, {"value_loss": loss.detach(), **stats}


def micro_batch_loss(mb: ScoredBatch, policy, critic, config: PPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO loss of one (trimmed) micro-batch and its statistics, as one graph."""
    pg_loss, pg_stats, hidden = _policy_part(mb, policy, critic, config)
    vf_loss, vf_stats = _value_part(mb, critic, config, hidden)
    loss = pg_loss + vf_loss
    return loss, {**pg_stats, **vf_stats, "loss": loss.detach()}


def micro_batch_backward(mb: ScoredBatch, policy, critic, config: PPOConfig, weight: float, autocast=contextlib.nullcontext):
    """Accumulate the gradient of `weight` x the micro-batch's PPO loss; return its statistics.

    With a separate critic the policy's loss goes backward before the critic runs forward: the two
    models share no parameter, so every gradient is the one the summed loss gives, and only one
    model's activations are alive at a time (the update's peak memory drops by the critic's).
    A shared value head reads the policy's hidden states, so there it is one graph.
    """
    if critic.uses_policy_hidden:
        with autocast():
            loss, stats = micro_batch_loss(mb, policy, critic, config)
        (loss * weight).backward()
        return stats
    with autocast():
        pg_loss, pg_stats, _ = _policy_part(mb, policy, critic, config)
    (pg_loss * weight).backward()
    with autocast():
        vf_loss, vf_stats = _value_part(mb, critic, config, None)
    (vf_loss * weight).backward()
    return {**pg_stats, **vf_stats, "loss": (pg_loss + vf_loss).detach()}


def ppo_update(
    batch: ScoredBatch,
    policy: torch.nn.Module,
    critic,
    optimizers: dict[str, torch.optim.Optimizer],
    plan: BatchPlan,
    config: PPOConfig,
    generator: torch.Generator,
    autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """Run `config.ppo_epochs` passes over `batch`; return the mean statistics.

    Each mini-batch of `plan.mini_batch` samples (global) is one optimizer step; each rank takes
    its share, split into micro-batches of `plan.micro_batch`; each micro-batch's loss is weighted
    by its share of the mini-batch, so the gradient does not depend on how the mini-batch was split
    (the factor world_size undoes the averaging over ranks). `autocast` makes a fresh
    mixed-precision context per forward pass. `policy` and `critic.module` may be DDP / FSDP2
    wrapped (`ppo.distributed.wrap`); the statistics returned are means over ranks.
    """
    # Clipped per model: a critic with large early gradients must not shrink the policy's step.
    param_sets = {name: [p for g in opt.param_groups for p in g["params"]] for name, opt in optimizers.items()}
    history: dict[str, list[Tensor]] = defaultdict(list)
    epochs_run = 0
    for _epoch in range(config.ppo_epochs):
        order = torch.randperm(len(batch), generator=generator)
        epoch_kl = []
        for start in range(0, len(batch), plan.mini_batch):
            mini = order[start : start + plan.mini_batch]
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            micros = mini[dist.shard_slice(len(mini))].split(plan.micro_batch)
            for i, micro in enumerate(micros):
                mb = batch.select(micro).trim_padding()
                # Gradients cross ranks once per mini-batch: on its last micro-batch.
                with dist.gradient_sync((policy, critic.module), enabled=i == len(micros) - 1):
                    stats = micro_batch_backward(mb, policy, critic, config, len(micro) * dist.world_size() / len(mini), autocast)
                for key, value in stats.items():
                    history[key].append(value)
                epoch_kl.append(stats["approx_kl"])
            if config.max_grad_norm is not None:
                for name, params in param_sets.items():
                    history[f"grad_norm/{name}"].append(dist.clip_grad_norm(params, config.max_grad_norm))
            for opt in optimizers.values():
                opt.step()
        epochs_run += 1
        # cleanrl's early stop: once the policy moved too far from the rollout policy, more
        # epochs on the same data only overfit it. Decided on the mean over ranks: all stop together.
        stop = config.approx_kl_stop
        if stop is not None and dist.all_reduce_mean({"approx_kl": torch.stack(epoch_kl).mean()})["approx_kl"] > stop:
            break
    means = dist.all_reduce_mean({key: torch.stack([v.float() for v in values]).mean() for key, values in history.items()})
    means["ppo_epochs_run"] = epochs_run
    return means
