"""`fused_mlp` (ppo/fastpath/fused_mlp.py): the trained models' MLPs keep only gate and up for
backward. The same bits as the stock MLP in fp32 and under bf16 autocast, a PPO step unchanged,
less kept for backward, and the stock forward wherever the fused one does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_setups import ppo_step_with, tiny_llama
from transformers import GPT2Config, LlamaConfig

from ppo.fastpath import fused_mlp
from ppo.fastpath.gate import FastPathWarning, tiny_twin
from ppo.forward import policy_logprobs

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_gate", "quiet_bf16_emulation")


def batch(tokenizer):
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 7, 8, 9, 11]])
    mask = (ids != 0).long()
    return ids, mask, 4


def logprobs_and_grads(model, ids, mask, width, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logprobs, _, _ = policy_logprobs(model, ids, mask, width, 0.7)
    logprobs.sum().backward()
    return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_policy_gives_the_same_bits(tiny_policy, tiny_tokenizer, autocast):
    fused = copy.deepcopy(tiny_policy)
    assert fused_mlp.install(fused) == len(fused.model.layers)
    stock_lp, stock_grads = logprobs_and_grads(tiny_policy, *batch(tiny_tokenizer), autocast)
    fused_lp, fused_grads = logprobs_and_grads(fused, *batch(tiny_tokenizer), autocast)
    assert torch.equal(fused_lp, stock_lp)
    for name, grad in stock_grads.items():
        assert torch.equal(fused_grads[name], grad), name
    assert fused.state_dict().keys() == tiny_policy.state_dict().keys()


def saved_bytes(model, ids, mask, width) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        policy_logprobs(model, ids, mask, width, 1.0)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_keeps_two_fewer_intermediate_tensors_per_layer(tiny_policy, tiny_tokenizer):
    ids, mask, width = batch(tiny_tokenizer)
    stock = saved_bytes(tiny_policy, ids, mask, width)
    fused_mlp.install(tiny_policy)
    fused = saved_bytes(tiny_policy, ids, mask, width)
    config = tiny_policy.config
    # the last layer runs its MLP only at the positions read (prune_last_layer's rows: `width` of them)
    rows = ids.shape[0] * (ids.shape[1] * (config.num_hidden_layers - 1) + width)
    assert stock - fused == 2 * rows * config.intermediate_size * 4


def test_steps_aside_without_grad_and_for_a_lora_down_projection(tiny_policy, tiny_tokenizer, monkeypatch):
    calls = []
    real = fused_mlp.silu_mul_linear
    monkeypatch.setattr(fused_mlp, "silu_mul_linear", lambda *a: calls.append(1) or real(*a))
    fused_mlp.install(tiny_policy)
    calls.clear()  # the gate's self-check on a twin
    ids, mask, width = batch(tiny_tokenizer)
    with torch.no_grad():
        policy_logprobs(tiny_policy, ids, mask, width, 1.0)
    assert calls == []
    policy_logprobs(tiny_policy, ids, mask, width, 1.0)
    assert len(calls) == len(tiny_policy.model.layers)
    from peft import LoraConfig, get_peft_model

    calls.clear()
    lora = get_peft_model(tiny_policy, LoraConfig(r=2, target_modules=["down_proj"]))
    lp, _, _ = policy_logprobs(lora, ids, mask, width, 1.0)
    lp.sum().backward()
    assert calls == []  # the adapter's own forward ran
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


def test_gate_knows_llama_and_qwen3_and_refuses_others(tiny_policy):
    for config in (tiny_llama().config, tiny_policy.config):
        assert fused_mlp.architecture_reason(config) is None
        with torch.random.fork_rng():
            assert fused_mlp.mismatch_with_stock(tiny_twin(config)) is None
    assert "gpt2" in fused_mlp.architecture_reason(GPT2Config())
    assert "gelu" in fused_mlp.architecture_reason(LlamaConfig(hidden_act="gelu"))


def test_a_wrong_fused_function_is_caught_by_the_self_check(monkeypatch):
    monkeypatch.setattr(fused_mlp, "silu_mul_linear", lambda g, u, w, b: torch.nn.functional.linear(g * u, w, b))
    model = tiny_llama()
    with pytest.warns(FastPathWarning, match="fused_mlp"):
        assert fused_mlp.install(model) == 0
    assert all("forward" not in vars(m) for m in fused_mlp.gated_mlps(model))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ppo_step_is_unchanged(tiny_policy, tiny_tokenizer, tiny_reward_model, precision):
    """GAE with a separate critic, 2 epochs x 2 mini-batches of 2 micro-batches: every statistic and
    every updated weight of the policy and the critic as with the stock MLPs."""
    models = (tiny_policy, tiny_tokenizer, tiny_reward_model)
    runs = [ppo_step_with(*models, precision, fused_mlp=fused) for fused in (False, True)]
    (stock, stock_stats), (fused, fused_stats) = runs
    assert fused_mlp.gated_mlps(fused.policy)[0].forward.__func__ is fused_mlp._fused_forward
    assert "forward" in vars(fused_mlp.gated_mlps(fused.critic.module)[0])
    assert fused_stats == stock_stats
    for model in ("policy", "critic"):
        a = getattr(fused, model) if model == "policy" else fused.critic.module
        b = getattr(stock, model) if model == "policy" else stock.critic.module
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), f"{model}.{name}"
