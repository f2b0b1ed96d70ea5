"""Batched sampling with a Hugging Face causal LM and its KV cache.

Why a sampling loop of our own rather than `model.generate`: we need each response's exact length
(the response mask comes from it, never from comparing ids with the pad id, which breaks when
pad == EOS), stop tokens and stop strings per row, no sampling defaults leaking in from a model's
`generation_config` (Qwen3 ships top_k=20, top_p=0.95), and no per-token overhead of a general
pipeline. The logits processing itself is transformers' own warpers.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ppo.batch import PromptBatch, Rollout
from ppo.rollout.base import SamplingParams


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[B, T] positions that skip left padding (pad slots get 0). Shared by sampling and scoring,
    so that both see the same positions for the same tokens."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def build_warpers(params: SamplingParams) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        warpers.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=params.top_p))
    return warpers


class HFRolloutEngine:
    """Samples from the policy module itself, so weights are always current."""

    def __init__(self, model: torch.nn.Module, tokenizer, autocast=contextlib.nullcontext):
        self.model = model
        self.tokenizer = tokenizer
        self.autocast = autocast  # a factory of fresh mixed-precision contexts

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        # The engine holds the trained module itself: there is nothing to copy.
        return None

    @torch.inference_mode()
    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Rollout:
        model = self.model
        was_training = model.training
        model.eval()  # dropout off while sampling
        try:
            with self.autocast():
                seeds = prompts.seeds
                if seeds is None:
                    seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
                response_ids, lengths, ended = self._sample(prompts.input_ids, prompts.attention_mask, params, seeds)
        finally:
            model.train(was_training)
        width = response_ids.shape[1]
        response_mask = (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()
        return Rollout(prompts.input_ids, prompts.attention_mask, response_ids, response_mask, ended)

    def _sample(self, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams, seeds: list[int]):
        """Returns response ids [B, R], lengths [B] (the ending token included) and ended [B].

        Sampling is the Gumbel-max trick with one random stream per row (seeded from `seeds`):
        argmax(logits + Gumbel noise) is an exact draw from softmax(logits), and a row's draw does not
        depend on which other rows share its batch or its rank."""
        batch = input_ids.shape[0]
        device = input_ids.device
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), device=device, dtype=torch.long)
        warpers = build_warpers(params)
        pad_id = self.tokenizer.pad_token_id
        streams = [torch.Generator(device=device).manual_seed(int(seed) % 2**63) for seed in seeds]

        cache = DynamicCache(config=self.model.config)
        mask = attention_mask.long()
        positions = position_ids_from_mask(mask)
        logits = self._forward(input_ids, mask, positions, cache)

        tokens: list[Tensor] = []
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        ended = torch.zeros(batch, dtype=torch.bool, device=device)
        for _ in range(params.max_new_tokens):
            scores = warpers(input_ids, logits.float())
            # -log(Exp(1)) is Gumbel(0, 1); filtered logits are -inf and can never win the argmax.
            exponentials = torch.stack([torch.empty(scores.shape[1], device=device).exponential_(generator=g) for g in streams])
            next_tokens = (scores - exponentials.log()).argmax(dim=-1)
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
            tokens.append(next_tokens)
            lengths += (~finished).long()
            stopped = torch.isin(next_tokens, stop_ids) & ~finished
            if params.stop_strings:
                stopped |= self._hit_stop_string(tokens, lengths, finished, params.stop_strings)
            ended |= stopped
            finished |= stopped
            # One host sync per token: the price of stopping as soon as every row is done.
            if bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            logits = self._forward(next_tokens[:, None], mask, positions, cache)
        return torch.stack(tokens, dim=1), lengths, ended

    def _forward(self, input_ids: Tensor, mask: Tensor, positions: Tensor, cache: DynamicCache) -> Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def _hit_stop_string(self, tokens: list[Tensor], lengths: Tensor, finished: Tensor, stop_strings) -> Tensor:
        # Decoding the tail of each live row is cheap next to a forward pass, and exact for any
        # tokenizer (a stop string may span several tokens).
        hit = torch.zeros_like(finished)
        tail = torch.stack(tokens[-8:], dim=1).tolist()
        for row in (~finished).nonzero().flatten().tolist():
            text = self.tokenizer.decode(tail[row], skip_special_tokens=True)
            hit[row] = any(s in text for s in stop_strings)
        return hit
