"""Token batches for training on given completions (SFT, reward models, perplexity).

Prompt and completion are tokenized separately and joined: PPO generates after the prompt's own
token ids, so the boundary a model learns here is exactly the one the policy samples from later
(tokenizing the joined text can merge the last prompt token with the first completion token). The
completion ends with EOS: a policy that never saw EOS after a completion does not learn to stop.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ppo.rollout.hf import position_ids_from_mask

IGNORE_INDEX = -100  # label of positions without a loss (prompt and padding); torch's default


@dataclass
class TokenBatch:
    """A padded batch of token sequences (either padding side) ready for a forward pass."""

    input_ids: Tensor  # [B, T] token ids, pad id at padding
    attention_mask: Tensor  # [B, T] 1 for real tokens
    position_ids: Tensor  # [B, T] 0.. over real tokens, whatever the padding side
    labels: Tensor | None = None  # [B, T] next-token targets at their own column; -100: no loss


def encode_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + completion + EOS, and how many of them are prompt tokens.

    The completion ends with EOS (added unless it already holds one). When the pair is longer than
    `max_length`, the prompt loses tokens from its left (the part furthest from the answer); a
    completion longer than the whole budget keeps its start and loses its end (and so its EOS).
    """
    # Plain text gets the tokenizer's special tokens (a BOS, say) as PPO's prompt collation does; a
    # prompt already rendered by a chat template carries them and must not get a second BOS.
    bos = getattr(tokenizer, "bos_token", None)
    prompt_ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    # A completion rendered by a chat template may already end its turn with EOS and a newline.
    if tokenizer.eos_token_id not in completion_ids:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(completion_ids) > max_length:
        # One constant message: Python shows it once, not once per row.
        warnings.warn(f"prompt + completion pairs longer than max_length={max_length} were cut (the prompt from its left first)", stacklevel=2)
    # Keep at least one prompt token: the first completion token is predicted from the position before it.
    completion_ids = completion_ids[: max_length - min(1, len(prompt_ids))]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(completion_ids) - max_length) :]
    return prompt_ids + completion_ids, len(prompt_ids)


def sft_labels(ids: list[int], n_prompt: int) -> list[int]:
    """Labels aligned with `ids`: -100 on prompt tokens, the token itself on completion tokens."""
    return [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


def collate(sequences: list[list[int]], pad_id: int, labels: list[list[int]] | None = None, padding_side: str = "right") -> TokenBatch:
    """Pad token lists into a `TokenBatch` `[B, T]`; labels are padded with -100."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    label_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
    for i, seq in enumerate(sequences):
        cols = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        input_ids[i, cols] = torch.tensor(seq, dtype=torch.long)
        mask[i, cols] = 1
        if label_ids is not None:
            label_ids[i, cols] = torch.tensor(labels[i], dtype=torch.long)
    return TokenBatch(input_ids, mask, position_ids_from_mask(mask), label_ids)
