"""The critic role: a value per response token, from its own model or from a head on the policy.

Two small classes with the same three members, so the update never asks which one it holds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ppo.forward import read_head, token_values


class SeparateCritic:
    """A value model of its own (AutoModelForSequenceClassification-shaped, num_labels=1) whose score
    head is read at every token. Costs a second backbone, buys a critic that cannot disturb the
    policy's features."""

    uses_policy_hidden = False

    def __init__(self, model: nn.Module):
        self.module = model  # what the optimizer trains and the checkpoint saves (maybe a peft wrapper)
        # The Hugging Face model itself, LoRA layers injected: its backbone and head are read directly.
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model

    def values(self, input_ids: Tensor, attention_mask: Tensor, response_width: int, policy_hidden: Tensor | None) -> Tensor:
        return token_values(self.model, input_ids, attention_mask, response_width)


class SharedCritic:
    """A linear value head on the policy's last hidden state: one model, one forward pass."""

    uses_policy_hidden = True

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        # Zero init: the first values are 0, so early advantages are the raw returns, not noise.
        self.module = nn.Linear(hidden_size, 1, dtype=dtype, device=device)
        nn.init.zeros_(self.module.weight)
        nn.init.zeros_(self.module.bias)

    def values(self, input_ids: Tensor, attention_mask: Tensor, response_width: int, policy_hidden: Tensor | None) -> Tensor:
        if policy_hidden is None:
            raise ValueError("SharedCritic needs the policy's hidden states")
        return read_head(self.module, policy_hidden).squeeze(-1)  # fp32 even under bf16 autocast
