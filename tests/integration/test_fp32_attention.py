"""fp32_attention: under bf16 autocast on a CPU, attention runs torch's fp32 kernel on the bf16
inputs (prompt passes, scoring, the update, lean decode steps and the pruned last layer), and the
sampling KV cache is held in fp32; elsewhere nothing changes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_setups import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from ppo import PPOConfig, PPOTrainer
from ppo.data import collate_prompts
from ppo.fastpath import fp32_attention
from ppo.fastpath.kv_cache import rollout_cache
from ppo.rollout import HFRolloutEngine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_gate", "quiet_bf16_emulation")

PROMPTS = ["a b c", "d e", "f g h i", "j"]


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


class AttentionDtypes(TorchDispatchMode):
    """The dtypes of every attention kernel's query (forward and backward) dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__:
            self.seen.append(args[0].dtype)
        return func(*args, **kwargs or {})


def batch():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def switched(model):
    model = copy.deepcopy(model)
    assert fp32_attention.install(model)
    return model


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_under_autocast_the_kernel_is_fp32_forward_and_backward(tiny_policy, arch):
    stock = tiny_policy if arch == "qwen3" else tiny_llama()
    fast = switched(stock)
    ids, mask, positions = batch()
    results = {}
    for name, model in (("stock", stock), ("fast", fast)):
        model.zero_grad(set_to_none=True)
        with AttentionDtypes() as kernels, bf16():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (kernels.seen, logits.detach().float(), grads)
    assert results["stock"][0] and set(results["stock"][0]) == {torch.bfloat16}
    assert results["fast"][0] and set(results["fast"][0]) == {torch.float32}
    assert results["fast"][1].dtype == torch.float32
    # the same bf16 model to bf16's rounding: logits and every parameter's gradient
    torch.testing.assert_close(results["fast"][1], results["stock"][1], atol=0.05, rtol=0.02)
    assert results["fast"][2].keys() == results["stock"][2].keys()
    for name, grad in results["stock"][2].items():
        scale = float(grad.abs().max()) or 1.0
        assert float((results["fast"][2][name] - grad).abs().max()) <= 0.05 * scale, name


def test_without_autocast_it_is_the_stock_computation_bit_for_bit(tiny_policy):
    fast = switched(tiny_policy)
    ids, mask, positions = batch()
    with torch.no_grad():
        stock_logits = tiny_policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        fast_logits = fast(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(fast_logits, stock_logits)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_sampling_attends_in_fp32_over_an_fp32_cache(tiny_policy, tiny_tokenizer, arch):
    """The prompt pass fills an fp32 cache and each lean decode step attends in fp32; greedy tokens
    match a full forward's argmax over the same sequence."""
    model = switched(tiny_policy if arch == "qwen3" else tiny_llama(vocab_size=tiny_tokenizer.vocab_size))
    engine = HFRolloutEngine(model, tiny_tokenizer, bf16)
    assert engine.lean_decoder is not None and engine.lean_decoder.attention is fp32_attention.sdpa
    with bf16(), torch.no_grad():
        cache = rollout_cache(model, 8)
        cache.update(torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16), 0)
    assert cache.layers[0].keys.dtype == cache.layers[0].values.dtype == torch.float32
    prompts = collate_prompts(tiny_tokenizer, PROMPTS)
    with AttentionDtypes() as kernels:
        rollout = engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert kernels.seen and set(kernels.seen) == {torch.float32}
    # each greedy token is the argmax of the full forward over everything before it (bf16 too)
    sequence = torch.cat([prompts.input_ids, rollout.response_ids], dim=1)
    mask = torch.cat([prompts.attention_mask, rollout.response_mask.long()], dim=1)
    with bf16(), torch.no_grad():
        logits = model(input_ids=sequence, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    width = prompts.input_ids.shape[1]
    for row in range(len(PROMPTS)):
        for t in range(int(rollout.response_mask[row].sum())):
            top2 = logits[row, width + t - 1].float().topk(2).values
            if float(top2[0] - top2[1]) > 0.05:  # not a near-tie that bf16 rounding may flip
                assert int(logits[row, width + t - 1].argmax()) == int(rollout.response_ids[row, t])


def test_the_trainer_switches_every_model_under_bf16_only(tiny_policy, tiny_tokenizer, tiny_reward_model):
    def trainer(precision, **overrides):
        config = PPOConfig(batch_size=4, max_new_tokens=4, progress_bar=False, precision=precision, **overrides)
        policy, reward = copy.deepcopy(tiny_policy), copy.deepcopy(tiny_reward_model)
        return PPOTrainer(config, policy, tiny_tokenizer, reward_model=reward), reward

    on, reward_model = trainer("bf16")
    models = (on.policy, on.ref_model, on.critic.module, reward_model)
    assert all(fp32_attention.uses_fp32_attention(m) for m in models)
    stats = on.step(PROMPTS)
    assert all(torch.isfinite(torch.tensor(v)).all() for k, v in stats.items() if isinstance(v, float))
    for off, _ in (trainer("fp32"), trainer("bf16", fp32_attention=False)):
        assert not any(fp32_attention.uses_fp32_attention(m) for m in (off.policy, off.ref_model, off.critic.module))


def test_other_attention_implementations_are_left_alone(tiny_policy):
    eager = copy.deepcopy(tiny_policy)
    eager.set_attn_implementation("eager")
    assert not fp32_attention.install(eager)
    assert eager.config._attn_implementation == "eager"


def test_a_saved_model_loads_with_plain_transformers(tiny_policy, tmp_path):
    model = switched(tiny_policy)
    model.save_pretrained(tmp_path)
    assert fp32_attention.NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation == "sdpa"
    ids, mask, positions = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask, position_ids=positions).logits,
            model(input_ids=ids, attention_mask=mask, position_ids=positions).logits,
        )
