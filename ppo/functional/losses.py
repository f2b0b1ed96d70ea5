"""PPO's clipped policy and value losses, and the weights and metric of a sampler whose
probabilities differ from the trainer's (truncated importance sampling)."""

from __future__ import annotations

import torch
from torch import Tensor

from ppo.functional.masked import _acc, _masked, masked_mean


def truncated_importance_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """``min(pi_old / pi_rollout, cap)`` per token, ``[B, T]`` -> ``[B, T]`` fp32, 0 at masked
    positions, no gradient: truncated importance sampling (Yao et al., 2025, "Your efficient RL
    framework secretly brings you off-policy RL training") for tokens drawn by a sampler whose
    probabilities differ from the trainer's."""
    log_w, m = _masked(_acc(old_logprobs) - _acc(rollout_logprobs), mask)
    return torch.where(m, torch.exp(log_w).clamp(max=cap), 0).detach()


def mean_abs_diff(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """``masked_mean(|a - b|)`` in fp32: the mismatch of two log-prob tensors ``[B, T]`` -> 0-d."""
    return masked_mean((_acc(a) - _acc(b)).abs(), mask)


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, ``[B, T]`` inputs -> (0-d loss, stats).

    ``ratio = exp(logprobs - old_logprobs)``;
    ``loss = masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range)))``;
    with ``token_weights`` ``[B, T]`` (e.g. :func:`truncated_importance_weights`) each token's term
    is multiplied by its weight inside the mean.
    Stats (detached 0-d): ``clipfrac`` (share of real tokens where the clipped term is strictly
    larger), ``approx_kl`` (``masked_mean((lp - old)**2 / 2)``), ``ratio_mean``, ``ratio_max``.
    """
    adv, m = _masked(advantages, mask)
    # Zero the log-ratio before exp: exp of a huge masked value is inf, and inf * 0 in backward
    # would be NaN even though the forward discards it.
    log_ratio = torch.where(m, _acc(logprobs) - _acc(old_logprobs), 0)
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * _masked(token_weights, m)[0]
    loss = masked_mean(per_token, m)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), m),
            "approx_kl": masked_mean(0.5 * log_ratio**2, m),
            "ratio_mean": masked_mean(ratio, m),
            # ratio > 0, so filling masked positions with 0 cannot win the max.
            "ratio_max": torch.where(m, ratio, 0).max(),
        }
    return loss, stats


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped value loss, ``[B, T]`` inputs -> (0-d loss, stats).

    ``v_clip = old + clamp(v - old, -c, c)``;
    ``loss = 0.5 * masked_mean(max((v - R)**2, (v_clip - R)**2))``. Stats (detached 0-d):
    ``vf_clipfrac``, the share of real tokens where the clipped term is strictly larger.
    """
    v, m = _masked(values, mask)
    old, _ = _masked(old_values, m)
    ret, _ = _masked(returns, m)
    v_clip = old + torch.clamp(v - old, -clip_range_value, clip_range_value)
    unclipped, clipped = (v - ret) ** 2, (v_clip - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        vf_clipfrac = masked_mean((clipped > unclipped).to(v.dtype), m)
    return loss, {"vf_clipfrac": vf_clipfrac}
