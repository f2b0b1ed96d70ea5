"""`fused_norm` (ppo/fastpath/fused_norm.py): the trained models' RMS norms keep their input and
1/rms for backward. The same forward bits as the stock norms in fp32 and under bf16 autocast, the
same gradients to fp32 rounding (the residual stream's gradient sums its three parts in another
order), a PPO step unchanged to rounding, one fewer activation kept per norm, and the stock forward
where the fused one does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_setups import ppo_step_with, tiny_llama
from transformers import GPT2Config

from ppo.fastpath import fused_norm
from ppo.fastpath.gate import FastPathWarning, tiny_twin
from ppo.forward import policy_logprobs

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_gate", "quiet_bf16_emulation")


def batch():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 7, 8, 9, 11]])
    return ids, (ids != 0).long(), 4


def logprobs_and_grads(model, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logprobs, _, _ = policy_logprobs(model, *batch(), 0.7)
    logprobs.sum().backward()
    return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_fused_policy_gives_the_same_bits(tiny_policy, arch, autocast):
    stock = tiny_policy if arch == "qwen3" else tiny_llama()
    fused = copy.deepcopy(stock)
    layers = len(fused.model.layers)
    per_layer = 4 if arch == "qwen3" else 2  # Qwen3 norms each query and key head too
    assert fused_norm.install(fused) == per_layer * layers + 1
    stock_lp, stock_grads = logprobs_and_grads(stock, autocast)
    fused_lp, fused_grads = logprobs_and_grads(fused, autocast)
    assert torch.equal(fused_lp, stock_lp)
    differ = 0
    for name, grad in stock_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)
        differ += not torch.equal(fused_grads[name], grad)
    assert differ < len(stock_grads)  # most are bit-equal: this is a rounding difference, not another formula
    assert fused.state_dict().keys() == stock.state_dict().keys()


def saved_bytes(model) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        policy_logprobs(model, *batch(), 1.0)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_keeps_one_fewer_activation_per_norm(tiny_policy):
    """The difference is exactly each norm call's normalised tensor: its input's size in fp32."""
    stock = saved_bytes(tiny_policy)
    normed = []
    hooks = [
        norm.register_forward_pre_hook(lambda _, args: normed.append(args[0].numel() * 4))
        for norm in fused_norm.rms_norms(tiny_policy)
    ]
    fused_norm.install(tiny_policy)
    fused = saved_bytes(tiny_policy)
    for hook in hooks:
        hook.remove()
    assert len(normed) == len(fused_norm.rms_norms(tiny_policy))
    assert stock - fused == sum(normed)


def test_steps_aside_without_grad(tiny_policy, monkeypatch):
    calls = []
    real = fused_norm.rms_norm
    monkeypatch.setattr(fused_norm, "rms_norm", lambda *a: calls.append(1) or real(*a))
    count = fused_norm.install(tiny_policy)
    calls.clear()  # the gate's self-check on a twin
    with torch.no_grad():
        policy_logprobs(tiny_policy, *batch(), 1.0)
    assert calls == []
    policy_logprobs(tiny_policy, *batch(), 1.0)
    assert len(calls) == count


def test_gate_knows_llama_and_qwen3_and_refuses_others(tiny_policy):
    for config in (tiny_llama().config, tiny_policy.config):
        assert fused_norm.architecture_reason(config) is None
        with torch.random.fork_rng():
            assert fused_norm.mismatch_with_stock(tiny_twin(config)) is None
    assert "gpt2" in fused_norm.architecture_reason(GPT2Config())


def test_a_wrong_fused_function_is_caught_by_the_self_check(monkeypatch):
    monkeypatch.setattr(fused_norm, "rms_norm", lambda x, w, eps: w * x * torch.rsqrt(x.pow(2).mean(-1, True) + 0.1))
    model = tiny_llama()
    with pytest.warns(FastPathWarning, match="fused_norm"):
        assert fused_norm.install(model) == 0
    assert all("forward" not in vars(m) for m in fused_norm.rms_norms(model))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ppo_step_is_unchanged(tiny_policy, tiny_tokenizer, tiny_reward_model, precision):
    """GAE with a separate critic, 2 epochs x 2 mini-batches of 2 micro-batches: every statistic and
    every updated weight of the policy and the critic as with the stock norms."""
    models = (tiny_policy, tiny_tokenizer, tiny_reward_model)
    runs = [ppo_step_with(*models, precision, fused_norm=fused) for fused in (False, True)]
    (stock, stock_stats), (fused, fused_stats) = runs
    assert fused_norm.rms_norms(fused.policy)[0].forward.__func__ is fused_norm._fused_forward
    assert "forward" in vars(fused_norm.rms_norms(fused.critic.module)[0])
    assert "forward" not in vars(fused_norm.rms_norms(fused.ref_model)[0])  # frozen: nothing kept anyway
    assert fused_stats.keys() == stock_stats.keys()
    for key, value in stock_stats.items():  # the samples come before the update: those are equal
        want = pytest.approx(value, rel=1e-4, abs=1e-6) if isinstance(value, float) else value
        assert fused_stats[key] == want, key
    for model in ("policy", "critic"):
        a = getattr(fused, model) if model == "policy" else fused.critic.module
        b = getattr(stock, model) if model == "policy" else stock.critic.module
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{model}.{name}")
