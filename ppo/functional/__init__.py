"""Pure tensor maths for PPO on language models: no modules, no config objects, scalars passed in.

One package, imported as one module (`from ppo import functional as F`), in eight files:
    masked.py       masked mean / variance / whitening, explained variance; the shared upcasting
    softmax.py      log-probs and entropy from logits, chunked (one fp32 chunk at a time)
    head.py         the same from hidden states and the LM head's weight, never holding the logits
    mlp.py          a gated MLP's tail, down(silu(gate) * up), keeping only gate and up for backward
    norm.py         RMS normalisation keeping only its input and 1/rms for backward
    estimators.py   per-token rewards, GAE, discounted returns, group baselines (GRPO, RLOO)
    kl.py           the KL estimators k1/k2/k3, the KL term of a loss, the KL controllers
    losses.py       the clipped policy and value losses, truncated importance weights

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

from ppo.functional.estimators import (
    adjusted_scores,
    compute_gae,
    discounted_returns,
    group_advantages,
    group_reward_stats,
    leave_one_out_advantages,
    sequence_to_tokens,
    token_level_rewards,
)
from ppo.functional.head import head_logprobs
from ppo.functional.kl import KL_ESTIMATORS as KL_ESTIMATORS  # `x as x`: importable, not in __all__
from ppo.functional.kl import AdaptiveKLController, FixedKLController, kl_loss, kl_penalty
from ppo.functional.losses import clipped_policy_loss, clipped_value_loss
from ppo.functional.losses import mean_abs_diff as mean_abs_diff
from ppo.functional.losses import truncated_importance_weights as truncated_importance_weights
from ppo.functional.masked import explained_variance, masked_mean, masked_var, masked_whiten
from ppo.functional.mlp import silu_mul_linear
from ppo.functional.norm import rms_norm
from ppo.functional.softmax import entropy_from_logits, logprobs_from_logits

__all__ = [
    "logprobs_from_logits",
    "entropy_from_logits",
    "head_logprobs",
    "silu_mul_linear",
    "rms_norm",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "compute_gae",
    "kl_penalty",
    "clipped_policy_loss",
    "clipped_value_loss",
    "token_level_rewards",
    "adjusted_scores",
    "explained_variance",
    "discounted_returns",
    "group_advantages",
    "leave_one_out_advantages",
    "group_reward_stats",
    "sequence_to_tokens",
    "kl_loss",
    "FixedKLController",
    "AdaptiveKLController",
]
