"""Batched sampling with a Hugging Face causal LM and its KV cache.

Why a sampling loop of our own rather than `model.generate`: we need each response's exact length
(the response mask comes from it, never from comparing ids with the pad id, which breaks when
pad == EOS), stop tokens and stop strings per row, no sampling defaults leaking in from a model's
`generation_config` (Qwen3 ships top_k=20, top_p=0.95), and no per-token overhead of a general
pipeline. The logits processing itself is transformers' own warpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ppo.batch import PromptBatch, Rollout
from ppo.fastpath import fp32_attention
from ppo.fastpath.bf16_weights import bf16_while
from ppo.fastpath.compat import cache_kwargs
from ppo.fastpath.kv_cache import PreallocatedLayer, rollout_cache
from ppo.fastpath.lean_decode import lean_decoder_for
from ppo.precision import grad_free
from ppo.rollout.base import SamplingParams


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[B, T] positions that skip left padding (pad slots get 0). Shared by sampling and scoring,
    so that both see the same positions for the same tokens."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def build_warpers(params: SamplingParams) -> LogitsProcessorList:
    """The top-k / top-p truncation, applied to logits already divided by the temperature."""
    warpers = LogitsProcessorList()
    if params.top_k:
        warpers.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=params.top_p))
    return warpers


def inverse_cdf_draw(probs: Tensor, uniforms: Tensor) -> Tensor:
    """One token per row of `probs` [B, V] (a zero is never drawn), given one uniform in [0, 1) per
    row: the first token whose cumulative probability exceeds u. The cumulative sum runs in float64
    so that rounding cannot move mass between tokens, and u is scaled by the row's total so that it
    always lands inside it."""
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def next_token(
    logits: Tensor, params: SamplingParams, warpers: LogitsProcessorList, input_ids: Tensor, uniforms: Tensor
):
    """Draw one token per row from `logits` [B, V]; return it with its log-prob and the entropy of
    the tempered distribution (before top-k/top-p: what the scoring pass computes at this position,
    which spares the policy a second forward over the rollout). One log-softmax serves all three."""
    tempered = logits.float()
    if params.temperature not in (0.0, 1.0):
        tempered = tempered / params.temperature
    log_probs = torch.log_softmax(tempered, dim=-1).clamp_min_(torch.finfo(tempered.dtype).min)
    probs = log_probs.exp()
    if params.temperature == 0.0:
        # Greedy (evaluation): the first most likely token; log-probs and entropy are the model's own
        # (temperature 1), the only distribution left to report.
        tokens = tempered.argmax(dim=-1)
    else:
        sampling_probs = torch.softmax(warpers(input_ids, tempered), dim=-1) if warpers else probs
        tokens = inverse_cdf_draw(sampling_probs, uniforms)
    entropy = -(probs * log_probs).sum(dim=-1)
    return tokens, log_probs, entropy


class HFRolloutEngine:
    """Samples from the policy module itself, so weights are always current."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        autocast=contextlib.nullcontext,
        lean_decode: bool = True,
        bf16_frozen_weights: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.autocast = autocast  # a factory of fresh mixed-precision contexts
        # Under bf16 autocast: frozen weights (a LoRA base) in bf16 while sampling, or autocast casts
        # them again at every decode step (`ppo.fastpath.bf16_weights.bf16_while`).
        self.bf16_frozen_weights = bf16_frozen_weights
        # Decode steps without transformers' per-layer machinery where the architecture allows it
        # (`ppo.fastpath.lean_decode`); the prompt always goes through the model's own forward.
        self.lean_decoder = lean_decoder_for(model) if lean_decode else None

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        # The engine holds the trained module itself: there is nothing to copy.
        return None

    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Rollout:
        model = self.model
        was_training = model.training
        model.eval()  # dropout off while sampling
        try:
            frozen_in_bf16 = bf16_while(model) if self.bf16_frozen_weights else contextlib.nullcontext()
            # Under autocast each trained weight is cast once per rollout, not per token.
            with self.autocast(), grad_free(), frozen_in_bf16, fp32_attention.sampling():
                seeds = prompts.seeds
                if seeds is None:
                    seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
                response_ids, lengths, ended, logprobs, entropy = self._sample(
                    prompts.input_ids, prompts.attention_mask, params, seeds
                )
        finally:
            model.train(was_training)
        width = response_ids.shape[1]
        response_mask = (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()
        return Rollout(prompts.input_ids, prompts.attention_mask, response_ids, response_mask, ended, logprobs, entropy)

    def _sample(self, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams, seeds: list[int]):
        """Returns response ids [B, R], lengths [B] (the ending token included), ended [B], and the
        log-probs and entropies [B, R] of the sampled tokens at the sampling temperature.

        Sampling is by inverse CDF with one uniform per (row, step), all drawn up front from the
        row's own stream (seeded from `seeds`): an exact draw from softmax(warped logits), and a row's
        draw does not depend on which other rows share its batch or its rank. One uniform per token,
        not one per vocabulary entry as with Gumbel-max, keeps the random numbers off the profile."""
        batch, prompt_width = input_ids.shape
        device = input_ids.device
        steps = params.max_new_tokens
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), device=device, dtype=torch.long)
        warpers = build_warpers(params)
        pad_id = self.tokenizer.pad_token_id
        uniforms = torch.stack(
            [
                torch.rand(
                    steps, generator=torch.Generator(device="cpu").manual_seed(int(seed) % 2**63), dtype=torch.float64
                )
                for seed in seeds
            ]
        ).to(device)

        cache = rollout_cache(self.model, prompt_width + steps)
        # Positions after a row's end are fed too (as padding, unmasked): their outputs are never read.
        full_mask = torch.cat([attention_mask.long(), attention_mask.new_ones(batch, steps, dtype=torch.long)], dim=1)
        positions = position_ids_from_mask(full_mask)
        logits = self._forward(input_ids, full_mask[:, :prompt_width], positions[:, :prompt_width], cache)
        lean = self.lean_decoder if all(isinstance(layer, PreallocatedLayer) for layer in cache.layers) else None
        if lean is not None:
            keys, values = map(list, zip(*(layer.buffers() for layer in cache.layers)))
            attend = full_mask.bool()[:, None, None, :]

        tokens: list[Tensor] = []
        token_logprobs: list[Tensor] = []
        token_entropies: list[Tensor] = []
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        ended = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(steps):
            next_tokens, log_probs, entropy = next_token(logits, params, warpers, input_ids, uniforms[:, step])
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
            tokens.append(next_tokens)
            token_logprobs.append(log_probs.gather(-1, next_tokens[:, None])[:, 0])
            token_entropies.append(entropy)
            lengths += (~finished).long()
            stopped = torch.isin(next_tokens, stop_ids) & ~finished
            if params.stop_strings:
                stopped |= self._hit_stop_string(tokens, lengths, finished, params.stop_strings)
            ended |= stopped
            finished |= stopped
            # One host sync per token: the price of stopping as soon as every row is done.
            if step + 1 == steps or bool(finished.all()):
                break
            column = prompt_width + step  # where next_tokens sits in the full sequence
            if lean is not None:
                logits = lean.step(next_tokens, positions[:, column], keys, values, column, attend[..., : column + 1])
            else:
                logits = self._forward(
                    next_tokens[:, None], full_mask[:, : column + 1], positions[:, column : column + 1], cache
                )
        return (
            torch.stack(tokens, dim=1),
            lengths,
            ended,
            torch.stack(token_logprobs, dim=1),
            torch.stack(token_entropies, dim=1),
        )

    def _forward(self, input_ids: Tensor, mask: Tensor, positions: Tensor, cache) -> Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs(self.model, cache),
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
