"""All reward sources of a run, combined as a weighted sum into one score per sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ppo.rewards.funcs import call_reward_function, function_name
from ppo.rewards.model import reward_model_scores


class RewardSources:
    """A reward model and/or reward functions with one weight each (the model's first)."""

    def __init__(
        self,
        reward_model=None,
        reward_funcs: Callable | Sequence[Callable] | None = None,
        weights: Sequence[float] | None = None,
        reward_tokenizer=None,
        timeout_s: float | None = None,
        max_abs: float | None = None,
    ):
        if callable(reward_funcs) and not isinstance(reward_funcs, torch.nn.Module):
            reward_funcs = [reward_funcs]
        self.reward_model = reward_model
        self.funcs = list(reward_funcs or [])
        self.reward_tokenizer = reward_tokenizer
        self.timeout_s, self.max_abs = timeout_s, max_abs  # per reward-function call (see call_reward_function)
        if reward_model is None and not self.funcs:
            raise ValueError("PPO needs a reward: pass reward_model and/or reward_funcs")
        self.names = (["reward_model"] if reward_model is not None else []) + [function_name(f) for f in self.funcs]
        if weights is None:
            weights = [1.0] * len(self.names)
        if len(weights) != len(self.names):
            raise ValueError(
                f"reward_weights has {len(weights)} values for {len(self.names)} reward sources "
                f"({', '.join(self.names)}): list the reward model's weight first, then one per function"
            )
        self.weights = [float(w) for w in weights]

    def score(self, input_ids: Tensor, *samples, **options) -> tuple[Tensor, dict[str, float]]:
        """`score_each`'s arguments -> `[B]` weighted scores (on `input_ids`' device) and each
        source's mean (for the metrics)."""
        per_source = self.score_each(input_ids, *samples, **options)
        scores = self.combine(per_source)
        means = {f"rewards/{name}": per_source[:, i].mean().item() for i, name in enumerate(self.names)}
        return scores.to(input_ids.device), means

    def combine(self, per_source: Tensor) -> Tensor:
        """`[B]` fp32 weighted sum of `[B, sources]` scores (`score_each`'s float64 columns)."""
        # float64 (the Python floats themselves) and rounded to fp32 once, at the end. Not a matmul:
        # this runs inside the scoring pass's autocast, where `per_source @ weights` became a bf16
        # matmul and a reward of 1/9 reached GAE as 0.111328125.
        return (per_source.double() * torch.tensor(self.weights, dtype=torch.float64)).sum(dim=1).float()

    def score_each(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        extras: dict[str, list[Any]],
        rows_per_forward: int | None = None,
    ) -> Tensor:
        """`[B, sources]` unweighted float64 scores on the CPU, one column per source in `names` order;
        raises on the first NaN/inf, naming the source and the sample. The reward model sees
        `rows_per_forward` sequences per forward (None: all at once)."""
        columns: list[Tensor] = []
        if self.reward_model is not None:
            columns.append(
                reward_model_scores(
                    self.reward_model,
                    input_ids,
                    attention_mask,
                    prompts,
                    completions,
                    self.reward_tokenizer,
                    rows_per_forward,
                )
                .cpu()
                .double()
            )
        for func in self.funcs:
            values = call_reward_function(
                func, prompts, completions, completion_ids, extras, self.timeout_s, self.max_abs
            )
            columns.append(torch.tensor(values, dtype=torch.float64))
        per_source = torch.stack(columns, dim=1)  # [B, sources] float64: each source's own values
        bad = (~torch.isfinite(per_source)).nonzero()
        if len(bad):
            row, col = bad[0].tolist()
            raise ValueError(
                f"{self.names[col]} gave {per_source[row, col].item()} for sample {row} (prompt "
                f"{prompts[row][:80]!r}); refusing to train on it"
            )
        return per_source
