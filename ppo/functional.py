"""Pure tensor maths for PPO on language models: no modules, no config objects, scalars passed in.

Why one file over ~400 lines: API.md fixes ``ppo.functional`` as the one place of the maths; the
critic-free advantage estimators (GRPO, RLOO, REINFORCE++) sit at the end, next to GAE's kin.

Conventions:
* Shapes are ``[B, T]`` over response tokens unless a docstring says otherwise; logits ``[B, T, V]``.
* ``mask`` has the same shape as the data and may be float or bool: non-zero marks a real response
  token, zero marks padding. Masked-out positions never influence a result, whatever *finite* value
  they hold: they are replaced by 0 with ``torch.where`` before any arithmetic, so even huge values
  cannot overflow into inf/NaN, and gradients at those positions are exactly 0.
* Precision: 16-bit float inputs are upcast and everything is computed and *returned* in fp32;
  fp32 stays fp32 and fp64 stays fp64. Results are therefore fp32 for bf16 inputs.
* A reduction over ``dim`` removes that dimension, as torch does. A masked mean over zero real
  positions is 0 (not NaN), so an empty micro-batch contributes nothing instead of poisoning the
  update; ``masked_var``/``masked_whiten`` instead raise, since a variance of nothing is a bug.
* Stats returned next to losses are detached 0-d tensors (no ``.item()``: no device sync).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "logprobs_from_logits", "entropy_from_logits", "masked_mean", "masked_var", "masked_whiten",
    "compute_gae", "kl_penalty", "clipped_policy_loss", "clipped_value_loss", "token_level_rewards",
    "adjusted_scores", "explained_variance", "discounted_returns", "group_advantages",
    "leave_one_out_advantages", "group_reward_stats", "sequence_to_tokens", "kl_loss", "FixedKLController", "AdaptiveKLController",
]

# Most elements of one fp32 temporary made from logits; tests shrink both to cover the loop.
# Accelerators: 64 MiB, few kernel launches. CPU: 4 MiB, so that a chunk's temporaries stay in the
# last-level cache and below glibc's mmap threshold (32 MiB): a 64 MiB temporary is a fresh mmap
# that page-faults on every use. W3's log-probs, forward and backward: 170 ms at 2**24, 70 ms at
# 2**20 (82k page faults -> 17k), 115 ms at 2**16 (the Python loop starts to show).
_CHUNK_NUMEL = 1 << 24
_CPU_CHUNK_NUMEL = 1 << 20
KL_ESTIMATORS = ("k1", "k2", "k3")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(x: Tensor) -> Tensor:
    return x.to(_acc_dtype(x.dtype)) if x.is_floating_point() else x.float()


def _masked(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Upcast x and zero its masked-out positions; also return the bool mask."""
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match data shape {tuple(x.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(m, _acc(x), 0), m


def _chunks(logits: Tensor) -> Iterator[tuple]:
    """Index tuples covering the leading dims of a ``[..., V]`` tensor in pieces of at most
    ``_CHUNK_NUMEL`` elements (``_CPU_CHUNK_NUMEL`` on a CPU), but never less than one row.
    Slicing, not reshaping, keeps every piece a view even when the logits are a non-contiguous
    slice of the model output."""
    limit = _CPU_CHUNK_NUMEL if logits.device.type == "cpu" else _CHUNK_NUMEL
    return _index_pieces(tuple(logits.shape), limit)


def _index_pieces(dims: tuple[int, ...], limit: int, prefix: tuple = ()) -> Iterator[tuple]:
    inner = math.prod(dims[1:])
    if len(dims) <= 1:
        yield prefix
    elif inner <= limit:
        step = limit // max(inner, 1)
        yield from (prefix + (slice(s, s + step),) for s in range(0, dims[0], step))
    else:
        for i in range(dims[0]):
            yield from _index_pieces(dims[1:], limit, prefix + (i,))


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    """fp32 (fp64) logits over the temperature: the division happens on the chunk's upcast copy, so
    tempering costs no full-size tensor and no bf16 rounding."""
    z = _acc(logits)
    return z / temperature if temperature != 1.0 else z


def _softmax_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    mx = z.amax(-1, keepdim=True)
    return mx, (z - mx).exp_().sum(-1, keepdim=True).log_()


def _log_softmax(z: Tensor, mx: Tensor, log_sum: Tensor) -> Tensor:
    # (z - max) - log(sum(exp(z - max))) rather than z - logsumexp(z): both terms are small, so no
    # digits are lost when the logits are large. Clamping -inf (vocabulary masked by a logits
    # processor) keeps p * log p at 0 instead of NaN.
    return (z - mx).sub_(log_sum).clamp_min_(torch.finfo(z.dtype).min)


class _LogProbs(torch.autograd.Function):
    """Gathered log-softmax that saves only the (possibly bf16) logits plus [B, T] statistics and
    recomputes the softmax chunk by chunk in backward: no full-size fp32 tensor is ever kept."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        out = logits.new_empty(labels.shape, dtype=_acc_dtype(logits.dtype))
        mx, log_sum = torch.empty_like(out), torch.empty_like(out)
        for idx in _chunks(logits):
            z = _tempered(logits[idx], temperature)
            m, s = _softmax_stats(z)
            out[idx] = ((z.gather(-1, labels[idx].unsqueeze(-1)) - m) - s).squeeze(-1)
            mx[idx], log_sum[idx] = m.squeeze(-1), s.squeeze(-1)
        ctx.save_for_backward(logits, labels, mx, log_sum)
        ctx.temperature = temperature
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, labels, mx, log_sum = ctx.saved_tensors
        out = torch.empty_like(logits)
        for idx in _chunks(logits):
            g = grad[idx].unsqueeze(-1) / ctx.temperature  # d(z/T)/dz = 1/T
            z = _log_softmax(_tempered(logits[idx], ctx.temperature), mx[idx].unsqueeze(-1), log_sum[idx].unsqueeze(-1))
            out[idx] = z.exp_().mul_(-g).scatter_add_(-1, labels[idx].unsqueeze(-1), g)  # g*(onehot-p)/T
        return out, None, None


class _Entropy(torch.autograd.Function):
    """Softmax entropy with the same memory profile as `_LogProbs`; dH/dz_j = -p_j (log p_j + H)."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float) -> Tensor:
        ent = logits.new_empty(logits.shape[:-1], dtype=_acc_dtype(logits.dtype))
        mx, log_sum = torch.empty_like(ent), torch.empty_like(ent)
        ctx.temperature = temperature
        for idx in _chunks(logits):
            z = _tempered(logits[idx], temperature)
            m, s = _softmax_stats(z)
            # -sum(p log p) adds same-sign terms: no cancellation, unlike lse - sum(p z).
            logp = _log_softmax(z, m, s)
            ent[idx] = -(logp.exp() * logp).sum(-1)
            mx[idx], log_sum[idx] = m.squeeze(-1), s.squeeze(-1)
        ctx.save_for_backward(logits, mx, log_sum, ent)
        return ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, mx, log_sum, ent = ctx.saved_tensors
        out = torch.empty_like(logits)
        for idx in _chunks(logits):
            logp = _log_softmax(_tempered(logits[idx], ctx.temperature), mx[idx].unsqueeze(-1), log_sum[idx].unsqueeze(-1))
            g = logp.exp() * (logp + ent[idx].unsqueeze(-1))
            out[idx] = g.mul_(-grad[idx].unsqueeze(-1) / ctx.temperature)
        return out, None


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``: ``[B, T, V]``, ``[B, T]`` -> ``[B, T]``.

    Computed as the gathered logit minus a chunked fp32 logsumexp (split as max + log-sum for
    accuracy), so at most one chunk (``_CPU_CHUNK_NUMEL`` / ``_CHUNK_NUMEL`` elements) of fp32 exists at a time, in
    forward and backward alike. Returns fp32 (fp64 for fp64 logits). ``labels`` must be valid
    indices in ``[0, V)``, padding included. First-order differentiable w.r.t. ``logits``.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    return _LogProbs.apply(logits, labels.long(), float(temperature))


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` in nats: ``[..., V]`` -> ``[...]``.

    Chunked like :func:`logprobs_from_logits`; returns fp32 (fp64 for fp64 logits); ``-inf`` logits
    are allowed (they contribute 0). First-order differentiable.
    """
    return _Entropy.apply(logits, float(temperature))


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over real positions: ``[B, T]`` -> 0-d (``dim=None``) or with ``dim`` removed.

    A slice with no real position gives 0.
    """
    xz, m = _masked(x, mask)
    if dim is None:
        return xz.sum() / m.sum().clamp_min(1)
    return xz.sum(dim) / m.sum(dim).clamp_min(1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all real positions, ``[B, T]`` -> 0-d; Bessel-corrected (n - 1) when
    ``unbiased``. Raises ValueError with fewer than 2 (unbiased) or 1 (biased) real positions;
    checking that reads the count back to the host (one sync).
    """
    xz, m = _masked(x, mask)
    n, need = int(m.sum()), 2 if unbiased else 1
    if n < need:
        raise ValueError(f"masked_var: need at least {need} real positions (unbiased={unbiased}), got {n}")
    mean = xz.sum() / n
    # Two passes (mean, then squared deviations) avoid the E[x^2] - E[x]^2 cancellation.
    sq = torch.where(m, (xz - mean) ** 2, 0).sum()
    return sq / (n - 1 if unbiased else n)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over real positions, ``[B, T]`` -> ``[B, T]``, with the
    unbiased variance; ``shift_mean=False`` adds the mean back. 0 at masked positions. Needs at
    least 2 real positions (see :func:`masked_var`).
    """
    xz, m = _masked(x, mask)
    mean = masked_mean(xz, m)
    scale = torch.rsqrt(masked_var(xz, m, unbiased=True) + 1e-8)
    return torch.where(m, (xz - mean) * scale + (0.0 if shift_mean else mean), 0)


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


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens, ``[B, T]`` -> ``[B, T]``.

    With ``d = logprobs - ref_logprobs``: ``k1 = d``, ``k2 = d**2 / 2``,
    ``k3 = exp(-d) - 1 + d`` (non-negative, unbiased). Elementwise and unmasked: mask the result.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    d = _acc(logprobs) - _acc(ref_logprobs)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    # expm1 keeps precision for small d; the clamp removes rounding just below zero.
    return (torch.expm1(-d) + d).clamp_min(0)


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


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        clip_range: float, token_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
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


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range_value: float) -> tuple[Tensor, dict[str, Tensor]]:
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


def adjusted_scores(scores: Tensor, ended: Tensor, missing_eos_penalty: float | None = None,
                    clip: float | None = None) -> Tensor:
    """Sequence scores ``[B]`` after the missing-EOS penalty (``penalty`` subtracted from each row
    whose ``ended [B]`` is False) and then clipping to ``[-clip, clip]``; None turns a step off."""
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ended).float()
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over real positions, ``[B, T]`` -> 0-d, with
    biased variances. Returns 0 (not NaN) when ``Var(returns) == 0``, which includes an empty mask
    or a single real token. 1 is a perfect critic, 0 no better than a constant, < 0 worse.
    """
    v, m = _masked(values, mask)
    ret, _ = _masked(returns, m)
    var_ret, var_err = (masked_mean((x - masked_mean(x, m)) ** 2, m) for x in (ret, ret - v))
    ok = var_ret > 0
    return torch.where(ok, 1 - var_err / torch.where(ok, var_ret, 1), 0)


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


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}``, ``[B, T]`` -> ``[B, T]``; a masked position ends
    the episode (``G`` restarts after it) and holds 0. REINFORCE++'s return (Hu, 2025) before its
    batch normalisation; the same as GAE with zero values and ``lam = 1``."""
    r, m = _masked(rewards, mask)
    return compute_gae(r, torch.zeros_like(r), m, gamma, 1.0)[0]


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k3") -> Tensor:
    """The KL term of a loss (KL in the loss, as GRPO puts it): ``masked_mean(kl_penalty(...))``,
    ``[B, T]`` -> 0-d, differentiable w.r.t. ``logprobs``. Masked positions are zeroed before the
    estimator, so no value there (not even one whose ``exp`` overflows) reaches the result or the
    gradient. k1's gradient is 0 in expectation over on-policy samples; k2 and k3 are the usual
    choices (k2's gradient is that of the reverse KL)."""
    m = mask if mask.dtype == torch.bool else mask != 0
    lp = torch.where(m, _acc(logprobs), 0)
    ref = torch.where(m, _acc(ref_logprobs), 0)
    return masked_mean(kl_penalty(lp, ref, estimator), m)


class FixedKLController:
    """Constant KL coefficient: ``.value`` is always ``kl_coef``."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op, kept so both controllers are interchangeable."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional KL controller of Ziegler et al. (2019), "Fine-Tuning Language Models from Human
    Preferences": ``err = clip(kl / target - 1, -0.2, 0.2)``; ``value *= 1 + err * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target and horizon must be > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """``current_kl``: float or 0-d tensor (one sync). A non-finite KL raises ValueError rather
        than silently turning the coefficient into NaN."""
        kl = float(current_kl)
        if not math.isfinite(kl):
            raise ValueError(f"AdaptiveKLController.update: current_kl must be finite, got {kl}")
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        """Plain floats; ``load_state_dict`` restores all three (target and horizon included)."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = (float(state[k]) for k in ("value", "target", "horizon"))
