"""The lean decode step against the model's own forward: same logits, same samples."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ppo.batch import PromptBatch
from ppo.rollout import HFRolloutEngine, SamplingParams
from ppo.fastpath.compat import cache_kwargs
from ppo.fastpath.kv_cache import rollout_cache
from ppo.fastpath.lean_decode import LeanDecoder, unsupported_reason

VOCAB = 40
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16, tie_word_embeddings=True))


def qwen2():  # biases on q/k/v, no per-head norms
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=False))


def llama():  # a rope scaling the rotary module has to apply
    return LlamaForCausalLM(LlamaConfig(**SHAPE, attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}))


def left_padded_prompts(batch=4, width=7):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (batch, width), generator=generator)
    mask = torch.ones(batch, width, dtype=torch.long)
    mask[1, :3] = 0
    mask[3, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("build", [qwen3, qwen2, llama])
@torch.inference_mode()
def test_lean_steps_give_the_models_own_logits(build):
    torch.manual_seed(0)
    model = build().eval()
    assert unsupported_reason(model) is None
    ids, mask = left_padded_prompts()
    batch, width, steps = *ids.shape, 6
    full_mask = torch.cat([mask, torch.ones(batch, steps, dtype=torch.long)], dim=1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    caches = [rollout_cache(model, width + steps) for _ in range(2)]
    for cache in caches:
        model(input_ids=ids, attention_mask=mask, position_ids=positions[:, :width], use_cache=True, **cache_kwargs(model, cache))
    lean, lean_cache, own_cache = LeanDecoder(model), caches[0], caches[1]
    keys, values = [layer._keys for layer in lean_cache.layers], [layer._values for layer in lean_cache.layers]
    tokens = torch.randint(3, VOCAB, (steps, batch), generator=torch.Generator().manual_seed(5))
    for step in range(steps):
        column = width + step
        own = model(input_ids=tokens[step][:, None], attention_mask=full_mask[:, : column + 1],
                    position_ids=positions[:, column : column + 1], use_cache=True, **cache_kwargs(model, own_cache)).logits[:, -1]
        mine = lean.step(tokens[step], positions[:, column], keys, values, column, full_mask.bool()[:, None, None, : column + 1])
        torch.testing.assert_close(mine, own, atol=1e-5, rtol=1e-5)
        # and the cache it wrote is the one the model's own forward wrote
        torch.testing.assert_close(keys[0][:, :, column], own_cache.layers[0].keys[:, :, column], atol=1e-5, rtol=1e-5)


class _Tokenizer:  # all the engine reads from a tokenizer when there are no stop strings
    pad_token_id = 0


@pytest.mark.parametrize("autocast", [contextlib.nullcontext, functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.7), dict(temperature=1.0, top_k=5, top_p=0.9)])
def test_engine_samples_the_same_responses_with_and_without_the_lean_step(sampling, autocast):
    torch.manual_seed(0)
    model = qwen3()
    ids, mask = left_padded_prompts()
    prompts = PromptBatch(ids, mask, ["p"] * 4, {}, seeds=[11, 12, 13, 14])
    params = SamplingParams(max_new_tokens=10, stop_token_ids=(1,), **sampling)
    lean_engine = HFRolloutEngine(model, _Tokenizer(), autocast, lean_decode=True)
    plain_engine = HFRolloutEngine(model, _Tokenizer(), autocast, lean_decode=False)
    assert lean_engine.lean_decoder is not None and plain_engine.lean_decoder is None
    lean, plain = lean_engine.generate(prompts, params), plain_engine.generate(prompts, params)
    assert torch.equal(lean.response_ids, plain.response_ids)
    assert torch.equal(lean.response_mask, plain.response_mask)
    torch.testing.assert_close(lean.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean.entropy, plain.entropy, atol=1e-5, rtol=1e-5)


def test_models_it_cannot_run_exactly_keep_their_own_forward():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert "gpt2" in unsupported_reason(gpt2)
    assert HFRolloutEngine(gpt2, _Tokenizer()).lean_decoder is None

    sliding = Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=4, max_window_layers=0))
    assert "sliding" in unsupported_reason(sliding)

    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(qwen3(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert unsupported_reason(adapted) is not None
    assert unsupported_reason(adapted.base_model.model) == "a projection is not a plain nn.Linear (adapter, quantisation or sharding)"
