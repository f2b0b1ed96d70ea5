"""fused_lm_head: response log-probs, entropies, hidden states and every gradient equal the model's
own logits path (to float rounding, in fp32 and under bf16 autocast), without ever holding the
[B, R, V] logits; it steps aside where it cannot know the logits; a PPO step is unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_setups import tiny_llama
from transformers import LlamaConfig

from ppo import PPOConfig, PPOTrainer
from ppo.config_io import ConfigError
from ppo.fastpath import fused_head, gate
from ppo.fastpath.fused_head import fusing
from ppo.forward import policy_logprobs

R = 4  # response tokens


def small_llama():
    return tiny_llama(seed=3, vocab_size=50, hidden_size=32, intermediate_size=64).train()


def batch(vocab):
    ids = torch.randint(3, vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids, mask


def run(model, mode, precision="fp32"):
    model.zero_grad(set_to_none=True)
    ids, mask = batch(model.config.vocab_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with fusing(mode), autocast:
        lp, ent, hidden = policy_logprobs(model, ids, mask, R, 0.8, with_entropy=True, output_hidden=True)
    (lp.sum() + 0.3 * ent.sum() + 0.1 * hidden.float().pow(2).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent.detach(), hidden.detach(), grads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_fused_equals_the_logits_path_values_and_gradients(tiny_policy, family, precision):
    model = tiny_policy.train() if family == "qwen3" else small_llama()
    calls = []
    real = fused_head._fused
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_head, "_fused", lambda *a: calls.append(1) or real(*a))
        fused = run(model, True, precision)
    assert calls  # it did fuse
    stock = run(model, False, precision)
    tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=0, atol=3e-2)
    for got, want in zip(fused[:3], stock[:3]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)
    assert fused[3].keys() == stock[3].keys()
    for name in stock[3]:
        scale = float(stock[3][name].abs().max())
        err = float((fused[3][name] - stock[3][name]).abs().max())
        assert err <= (1e-4 if precision == "fp32" else 3e-2) * max(scale, 1e-3), (name, err, scale)


def test_the_logits_are_never_held(tiny_policy):
    ids, mask = batch(tiny_policy.config.vocab_size)
    vocab = tiny_policy.config.vocab_size
    assert vocab != tiny_policy.config.hidden_size  # so the head's weight [V, H] is not mistaken for logits

    def holds_logits(mode) -> bool:
        saved = []
        with fusing(mode), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            policy_logprobs(tiny_policy, ids, mask, R, 1.0, with_entropy=True)
        return any(len(s) >= 2 and s[-1] == vocab and s.numel() >= ids.shape[0] * R * vocab for s in saved)

    assert not holds_logits(True)
    assert holds_logits(False)  # the check sees them where they are


def test_auto_fuses_only_large_logits(tiny_policy, monkeypatch):
    calls = []
    real = fused_head._fused
    monkeypatch.setattr(fused_head, "_fused", lambda *a: calls.append(1) or real(*a))
    ids, mask = batch(tiny_policy.config.vocab_size)
    with fusing("auto"), torch.no_grad():
        policy_logprobs(tiny_policy, ids, mask, R, 1.0)
    assert not calls
    monkeypatch.setattr(fused_head, "AUTO_MIN_LOGITS", 0)
    with fusing("auto"), torch.no_grad():
        policy_logprobs(tiny_policy, ids, mask, R, 1.0)
    assert calls


def test_it_steps_aside_where_it_cannot_know_the_logits(tiny_policy):
    from transformers import GPT2Config, GPT2LMHeadModel

    gate.reset()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2)).eval()
    ids, mask = batch(40)
    with fusing(True), torch.no_grad():
        assert fused_head.response_logprobs(gpt2, ids, mask, None, torch.arange(4, 8), 1.0, False) is None
        lp, _, _ = policy_logprobs(gpt2, ids, mask, R, 1.0)  # the model's own logits
    assert lp.shape == (3, R) and torch.isfinite(lp).all()
    assert fused_head.architecture_reason(LlamaConfig(vocab_size=8)) is None
    capped = copy.copy(tiny_policy.config)
    capped.final_logit_softcapping = 30.0
    assert "scales the logits" in fused_head.architecture_reason(capped)


def test_lora_on_attention_fuses_and_lora_on_the_head_steps_aside(tiny_policy):
    peft = pytest.importorskip("peft")
    ids, mask = batch(tiny_policy.config.vocab_size)
    for targets, fuses in ((["q_proj", "v_proj"], True), (["lm_head"], False)):
        model = peft.get_peft_model(copy.deepcopy(tiny_policy), peft.LoraConfig(r=2, target_modules=targets))
        with fusing(True), torch.no_grad():
            got = fused_head.response_logprobs(
                model, ids, mask, (mask.cumsum(-1) - 1).clamp_min(0), torch.arange(4, 8), 1.0, False
            )
            stock, _, _ = policy_logprobs(model, ids, mask, R, 1.0) if not fuses else (None, None, None)
        assert (got is not None) == fuses
        if fuses:
            with fusing(False), torch.no_grad():
                stock, _, _ = policy_logprobs(model, ids, mask, R, 1.0)
            torch.testing.assert_close(got[0], stock, rtol=1e-5, atol=1e-5)


def count_w1(completions, **kwargs):
    return [float(c.split().count("w1")) for c in completions]


def test_a_ppo_step_is_the_same_fused_or_not(tiny_policy, tiny_tokenizer):
    results = {}
    for fused in (False, True):
        config = PPOConfig(
            batch_size=4,
            mini_batch_size=2,
            ppo_epochs=2,
            max_new_tokens=6,
            value_head="shared",
            fused_lm_head=fused,
            precision="fp32",
            fp32_matmul="mkl",
            progress_bar=False,
            seed=0,
        )
        trainer = PPOTrainer(config, copy.deepcopy(tiny_policy), tiny_tokenizer, reward_funcs=count_w1)
        stats = trainer.step(["w3 w4", "w5 w6 w7 w8 w9", "w2", "w8 w9 w10"])
        results[fused] = stats, [p.detach().clone() for p in trainer.policy.parameters()]
    (stock, stock_weights), (fused, fused_weights) = results[False], results[True]
    assert fused["generated_texts"] == stock["generated_texts"]
    for key in ("mean_reward", "kl", "loss", "policy_loss", "value_loss", "entropy"):
        assert fused[key] == pytest.approx(stock[key], rel=1e-4, abs=1e-6), key
    assert fused["mismatch/first_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    for a, b in zip(stock_weights, fused_weights):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fused_lm_head_takes_true_false_or_auto():
    assert PPOConfig(fused_lm_head="auto").fused_lm_head == "auto"
    with pytest.raises(ConfigError, match="fused_lm_head must be true, false or auto"):
        PPOConfig(fused_lm_head="sometimes")
