"""The dataclasses that flow between the steps of one PPO iteration.

    PromptBatch --rollout--> Rollout --scoring/advantages--> ScoredBatch --update--> stats

Token layout of a sequence row: `[left padding | prompt | response | right padding]`. The prompt
block has a fixed width P (left-padded so every response starts at column P) and the response block
a width R. All per-token PPO quantities are over the response block only: `[B, R]`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class PromptBatch:
    """Tokenized prompts, left-padded."""

    input_ids: Tensor  # [B, P] prompt token ids, left padding
    attention_mask: Tensor  # [B, P] 1 for real prompt tokens
    texts: list[str]  # [B] the prompts as rendered text (chat template applied)
    extras: dict[str, list[Any]]  # dataset columns passed to reward functions, each [B]
    # [B] one sampling seed per row: a sample's randomness belongs to the sample, so the same
    # global batch gives the same responses on 1 or N ranks and after a resume. None: drawn.
    seeds: list[int] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def repeat(self, n: int) -> "PromptBatch":
        """Each prompt n times in a row (prompt i -> rows i*n .. i*n+n-1), for num_generations."""
        if n == 1:
            return self
        return PromptBatch(
            input_ids=self.input_ids.repeat_interleave(n, dim=0),
            attention_mask=self.attention_mask.repeat_interleave(n, dim=0),
            texts=[t for t in self.texts for _ in range(n)],
            extras={k: [v for v in col for _ in range(n)] for k, col in self.extras.items()},
            seeds=None if self.seeds is None else [s * n + i for s in self.seeds for i in range(n)],
        )


@dataclass
class Rollout:
    """What a rollout engine returns: the sampled responses next to their prompts."""

    prompt_ids: Tensor  # [B, P] left-padded prompt ids
    prompt_mask: Tensor  # [B, P] 1 for real prompt tokens
    response_ids: Tensor  # [B, R] sampled ids; values after the end are arbitrary (masked)
    response_mask: Tensor  # [B, R] 1 up to and including the token that ended the response
    ended: Tensor  # [B] bool, True when the response ended with EOS (or a stop token/string)
    # Optional, from the sampling pass itself: log pi(a_t|s_t) of each sampled token and the entropy
    # of its distribution at the sampling temperature, before top-k/top-p, as the scoring pass
    # computes them. An engine that cannot give them exactly (another implementation of the model)
    # leaves them None and the trainer runs the policy forward instead.
    logprobs: Tensor | None = None  # [B, R] fp32
    entropy: Tensor | None = None  # [B, R] fp32

    @property
    def input_ids(self) -> Tensor:  # [B, P+R]
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # [B, P+R]
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)

    def completion_ids(self) -> list[list[int]]:
        """Each response's real tokens without padding (the EOS kept when one was generated)."""
        lengths = self.response_mask.sum(dim=1).tolist()
        return [row[: int(n)] for row, n in zip(self.response_ids.tolist(), lengths)]


@dataclass
class ScoredBatch:
    """A rollout with everything the update needs. Per-token fields are over the response block."""

    input_ids: Tensor  # [B, P+R] prompt (left-padded) + response (right-padded) ids
    attention_mask: Tensor  # [B, P+R] 1 for real prompt and response tokens
    response_mask: Tensor  # [B, R] float, 1 for real response tokens
    logprobs: Tensor  # [B, R] log pi_old(a_t|s_t) at sampling temperature, from the scoring pass
    ref_logprobs: Tensor  # [B, R] log pi_ref(a_t|s_t) at the same temperature
    values: Tensor  # [B, R] V_old(s_t) from the critic
    scores: Tensor  # [B] combined reward-model/function score after missing_eos_penalty
    rewards: Tensor  # [B, R] per-token reward: -kl_coef * KL, plus the score at the last token
    advantages: Tensor  # [B, R] GAE advantages (whitened when configured)
    returns: Tensor  # [B, R] advantages (before whitening) + values: the critic's targets
    # [B, R] log pi_rollout(a_t|s_t) from the sampling pass, when the engine gave them (else None):
    # the mismatch metrics and truncated importance sampling compare it with the trainer's pi_old.
    rollout_logprobs: Tensor | None = None

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: Tensor) -> "ScoredBatch":
        """Rows `index` of every field (a mini-batch)."""
        return replace(self, **{name: value[index] for name, value in self._tensors().items()})

    def trim_padding(self) -> "ScoredBatch":
        """Drop prompt columns that are padding in every row and response columns past the longest
        response, so that padding costs no compute in the update."""
        prompt_width = self.input_ids.shape[1] - self.response_width
        real_prompt_cols = self.attention_mask[:, :prompt_width].any(dim=0).nonzero()
        left = int(real_prompt_cols[0]) if len(real_prompt_cols) else 0
        keep = int(self.response_mask.sum(dim=1).max().item())
        per_token = set(self._tensors()) - {"input_ids", "attention_mask", "scores"}
        trimmed = {name: getattr(self, name)[:, :keep] for name in per_token}
        end = prompt_width + keep
        return replace(
            self,
            input_ids=self.input_ids[:, left:end],
            attention_mask=self.attention_mask[:, left:end],
            **trimmed,
        )

    def to(self, device: torch.device | str) -> "ScoredBatch":
        return replace(self, **{name: value.to(device) for name, value in self._tensors().items()})

    def _tensors(self) -> dict[str, Tensor]:
        """The fields that hold a tensor (optional ones may be None)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class RolloutScores:
    """What the no-grad scoring pass gives (`ppo.scoring`), over the global batch: every rank's rows
    in rank order, the same on every rank. All fp32 and free of inference-mode tensors."""

    rollout: Rollout  # the global rollout (prompts left-padded, responses right-padded to the widest rank)
    completions: list[str]  # [B] the decoded responses
    logprobs: Tensor  # [B, R] log pi_old(a_t|s_t) at the sampling temperature
    ref_logprobs: Tensor  # [B, R] log pi_ref(a_t|s_t) at the same temperature
    entropy: Tensor  # [B, R] entropy of pi_old at each response position
    values: Tensor | None  # [B, R] V_old(s_t) from the critic; None when the run has no critic
    scores: Tensor  # [B] weighted sum of the reward sources (before missing_eos_penalty and clipping)
    source_means: dict[str, float]  # "rewards/<source>": each reward source's mean over the batch
    # [B, R] log pi_rollout(a_t|s_t) from the sampling pass, when the engine gave them (else None)
    rollout_logprobs: Tensor | None = None
