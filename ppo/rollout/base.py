"""The rollout-engine contract: two methods, so that another engine (vLLM, a server) can replace
Hugging Face generation without touching the trainer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from ppo.batch import PromptBatch, Rollout


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one response per row of a PromptBatch."""

    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy (the most likely token; log-probs are then at temperature 1)
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None or 1.0: off
    stop_token_ids: tuple[int, ...] = ()  # ids that end a response; the EOS is always one of them
    stop_strings: tuple[str, ...] = field(default=())  # text that ends a response once it appears


class RolloutEngine(Protocol):
    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Rollout:
        """Sample a response for every row; the Rollout's masks come from generated lengths."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load the policy's new weights (a no-op for an engine that shares the policy module)."""
        ...
