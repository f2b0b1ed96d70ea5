"""[1] Prompts in, left-padded token batches out.

A prompt is a string or a list of chat messages (`[{"role": ..., "content": ...}]`); messages are
rendered with the tokenizer's chat template and its generation prompt.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ppo.batch import PromptBatch


def render_prompt(tokenizer, prompt: Any, index: int | None = None) -> str:
    """The text the policy sees for one prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"prompt {index} is a list of chat messages but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    where = f"prompt {index}" if index is not None else "a prompt"
    raise ValueError(
        f"{where} must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}: "
        f"{str(prompt)[:80]!r}"
    )


def ensure_pad_token(tokenizer) -> None:
    """Batched generation needs a pad token; fall back to EOS (our masks never rely on pad ids)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
        warnings.warn("tokenizer has no pad token: using its EOS token for padding", stacklevel=2)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def collate_prompts(
    tokenizer,
    prompts: Sequence[Any],
    extras: dict[str, list[Any]] | None = None,
    max_prompt_tokens: int | None = None,
    device: torch.device | str = "cpu",
) -> PromptBatch:
    """Tokenize prompts into a left-padded batch. Prompts longer than `max_prompt_tokens` keep
    their last tokens (the part nearest the response) and a warning names them."""
    if len(prompts) == 0:
        raise ValueError("no prompts given: the prompt list is empty")
    texts = [render_prompt(tokenizer, p, i) for i, p in enumerate(prompts)]
    # Chat templates already contain any special tokens; plain text gets the tokenizer's defaults.
    ids = [
        tokenizer(t, add_special_tokens=not isinstance(p, (list, tuple)))["input_ids"] for t, p in zip(texts, prompts)
    ]
    for i, row in enumerate(ids):
        if len(row) == 0:
            raise ValueError(f"prompt {i} is empty after tokenization: {texts[i]!r}")
    if max_prompt_tokens is not None:
        too_long = [i for i, row in enumerate(ids) if len(row) > max_prompt_tokens]
        if too_long:
            warnings.warn(
                f"{len(too_long)} prompt(s) longer than {max_prompt_tokens} tokens were cut from the left "
                f"(indices {too_long[:10]})",
                stacklevel=2,
            )
            ids = [row[-max_prompt_tokens:] for row in ids]
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    extras = {k: list(v) for k, v in (extras or {}).items()}
    for key, column in extras.items():
        if len(column) != len(prompts):
            raise ValueError(f"column {key!r} has {len(column)} values for {len(prompts)} prompts")
    return PromptBatch(input_ids.to(device), attention_mask.to(device), texts, extras)
