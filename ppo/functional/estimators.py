"""Per-token rewards and the advantage estimators: GAE, discounted returns (REINFORCE++) and the
critic-free group baselines (GRPO, RLOO)."""

from __future__ import annotations

import torch
from torch import Tensor

from ppo.functional.masked import _acc, _masked


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation: ``[B, T]`` rewards, values, mask -> (advantages, returns).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    ``V_{t+1}`` and ``A_{t+1}`` count as 0 past the last column or at a masked position: the episode
    ends after its last real token. ``returns = advantages + values``. Both are 0 at masked
    positions. Pure (no detach); the loop runs over T only.
    """
    r, m = _masked(rewards, mask)
    v, _ = _masked(values, m)
    next_v = next_a = v.new_zeros(v.shape[:-1])
    advs = [next_a] * v.shape[-1]
    for t in reversed(range(v.shape[-1])):
        # Masked positions hold V = 0 and A = 0, which is exactly the episode-end bootstrap.
        delta = r[..., t] + gamma * next_v - v[..., t]
        next_a = torch.where(m[..., t], delta + gamma * lam * next_a, 0)
        next_v = v[..., t]
        advs[t] = next_a
    adv = torch.stack(advs, dim=-1) if advs else torch.zeros_like(v)
    return adv, torch.where(m, adv + v, 0)


def token_level_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float | Tensor) -> Tensor:
    """Per-token rewards ``[B, T]`` from sequence scores ``[B]`` and a per-token KL ``[B, T]``.

    ``-kl_coef * kl`` at real positions, 0 at masked ones, plus ``scores[b]`` at the last real
    token of row b (the last non-zero of the mask row, padding holes allowed). Raises ValueError if
    a row has no real token (this check syncs with the device once).
    """
    klz, m = _masked(kl, mask)
    if scores.shape != kl.shape[:1] or kl.dim() != 2:
        raise ValueError(f"need scores [B] and kl [B, T], got {tuple(scores.shape)}, {tuple(kl.shape)}")
    if m.shape[1] == 0 or not bool(m.any(dim=1).all()):
        raise ValueError("token_level_rewards: every row needs at least one real token")
    cols = torch.arange(m.shape[1], device=m.device)
    at_last = cols == torch.where(m, cols, -1).amax(dim=1, keepdim=True)
    return torch.where(m, -kl_coef * klz, 0) + torch.where(at_last, _acc(scores).unsqueeze(1), 0)


def adjusted_scores(
    scores: Tensor, ended: Tensor, missing_eos_penalty: float | None = None, clip: float | None = None
) -> Tensor:
    """Sequence scores ``[B]`` after the missing-EOS penalty (``penalty`` subtracted from each row
    whose ``ended [B]`` is False) and then clipping to ``[-clip, clip]``; None turns a step off."""
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ended).float()
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}``, ``[B, T]`` -> ``[B, T]``; a masked position ends
    the episode (``G`` restarts after it) and holds 0. REINFORCE++'s return (Hu, 2025) before its
    batch normalisation; the same as GAE with zero values and ``lam = 1``."""
    r, m = _masked(rewards, mask)
    return compute_gae(r, torch.zeros_like(r), m, gamma, 1.0)[0]


# ----------------------------------------------------------------------------- critic-free estimators
# Groups: the batch holds `group_size` consecutive samples of each prompt (rows g*G .. g*G+G-1),
# which is how the trainer lays out num_generations samples.


def _groups(scores: Tensor, group_size: int) -> Tensor:
    """``[B]`` -> ``[B / G, G]`` in the accumulation dtype; rejects groups of one and ragged groups."""
    if scores.dim() != 1:
        raise ValueError(f"need scores [B], got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"a group baseline needs at least 2 samples per prompt, got group_size={group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    return _acc(scores).view(-1, group_size)


def group_advantages(scores: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's outcome advantage, ``[B]`` -> ``[B]``: each score minus its group's mean, divided by
    ``std + eps`` (the group's unbiased standard deviation) when ``scale`` (Shao et al., 2024,
    DeepSeekMath). ``scale=False`` is Dr. GRPO (Liu et al., 2025): no division, so groups whose
    rewards barely differ are not blown up. A group with equal scores gets 0 either way."""
    g = _groups(scores, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO's advantage, ``[B]`` -> ``[B]``: each score minus the mean of the *other* scores of its
    group (Kool et al., 2019; Ahmadian et al., 2024), an unbiased baseline. Equals
    ``G / (G - 1) * (r - group mean)``; computed as the leave-one-out mean itself."""
    g = _groups(scores, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def group_reward_stats(scores: Tensor, group_size: int) -> dict[str, Tensor]:
    """Statistics of the groups, ``[B]`` -> 0-d tensors: ``reward_std`` (mean over groups of the
    unbiased within-group std) and ``zero_std_fraction`` (share of groups whose scores are all
    equal: their group-normalised advantage is 0, so they teach nothing)."""
    g = _groups(scores, group_size)
    flat = (g.amax(dim=1) == g.amin(dim=1)).to(g.dtype)
    return {"reward_std": g.std(dim=1).mean(), "zero_std_fraction": flat.mean()}


def sequence_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """A per-sequence value ``[B]`` at every real token of its row: ``[B, T]``, 0 at masked ones."""
    m = mask if mask.dtype == torch.bool else mask != 0
    if advantages.shape != m.shape[:1] or m.dim() != 2:
        raise ValueError(f"need advantages [B] and mask [B, T], got {tuple(advantages.shape)}, {tuple(m.shape)}")
    return torch.where(m, _acc(advantages).unsqueeze(1), 0)
