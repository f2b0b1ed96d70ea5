"""Scores from a reward model, on the policy's tokens or re-tokenized for its own tokenizer."""

from __future__ import annotations

import torch
from torch import Tensor

from ppo.forward import by_rows, sequence_scores


def render_for_reward_tokenizer(reward_tokenizer, prompt: str, completion: str) -> str:
    """Prompt + completion as text for a reward model with its own tokenizer (its chat template
    when it has one, so a chat reward model sees the format it was trained on)."""
    if getattr(reward_tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return reward_tokenizer.apply_chat_template(messages, tokenize=False)
    return prompt + completion


@torch.inference_mode()
def reward_model_scores(
    reward_model,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompts: list[str],
    completions: list[str],
    reward_tokenizer=None,
    rows_per_forward: int | None = None,
) -> Tensor:
    """`[B]` scores, `rows_per_forward` sequences at a time (None: all). Without
    `reward_tokenizer` the policy's ids are scored as they are."""
    if reward_tokenizer is None:
        return by_rows(lambda ids, mask: sequence_scores(reward_model, ids, mask), rows_per_forward, input_ids, attention_mask)
    texts = [render_for_reward_tokenizer(reward_tokenizer, p, c) for p, c in zip(prompts, completions)]
    device = input_ids.device

    def score_texts(block: list[str]) -> Tensor:  # each block padded to its own longest text
        encoded = reward_tokenizer(block, return_tensors="pt", padding=True, add_special_tokens=False)
        return sequence_scores(reward_model, encoded["input_ids"].to(device), encoded["attention_mask"].to(device))

    return by_rows(score_texts, rows_per_forward, texts)


def check_reward_model(model, source: str = "the reward model") -> None:
    """Raise unless `model` is a sequence classifier with exactly one label."""
    has_head = getattr(model, "score", None) is not None or getattr(model, "classifier", None) is not None
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    if not has_head or not hasattr(model, "base_model_prefix"):
        raise ValueError(
            f"{source} is a {type(model).__name__}, not a sequence classifier (AutoModelForSequenceClassification, "
            "num_labels=1); to start a reward model from a causal LM set init_from_policy=true"
        )
    if labels != 1:
        raise ValueError(f"{source} has {labels} labels; a reward model has exactly one (num_labels=1)")
