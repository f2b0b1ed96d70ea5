"""KL to the reference: the per-token estimators (k1, k2, k3), the KL term of a loss, and the
fixed and adaptive controllers of its coefficient."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ppo.functional.masked import _acc, masked_mean

KL_ESTIMATORS = ("k1", "k2", "k3")


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
